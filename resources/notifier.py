import logging

import dagster as dg

from integrations.alerts import Alert, post_alert

logger = logging.getLogger("handoff.alerts")


class Notifier(dg.ConfigurableResource):
    """Sends alerts to the log, always, and to a webhook (Slack-compatible) when one is set."""

    webhook_url: str | None = None

    def send(self, alert: Alert) -> None:
        logger.warning(alert.text)
        if self.webhook_url:
            post_alert(self.webhook_url, alert)
