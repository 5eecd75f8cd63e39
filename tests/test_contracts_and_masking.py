"""Contracts split batches by row with readable reasons; PII keeps its shape but not its value."""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Iterator
from decimal import Decimal

import pandas as pd
import pandera.pandas as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pandera.engines import pandas_engine
from pandera.typing import Series

from assets.crm_contacts import customer_to_contact
from integrations import contracts
from integrations.contracts import Contract
from integrations.contracts.contract import _not_utf8
from integrations.contracts.crm_contact import CRM_CONTACT
from integrations.contracts.erp_customer import ERP_CUSTOMER
from integrations.contracts.erp_invoice import ERP_INVOICE
from integrations.contracts.rules import EMAIL_PATTERN, is_email
from integrations.engine.hashing import content_hash, idempotency_key
from integrations.engine.masking import mask_email, mask_record, scrub


def customers(**overrides: list) -> pd.DataFrame:
    base = {
        "customer_id": [1, 2, 3, 4],
        "customer_number": ["C0000001", "C0000002", "C0000003", "C0000004"],
        "first_name": ["Ada", "Alan", "Grace", "Edsger"],
        "last_name": ["Lovelace", "Turing", "Hopper", "Dijkstra"],
        "email": ["ada@example.com", "alan@example", "Grace.H@Example.com", "ADA@example.com"],
        "phone": [None, "+44 1", "+1 2", "+31 3"],
        "company_name": [None, "Bletchley", None, None],
        "city": ["London", None, "Arlington", "Austin"],
        "country": ["GB", "GB", None, "NL"],
    }
    return pd.DataFrame({**base, **overrides}).set_axis(["1", "2", "3", "4"])


def test_source_contract_names_each_broken_rule_without_the_value():
    verdict = ERP_CUSTOMER.judge(customers())
    reasons = {rejection.index: rejection.reason for rejection in verdict.rejections}
    assert set(reasons) == {"2", "3"}
    assert reasons["2"] == "erp.customer@v2: email is not a valid email address"
    assert reasons["3"] == "erp.customer@v2: country is missing"
    assert all("alan@" not in reason for reason in reasons.values())
    assert list(verdict.valid.index) == ["1", "4"]


def test_a_key_or_code_is_refused_with_a_newline_at_its_end_or_another_script_s_digits():
    """`^C\\d{7}$` took "C1234567\\n" (Python's `$` matches before a final newline) and
    "C١٢٣٤٥٦٧": a key a trimmed or corrected ERP row no longer had, written to the CRM as is."""
    numbers = ["C0000001", "C0000002\n", "C٠٠٠٠٠٠٣", "C0000004"]
    verdict = ERP_CUSTOMER.judge(
        customers(country=["GB\n", "GB", "US", "NL"], customer_number=numbers)
    )
    reasons = {rejection.index: rejection.reason for rejection in verdict.rejections}
    assert set(reasons) == {"1", "2", "3"}
    assert reasons["1"].startswith("erp.customer@v2: country str_matches(")
    assert "customer_number str_matches(" in reasons["2"]
    assert reasons["3"].startswith("erp.customer@v2: customer_number str_matches(")
    assert list(verdict.valid.index) == ["4"]


def _patterns() -> Iterator[tuple[str, str, str]]:
    """(contract, field, pattern) of every `str_matches` rule of the project's contracts."""
    for module in pkgutil.iter_modules(contracts.__path__):
        for value in vars(importlib.import_module(f"{contracts.__name__}.{module.name}")).values():
            if isinstance(value, Contract):
                for name, column in value.schema.columns.items():
                    for check in column.checks:
                        if check.name == "str_matches":
                            yield value.label, name, check.statistics["pattern"]


def test_every_pattern_of_a_contract_is_of_the_whole_value_in_ascii_digits():
    """A pattern ending in `$` takes a value with a newline at its end, `\\d` another script's
    digits: the contracts use `rules.whole` and `[0-9]`."""
    found = list(_patterns())
    assert len(found) > 20
    loose = [(label, name, p) for label, name, p in found if p.endswith("$") or "\\d" in p]
    assert loose == []


