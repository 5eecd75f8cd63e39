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
    """Counts by fate, and the arrival time (s) of each request the gateway let through."""
    answer = requests.get(
        f"{sandbox.base_url}/_sandbox/traffic",
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
    )
    answer.raise_for_status()
    return answer.json()


def achieved_rate(served_at: list[float]) -> float:
    """Requests per second between the first and the last request let through."""
    if len(served_at) < 2:
        return 0.0
    return (len(served_at) - 1) / (served_at[-1] - served_at[0])


def busiest_second(served_at: list[float]) -> int:
    """The most requests let through in any one-second window."""
    best, first = 0, 0
    for last, moment in enumerate(served_at):
        while moment - served_at[first] >= 1.0:
            first += 1
        best = max(best, last - first + 1)
    return best
