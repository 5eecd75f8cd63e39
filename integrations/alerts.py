"""Alerts: what went wrong, in which flow, and what to do; posted as Slack-compatible JSON."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import requests

logger = logging.getLogger("handoff.alerts")


@dataclass(frozen=True)
class Alert:
    kind: str  # stale_flow | old_dead_letters | run_failure
    flow: str
    message: str
    what_to_do: str
    details: dict[str, object] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return f"handoff {self.kind}: {self.flow}: {self.message}. What to do: {self.what_to_do}"

    def payload(self) -> dict[str, object]:
        """Slack's incoming-webhook body (`text`), with the alert's fields for machines beside it."""
        return {
            "text": self.text,
            "handoff": {
                "kind": self.kind,
                "flow": self.flow,
                "message": self.message,
                "what_to_do": self.what_to_do,
                "details": self.details,
            },
        }


def post_alert(url: str, alert: Alert, timeout: float = 10.0) -> bool:
    """Post the alert; a receiver that is down is logged, never raised: alerting must not fail."""
    try:
        response = requests.post(url, json=alert.payload(), timeout=timeout)
        response.raise_for_status()
        return True
    except requests.RequestException as error:
        logger.error(
            "could not post the %s alert for %s: %s", alert.kind, alert.flow, type(error).__name__
        )
        return False
