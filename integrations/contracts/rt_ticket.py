"""RT ticket (source): what a ticket read from RT's REST2 API must hold to be staged in the ERP."""

from __future__ import annotations

import pandera.pandas as pa
from pandera.typing import Series

from integrations.contracts.contract import Contract


class RtTicketV1(pa.DataFrameModel):
    id: Series[int] = pa.Field(gt=0, unique=True)
    Status: Series[str] = pa.Field(str_length={"min_value": 1})
    Queue: Series[str] = pa.Field(str_length={"min_value": 1})
    # The first requestor: RT's user name (an ERP customer number for synced customers).
    RequestorName: Series[str] = pa.Field(nullable=True, metadata={"pii": True})
    RequestorEmail: Series[str] = pa.Field(nullable=True, metadata={"pii": True})
    Created: Series[pa.DateTime]
    Resolved: Series[pa.DateTime] = pa.Field(nullable=True)
    LastUpdated: Series[pa.DateTime]

    class Config:
        coerce = True
        strict = False


RT_TICKET = Contract(name="rt.ticket", version=1, model=RtTicketV1)
