"""Issue 18, the weights cache (``KITSSEG_HOME``): a file where the folder belongs, a folder that cannot be
written, a read-only mount or an immutable folder give one error line with advice that fits, never a
traceback or "delete index.json".

The tests run as root, which may write anywhere, so permissions are simulated: a file in place of the
folder (real), ``os.access`` answering no (what a read-only mount or missing permission answers), and
``os.open`` failing with the errno the kernel gives for a read-only mount (EROFS), an immutable folder
(EPERM), missing permission (EACCES) or a full disk (ENOSPC).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import kitsseg.weights.cache as cache_module
from kitsseg.errors import OutputError, WeightsError
from oracle import write_oracle_weights
from robustness import assert_one_error, phantom_ct, run_cli


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    return write_oracle_weights(tmp_path / "mine.pt")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KITSSEG_OFFLINE", "1")


def _home_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.write_text("not a folder\n")
    monkeypatch.setenv("KITSSEG_HOME", str(home))
    return home


@pytest.mark.parametrize(
    "argv",
    [
        ["weights", "import", "{weights}"],
        ["weights", "list"],
        ["weights", "verify"],
        ["weights", "path", "mine"],
        ["segment", "{ct}", "-o", "{tmp}/out/m.nii.gz", "--weights", "mine", "--device", "cpu"],
    ],
    ids=["import", "list", "verify", "path", "segment"],
)
def test_kitsseg_home_that_is_a_file(
    argv: list[str],
    tmp_path: Path,
    weights: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    home = _home_is_a_file(tmp_path, monkeypatch)
    ct = phantom_ct(tmp_path / "ct.nii.gz")
    args = [a.format(weights=weights, ct=ct, tmp=tmp_path) for a in argv]
    code = run_cli(args)
    line = assert_one_error(capsys.readouterr().err, f"{home} (from KITSSEG_HOME) is a file, not a folder")
    assert code == WeightsError.exit_code
    assert "point KITSSEG_HOME at a writable folder" in line
    assert "delete" not in line  # deleting index.json would not help
    assert home.read_text() == "not a folder\n"
    assert not (tmp_path / "out").exists()


def test_kitsseg_home_under_a_file(
    tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "blocker").write_text("x\n")
    monkeypatch.setenv("KITSSEG_HOME", str(tmp_path / "blocker" / "cache"))
    assert run_cli(["weights", "import", weights]) == WeightsError.exit_code
    assert_one_error(capsys.readouterr().err, f"lies under {tmp_path / 'blocker'}, which is a file")


def test_cache_dir_option_gets_its_own_advice(
    tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KITSSEG_HOME", raising=False)
    (tmp_path / "blocker").write_text("x\n")
    code = run_cli(["weights", "import", weights, "--cache-dir", tmp_path / "blocker" / "c"])
    assert code == WeightsError.exit_code
    line = assert_one_error(capsys.readouterr().err, "is a file")
    assert "(from KITSSEG_HOME)" not in line  # the user gave --cache-dir, not the variable


def test_unwritable_kitsseg_home(
    tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("KITSSEG_HOME", str(home))
    real_access = os.access

    def access(path: object, mode: int, **kwargs: object) -> bool:
        if Path(str(path)) == home and mode & os.W_OK:
            return False
        return real_access(path, mode, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "access", access)
    assert run_cli(["weights", "import", weights]) == OutputError.exit_code
    line = assert_one_error(capsys.readouterr().err, "(from KITSSEG_HOME) is not writable")
    assert "point KITSSEG_HOME at a writable folder" in line
    assert list(home.iterdir()) == []


@pytest.mark.parametrize("code", [errno.EROFS, errno.EPERM, errno.EACCES, errno.ENOSPC])
def test_writes_into_the_cache_that_fail(
    code: int,
    tmp_path: Path,
    weights: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Creating any file in the cache fails as a read-only mount (EROFS), an immutable folder (EPERM),
    missing permission (EACCES) or a full disk (ENOSPC) would make it fail."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("KITSSEG_HOME", str(home))
    real_open = os.open

    def refusing_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & os.O_CREAT and Path(str(path)).parent == home:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cache_module.os, "open", refusing_open)
    assert run_cli(["weights", "import", weights]) == OutputError.exit_code
    line = assert_one_error(capsys.readouterr().err, f"cannot write to the weights cache folder {home}")
    assert os.strerror(code) in line
    assert [p.name for p in home.iterdir()] == []


@pytest.mark.parametrize(
    "argv",
    [["weights", "list"], ["weights", "verify"], ["weights", "path", "mine"]],
    ids=["list", "verify", "path"],
)
def test_an_index_entry_pointing_outside_the_cache_is_refused_by_every_reader(
    argv: list[str],
    tmp_path: Path,
    weights: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An index entry whose ``file`` is ``../mine.pt`` was refused by ``list`` only: ``path`` printed (and
    ``--weights NAME`` used) the file outside the cache, and ``verify`` hashed it."""
    import json

    home = tmp_path / "home"
    monkeypatch.setenv("KITSSEG_HOME", str(home))
    assert run_cli(["weights", "import", weights, "--name", "mine"]) == 0
    index = json.loads((home / "index.json").read_text())
    index["weights"]["mine"]["file"] = "../mine.pt"
    (home / "index.json").write_text(json.dumps(index))
    capsys.readouterr()
    assert run_cli(argv) == WeightsError.exit_code
    assert_one_error(capsys.readouterr().err, "entry 'mine': 'file' must be a plain file name")
