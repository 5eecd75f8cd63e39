"""Secrets come only from the environment, and a missing one stops the code location at load."""

from __future__ import annotations

import os

from integrations.engine.state import MissingSecret

# Each secret the code location needs, and what it is for (said in the error when it is missing).
SECRETS = {
    "CRM_ACCESS_TOKEN": "the CRM's bearer token (the demo writes one to $HANDOFF_HOME/crm_token)",
    "HANDOFF_DLQ_KEY": "the Fernet key that encrypts dead-letter payloads at rest "
    "(`handoff dlq keygen` makes one; keep it, or old payloads become unreadable)",
}


def require_secrets(names: dict[str, str] = SECRETS) -> None:
    """Raise one error naming every missing secret, before any run can start."""
    missing = [name for name in names if not os.environ.get(name)]
    if missing:
        raise MissingSecret(
            "handoff cannot load: "
            + "; ".join(f"{name} is not set ({names[name]})" for name in missing)
            + ". Set it in the code location's environment and reload"
        )


def require_helpdesk_credentials() -> None:
    """With RT configured (RT_BASE_URL): an auth token, or a user and password."""
    if not os.environ.get("RT_TOKEN"):
        require_secrets(
            {
                "RT_USER": "the RT user handoff acts as (or set RT_TOKEN instead)",
                "RT_PASSWORD": "that RT user's password (or set RT_TOKEN instead)",
            }
        )