def test_target_contract_refuses_the_second_email_that_differs_only_in_case():
    valid = ERP_CUSTOMER.judge(customers()).valid
    verdict = CRM_CONTACT.judge(customer_to_contact(valid))
    assert [(r.index, r.reason) for r in verdict.rejections] == [
        ("4", "crm.contact@v2: email is used by another customer in this batch (ignoring case)")
    ]
    assert verdict.valid["email"].tolist() == ["ada@example.com"]


def invoices(dates: list[str]) -> pd.DataFrame:
    """Two invoices, the first with a malformed number, their dates as text."""
    return pd.DataFrame(
        {
            "invoice_id": [1, 2],
            "invoice_number": ["bad", "INV-00000002"],
            "customer_id": [1, 1],
            "customer_number": ["C0000001", "C0000001"],
            "invoice_date": dates,
            "amount": [10.0, 20.0],
            "currency": ["EUR", "EUR"],
            "status": ["open", "paid"],
        }
    ).set_axis(["1", "2"])


@pytest.mark.parametrize(
    ("contract", "batch"),
    [
        (ERP_CUSTOMER, customers()),
        # A value that cannot be coerced fails its row, and the column's type with it.
        (ERP_CUSTOMER, customers(customer_id=[1, "two", 3, 4], phone=[44, None, None, None])),
        # The rejected row's date decides how pandas reads the other's (day first).
        (ERP_INVOICE, invoices(["13/02/2024", "01/02/2024"])),
    ],
)
@pytest.mark.filterwarnings(
    "ignore:Parsing dates in:UserWarning"
)  # the ambiguous dates are the case
def test_valid_rows_come_out_as_the_model_makes_them_alone(contract, batch):
    verdict = contract.judge(batch)
    assert verdict.rejections and not verdict.valid.empty
    alone = contract.model.validate(batch.loc[verdict.valid.index])
    pd.testing.assert_frame_equal(verdict.valid, alone, check_exact=True)


def test_text_times_are_read_each_as_itself_whatever_the_batch():
    """ISO texts of mixed precision failed the whole batch (pandas guessed one format from the
    first), and an ambiguous date read as its neighbours made it: now each is read alone."""
    stamped = invoices(["2024-02-01 10:00:00", "2024-02-01T10:00:00.5+01:00"])
    verdict = ERP_INVOICE.judge(stamped.assign(invoice_number=["INV-00000001", "INV-00000002"]))
    assert verdict.rejections == []
    assert verdict.valid["invoice_date"].tolist() == [
        pd.Timestamp("2024-02-01 10:00:00"),
        pd.Timestamp("2024-02-01 09:00:00.5"),  # UTC
    ]
    for neighbour in ("13/02/2024", "not a date"):
        verdict = ERP_INVOICE.judge(invoices([neighbour, "01/02/2024"]))
        assert verdict.valid.loc["2", "invoice_date"] == pd.Timestamp("2024-01-02")
    (refused,) = ERP_INVOICE.judge(invoices(["x", "2024-01-02"])).rejections
    assert (refused.index, refused.reason) == (  # and its other fault, in the same letter
        "1",
        "erp.invoice@v2: invoice_date is not a date and time; "
        "invoice_number str_matches('^INV-[0-9]{8}\\Z')",
    )


class StampedV1(pa.DataFrameModel):
    at: Series[pa.DateTime] = pa.Field(nullable=True)
    day_first: Series[pandas_engine.DateTime] = pa.Field(
        nullable=True, dtype_kwargs={"to_datetime_kwargs": {"format": "%d/%m/%Y"}}
    )

    class Config:
        coerce = True


