"""ERP support ticket (destination): a helpdesk ticket as the ERP's staging table holds it."""

from __future__ import annotations

import pandera.pandas as pa
from pandera.typing import Series

from integrations.contracts.contract import Contract
from integrations.contracts.rules import CUSTOMER_NUMBER


class ErpSupportTicketV2(pa.DataFrameModel):
    ticket_id: Series[int] = pa.Field(gt=0, unique=True)
    status: Series[str]
    queue: Series[str]
    # The requestor's ERP customer, when the requestor is one (RT user named by customer number).
    customer_number: Series[str] = pa.Field(nullable=True, str_matches=CUSTOMER_NUMBER)
    requestor_email: Series[str] = pa.Field(nullable=True, metadata={"pii": True})
    created_at: Series[pa.DateTime]
    resolved_at: Series[pa.DateTime] = pa.Field(nullable=True)
    last_updated_at: Series[pa.DateTime]

    class Config:
        coerce = True
        strict = True


ERP_SUPPORT_TICKET = Contract(name="erp.support_ticket", version=2, model=ErpSupportTicketV2)
