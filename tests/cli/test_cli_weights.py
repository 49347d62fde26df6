"""`kitsseg weights ...` against a real local HTTP server: exit codes, messages, progress off a TTY."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from httpserver import FileServer
from kitsseg.cli import main
from kitsseg.errors import ChecksumError, WeightsError


def make_weights(path: Path) -> Path:
    from kitsseg.nets.model import UNet, UNetConfig
    from kitsseg.weights.checkpoint import StageModel, save_bundle

    model = UNet(UNetConfig(base_width=4, depth=2))
    return save_bundle(path, {"kidney": StageModel(model, (32, 32))}, {"name": "tiny", "license": "MIT"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[bytes, str]:
    data = make_weights(tmp_path_factory.mktemp("w") / "tiny.pt").read_bytes()
    return data, hashlib.sha256(data).hexdigest()


@pytest.fixture
def server():
    with FileServer() as srv:
        yield srv


@pytest.fixture
def setup(server, tiny, tmp_path, monkeypatch):
    """A registry with one downloadable entry ``tiny`` served locally, and an empty cache in KITSSEG_HOME."""
    url = server.serve("/tiny.pt", tiny[0])
    registry = tmp_path / "registry" / "registry.json"
    registry.parent.mkdir()
    registry.write_text(
        json.dumps(
            [
                {
                    "name": "tiny",
                    "version": "1.2",
                    "urls": [url],
                    "file": "tiny.pt",
                    "sha256": tiny[1],
                    "size": len(tiny[0]),
                    "shipped": False,
                    "license": "MIT",
                    "default": True,
                }
            ]
        )
    )
    cache = tmp_path / "cache"
    monkeypatch.setenv("KITSSEG_REGISTRY", str(registry))
    monkeypatch.setenv("KITSSEG_HOME", str(cache))
    monkeypatch.delenv("KITSSEG_OFFLINE", raising=False)
    return url, cache


def run(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def flat(text: str) -> str:
    """Rich may wrap long lines off a terminal; compare messages with the wrapping undone."""
    return " ".join(text.split())


def test_pull_then_list_and_path(setup, capsys, tiny):
    _, cache = setup
    code, out, err = run(["weights", "pull", "tiny"], capsys)
    assert code == 0, err
    assert str(cache / "tiny.pt") in out
    assert f"sha256 {tiny[1]}" in out
    assert (cache / "tiny.pt").read_bytes() == tiny[0]
    code, out, _ = run(["weights", "list"], capsys)
    assert code == 0
    assert "tiny" in out
    assert "MIT" in out
    assert "cached" in out
    assert f"{len(tiny[0]) / 1000:.1f} KB" in out
    code, out, _ = run(["weights", "path", "tiny"], capsys)
    assert (code, out) == (0, f"{cache / 'tiny.pt'}\n")


def test_corrupt_then_verify_fails_with_exit_8_and_pull_repairs(setup, capsys, tiny):
    _, cache = setup
    assert run(["weights", "pull", "tiny"], capsys)[0] == 0
    path = cache / "tiny.pt"
    path.write_bytes(tiny[0][:100] + b"X" * 10 + tiny[0][110:])
    code, out, err = run(["weights", "verify"], capsys)
    assert code == ChecksumError.exit_code == 8
    assert "FAILED" in out
    assert "1 weights file(s) failed verification (tiny)" in flat(err)
    assert f"expected sha256 {tiny[1]}" in flat(err)
    assert path.exists()  # verify deletes nothing
    code, _, err = run(["weights", "path", "tiny"], capsys)
    assert code == 8
    assert "it was not used" in flat(err)
    assert "kitsseg weights pull tiny" in flat(err)
    assert run(["weights", "pull", "tiny"], capsys)[0] == 0
    code, out, _ = run(["weights", "verify"], capsys)
    assert code == 0
    assert "all ok" in out


def test_interrupted_then_resumed_pull(setup, server, capsys, tiny):
    _, cache = setup
    server.drop_after("/tiny.pt", len(tiny[0]) // 2)
    code, _, err = run(["weights", "pull", "tiny", "--retries", "0"], capsys)
    assert code == WeightsError.exit_code == 7
    assert "could not download" in flat(err)
    assert "the next pull resumes from there" in flat(err)
    kept = (cache / "tiny.pt.partial").stat().st_size
    assert 0 < kept < len(tiny[0])
    assert not (cache / "tiny.pt").exists()
    code, out, _ = run(["weights", "verify"], capsys)
    assert code == 0
    assert "unfinished download" in flat(out)
    code, out, err = run(["weights", "pull", "tiny"], capsys)
    assert code == 0, err
    assert server.gets()[-1].headers["Range"] == f"bytes={kept}-"
    assert (cache / "tiny.pt").read_bytes() == tiny[0]
    assert sorted(p.name for p in cache.iterdir()) == ["tiny.pt"]


def test_pull_registered_url_with_a_contradicting_sha256(setup, server, capsys):
    url, _ = setup  # a URL of a registry entry: the registry's sha256 rules
    code, _, err = run(["weights", "pull", url, "--sha256", "0" * 64], capsys)
    assert code == 7
    assert "contradicts the registry" in flat(err)
    assert server.requests == []


def test_pull_unregistered_url_with_wrong_sha256(setup, server, capsys, tiny):
    _, cache = setup
    url = server.serve("/other/model.pt", tiny[0])
    code, _, err = run(["weights", "pull", url, "--sha256", "0" * 64], capsys)
    assert code == 8
    assert f"expected {'0' * 64} but got {tiny[1]}; deleted the download" in flat(err)
    assert not cache.exists() or sorted(p.name for p in cache.iterdir()) == []
    code, out, err = run(["weights", "pull", url, "--sha256", tiny[1]], capsys)
    assert code == 0, err
    assert "model.pt" in out


def test_pull_404_exits_7_naming_the_url(setup, server, capsys):
    url = server.url("/absent.pt")
    code, _, err = run(["weights", "pull", url], capsys)
    assert code == 7
    assert f"{url} answered 404" in flat(err)


def test_offline_pull_names_the_import_command(setup, server, capsys, monkeypatch):
    _, cache = setup
    monkeypatch.setenv("KITSSEG_OFFLINE", "1")
    code, _, err = run(["weights", "pull", "tiny"], capsys)
    assert code == 7
    assert "kitsseg weights import FILE --name tiny" in flat(err)
    assert str(cache / "tiny.pt") in flat(err)
    assert server.requests == []


def test_import_then_path_offline(setup, capsys, tiny, tmp_path, monkeypatch):
    _, cache = setup
    monkeypatch.setenv("KITSSEG_OFFLINE", "1")
    src = tmp_path / "copied-from-usb.pt"
    src.write_bytes(tiny[0])
    code, out, err = run(["weights", "import", str(src)], capsys)  # matched to 'tiny' by its sha256
    assert code == 0, err
    assert "imported" in out
    code, out, _ = run(["weights", "path"], capsys)  # the default entry
    assert (code, out.strip()) == (0, str(cache / "tiny.pt"))
    code, _, err = run(["weights", "import", str(tmp_path / "nope.pt")], capsys)
    assert code == 3
    assert "does not exist" in err


def test_explicit_cache_dir_option(setup, capsys, tmp_path, tiny):
    other = tmp_path / "elsewhere"
    code, out, err = run(["weights", "pull", "tiny", "--cache-dir", str(other)], capsys)
    assert code == 0, err
    assert (other / "tiny.pt").read_bytes() == tiny[0]
    assert not (setup[1] / "tiny.pt").exists()
    code, out, _ = run(["weights", "path", "tiny", "--cache-dir", str(other)], capsys)
    assert out.strip() == str(other / "tiny.pt")


def test_unknown_name_exits_7(setup, capsys):
    code, _, err = run(["weights", "path", "nope"], capsys)
    assert code == 7
    assert "unknown weights 'nope'" in err


def test_progress_off_a_tty_in_a_subprocess(setup, server, tiny, tmp_path):
    """Through the real entry point with stdout and stderr piped: the bar must not break anything."""
    _, cache = setup
    server.drop_after("/tiny.pt", 2 * len(tiny[0]) // 3)  # a resume inside one pull, with the bar running
    env = {**os.environ, "COLUMNS": "60"}
    proc = subprocess.run(
        [sys.executable, "-m", "kitsseg", "weights", "pull", "tiny"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "\x1b[" not in proc.stdout  # no terminal control codes into a pipe
    assert f"sha256 {tiny[1]}" in proc.stdout
    assert (cache / "tiny.pt").read_bytes() == tiny[0]
    first, second = server.gets()
    assert "Range" not in first.headers
    assert second.headers["Range"].startswith("bytes=")
    assert "tiny.pt" in proc.stderr  # the bar's last state, printed once
