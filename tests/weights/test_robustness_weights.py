"""Issue 18, weights files: what a weights archive may inflate to is bounded before anything is loaded.

A weights file is a torch zip archive, and a zip member can declare far more bytes than the file holds
(zeros deflate about 1000:1). The bound is read from the central directory (declared sizes, nothing
inflated) in every path that loads weights: ``weights import``, ``--weights`` and downloads. The tests
build small bombs and lower the bound through its parameter (or the module constant, for the CLI) instead
of writing gigabytes; one archive only *declares* 2 GiB, to check the default bound itself.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

import pytest

import kitsseg.weights.checkpoint as checkpoint
from httpserver import FileServer
from kitsseg.errors import WeightsError
from kitsseg.weights.checkpoint import MAX_INFLATED_BYTES, check_inflated_size, load_bundle, read_metadata
from kitsseg.weights.download import DownloadPolicy
from kitsseg.weights.manage import import_weights
from kitsseg.weights.registry import Registry
from kitsseg.weights.resolve import resolve_weights
from oracle import write_oracle_weights
from robustness import assert_one_error, phantom_ct, run_cli

MIB = 1 << 20
NO_WAIT = DownloadPolicy(retries=0, timeout=(5.0, 5.0), sleep=lambda s: None)


def zip_bomb(path: Path, inflated: int = 8 * MIB) -> Path:
    """A zip laid out like a torch archive whose data member is ``inflated`` zero bytes, deflated."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        with archive.open("archive/data/0", "w") as member:
            block = bytes(MIB)
            for _ in range(inflated // MIB):
                member.write(block)
    return path


def declare_size(path: Path, member: str, size: int) -> Path:
    """Rewrite the central directory so ``member`` declares ``size`` bytes (its data stays as it is)."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    at = 0
    while (at := data.find(b"PK\x01\x02", at)) >= 0:
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        if bytes(data[at + 46 : at + 46 + name_len]) == name:
            struct.pack_into("<I", data, at + 24, size)
        at += 4
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def no_torch_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the archive reaches ``torch.load``: the refusal must come first."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load ran on an archive that had to be refused before loading")

    monkeypatch.setattr(checkpoint.torch, "load", refuse)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KITSSEG_OFFLINE", "1")
    monkeypatch.setenv("KITSSEG_HOME", str(tmp_path / "home"))


def test_a_zip_bomb_is_refused_before_loading(tmp_path: Path, no_torch_load: None) -> None:
    bomb = zip_bomb(tmp_path / "bomb.pt")
    assert bomb.stat().st_size < MIB // 8  # 8 MiB of zeros in a few kB
    with pytest.raises(WeightsError, match=r"would inflate to 8 MiB, more than the 1 MiB"):
        read_metadata(bomb, max_inflated=MIB)
    with pytest.raises(WeightsError, match="would inflate"):
        load_bundle(bomb, max_inflated=MIB)


def test_the_default_bound_refuses_an_archive_declaring_2_gib(tmp_path: Path, no_torch_load: None) -> None:
    bomb = declare_size(zip_bomb(tmp_path / "bomb.pt", inflated=MIB), "archive/data/0", 2 << 30)
    assert MAX_INFLATED_BYTES == 1 << 30
    with pytest.raises(WeightsError, match=r"would inflate to 2048 MiB, more than the 1024 MiB"):
        load_bundle(bomb)


def test_real_weights_pass_the_bound(tmp_path: Path) -> None:
    weights = write_oracle_weights(tmp_path / "oracle.pt")
    inflated = check_inflated_size(weights)
    # torch stores records uncompressed: the declared total is about the file size, far under the bound
    assert inflated <= weights.stat().st_size
    assert read_metadata(weights, max_inflated=weights.stat().st_size)["format"] == checkpoint.FORMAT


def test_a_file_that_is_not_a_zip_archive_is_refused_before_loading(
    tmp_path: Path, no_torch_load: None
) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x02 an old pickle-format file, or anything else")
    with pytest.raises(WeightsError, match="cannot be read as kitsseg weights.*not a torch zip archive"):
        read_metadata(junk)


def test_weights_import_refuses_a_bomb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_torch_load: None
) -> None:
    monkeypatch.setattr(checkpoint, "MAX_INFLATED_BYTES", MIB)
    bomb = zip_bomb(tmp_path / "bomb.pt")
    cache = tmp_path / "cache"
    assert run_cli(["weights", "import", bomb, "--cache-dir", cache]) == WeightsError.exit_code
    assert_one_error(capsys.readouterr().err, "would inflate to 8 MiB")
    assert not cache.exists() or not any(cache.iterdir())


def test_segment_with_a_bomb_as_weights_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_torch_load: None
) -> None:
    monkeypatch.setattr(checkpoint, "MAX_INFLATED_BYTES", MIB)
    bomb = zip_bomb(tmp_path / "bomb.pt")
    ct = phantom_ct(tmp_path / "ct.nii.gz")
    args = ["segment", ct, "-o", tmp_path / "out" / "m.nii.gz", "--weights", bomb, "--device", "cpu"]
    assert run_cli(args) == WeightsError.exit_code
    assert_one_error(capsys.readouterr().err, "would inflate to 8 MiB")
    assert not (tmp_path / "out").exists()


def test_a_downloaded_bomb_is_refused_and_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_torch_load: None
) -> None:
    monkeypatch.setattr(checkpoint, "MAX_INFLATED_BYTES", MIB)
    bomb = zip_bomb(tmp_path / "bomb.pt").read_bytes()
    cache = tmp_path / "cache"
    with FileServer() as server:
        url = server.serve("/weights.pt", bomb)
        with pytest.raises(WeightsError, match="would inflate.*deleted the download"):
            resolve_weights(
                url, registry=Registry.from_entries([]), cache_dir=cache, offline=False, policy=NO_WAIT
            )
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_the_bound_is_read_not_inflated(tmp_path: Path) -> None:
    """Checking a 64 MiB bomb reads its central directory only: well under a second, whatever it holds."""
    import time

    bomb = zip_bomb(tmp_path / "bomb.pt", inflated=64 * MIB)
    t0 = time.perf_counter()
    assert check_inflated_size(bomb, max_inflated=128 * MIB) >= 64 * MIB
    assert time.perf_counter() - t0 < 0.5
    assert os.path.getsize(bomb) < MIB


def test_import_of_a_bomb_leaves_the_source_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint, "MAX_INFLATED_BYTES", MIB)
    bomb = zip_bomb(tmp_path / "bomb.pt")
    before = bomb.read_bytes()
    with pytest.raises(WeightsError, match="would inflate"):
        import_weights(bomb, "bomb", cache_dir=tmp_path / "cache", registry=Registry.from_entries([]))
    assert bomb.read_bytes() == before
