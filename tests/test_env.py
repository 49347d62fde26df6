"""Every ``KITSSEG_*`` switch is read through ``kitsseg.env``, at call time."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kitsseg import env

SRC = Path(env.__file__).resolve().parent


def test_readers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in env.ALL:
        monkeypatch.delenv(name, raising=False)
    assert (env.home(), env.offline(), env.registry()) == (None, False, None)
    assert env.mallopt_enabled()
    assert env.fused_conv_enabled()
    monkeypatch.setenv(env.HOME, f" {tmp_path} ")
    monkeypatch.setenv(env.OFFLINE, "Yes")
    monkeypatch.setenv(env.REGISTRY, "~/reg.json")
    monkeypatch.setenv(env.MALLOPT, "0")
    monkeypatch.setenv(env.FUSED_CONV, " 0 ")
    assert env.home() == tmp_path
    assert env.offline()
    assert env.registry() == Path("~/reg.json").expanduser()
    assert not env.mallopt_enabled()
    assert not env.fused_conv_enabled()
    monkeypatch.setenv(env.OFFLINE, "0")
    assert not env.offline()


def test_documented_in_the_module_docstring() -> None:
    for name in env.ALL:
        assert f"``{name}``" in (env.__doc__ or ""), name


def test_no_other_module_spells_a_switch() -> None:
    """A string literal ``"KITSSEG_..."`` outside env.py is a switch read ad hoc (prose may name them)."""
    literal = re.compile(r"[\"']KITSSEG_[A-Z_]+[\"']")
    offenders = {
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if path.name != "env.py" and literal.search(path.read_text(encoding="utf-8"))
    }
    assert offenders == set(), offenders
