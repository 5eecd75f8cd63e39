"""Versioned data contracts (pandera models), one per dataset, and how rows are judged by them."""

from integrations.contracts.contract import Contract, RowRejection, Verdict

__all__ = ["Contract", "RowRejection", "Verdict"]
