"""Tests of kitsseg.weights: registry, resolution, offline mode, import, list, verify, safe loading."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from httpserver import FileServer
from kitsseg.errors import ChecksumError, InputNotFoundError, WeightsError
from kitsseg.weights.cache import cache_root, file_lock, read_index
from kitsseg.weights.download import DownloadPolicy, partial_path
from kitsseg.weights.manage import import_weights, list_weights, verify_cache
from kitsseg.weights.registry import PACKAGE_ASSETS, Registry, WeightsEntry, default_registry
from kitsseg.weights.resolve import (
    cached_weights_path,
    load_weights,
    pull_weights,
    resolve_weights,
    weights_sha256,
)

NO_WAIT = DownloadPolicy(retries=2, timeout=(5.0, 5.0), chunk_size=4096, sleep=lambda s: None)


def make_weights(path: Path, name: str = "tiny") -> Path:
    from kitsseg.nets.model import UNet, UNetConfig
    from kitsseg.weights.checkpoint import StageModel, save_bundle

    cfg = UNetConfig(base_width=4, depth=2)
    stages = {"kidney": StageModel(UNet(cfg), (32, 32)), "tumor": StageModel(UNet(cfg), (16, 32))}
    meta = {
        "name": name,
        "version": "9.9",
        "hu_window": [-100, 300],
        "eig_bounds": [1.1, 2.5],
        "license": "MIT",
    }
    return save_bundle(path, stages, meta)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[bytes, str]:
    data = make_weights(tmp_path_factory.mktemp("w") / "tiny.pt").read_bytes()
    return data, hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    monkeypatch.delenv("KITSSEG_OFFLINE", raising=False)
    monkeypatch.delenv("KITSSEG_REGISTRY", raising=False)
    monkeypatch.setenv("KITSSEG_HOME", str(tmp_path / "home-cache"))


@pytest.fixture
def server():
    with FileServer() as srv:
        yield srv


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def entry(name: str, sha: str | None, urls=(), shipped=False, default=False, size=None) -> dict:
    return {
        "name": name,
        "version": "1.0",
        "urls": list(urls),
        "file": f"{name}.pt",
        "sha256": sha,
        "size": size,
        "shipped": shipped,
        "model": "tiny",
        "hu_window": [-100, 300],
        "eig_bounds": [1.1, 2.5],
        "training_data": "none",
        "license": "MIT",
        "default": default,
    }


# -- registry ------------------------------------------------------------------------------------------


def test_packaged_registry_is_valid_and_has_a_shipped_default():
    reg = default_registry()
    assert reg.assets_dir == PACKAGE_ASSETS
    starter = reg.find("kitsseg-starter")
    assert starter is not None
    assert starter.shipped
    assert starter.file == "kitsseg-starter.pt"
    assert reg.default().name == "kitsseg-starter"


def test_registry_env_var_points_to_another_file(monkeypatch, tmp_path, tiny):
    path = tmp_path / "reg" / "registry.json"
    path.parent.mkdir()
    path.write_text(json.dumps([entry("mine", tiny[1], shipped=True)]))
    monkeypatch.setenv("KITSSEG_REGISTRY", str(path))
    reg = default_registry()
    assert [e.name for e in reg.entries] == ["mine"]
    assert reg.shipped_path(reg.find("mine")) == path.parent / "mine.pt"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sha256": "abc"}, "64 hex"),
        ({"file": "../evil.pt"}, "plain file name"),
        ({"name": "has space"}, "'name'"),
        ({"urls": ["file:///etc/passwd"]}, "http"),
        ({"hu_window": [1]}, r"\[lo, hi\]"),
    ],
)
def test_invalid_registry_entries_are_rejected(change, message):
    with pytest.raises(WeightsError, match=message):
        Registry.from_entries([{**entry("a", "0" * 64), **change}])


def test_duplicate_names_and_two_defaults_are_rejected():
    with pytest.raises(WeightsError, match="duplicate"):
        Registry.from_entries([entry("a", None), entry("a", None)])
    with pytest.raises(WeightsError, match="more than one"):
        Registry.from_entries([entry("a", None, default=True), entry("b", None, default=True)])


def test_registry_load_errors_are_weights_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        Registry.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(WeightsError, match="cannot be read"):
        Registry.load(tmp_path / "bad.json")


# -- cache location --------------------------------------------------------------------------------------


def test_cache_root_precedence(monkeypatch, tmp_path):
    assert cache_root(tmp_path / "x") == tmp_path / "x"
    assert cache_root() == tmp_path / "home-cache"
    monkeypatch.delenv("KITSSEG_HOME")
    import platformdirs

    assert cache_root() == Path(platformdirs.user_cache_dir("kitsseg"))


def test_lock_file_is_removed_on_release(tmp_path):
    with file_lock(tmp_path / "a.lock"):
        assert (tmp_path / "a.lock").exists()
    with file_lock(tmp_path / "a.lock"):
        pass
    assert not (tmp_path / "a.lock").exists()


# -- shipped weights -------------------------------------------------------------------------------------


def test_shipped_default_resolves_and_loads_without_network(tmp_path, cache, tiny):
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "starter.pt").write_bytes(tiny[0])
    reg = Registry.from_entries([entry("starter", tiny[1], shipped=True, default=True)], assets)
    assert resolve_weights(None, registry=reg, cache_dir=cache, offline=True) == assets / "starter.pt"
    bundle = load_weights("starter", registry=reg, cache_dir=cache, offline=True)
    assert bundle.hu_window == (-100.0, 300.0)
    assert bundle.tumor is not None
    assert not cache.exists()  # nothing written for shipped weights


def test_shipped_file_failing_its_checksum_is_refused(tmp_path, cache, tiny):
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "starter.pt").write_bytes(tiny[0][:-10] + b"0123456789")
    reg = Registry.from_entries([entry("starter", tiny[1], shipped=True)], assets)
    with pytest.raises(ChecksumError, match=f"shipped weights starter.*expected {tiny[1]} but got"):
        resolve_weights("starter", registry=reg, cache_dir=cache)


def test_shipped_entry_missing_from_package_says_reinstall(tmp_path, cache, tiny):
    reg = Registry.from_entries([entry("starter", tiny[1], shipped=True)], tmp_path)
    with pytest.raises(WeightsError, match="missing from the package.*reinstall"):
        resolve_weights("starter", registry=reg, cache_dir=cache)


def test_entry_without_sha256_is_not_used(tmp_path, cache, tiny):
    (tmp_path / "starter.pt").write_bytes(tiny[0])
    reg = Registry.from_entries([entry("starter", None, shipped=True)], tmp_path)
    with pytest.raises(WeightsError, match="no sha256"):
        resolve_weights("starter", registry=reg, cache_dir=cache)


def test_sha256_is_memoised_per_process_and_notices_changes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"one")
    first = weights_sha256(path)
    assert weights_sha256(path) == first == hashlib.sha256(b"one").hexdigest()
    path.write_bytes(b"two!")
    assert weights_sha256(path) == hashlib.sha256(b"two!").hexdigest()


# -- downloads through the registry ----------------------------------------------------------------------


def test_name_downloads_once_then_resolves_from_cache(server, cache, tiny):
    url = server.serve("/tiny.pt", tiny[0])
    reg = Registry.from_entries([entry("tiny", tiny[1], urls=[url])])
    path = resolve_weights("tiny", registry=reg, cache_dir=cache, policy=NO_WAIT)
    assert path == cache / "tiny.pt"
    assert weights_sha256(path) == tiny[1]
    assert resolve_weights("tiny", registry=reg, cache_dir=cache, policy=NO_WAIT) == path
    assert len(server.gets()) == 1
    assert sorted(p.name for p in cache.iterdir()) == ["tiny.pt"]


def test_half_finished_download_resumes_with_range(server, cache, tiny):
    url = server.serve("/tiny.pt", tiny[0])
    server.drop_after("/tiny.pt", len(tiny[0]) // 2)
    reg = Registry.from_entries([entry("tiny", tiny[1], urls=[url])])
    path = resolve_weights("tiny", registry=reg, cache_dir=cache, policy=NO_WAIT)
    assert weights_sha256(path) == tiny[1]
    assert [("Range" in r.headers) for r in server.gets()] == [False, True]


def test_mirrors_are_tried_in_order(server, cache, tiny):
    good = server.serve("/tiny.pt", tiny[0])
    reg = Registry.from_entries([entry("tiny", tiny[1], urls=[server.url("/gone.pt"), good])])
    assert weights_sha256(resolve_weights("tiny", registry=reg, cache_dir=cache, policy=NO_WAIT)) == tiny[1]
    server.status("/tiny.pt", 404)
    (cache / "tiny.pt").unlink()
    with pytest.raises(WeightsError, match="every URL of 'tiny' failed.*gone.pt.*tiny.pt"):
        resolve_weights("tiny", registry=reg, cache_dir=cache, policy=NO_WAIT)


def test_wrong_registered_sha256_leaves_nothing_in_the_cache(server, cache, tiny):
    url = server.serve("/tiny.pt", tiny[0])
    reg = Registry.from_entries([entry("tiny", "f" * 64, urls=[url])])
    with pytest.raises(ChecksumError, match=f"expected {'f' * 64} but got {tiny[1]}; deleted the download"):
        resolve_weights("tiny", registry=reg, cache_dir=cache, policy=NO_WAIT)
    assert list(cache.iterdir()) == []


def test_404_is_a_weights_error_naming_the_url(server, cache, tiny):
    reg = Registry.from_entries([entry("tiny", tiny[1], urls=[server.url("/nope.pt")])])
    with pytest.raises(WeightsError, match=r"http://127\.0\.0\.1:\d+/nope\.pt answered 404"):
        resolve_weights("tiny", registry=reg, cache_dir=cache, policy=NO_WAIT)


def test_offline_never_touches_the_network(server, cache, tiny, monkeypatch):
    url = server.serve("/tiny.pt", tiny[0])
    reg = Registry.from_entries([entry("tiny", tiny[1], urls=[url])])
    monkeypatch.setenv("KITSSEG_OFFLINE", "1")
    with pytest.raises(WeightsError) as info:
        resolve_weights("tiny", registry=reg, cache_dir=cache)
    message = str(info.value)
    assert "KITSSEG_OFFLINE=1" in message
    assert "tiny.pt" in message
    assert str(cache / "tiny.pt") in message
    assert f"kitsseg weights import FILE --name tiny --cache-dir {cache}" in message
    with pytest.raises(WeightsError, match="offline"):
        resolve_weights(url, cache_dir=cache, registry=Registry.from_entries([]))
    with pytest.raises(WeightsError, match="offline"):
        pull_weights("tiny", registry=reg, cache_dir=cache)
    assert server.requests == []
    # once placed by hand, offline resolution works
    src = cache.parent / "tiny.pt"
    src.write_bytes(tiny[0])
    import_weights(src, "tiny", registry=reg, cache_dir=cache)
    assert resolve_weights("tiny", registry=reg, cache_dir=cache) == cache / "tiny.pt"
    assert server.requests == []


def test_offline_message_without_explicit_cache_dir_has_plain_command(cache, tiny):
    reg = Registry.from_entries([entry("tiny", tiny[1], urls=["http://127.0.0.1:9/tiny.pt"])])
    with pytest.raises(WeightsError, match=r"`kitsseg weights import FILE --name tiny`"):
        resolve_weights("tiny", registry=reg, offline=True)


def test_corrupted_cached_file_is_refused_at_load_and_repaired_by_pull(server, cache, tiny):
    url = server.serve("/tiny.pt", tiny[0])
    reg = Registry.from_entries([entry("tiny", tiny[1], urls=[url])])
    path = pull_weights("tiny", registry=reg, cache_dir=cache, policy=NO_WAIT)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(
        ChecksumError, match=r"cached weights file .*tiny\.pt \(tiny\).*it was not used"
    ) as info:
        load_weights("tiny", registry=reg, cache_dir=cache, policy=NO_WAIT)
    assert "kitsseg weights pull tiny" in str(info.value)
    assert len(server.gets()) == 1  # refused, not silently re-downloaded
    assert path.read_bytes() == bytes(data)  # and not deleted
    rows = verify_cache(cache, registry=reg)
    assert [(r.name, r.ok) for r in rows] == [("tiny", False)]
    assert "expected sha256" in rows[0].message
    assert path.read_bytes() == bytes(data)  # verify reports, deletes nothing
    pull_weights("tiny", registry=reg, cache_dir=cache, policy=NO_WAIT)
    assert weights_sha256(path) == tiny[1]
    assert [(r.name, r.ok) for r in verify_cache(cache, registry=reg)] == [("tiny", True)]


# -- URLs ------------------------------------------------------------------------------------------------


def test_url_pull_is_recorded_and_pinned(server, cache, tiny):
    url = server.serve("/models/fancy.pt", tiny[0])
    reg = Registry.from_entries([])
    path = resolve_weights(url, registry=reg, cache_dir=cache, policy=NO_WAIT)
    assert path == cache / "fancy.pt"
    record = read_index(cache)["fancy"]
    assert record["sha256"] == tiny[1]
    assert record["source"] == url
    assert record["license"] == "MIT"
    assert resolve_weights(url, registry=reg, cache_dir=cache, policy=NO_WAIT) == path
    assert resolve_weights("fancy", registry=reg, cache_dir=cache, policy=NO_WAIT) == path
    assert len(server.gets()) == 1


def test_url_with_sha256_pin(server, cache, tiny):
    url = server.serve("/fancy.pt", tiny[0])
    reg = Registry.from_entries([])
    with pytest.raises(ChecksumError, match="deleted the download"):
        resolve_weights(url, sha256="a" * 64, registry=reg, cache_dir=cache, policy=NO_WAIT)
    assert list(cache.iterdir()) == []
    path = resolve_weights(url, sha256=tiny[1].upper(), registry=reg, cache_dir=cache, policy=NO_WAIT)
    assert weights_sha256(path) == tiny[1]
    with pytest.raises(WeightsError, match="64 hex"):
        resolve_weights(url, sha256="xyz", registry=reg, cache_dir=cache)


def test_url_that_is_not_weights_is_deleted(server, cache):
    url = server.serve("/page.pt", b"<html>login required</html>")
    with pytest.raises(WeightsError, match="not a kitsseg weights file.*deleted the download"):
        resolve_weights(url, registry=Registry.from_entries([]), cache_dir=cache, policy=NO_WAIT)
    assert list(cache.iterdir()) == []


def test_registry_url_resolves_as_its_entry(server, cache, tiny):
    url = server.serve("/tiny.pt", tiny[0])
    reg = Registry.from_entries([entry("tiny", tiny[1], urls=[url])])
    assert resolve_weights(url, registry=reg, cache_dir=cache, policy=NO_WAIT) == cache / "tiny.pt"
    assert read_index(cache) == {}


def test_url_name_never_clobbers_a_registry_file(server, cache, tiny):
    url = server.serve("/elsewhere/tiny.pt", tiny[0])
    reg = Registry.from_entries([entry("tiny", "e" * 64)])
    path = resolve_weights(url, registry=reg, cache_dir=cache, policy=NO_WAIT)
    assert path != cache / "tiny.pt"
    assert path.name.endswith("-tiny.pt")


# -- paths, unknown names --------------------------------------------------------------------------------


def test_existing_path_is_returned_as_is(tmp_path, tiny):
    path = tmp_path / "any-name.bin"
    path.write_bytes(tiny[0])
    assert resolve_weights(str(path), registry=Registry.from_entries([])) == path
    assert load_weights(path, registry=Registry.from_entries([])).kidney.input_size == (32, 32)
    with pytest.raises(ChecksumError):
        resolve_weights(str(path), sha256="0" * 64, registry=Registry.from_entries([]))


def test_unknown_name_and_missing_path(cache):
    reg = Registry.from_entries([entry("tiny", None)])
    with pytest.raises(WeightsError, match=r"unknown weights 'nope'.*known: tiny.*kitsseg weights list"):
        resolve_weights("nope", registry=reg, cache_dir=cache)
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights("some/dir/w.pt", registry=reg, cache_dir=cache)


def test_loading_a_non_weights_file_is_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot be read as kitsseg weights"):
        load_weights(bad)


# -- import, list, path ----------------------------------------------------------------------------------


def test_import_a_local_file_under_a_new_name(tmp_path, cache, tiny):
    src = tmp_path / "downloaded.pt"
    src.write_bytes(tiny[0])
    reg = Registry.from_entries([])
    dest = import_weights(src, "mine", cache_dir=cache, registry=reg)
    assert dest == cache / "mine.pt"
    assert dest.read_bytes() == tiny[0]
    assert src.read_bytes() == tiny[0]  # the source is left alone
    assert read_index(cache)["mine"]["sha256"] == tiny[1]
    assert resolve_weights("mine", registry=reg, cache_dir=cache, offline=True) == dest
    assert cached_weights_path("mine", registry=reg, cache_dir=cache) == dest
    assert load_weights("mine", registry=reg, cache_dir=cache).metadata["name"] == "tiny"
    assert sorted(p.name for p in cache.iterdir()) == ["index.json", "mine.pt"]
    dest.write_bytes(tiny[0][:-1])
    with pytest.raises(ChecksumError, match="Import them again"):
        resolve_weights("mine", registry=reg, cache_dir=cache)


def test_import_matches_the_registry_by_hash(tmp_path, cache, tiny):
    src = tmp_path / "whatever.pt"
    src.write_bytes(tiny[0])
    reg = Registry.from_entries([entry("tiny", tiny[1], urls=["http://127.0.0.1:9/tiny.pt"])])
    assert import_weights(src, cache_dir=cache, registry=reg) == cache / "tiny.pt"
    assert read_index(cache) == {}
    assert resolve_weights("tiny", registry=reg, cache_dir=cache, offline=True) == cache / "tiny.pt"


def test_import_under_a_registry_name_must_match_its_hash(tmp_path, cache, tiny):
    other = make_weights(tmp_path / "other.pt", name="other")
    reg = Registry.from_entries([entry("tiny", tiny[1])])
    with pytest.raises(ChecksumError, match=r"not the registered 'tiny'.*nothing was imported"):
        import_weights(other, "tiny", cache_dir=cache, registry=reg)
    assert not (cache / "tiny.pt").exists()


def test_import_refuses_missing_and_non_weights_files(tmp_path, cache):
    with pytest.raises(InputNotFoundError):
        import_weights(tmp_path / "nope.pt", cache_dir=cache, registry=Registry.from_entries([]))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    with pytest.raises(WeightsError, match="cannot be read as kitsseg weights"):
        import_weights(junk, cache_dir=cache, registry=Registry.from_entries([]))
    assert not cache.exists() or list(cache.iterdir()) == []
    with pytest.raises(WeightsError, match="--name"):
        import_weights(junk, "../x", cache_dir=cache, registry=Registry.from_entries([]))


def test_import_removes_a_stale_partial(tmp_path, cache, tiny):
    reg = Registry.from_entries([entry("tiny", tiny[1])])
    cache.mkdir()
    partial_path(cache / "tiny.pt").write_bytes(b"half")
    src = tmp_path / "tiny.pt"
    src.write_bytes(tiny[0])
    import_weights(src, "tiny", cache_dir=cache, registry=reg)
    assert sorted(p.name for p in cache.iterdir()) == ["tiny.pt"]


def test_list_shows_states(tmp_path, cache, tiny):
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "ship.pt").write_bytes(tiny[0])
    reg = Registry.from_entries(
        [
            entry("ship", tiny[1], shipped=True, default=True),
            entry("far", tiny[1], urls=["http://127.0.0.1:9/f"]),
            entry("gone", tiny[1], shipped=True),
        ],
        assets,
    )
    src = tmp_path / "x.pt"
    src.write_bytes(tiny[0])
    import_weights(src, "local1", cache_dir=cache, registry=reg)
    rows = {r.entry.name: r for r in list_weights(cache, registry=reg)}
    assert rows["ship"].state == "shipped"
    assert rows["ship"].path == assets / "ship.pt"
    assert rows["gone"].state == "missing"
    assert rows["far"].state == "not cached"
    assert not rows["far"].cached
    assert rows["local1"].state == "cached"
    assert rows["local1"].entry.origin == "local"
    assert rows["local1"].entry.license == "MIT"


def test_path_does_not_download(server, cache, tiny):
    url = server.serve("/tiny.pt", tiny[0])
    reg = Registry.from_entries([entry("tiny", tiny[1], urls=[url])])
    with pytest.raises(WeightsError, match="not in the cache.*kitsseg weights pull tiny"):
        cached_weights_path("tiny", cache_dir=cache, registry=reg)
    assert server.requests == []


def test_pull_of_a_local_file_points_to_import(tmp_path, tiny):
    src = tmp_path / "w.pt"
    src.write_bytes(tiny[0])
    with pytest.raises(WeightsError, match="kitsseg weights import"):
        pull_weights(str(src), registry=Registry.from_entries([]))


def test_verify_reports_missing_shipped_partial_and_imported(tmp_path, cache, tiny):
    reg = Registry.from_entries([entry("ship", tiny[1], shipped=True)], tmp_path / "no-assets")
    src = tmp_path / "x.pt"
    src.write_bytes(tiny[0])
    import_weights(src, "mine", cache_dir=cache, registry=reg)
    partial_path(cache / "other.pt").write_bytes(b"12345")
    rows = {r.name: r for r in verify_cache(cache, registry=reg)}
    assert not rows["ship"].ok
    assert "missing" in rows["ship"].message
    assert rows["mine"].ok
    assert rows["other.pt"].ok
    assert "5 bytes" in rows["other.pt"].message
    (cache / "mine.pt").unlink()
    assert not {r.name: r for r in verify_cache(cache, registry=reg)}["mine"].ok


def test_entry_round_trip_fields():
    e = WeightsEntry.from_dict(entry("a", "A" * 64, urls=["https://x.org/a.pt"], size=12))
    assert e.sha256 == "a" * 64
    assert e.urls == ("https://x.org/a.pt",)
    assert e.hu_window == (-100.0, 300.0)
    assert e.size == 12
