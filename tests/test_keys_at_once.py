"""A batch's keys looked at all at once say, key by key, what looking at each key says."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from integrations.engine.ids import key_text
from integrations.engine.sync import MAX_KEY_LENGTH, _key_problems, _unusable_key

# Ordinary keys, and the ones each check is for: blank, whitespace inside, control characters,
# too long, non-ASCII, lone surrogates (bytes decoded with surrogateescape).
keys = st.one_of(
    st.from_regex(r"C[0-9]{7}", fullmatch=True),
    st.text(alphabet=st.sampled_from(" \t\n\x00\x1f\x7fa-Zé€\u3000\udc80"), max_size=6),
    st.text(min_size=MAX_KEY_LENGTH - 1, max_size=MAX_KEY_LENGTH + 1, alphabet="ab c"),
    st.text(),
)


def _one_by_one(series: pd.Series) -> tuple[list, list]:
    problems = series.map(_unusable_key)
    return problems.tolist(), series[problems.isna()].map(key_text).tolist()


@settings(max_examples=300, deadline=None)
@given(st.lists(keys, min_size=1, max_size=40))
def test_text_keys_at_once_are_judged_as_one_by_one(values):
    series = pd.Series(values, dtype=object, index=range(100, 100 + len(values)))
    problems, text = _key_problems(series)
    assert (problems.tolist(), text.tolist()) == _one_by_one(series)
    assert problems.index.equals(series.index)
    assert text.index.equals(series.index[problems.isna().to_numpy()])
    assert all(type(key) is str for key in text)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.one_of(keys, st.none(), st.just(np.nan), st.just(pd.NA), st.integers(), st.floats()),
        min_size=1,
        max_size=20,
    )
)
def test_mixed_keys_are_judged_one_by_one(values):
    series = pd.Series(values, dtype=object)
    problems, text = _key_problems(series)
    assert (problems.tolist(), text.tolist()) == _one_by_one(series)


def test_whole_number_keys_are_all_usable():
    problems, text = _key_problems(pd.Series(np.array([3, 1, 2], dtype=np.int64)))
    assert problems.isna().all()
    assert text.tolist() == ["3", "1", "2"]
