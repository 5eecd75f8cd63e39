"""A contract: a named, versioned pandera model that splits a batch into valid rows and rejections.

Rejection reasons name the column and the rule, never the offending value: values can be PII.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import pandas as pd
import pandera.pandas as pa


@dataclass(frozen=True)
class RowRejection:
    """One row that failed its contract, with every rule it broke."""

    index: object
    reason: str


@dataclass(frozen=True)
class Verdict:
    valid: pd.DataFrame
    rejections: list[RowRejection]


class ContractViolation(Exception):
    """The batch as a whole does not fit the contract (a missing column, a wrong type)."""


_READABLE_CHECKS = {"not_nullable": "is missing", "field_uniqueness": "is not unique"}


@dataclass(frozen=True)
class Contract:
    """A dataset's contract. Bump `version` whenever the model's rules change."""

    name: str
    version: int
    model: type[pa.DataFrameModel]

    @property
    def label(self) -> str:
        return f"{self.name}@v{self.version}"

    @property
    def schema(self) -> pa.DataFrameSchema:
        return self.model.to_schema()

    @property
    def pii_fields(self) -> frozenset[str]:
        """Fields marked `metadata={"pii": True}`: masked wherever a person reads them."""
        return frozenset(
            name
            for name, column in self.schema.columns.items()
            if (column.metadata or {}).get("pii")
        )

    def judge(self, batch: pd.DataFrame) -> Verdict:
        """Validate lazily (all failures at once) and split the batch by row.

        A value that cannot be coerced fails its row, and can also fail a whole column's check
        (the column keeps the wrong type); so rejected rows are set aside and the rest validated
        again, until it passes or only whole-batch failures remain.
        """
        reasons: dict[object, list[str]] = defaultdict(list)
        remaining = batch
        while True:
            try:
                valid = self.model.validate(remaining, lazy=True)
                break
            except pa.errors.SchemaErrors as errors:
                cases = errors.failure_cases
            row_cases = cases[cases["index"].notna() & cases["index"].isin(remaining.index)]
            if row_cases.empty:
                whole = cases[cases["index"].isna()]
                rules = "; ".join(
                    f"{column}: {_readable(check)}"
                    for column, check in zip(whole["column"], whole["check"], strict=True)
                )
                raise ContractViolation(
                    f"{self.label}: the batch does not fit the contract: {rules}"
                )
            for index, context, column, check in zip(
                row_cases["index"],
                row_cases["schema_context"],
                row_cases["column"],
                row_cases["check"],
                strict=True,
            ):
                whole_row = context == "DataFrameSchema"
                reason = _readable(check) if whole_row else f"{column} {_readable(check)}"
                if reason not in reasons[index]:
                    reasons[index].append(reason)
            remaining = remaining.drop(index=list(set(row_cases["index"])))
            if remaining.empty:
                valid = remaining
                break
        rejected = [
            RowRejection(index, f"{self.label}: " + "; ".join(why))
            for index, why in reasons.items()
        ]
        return Verdict(valid=valid, rejections=rejected)


def _readable(check: object) -> str:
    text = str(check)
    return _READABLE_CHECKS.get(text, text)