def test_text_times_of_any_year_empty_or_in_a_declared_format():
    """Year 1 or 9999 is a time (pandas holds neither in nanoseconds: they were refused); ""
    stays a null; a field's own format is the contract's to apply."""
    batch = pd.DataFrame(
        {
            "at": ["0001-01-01T00:00:00", "9999-12-31", "", "2025-01-03 10:00"],
            "day_first": ["03/01/2025"] * 4,
        }
    ).set_axis(["1", "2", "3", "4"])
    verdict = Contract("t", 1, StampedV1).judge(batch)
    assert verdict.rejections == []
    at = verdict.valid["at"]
    assert at.dtype == "datetime64[us]"
    assert at.tolist()[:2] + at.tolist()[3:] == [
        pd.Timestamp("0001-01-01"),
        pd.Timestamp("9999-12-31"),
        pd.Timestamp("2025-01-03 10:00"),
    ]
    assert pd.isna(at.iloc[2])
    assert verdict.valid["day_first"].tolist() == [pd.Timestamp("2025-01-03")] * 4
    ordinary = Contract("t", 1, StampedV1).judge(batch.iloc[3:])
    assert ordinary.valid["at"].dtype == "datetime64[ns]", "pandas' default, where it holds"


def test_times_and_values_of_the_wrong_type_are_refused_in_words():
    """A time pandas cannot hold where the contract leaves coercion to pandera (a field of its
    own format, as a database gives it: a datetime of year 9999), and text in a number field
    were refused as "coerce_dtype('datetime64[ns]')" and "dtype('float64')"."""
    from datetime import datetime

    batch = pd.DataFrame(
        {
            "at": [datetime(9999, 12, 31), datetime(2025, 1, 3), datetime(2025, 1, 4)],
            "day_first": [datetime(9999, 12, 31), None, None],
        }
    ).set_axis(["1", "2", "3"])
    verdict = Contract("t", 1, StampedV1).judge(batch)
    assert [(r.index, r.reason) for r in verdict.rejections] == [
        ("1", "t@v1: day_first is not a date and time (of the years 1677 to 2262)")
    ]
    # Beside text that is no time (PostgreSQL's 'infinity'), it failed the whole batch.
    mixed = batch.assign(
        at=[datetime(9999, 12, 31), "infinity", datetime(2025, 1, 4)], day_first=None
    )
    verdict = Contract("t", 1, StampedV1).judge(mixed)
    assert [(r.index, r.reason) for r in verdict.rejections] == [
        ("2", "t@v1: at is not a date and time"),
    ]
    assert verdict.valid["at"].tolist() == [
        pd.Timestamp("9999-12-31"),
        pd.Timestamp("2025-01-04"),
    ]
    totals = pd.DataFrame({"count": [1, 2], "total": [2.0, "two"]}).set_axis(["1", "2"])
    (refused,) = Contract("t", 1, CountedV1).judge(totals).rejections
    assert (refused.index, refused.reason) == (
        "2",
        "t@v1: total is not twice the count; total is not a number",
    )


def test_a_number_with_a_fraction_is_refused_by_an_integer_field_not_cut():
    """Coercion made 10.7 a 10, silently; a whole 3.0 or Decimal('4.00') is still 3 and 4. The
    letter names the row's other faults too: fixing one should not reveal the next."""
    batch = customers(customer_id=[Decimal("1.00"), 2.0, Decimal("10.70"), 10.5])
    verdict = ERP_CUSTOMER.judge(batch.assign(email="ada@example.com", country=["GB"] * 3 + [""]))
    assert {r.index: r.reason for r in verdict.rejections} == {
        "3": "erp.customer@v2: customer_id is not a whole number",
        "4": "erp.customer@v2: customer_id is not a whole number; country str_matches('^[A-Z]{2}\\Z')",
    }
    assert verdict.valid["customer_id"].tolist() == [1, 2]


class CountedV1(pa.DataFrameModel):
    count: Series[int] = pa.Field(nullable=True, unique=True)
    total: Series[float]

    @pa.dataframe_check(error="total is not twice the count")
    def twice(cls, frame: pd.DataFrame) -> pd.Series:
        return frame["count"].isna() | (frame["total"] == 2 * frame["count"])

    class Config:
        coerce = True


