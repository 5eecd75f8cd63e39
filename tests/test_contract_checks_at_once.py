"""The contracts' str_matches and str_length run on a column at once answer as pandera's own."""

from __future__ import annotations

import importlib
import pkgutil

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pandera.backends.pandas import builtin_checks

from integrations import contracts
from integrations.contracts import text_checks
from integrations.contracts.contract import Contract, _schema_trusting
from integrations.contracts.erp_customer import ERP_CUSTOMER
from integrations.contracts.rules import COUNTRY_CODE, CUSTOMER_NUMBER, INVOICE_NUMBER

PATTERNS = [CUSTOMER_NUMBER, COUNTRY_CODE, INVOICE_NUMBER, r"^C[0-9]{7}$", r"^(?:A|B)\Z"]
TEXT = st.one_of(
    st.text(max_size=10),
    st.text(alphabet="CO0123456789INV-AZaz\n ", max_size=13),
    st.from_regex(r"C[0-9]{7}", fullmatch=True),
    st.from_regex(r"[A-Z]{2}", fullmatch=True),
)
VALUE = st.one_of(TEXT, st.none(), st.just(np.nan), st.integers())


def _outcome(check, *args, **kwargs):
    try:
        return check(*args, **kwargs)
    except Exception as error:  # the same error either way
        return type(error)


def _same(got, expected) -> None:
    if isinstance(expected, type) or isinstance(got, type):
        assert got == expected
        return
    pd.testing.assert_series_equal(got, expected, check_dtype=False)
    assert got.dtype == expected.dtype or got.dtype == bool


def _series(values: list, null_label: bool) -> pd.Series:
    index = pd.Index([None if null_label and i == 0 else i for i in range(len(values))])
    return pd.Series(values, index, dtype=object, name="field")


@settings(max_examples=300, deadline=None)
@given(st.lists(VALUE, max_size=12), st.sampled_from(PATTERNS), st.booleans())
def test_str_matches_at_once_answers_as_pandera(values, pattern, null_label):
    series = _series(values, null_label)
    expected = _outcome(builtin_checks.str_matches, series, pattern)
    _same(_outcome(text_checks.matches_at_once, series, pattern), expected)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(VALUE, max_size=12),
    st.sampled_from(
        [{"min_value": 1}, {"max_value": 3}, {"min_value": 1, "max_value": 4}, {"exact_value": 2}]
    ),
    st.booleans(),
)
def test_str_length_at_once_answers_as_pandera(values, bounds, null_label):
    series = _series(values, null_label)
    expected = _outcome(builtin_checks.str_length, series, **bounds)
    _same(_outcome(text_checks.length_at_once, series, **bounds), expected)


def test_only_plain_patterns_are_read_at_once():
    assert text_checks.ranges(CUSTOMER_NUMBER) is not None
    assert text_checks.ranges(COUNTRY_CODE) is not None
    assert text_checks.ranges(r"^C[0-9]{7}$") is None  # `$` takes a final newline
    assert text_checks.ranges(r"^(?:A|B)\Z") is None


def test_the_contracts_run_their_text_checks_at_once():
    """pandera swaps a check function named as one of its own for its own: the fast path must
    keep names of its own to be used at all."""
    schema, _ = _schema_trusting(ERP_CUSTOMER.model, frozenset())
    checks = schema.columns["customer_number"].checks + schema.columns["first_name"].checks
    assert [check._check_fn for check in checks] == [
        text_checks.matches_at_once,
        text_checks.length_at_once,
    ]
    plain = ERP_CUSTOMER.schema
    assert [check.error for check in checks] == [
        check.error
        for check in plain.columns["customer_number"].checks + plain.columns["first_name"].checks
    ]


def _contracts() -> list[Contract]:
    found = []
    for module in pkgutil.iter_modules(contracts.__path__):
        loaded = importlib.import_module(f"integrations.contracts.{module.name}")
        found += [value for value in vars(loaded).values() if isinstance(value, Contract)]
    return found


@pytest.mark.parametrize("contract", _contracts(), ids=lambda contract: contract.label)
def test_the_checks_keep_their_order_and_failures(contract):
    plain = contract.model.to_schema()
    fast, _ = _schema_trusting(contract.model, frozenset())
    for name, column in plain.columns.items():
        assert [c.error for c in fast.columns[name].checks] == [c.error for c in column.checks]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.from_regex(r"C[0-9]{7}", fullmatch=True), TEXT, st.none()),
            st.one_of(st.sampled_from(["Ann", "", "Zoë"]), st.none()),
            st.one_of(st.sampled_from(["DE", "de", "DEU", "É1"]), TEXT, st.none()),
        ),
        min_size=1,
        max_size=8,
    ),
    st.booleans(),
)
def test_erp_customer_judged_as_by_pandera(rows, null_label):
    batch = pd.DataFrame(
        {
            "customer_id": range(1, len(rows) + 1),
            "customer_number": [row[0] for row in rows],
            "first_name": [row[1] for row in rows],
            "last_name": "Lee",
            "email": "a@b.de",
            "phone": None,
            "company_name": None,
            "city": None,
            "country": [row[2] for row in rows],
        },
        index=pd.Index([None if null_label and i == 0 else i for i in range(len(rows))]),
    )
    fast = _judged(batch)
    _schema_trusting.cache_clear()
    original = text_checks._AT_ONCE.copy()
    text_checks._AT_ONCE.clear()
    try:
        slow = _judged(batch)
    finally:
        text_checks._AT_ONCE.update(original)
        _schema_trusting.cache_clear()
    if isinstance(slow, str):
        assert fast == slow
        return
    assert fast.rejections == slow.rejections
    pd.testing.assert_frame_equal(fast.valid, slow.valid)


def _judged(batch: pd.DataFrame):
    try:
        return ERP_CUSTOMER.judge(batch.copy())
    except Exception as error:  # the same error either way
        return repr(error)


def test_a_column_of_other_values_goes_through_pandera():
    series = pd.Series([1, "C1234567"], dtype=object)
    expected = builtin_checks.str_matches(series, CUSTOMER_NUMBER)
    pd.testing.assert_series_equal(text_checks.matches_at_once(series, CUSTOMER_NUMBER), expected)
