"""RT tickets → ERP staging: what customers asked the helpdesk, for the ERP's service reporting."""

from __future__ import annotations

import pandas as pd

from integrations.contracts.erp_support_ticket import ERP_SUPPORT_TICKET
from integrations.contracts.rt_ticket import RT_TICKET
from integrations.engine.spec import FlowSpec, SourceTable, Target

CUSTOMER_NUMBER = r"C\d{7}"


def ticket_to_staging_row(tickets: pd.DataFrame) -> pd.DataFrame:
    """Each field by its meaning in the ERP's staging table."""
    # RT compares user names without case: "c0000001" is customer C0000001's user.
    requestor = tickets["RequestorName"].astype("string").str.upper()
    return pd.DataFrame(
        {
            "ticket_id": tickets["id"],
            "status": tickets["Status"],
            "queue": tickets["Queue"],
            # helpdesk/users names each customer's RT user by the customer number, and RT files
            # a customer's mail under that user (it matches addresses ignoring case).
            "customer_number": requestor.where(requestor.str.fullmatch(CUSTOMER_NUMBER), None),
            "requestor_email": tickets["RequestorEmail"].str.lower(),
            "created_at": tickets["Created"],
            "resolved_at": tickets["Resolved"],
            "last_updated_at": tickets["LastUpdated"],
        },
        index=tickets.index,
    ).astype({"customer_number": object})


ERP_SUPPORT_TICKETS = FlowSpec(
    name="helpdesk_tickets_to_erp_support_tickets",
    description="RT tickets into the ERP's `support_tickets` staging table by ticket id, read by "
    "TicketSQL on LastUpdated with a lookback; the requestor is mapped back to the ERP customer.",
    source=SourceTable(
        table="tickets", key="id", cursor="LastUpdated", system="helpdesk", deleted=None
    ),
    source_contract=RT_TICKET,
    target=Target(system="erp", dataset="support_tickets", id_property="ticket_id"),
    target_contract=ERP_SUPPORT_TICKET,
    mapping=ticket_to_staging_row,
    pool="rt_api",
    archive_deleted=False,
)