def test_values_refused_before_validation_fail_no_other_rule():
    """Two fractions in a nullable unique field (or one beside a null) failed the whole batch:
    refused values taken for nulls were duplicates. A rule of the whole row saw them too."""
    batch = pd.DataFrame(
        {"count": [7, 10.5, 2.5, None, 8], "total": [14.0, 21.0, 5.0, 0.0, 16.0]}
    ).set_axis(["1", "2", "3", "4", "5"])
    verdict = Contract("t", 1, CountedV1).judge(batch)
    assert {r.index: r.reason for r in verdict.rejections} == {
        "2": "t@v1: count is not a whole number",
        "3": "t@v1: count is not a whole number",
    }
    assert verdict.valid.index.tolist() == ["1", "4", "5"]


class FilledV1(pa.DataFrameModel):
    count: Series[int] = pa.Field(nullable=True)
    total: Series[float]

    @pa.dataframe_parser
    def total_defaults_to_the_count(cls, frame: pd.DataFrame) -> pd.DataFrame:
        return frame.assign(total=frame["total"].fillna(frame["count"]))

    class Config:
        coerce = True


class MisparsedV1(pa.DataFrameModel):
    count: Series[int] = pa.Field(nullable=True)
    total: Series[float]

    @pa.parser("total")
    def total_in_cents(cls, series: pd.Series) -> pd.Series:
        return series.map(lambda value: float(value) / 100)  # a bug: text is not a number

    class Config:
        coerce = True


def test_a_refused_row_s_other_faults_skip_a_parser_needing_the_refused_value():
    """A rule of the whole row that reads the field the row was refused for cannot judge the
    rest without it: the row's first fault stands, and the batch goes on."""
    batch = pd.DataFrame({"count": [7, 10.5], "total": [14.0, None]}).set_axis(["1", "2"])
    verdict = Contract("t", 1, FilledV1).judge(batch)
    assert [(r.index, r.reason) for r in verdict.rejections] == [
        ("2", "t@v1: count is not a whole number")
    ]
    assert verdict.valid.index.tolist() == ["1"]


def filled_by(fill) -> type[pa.DataFrameModel]:
    """FilledV1 with another way of reading the count in its parser of the whole row."""

    class Filled(pa.DataFrameModel):
        count: Series[int] = pa.Field(nullable=True)
        total: Series[float]

        @pa.dataframe_parser
        def total_defaults_to_the_count(cls, frame: pd.DataFrame) -> pd.DataFrame:
            return frame.assign(total=fill(frame))

        class Config:
            coerce = True

    return Filled


@pytest.mark.parametrize(
    "fill",
    [
        lambda frame: frame[["total", "count"]].bfill(axis=1)["total"],  # KeyError "[...] not in"
        lambda frame: frame["total"].fillna(frame.get("count") * 1),  # TypeError on None
        lambda frame: frame.eval("total.fillna(count)"),  # pandas' UndefinedVariableError
    ],
    ids=["columns-selected", "frame-get", "eval"],
)
def test_a_parser_of_the_whole_row_needing_the_refused_value_fails_in_its_own_way(fill):
    """Only a KeyError naming the refused field was taken for a parser needing it: any other
    way of missing it stopped the whole batch (and its run) on the refused row."""
    batch = pd.DataFrame({"count": [7, 10.5], "total": [14.0, None]}).set_axis(["1", "2"])
    verdict = Contract("t", 1, filled_by(fill)).judge(batch)
    assert [(r.index, r.reason) for r in verdict.rejections] == [
        ("2", "t@v1: count is not a whole number")
    ]
    assert verdict.valid.index.tolist() == ["1"]
    assert verdict.valid["total"].tolist() == [14.0]


def test_a_bug_in_a_contract_is_not_swallowed_by_a_refused_row_s_other_faults():
    """Any error of validating a refused row's other fields was ignored: a contract's bug (here
    a parser that cannot read text) passed unseen, its letter missing the fault."""
    batch = pd.DataFrame({"count": [7, 10.5], "total": [14.0, "two"]}).set_axis(["1", "2"])
    with pytest.raises(ValueError, match="could not convert string to float"):
        Contract("t", 1, MisparsedV1).judge(batch)


