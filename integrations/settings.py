"""Where things live, read from the environment; unset means the embedded default."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from integrations.engine.state import MissingSecret

# Real data nobody here wrote (DESIGN.md): the Chinook music store, beside the repository.
CHINOOK_DATASET = (
    Path(__file__).resolve().parents[2] / "shared/datasets/chinook/Chinook_Sqlite.sqlite"
)


def handoff_home() -> Path:
    """The folder of the embedded SQLite files (`HANDOFF_HOME`, default `.handoff/`)."""
    home = Path(os.environ.get("HANDOFF_HOME") or ".handoff").resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def _sqlite_url(filename: str) -> str:
    return f"sqlite:///{handoff_home() / filename}"


def database_url_variable(system: str) -> str:
    """The variable naming a system's database: `ERP_DATABASE_URL`, `FINANCE_DATABASE_URL`, …"""
    return f"{system.upper()}_DATABASE_URL"


def erp_database_url() -> str:
    """The ERP (system of record): `ERP_DATABASE_URL` or the embedded SQLite file."""
    return os.environ.get("ERP_DATABASE_URL") or _sqlite_url("erp.sqlite")


def finance_database_url() -> str:
    """The finance reporting database: `FINANCE_DATABASE_URL` or the embedded SQLite file."""
    return os.environ.get("FINANCE_DATABASE_URL") or _sqlite_url("finance.sqlite")


def chinook_database_url() -> str:
    """Chinook, the second ERP: `CHINOOK_DATABASE_URL`, or a copy of the shared Chinook file in
    `HANDOFF_HOME` (the shared file is read-only; SQLite's WAL needs to write beside it)."""
    if os.environ.get("CHINOOK_DATABASE_URL"):
        return os.environ["CHINOOK_DATABASE_URL"]
    if not CHINOOK_DATASET.exists():  # read-only: its absence is an error naming it, no empty copy
        return f"sqlite:///file:{CHINOOK_DATASET}?mode=ro&uri=true"
    copy = handoff_home() / "chinook.sqlite"
    if not copy.exists() or copy.stat().st_size == 0:  # an empty one: SQLite made it, unasked
        shutil.copyfile(CHINOOK_DATASET, copy)
        copy.chmod(0o644)
    return f"sqlite:///{copy}"


def state_url() -> str:
    """Ledger, cursors, DLQ and audit trail: `HANDOFF_STATE_URL` or the embedded SQLite file."""
    return os.environ.get("HANDOFF_STATE_URL") or _sqlite_url("state.sqlite")


def crm_base_url() -> str:
    """The CRM endpoint: `CRM_BASE_URL` or the local sandbox's default address."""
    return os.environ.get("CRM_BASE_URL") or "http://127.0.0.1:8765"


def dlq_key() -> str | None:
    """The Fernet key that encrypts dead-letter payloads at rest (`HANDOFF_DLQ_KEY`)."""
    return os.environ.get("HANDOFF_DLQ_KEY") or None


def crm_access_token() -> str | None:
    return os.environ.get("CRM_ACCESS_TOKEN") or None


def crm_requests_per_second() -> float | None:
    """The CRM's API request limit (`CRM_REQUESTS_PER_SECOND`); unset: no client-side limit."""
    value = os.environ.get("CRM_REQUESTS_PER_SECOND")
    if not value:
        return None
    try:
        limit = float(value)
    except ValueError:
        limit = math.nan
    # `10/s` stopped the load with a bare ValueError; 0, a negative one or inf limited nothing.
    if not 0 < limit < math.inf:
        raise MissingSecret(
            f"CRM_REQUESTS_PER_SECOND is {value!r}, not a number of requests a second above 0: "
            "set it to your CRM's limit (HubSpot's tier, e.g. 10), or unset it for no limit"
        )
    return limit


def crm_sandbox_path() -> Path:
    return handoff_home() / "crm_sandbox.sqlite"


def rt_base_url() -> str | None:
    """Request Tracker's base URL (`RT_BASE_URL`); unset means no helpdesk."""
    return os.environ.get("RT_BASE_URL") or None


def local_rt_home() -> Path:
    """The folder of the throwaway local RT (`handoff rt start`): `RT_HOME` or under HANDOFF_HOME."""
    return Path(os.environ.get("RT_HOME") or handoff_home() / "rt").resolve()
