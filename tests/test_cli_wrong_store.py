"""A command run outside the checkout opens a store of its own (HANDOFF_HOME is relative): an
empty answer then says which store it read, as `handoff audit verify` does."""

from pathlib import Path

import pytest

from integrations.cli import main
from integrations.engine.state import StateStore


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HANDOFF_HOME", str(tmp_path))
    monkeypatch.delenv("HANDOFF_STATE_URL", raising=False)
    return tmp_path


def test_an_empty_store_says_which_store_it_is(elsewhere: Path, capsys) -> None:
    assert main(["dlq", "list"]) == 0
    said = capsys.readouterr()
    assert "no dead letters match" in said.out
    assert str(elsewhere / "state.sqlite") in said.err and "HANDOFF_HOME" in said.err
    assert main(["audit", "show", "--key", "42"]) == 1
    said = capsys.readouterr()
    assert "no record '42'" in said.err and str(elsewhere / "state.sqlite") in said.err


def test_a_store_the_flows_use_needs_no_such_hint(elsewhere: Path, capsys) -> None:
    store = StateStore(f"sqlite:///{elsewhere / 'state.sqlite'}")
    store.append_audit(actor="test", action="note", why="test", detail={})
    assert main(["dlq", "list"]) == 0
    assert main(["audit", "show", "--key", "42"]) == 1
    assert "HANDOFF_HOME" not in capsys.readouterr().err
