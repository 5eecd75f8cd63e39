"""Drive the CRM sandbox's fault injection through its admin endpoint, as an operator would."""

from __future__ import annotations

from dataclasses import asdict

import requests

from integrations.crm.faults import Faults


def set_faults(sandbox, token: str, **faults) -> dict:
    """Replace the sandbox's faults: the ones named, everything else off."""
    answer = requests.post(
        f"{sandbox.base_url}/_sandbox/faults",
        json={**asdict(Faults()), **faults},
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
    )
    answer.raise_for_status()
    return answer.json()


def traffic(sandbox, token: str) -> dict:
    """Counts by fate, arrival times, rate and busiest second of what the gateway let through."""
    answer = requests.get(
        f"{sandbox.base_url}/_sandbox/traffic",
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
    )
    answer.raise_for_status()
    return answer.json()