def test_text_that_is_not_utf8_is_refused_in_a_column_with_nulls_or_without():
    batch = customers(
        phone=[None, "+44 \udce9", "+1 2", "+31 3"],
        city=["London", "Paris", "Lyon\udcff", "Austin"],
    )
    verdict = ERP_CUSTOMER.judge(batch)
    assert [(rejection.index, rejection.reason) for rejection in verdict.rejections] == [
        ("2", "erp.customer@v2: phone is not UTF-8 text; email is not a valid email address"),
        ("3", "erp.customer@v2: city is not UTF-8 text; country is missing"),
    ]
    assert list(verdict.valid.index) == ["1", "4"]


@pytest.mark.parametrize("others", [[None, ""], [float("nan"), ""], [7, None], ["", ""]], ids=str)
def test_text_that_is_not_utf8_is_found_beside_nulls_empty_text_and_numbers(others):
    values = pd.Series(["a", *others, "b\udcff", "c"], index=list("vwxyz"))
    assert _not_utf8(values) == ["y"]
    assert _not_utf8(values.drop("y")) == []


# Parts of addresses, mostly clean: ASCII's (a column of them is read at once), with ASCII's
# whitespace or "@", or with other letters and whitespace.
_ASCII_PART = st.text(st.sampled_from("ab1-.")) | st.text(
    st.sampled_from([*"@.a", " ", "\t", "\n", "\x0b", "\x1c", "\x1f", "\x00"]), max_size=3
)
_OTHER_PART = st.text(st.sampled_from("ab.")) | st.text(
    st.sampled_from([*"@.a", "é", "\xa0", "\x85", "\u2028"]), max_size=3
)


def _addresses(part: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Addresses and near misses: parts around an "@" and a "."."""
    return part | st.builds("{}@{}.{}".format, part, part, part)


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(_addresses(_ASCII_PART)),
    st.lists(st.none() | _addresses(_OTHER_PART) | _addresses(_ASCII_PART), max_size=4),
)
def test_is_email_is_the_pattern_matched_whole_on_each_value(ascii_values, others):
    for values in (ascii_values, ascii_values + others):
        index = [f"r{at}" for at in range(len(values))]
        found = is_email(pd.Series(values, index=index, dtype=object))
        assert found.dtype == bool and list(found.index) == index
        assert found.tolist() == [
            value is not None and re.fullmatch(EMAIL_PATTERN, value) is not None for value in values
        ]


def test_contracts_are_versioned_and_mark_pii():
    assert ERP_CUSTOMER.label == "erp.customer@v2" and CRM_CONTACT.label == "crm.contact@v2"
    assert {"email", "phone", "first_name", "last_name"} <= ERP_CUSTOMER.pii_fields
    assert "country" not in CRM_CONTACT.pii_fields and "email" in CRM_CONTACT.pii_fields


def test_masking_keeps_a_recognisable_shape():
    assert mask_email("jane.doe@example.com") == "j***@e***.com"
    assert mask_email("x@mail.example.co.uk") == "x***@m***.uk"
    masked = mask_record(
        {"email": "ada@example.com", "phone": "+44 20", "city": "London"}, {"email", "phone"}
    )
    assert masked == {"email": "a***@e***.com", "phone": "+***", "city": "London"}


def test_hashes_are_canonical_and_stable():
    assert content_hash({"b": 1, "a": "x"}) == content_hash({"a": "x", "b": 1})
    assert (
        content_hash({"a": "x"}) == "8fd817243634b144f70a61aca7dfe389"
    )  # md5 of {"a":"x"}: pinned, ledgers store it
    assert (
        idempotency_key("f", "1", "h")
        == idempotency_key("f", "1", "h")
        != idempotency_key("f", "2", "h")
    )


def test_scrub_masks_a_value_in_any_case_as_a_word_not_inside_others():
    """Matching any case anywhere masked "timestamp" for a customer named Tim."""
    said = "timestamp of TIM, marked by Tim at STRASSE 5"
    assert scrub(said, ["Tim", "Mark", "Straße"]) == "timestamp of T***, marked by T*** at S*** 5"
    # A digit or an underscore is no letter: the name is masked beside them.
    assert scrub("jane_doe JANE2 doe_1987", ["Jane", "Doe"]) == "j***_d*** J***2 d***_1987"
