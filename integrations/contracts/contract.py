"""A contract: a named, versioned pandera model that splits a batch into valid rows and rejections.

Rejection reasons name the column and the rule, never the offending value: values can be PII.
"""

from __future__ import annotations

import functools
import math
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from decimal import Decimal

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandas.api.types import infer_dtype
from pandera.engines import numpy_engine, pandas_engine
from pandera.errors import SchemaErrorReason

from integrations.contracts.text_checks import at_once


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

        Rules look at one row, or at other rows only to refuse a duplicate: a row that passes in
        a batch passes in any part of it. So when every failure is one row's value breaking a
        rule, and coercion made each value what it is whatever the other rows, the rest of the
        batch, as validated, is the valid frame. Otherwise (a value that cannot be coerced also
        fails its whole column's type, which can hide other rules) the rejected rows are set
        aside and the rest validated again, until it passes or only whole-batch failures remain.
        A frame without rows breaks no rule, whatever its columns' types (a batch all held, or
        all refused by the contract before this one, has lost the types its values gave it).
        """
        if batch.empty:
            return Verdict(valid=batch, rejections=[])
        reasons: dict[object, list[str]] = defaultdict(list)
        prepared, settled = self._prepared(batch, reasons)
        remaining = prepared[~prepared.index.isin(list(settled))] if settled else prepared
        while True:
            schema, by_value = self._schema_for(remaining)
            try:
                valid = schema.validate(remaining, lazy=True)
                break
            except pa.errors.SchemaErrors as errors:
                cases, coerced = errors.failure_cases, _uncached(errors.data)
                by_row = by_value and all(e.reason_code in _ROW_RULES for e in errors.schema_errors)
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
            for index, reason, _ in _failures(row_cases):
                if reason not in reasons[index]:
                    reasons[index].append(reason)
            kept = ~remaining.index.isin(row_cases["index"])
            if kept.any() and by_row and len(row_cases) == len(cases):
                valid = coerced[kept]
                break
            remaining = remaining[kept]
            if remaining.empty:
                valid = remaining
                break
        if settled:
            self._other_faults(prepared[prepared.index.isin(list(settled))], settled, reasons)
        rejected = [
            RowRejection(index, f"{self.label}: " + "; ".join(why))
            for index, why in reasons.items()
        ]
        _uncached(remaining)
        return Verdict(valid=_uncached(valid), rejections=rejected)

    def _prepared(
        self, batch: pd.DataFrame, reasons: dict[object, list[str]]
    ) -> tuple[pd.DataFrame, dict[object, set[str]]]:
        """What coercion would get wrong, settled value by value before it runs. A number with
        a fraction in an integer column is refused (coercion cuts 10.7 to 10). Text in a
        date-and-time column is parsed as ISO 8601, else on its own: coercion guesses one format
        from the batch's first value, so a batch of mixed precision ("10:00:00" beside
        "10:00:00.5") failed as a whole, and "03/01/2025" read as a day or a month by its
        neighbours. Text that is no date and time is refused. Returns the batch, its times
        parsed, and the refused rows with the columns each was refused for: they are validated
        apart, without those columns (see `_other_faults`)."""
        schema, settled = self.schema, defaultdict(set)
        for name, column in schema.columns.items():
            if name not in batch:
                continue
            values = batch[name]
            for index in _not_utf8(values):
                reasons[index].append(f"{name} is not UTF-8 text")
                settled[index].add(name)
            for index in _nans(values, column):
                reasons[index].append(f"{name} is NaN (not a number)")
                settled[index].add(name)
            if not (column.coerce or schema.coerce):
                continue
            if _is_integer(column) and values.dtype.kind in "fO":
                refused = list(values.index[_with_fraction(values)])
                for index in refused:
                    reasons[index].append(f"{name} is not a whole number")
            elif _naive_times(column) and values.dtype == object:
                kind = infer_dtype(values, skipna=True)
                # Coercion reads times and dates alike, value by value, but in nanoseconds only.
                if kind in _TIME_KINDS and all(map(_fits_nanoseconds, values)):
                    continue
                parsed, refused = (_parsed_times if kind == "string" else _mixed_times)(values)
                for index in refused:
                    reasons[index].append(f"{name} is not a date and time")
                batch = batch.assign(**{name: parsed})
            elif _naive_dates(column) and _beyond_nanoseconds(values):
                # Coercion to a date goes through nanoseconds: one far day failed every row.
                parsed, refused = _mixed_times(values)
                for index in refused:
                    reasons[index].append(f"{name} is not a date")
                batch = batch.assign(**{name: parsed.dt.date})
            else:
                continue
            for index in refused:
                settled[index].add(name)
        return batch, settled

    def _other_faults(
        self, rows: pd.DataFrame, settled: dict[object, set[str]], reasons: dict[object, list[str]]
    ) -> None:
        """The other fields' faults of rows refused before validation: they are validated apart,
        without the columns they were refused for, so that one letter names every fault (fixing
        one should not reveal the next). Only rules of one field: a rule of the whole row may
        need the refused value. So may a parser of the whole row: whatever it raises without
        that value (a KeyError, a TypeError of the None `frame.get` gave it, pandas' own error
        of `eval`), the row's first faults stand; a field's parser failing is the contract's
        bug, raised."""
        groups: dict[frozenset[str], list[object]] = defaultdict(list)
        for index in rows.index:
            groups[frozenset(settled[index])].append(index)
        for names, indexes in groups.items():
            schema = self.schema.remove_columns(list(names))
            try:
                parsed = _whole_row_parsed(schema, rows.loc[indexes].drop(columns=list(names)))
            except Exception:  # it may need the refused value (see the docstring)
                continue
            schema.parsers = []  # run above; remove_columns made this schema a copy
            try:
                schema.validate(parsed, lazy=True)
            except pa.errors.SchemaErrors as errors:
                for index, reason, whole_row in _failures(errors.failure_cases):
                    if not whole_row and index in reasons and reason not in reasons[index]:
                        reasons[index].append(reason)

    def _schema_for(self, frame: pd.DataFrame) -> tuple[pa.DataFrameSchema, bool]:
        """The model's schema, leaving alone the columns of `frame` that already hold what
        coercion would make of them, and whether it coerces value by value."""
        columns = self.schema.columns
        typed = frozenset(
            name
            for name, values in frame.items()
            if name in columns and _holds(columns[name], values)
        )
        return _schema_trusting(self.model, typed)


def kind_of(contract: Contract, field: str) -> str:
    """The contract field's kind: str, int, float, bool, datetime or date."""
    dtype = str(contract.schema.columns[field].dtype).lower().removeprefix("u")  # uint: int
    for kind in ("datetime", "date", "int", "float", "bool"):
        if dtype.startswith(kind):
            return kind
    return "str"


