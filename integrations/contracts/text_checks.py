"""Pandera's `str_matches` and `str_length` checks, run on a whole column at once.

Pandera runs both value by value (`re.match`, `len`), a tenth of a contract's time on a batch of
clean text. A column of plain text gets the same answer from numpy here: its lengths by one C-level
map, and, for a pattern that is a fixed run of literal characters and ASCII ranges (`^C[0-9]{7}\\Z`,
`^[A-Z]{2}\\Z`), each position's ASCII code against its range. A column that is not all text, text
that is not all ASCII, a pattern of any other shape, or an index holding a null label (pandera's
own path lets such a row pass a check it fails) goes through pandera's own function, as before.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.backends.pandas import builtin_checks

# One piece of a pattern: a literal ASCII character, or a range of them, then how many times.
_PIECE = re.compile(
    r"(?:\[(?P<lo>[A-Za-z0-9])-(?P<hi>[A-Za-z0-9])\]|(?P<char>[A-Za-z0-9_-]))"
    r"(?:\{(?P<times>[0-9]+)\})?"
)
_WHOLE = re.compile(r"\^(?P<body>(?:" + _PIECE.pattern + r")+)\\Z")


def ranges(pattern: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Each position's lowest and highest ASCII code, when `pattern` matches a fixed run of
    literal characters and ranges, whole (`^…\\Z`); None for any other pattern."""
    whole = _WHOLE.fullmatch(pattern)
    if whole is None:
        return None
    lows, highs = [], []
    for piece in _PIECE.finditer(whole["body"]):
        times = int(piece["times"]) if piece["times"] else 1
        low, high = (piece["lo"], piece["hi"]) if piece["char"] is None else (piece["char"],) * 2
        lows += [ord(low)] * times
        highs += [ord(high)] * times
    if not lows:
        return None
    return np.array(lows, np.uint8), np.array(highs, np.uint8)


def _texts(values: pd.Series) -> tuple[np.ndarray, np.ndarray] | None:
    """The values' texts and where the values are null (a check fails them), when every other
    value is a str and the index holds no null label."""
    if values.dtype != object or values.index.hasnans:
        return None
    texts = values.to_numpy()
    nulls = pd.isna(texts)
    if nulls.any():
        texts = texts[~nulls]
    try:
        "".join(texts)
    except TypeError:  # a value that is no str
        return None
    return texts, nulls


def lengths(texts: np.ndarray) -> np.ndarray:
    return np.fromiter(map(len, texts), np.int64, len(texts))


def matches_at_once(values: pd.Series, pattern: str) -> pd.Series:
    """pandera's `str_matches(pattern)` on `values`, at once where it can be."""
    found, bounds = _texts(values), ranges(pattern)
    if found is None or bounds is None:
        return builtin_checks.str_matches(values, pattern)
    texts, nulls = found
    joined = "".join(texts)
    if not joined.isascii():
        return builtin_checks.str_matches(values, pattern)
    low, high = bounds
    sizes = lengths(texts)
    starts = np.cumsum(sizes) - sizes
    fits = sizes == len(low)
    codes = np.frombuffer(joined.encode("ascii"), np.uint8)
    at = starts[fits][:, None] + np.arange(len(low))
    window = codes[at]
    fits[fits] = ((window >= low) & (window <= high)).all(axis=1)
    matched = np.zeros(len(values), bool)
    matched[~nulls] = fits
    return pd.Series(matched, values.index, name=values.name)


def length_at_once(
    values: pd.Series,
    min_value: int | None = None,
    max_value: int | None = None,
    exact_value: int | None = None,
) -> pd.Series:
    """pandera's `str_length` on `values`, at once where it can be: the same comparisons, of
    lengths counted by one C-level map."""
    found = _texts(values)
    if found is None or (exact_value is None and min_value is None and max_value is None):
        return builtin_checks.str_length(values, min_value, max_value, exact_value)
    texts, nulls = found
    if nulls.any():  # pandas' length of a null: NaN, which no comparison takes
        counted = np.full(len(values), np.nan)
        counted[~nulls] = lengths(texts)
    else:
        counted = lengths(texts)
    sizes = pd.Series(counted, values.index, name=values.name)
    if exact_value is not None:
        return sizes == exact_value
    if max_value is None:
        return sizes >= min_value
    if min_value is None:
        return sizes <= max_value
    return (sizes <= max_value) & (sizes >= min_value)


# Named apart from pandera's: a function named as a check of its own is swapped for that check.
_AT_ONCE = {"str_matches": matches_at_once, "str_length": length_at_once}


def at_once(check: pa.Check) -> pa.Check:
    """`check` run at once when it is a `str_matches` or `str_length` of pandera's; any other as
    it is. The new check keeps the old one's error (what a failure reads) and statistics."""
    fast = _AT_ONCE.get(check.name)
    if fast is None or check.element_wise or check.groupby is not None or check.groups:
        return check
    return pa.Check(
        fast,
        ignore_na=check.ignore_na,
        name=f"{check.name}_at_once",  # its own name: pandera runs its own check by its name
        error=check.error,
        raise_warning=check.raise_warning,
        n_failure_cases=check.n_failure_cases,
        statistics=dict(check.statistics),
        **check.statistics,
    )
