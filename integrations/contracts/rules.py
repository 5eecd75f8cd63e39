"""Rules shared by several contracts."""

from __future__ import annotations

import numpy as np
import pandas as pd


def whole(pattern: str) -> str:
    r"""`pattern` for pandera's `str_matches` (Python's `re.match`) that the whole value must
    match. Written `^…$`, a pattern also took the value with a newline at its end: `$` matches
    before a final newline, so "C1234567\n" was a valid customer number, and became a CRM key
    that the same customer, once the ERP trimmed it, no longer had. Write digits as `[0-9]`: `\d`
    takes any script's digits ("C١٢٣٤٥٦٧")."""
    return rf"^(?:{pattern})\Z" if "|" in pattern else rf"^{pattern}\Z"


# The ERP's keys and codes, as every contract that holds them reads them.
CUSTOMER_NUMBER = whole("C[0-9]{7}")
ORGANISATION_NUMBER = whole("O[0-9]{7}")
INVOICE_NUMBER = whole("INV-[0-9]{8}")
COUNTRY_CODE = whole("[A-Z]{2}")  # ISO 3166-1 alpha-2
CURRENCY_CODE = whole("[A-Z]{3}")  # ISO 4217
DAY = whole("[0-9]{4}-[0-9]{2}-[0-9]{2}")  # an ISO 8601 date, nothing after it

# Deliberately plain: one @, no spaces, a dot in the domain. What HubSpot and mail servers refuse.
EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[^@\s.]+$"


# The ASCII characters Python's `\s` matches (the pattern's `[^@\s]`), by code: a space or less.
_ASCII_SPACE = np.array([chr(code).isspace() for code in range(ord(" ") + 1)])


def is_email(values: pd.Series) -> pd.Series:
    """Whether each value matches EMAIL_PATTERN whole; a null does not. A column of ASCII text
    (a batch's addresses, most often) is read at once, by numpy, from where its characters "@",
    "." and whitespace are, in less than half the time the pattern takes value by value."""
    joined = _ascii_text(values)
    if joined is None:
        return values.str.fullmatch(EMAIL_PATTERN).fillna(False).astype(bool)
    return pd.Series(_ascii_emails(values.to_numpy(), joined), values.index, name=values.name)


def _ascii_text(values: pd.Series) -> str | None:
    """The values joined, when each is text and all of it ASCII."""
    if values.dtype != object:
        return None
    try:
        joined = "".join(values.to_numpy())
    except TypeError:  # a null, or a value that is no text
        return None
    return joined if joined.isascii() else None


def _ascii_emails(texts: np.ndarray, joined: str) -> np.ndarray:
    """EMAIL_PATTERN over ASCII texts, `joined` their concatenation: one "@", not first; no
    whitespace; after the "@" a ".", neither next to it nor last, the last "." of the text."""
    codes = np.frombuffer(joined.encode("ascii"), np.uint8)
    lengths = np.fromiter(map(len, texts), np.intp, len(texts))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    ats, at = _found(np.flatnonzero(codes == ord("@")), starts, ends)
    _, dot = _found(np.flatnonzero(codes == ord(".")), starts, ends)
    low = np.flatnonzero(codes <= ord(" "))
    spaces, _ = _found(low[_ASCII_SPACE[codes[low]]], starts, ends)
    return (ats == 1) & (at > starts) & (dot > at + 1) & (dot < ends - 1) & (spaces == 0)


def _found(
    positions: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """How many of the ascending `positions` each text from `starts` to `ends` holds, and the
    last of them before its end (-1: none; it is an earlier text's where the text holds none)."""
    before_end = np.searchsorted(positions, ends)
    last = np.concatenate(([-1], positions))[before_end]
    return before_end - np.searchsorted(positions, starts), last


def first_of_case_insensitive_duplicates(values: pd.Series) -> pd.Series:
    """True for each value not already seen earlier in the batch, ignoring case."""
    return ~values.str.lower().duplicated(keep="first")


def utf8_bytes(values: pd.Series) -> pd.Series:
    """Each text's length in bytes of UTF-8: what a database column of so many bytes holds."""
    return values.str.encode("utf-8").str.len()