def _whole_row_parsed(schema: pa.DataFrameSchema, frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` through the schema's parsers of the whole row alone, as validating runs them
    first (before coercion, the fields' parsers and every rule)."""
    if not schema.parsers:
        return frame
    return pa.DataFrameSchema(parsers=schema.parsers).validate(frame)


# Failures of one row's value. Any other (a coercion, a type, a missing column) can hide the
# outcome of other rules for a whole column.
_ROW_RULES = frozenset(
    {
        SchemaErrorReason.DATAFRAME_CHECK,
        SchemaErrorReason.SERIES_CONTAINS_NULLS,
        SchemaErrorReason.SERIES_CONTAINS_DUPLICATES,
        SchemaErrorReason.DUPLICATES,
    }
)
_STR = pandas_engine.Engine.dtype(str)


def _uncached(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` without the accessors cached on it and on its cached columns by validation
    (`frame.pandera`, a column's `.str`). Each refers back to its object: a reference cycle
    that would hold the batch's memory until a full garbage collection."""
    frame.__dict__.pop("pandera", None)
    for column in getattr(frame, "_item_cache", {}).values():
        column.__dict__.pop("str", None)
    return frame


def _holds(column: pa.Column, values: pd.Series) -> bool:
    """Whether coercion would leave `values` as they are, and they have the column's type.

    A str column holding only str and nulls is left as it is (pandera keeps the nulls and turns
    the rest into str); any other, when its dtype is already the declared one. A parser or a
    default changes values before coercion, and a pattern names many columns: never trusted.
    """
    if column.parsers or column.default is not None or column.regex:
        return False
    if column.dtype == _STR:
        return values.dtype == object and infer_dtype(values, skipna=True) in {"string", "empty"}
    if isinstance(column.dtype, pandas_engine.Date):  # coercion goes through nanoseconds
        return values.dtype == object and infer_dtype(values, skipna=True) in {"date", "empty"}
    return column.dtype is not None and pandas_engine.Engine.dtype(values.dtype) == column.dtype


@functools.cache
def _schema_trusting(
    model: type[pa.DataFrameModel], typed: frozenset[str]
) -> tuple[pa.DataFrameSchema, bool]:
    """The model's schema without type or coercion for the `typed` columns (every rule stays),
    and whether it coerces value by value.

    Pandera checks a str column's type element by element (the slowest part of validating clean
    text), and writes back every column, a copy apiece, when the schema rather than the column
    coerces: so coercion moves to the other columns. A schema that coerces more than its
    columns (an index, a frame-wide dtype, parsers) is kept whole. Numpy's coercions go value
    by value; pandas' may not (a date's format is guessed from the first date in the batch).
    """
    schema = _checks_at_once(model.to_schema())
    if schema.dtype is not None or schema.index is not None or schema.parsers:
        return schema, False
    by_value = all(
        not column.parsers
        and (name in typed or isinstance(column.dtype, numpy_engine.DataType | None))
        for name, column in schema.columns.items()
    )
    if not typed:
        return schema, by_value
    trusting = schema.update_columns(
        {
            name: {"dtype": None, "coerce": False}
            if name in typed
            else {"coerce": column.coerce or schema.coerce}
            for name, column in schema.columns.items()
        }
    )
    trusting.coerce = False
    return trusting, by_value


def _checks_at_once(schema: pa.DataFrameSchema) -> pa.DataFrameSchema:
    """`schema` with its columns' `str_matches` and `str_length` run on a column at once (see
    integrations/contracts/text_checks.py), in the same order: a copy, when there are any."""
    changed = {
        name: {"checks": [at_once(check) for check in column.checks]}
        for name, column in schema.columns.items()
        if any(at_once(check) is not check for check in column.checks)
    }
    return schema.update_columns(changed) if changed else schema


def _not_utf8(values: pd.Series) -> list[object]:
    """The rows whose text holds bytes that are no UTF-8, kept as lone surrogates (a SQLite
    source's Latin-1 text, see integrations/sql/source.py): no destination, hash or JSON takes
    them. One encoding of the whole column finds there are none, the common case."""
    if values.dtype != object:
        return []
    texts = values.to_numpy()
    try:
        try:
            "".join(texts).encode()  # in C, without a pass for nulls where there are none
        except TypeError:  # a null, or a value that is no str
            _texts_alone(texts)
    except UnicodeEncodeError:
        return [index for index, value in values.items() if holds_surrogates(value)]
    return []


def _texts_alone(texts: np.ndarray) -> None:
    """Encode the texts among `texts`: those left once None and empty text are (in C, half the
    time of a test of each value), or, when a value is no text (NaN, a number), each text."""
    try:
        "".join(filter(None, texts)).encode()
    except TypeError:
        "".join(value for value in texts if isinstance(value, str)).encode()


def holds_surrogates(value: object) -> bool:
    """Whether `value` is text holding bytes that are no UTF-8, kept as lone surrogates."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return True
    return False


def _nans(values: pd.Series, column: pa.Column) -> list[object]:
    """The rows holding the value NaN (a PostgreSQL float's or numeric's 'NaN'), which pandas,
    pandera's rules and a mapping would each take for a missing value: a nullable field wrote
    it as NULL, a change between the two was never seen. A source keeps it apart from NULL in
    a nullable Float64 column (see integrations/sql/source.py), or as Decimal('NaN'). A text
    field's values are left to coercion, as any number in it is (a pass over every text column
    cost a tenth of the contract's time)."""
    if column.dtype == _STR:
        return []
    if isinstance(values.array, pd.arrays.FloatingArray):
        return list(values.index[np.isnan(values.array.to_numpy("float64", na_value=0.0))])
    if values.dtype != object or not values.hasnans:  # float64's NaN is a NULL
        return []
    return list(values.index[values.map(_is_decimal_nan).astype(bool)])


def _is_decimal_nan(value: object) -> bool:
    return isinstance(value, Decimal) and value.is_nan()


def _is_integer(column: pa.Column) -> bool:
    kind = getattr(column.dtype, "type", None)
    return kind is not None and pd.api.types.is_integer_dtype(kind)


def _with_fraction(values: pd.Series) -> pd.Series:
    """Whether each value is a finite number with a fraction (floats, or Decimals as a NUMERIC
    column gives them)."""
    if values.dtype.kind == "f":
        numbers = values.to_numpy("float64", na_value=np.nan)  # Float64's NA too
        return pd.Series(np.isfinite(numbers) & (numbers != np.trunc(numbers)), values.index)
    return values.map(_has_fraction).astype(bool)


def _has_fraction(value: object) -> bool:
    if isinstance(value, Decimal):
        return value.is_finite() and value != value.to_integral_value()
    return isinstance(value, float) and math.isfinite(value) and not value.is_integer()


def _naive_times(column: pa.Column) -> bool:
    """A date-and-time column without a zone, read by pandas' default rules: the one whose text
    the contract reads itself. A zoned one, or one with its own `to_datetime_kwargs` (a format,
    day first), is left to pandera as it is declared."""
    dtype = column.dtype
    return (
        isinstance(dtype, pandas_engine.DateTime)
        and dtype.tz is None
        and not getattr(dtype, "to_datetime_kwargs", None)
    )


def _naive_dates(column: pa.Column) -> bool:
    """A date column read by pandas' default rules (no `to_datetime_kwargs` of its own)."""
    dtype = column.dtype
    return isinstance(dtype, pandas_engine.Date) and not getattr(dtype, "to_datetime_kwargs", None)


def _beyond_nanoseconds(values: pd.Series) -> bool:
    """Whether a date field's values hold a time past pandas' nanoseconds: a date-and-time
    field's column in microseconds (see `_in_unit`) mapped to it, or a database's datetimes.
    Python's dates alone are taken as they are (see `_holds`)."""
    if values.dtype.kind == "M":
        return values.dt.unit != "ns"
    if values.dtype != object or infer_dtype(values, skipna=True) == "date":
        return False
    return not all(map(_fits_nanoseconds, values))


def _parsed_times(texts: pd.Series) -> tuple[pd.Series, list[object]]:
    """ISO 8601 texts as times (with an offset: in UTC, without zone); any other text as pandas
    reads it alone; and the texts that are no time at all. Text pandas reads as no time ("",
    "NaT") is a null, as coercion made it. Times of years 1 to 9999 all fit (see `_in_unit`)."""
    parsed = pd.to_datetime(texts, format="ISO8601", errors="coerce", utc=True)
    refused, alone = [], {}
    for index in texts.index[texts.notna() & parsed.isna()]:
        try:
            time = pd.Timestamp(texts[index])
        except (ValueError, TypeError, OverflowError):
            refused.append(index)
            continue
        if time is not pd.NaT:
            alone[index] = time.tz_localize("UTC") if time.tzinfo is None else time
    return _in_unit(parsed, alone).dt.tz_localize(None), refused


_TIME_KINDS = frozenset({"datetime", "datetime64", "date", "empty"})


def _mixed_times(values: pd.Series) -> tuple[pd.Series, list[object]]:
    """Times beside text (a SQLite column holds both when some of its text is no time), beside
    what is no time at all (a number), or past what nanoseconds hold: each value on its own, as
    `_parsed_times` reads text; anything but text and times is refused."""
    parsed = pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns]")
    refused, alone = [], {}
    for index, value in values.items():
        if not isinstance(value, str | date) or pd.isna(value):
            if pd.notna(value):
                refused.append(index)
            continue
        try:
            time = pd.Timestamp(value)
        except (ValueError, TypeError, OverflowError):
            refused.append(index)
            continue
        if time is not pd.NaT:
            alone[index] = time if time.tzinfo is None else time.tz_convert("UTC").tz_localize(None)
    return _in_unit(parsed, alone), refused


def _in_unit(parsed: pd.Series, alone: dict[object, pd.Timestamp]) -> pd.Series:
    """`parsed` with the `alone` times set, in nanoseconds when they all fit (years 1677 to
    2262, pandas' default), else in microseconds: an ERP's "valid forever", 9999-12-31, is a
    time like any other."""
    unit = "ns" if all(map(_fits_nanoseconds, alone.values())) else "us"
    parsed = parsed.dt.as_unit(unit).copy()  # a view of the old column otherwise
    for index, time in alone.items():
        parsed[index] = time.as_unit(unit)
    return parsed


def _fits_nanoseconds(value: object) -> bool:
    """Whether a time (or anything else: left to coercion) fits pandas' nanoseconds."""
    if not isinstance(value, date) or 1678 <= value.year <= 2261:
        return True
    try:
        pd.Timestamp(value).as_unit("ns")
    except (ValueError, OverflowError):  # out of bounds
        return False
    return True


def _failures(cases: pd.DataFrame) -> Iterator[tuple[object, str, bool]]:
    """Each failure's row, the rule it broke in words (its field's name first), and whether the
    rule is the whole row's."""
    for index, context, column, check in zip(
        cases["index"], cases["schema_context"], cases["column"], cases["check"], strict=True
    ):
        whole_row = context == "DataFrameSchema"
        yield index, _readable(check) if whole_row else f"{column} {_readable(check)}", whole_row


def _readable(check: object) -> str:
    """A rule in words: pandera's own names for a type it could not make ("coerce_dtype(
    'datetime64[ns]')") or did not find ("dtype('int64')") read as what the value is not."""
    text = str(check)
    if text in _READABLE_CHECKS:
        return _READABLE_CHECKS[text]
    typed = _TYPE_CHECK.fullmatch(text)
    if typed is None:
        return text
    kind = typed["dtype"]
    if kind.startswith("datetime64"):  # pandas holds times from 1677 to 2262 only
        return "is not a date and time (of the years 1677 to 2262)"
    return f"is not {_TYPE_WORDS.get(kind.rstrip('0123456789'), f'of type {kind}')}"


_TYPE_CHECK = re.compile(r"(?:coerce_dtype|dtype)\('(?P<dtype>[^']+)'\)")
_TYPE_WORDS = {
    "int": "a whole number",
    "Int": "a whole number",
    "uint": "a whole number",
    "UInt": "a whole number",
    "float": "a number",
    "Float": "a number",
    "bool": "true or false",
    "str": "text",
    "string": "text",
    "object": "text",
}
