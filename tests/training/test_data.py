"""Dataset discovery, the case-level split, slice sets, and the slice cache (content, reuse, rebuild)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kitsseg.errors import DatasetError
from kitsseg.evaluation.phantom import make_phantom, write_phantom
from kitsseg.inference.preprocess import band_height, band_start, resize, window
from kitsseg.training.data import (
    SliceSet,
    check_split,
    find_cases,
    fingerprint,
    make_split,
    read_split,
    write_split,
)
from kitsseg.training.slicecache import CacheSpec, build_cache, extract_slices, open_cache, open_or_build

SPEC = CacheSpec(kidney_input=(32, 32), tumor_input=(16, 32), pixel_spacing_mm=2.5)
LEGACY = CacheSpec(kidney_input=(32, 32), tumor_input=(16, 32), pixel_spacing_mm=None)
SHAPE = (12, 64, 64)


def write_dataset(root: Path, n: int = 4) -> Path:
    for i in range(n):
        write_phantom(root, name=f"case_{i:05d}", shape=SHAPE, spacing=(3.0, 1.2, 1.2), seed=i)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("kits") / "data")


# ----------------------------------------------------------------------------------------- discovery


def test_find_cases_lists_labelled_cases_and_skips_unlabelled(tmp_path: Path) -> None:
    write_dataset(tmp_path, 2)
    (tmp_path / "case_00009").mkdir()
    (tmp_path / "case_00009" / "imaging.nii.gz").write_bytes(
        (tmp_path / "case_00000" / "imaging.nii.gz").read_bytes()
    )
    cases = find_cases(tmp_path)
    assert [c.name for c in cases] == ["case_00000", "case_00001"]
    assert cases[0].labels.name == "segmentation.nii.gz"


@pytest.mark.parametrize("kind", ["missing", "file", "empty", "unlabelled"])
def test_find_cases_errors(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "data"
    if kind == "file":
        target.write_text("x")
    elif kind == "empty":
        target.mkdir()
        (target / "notes").mkdir()
    elif kind == "unlabelled":
        (target / "case_00000").mkdir(parents=True)
        (target / "case_00000" / "imaging.nii.gz").write_bytes(b"")
    with pytest.raises(DatasetError) as info:
        find_cases(target)
    assert str(target) in str(info.value)
    assert info.value.exit_code == 10


def test_fingerprint_changes_when_a_file_changes(tmp_path: Path) -> None:
    write_dataset(tmp_path, 2)
    before = fingerprint(find_cases(tmp_path))
    assert fingerprint(find_cases(tmp_path)) == before
    seg = tmp_path / "case_00001" / "segmentation.nii.gz"
    seg.write_bytes(seg.read_bytes() + b"\0")
    assert fingerprint(find_cases(tmp_path)) != before


# ----------------------------------------------------------------------------------------- split


def test_split_is_case_level_seeded_and_covers_all_cases() -> None:
    names = [f"case_{i:05d}" for i in range(30)]
    split = make_split(names, 0.1, seed=3)
    assert len(split.val) == 3
    assert len(split.train) == 27
    assert not set(split.train) & set(split.val)
    assert set(split.train) | set(split.val) == set(names)
    assert make_split(list(reversed(names)), 0.1, seed=3) == split  # order of listing does not matter
    assert make_split(names, 0.1, seed=4).val != split.val


def test_split_keeps_one_case_on_each_side_and_needs_two() -> None:
    split = make_split(["a", "b", "c"], 0.1, seed=0)
    assert len(split.val) == 1
    assert len(split.train) == 2
    assert len(make_split(["a", "b"], 0.9, seed=0).train) == 1
    with pytest.raises(DatasetError):
        make_split(["a"], 0.1, seed=0)


def test_split_round_trip_and_check(tmp_path: Path) -> None:
    split = make_split([f"c{i}" for i in range(10)], 0.2, seed=1)
    path = write_split(split, tmp_path / "split.json")
    assert read_split(path) == split
    check_split(split, [f"c{i}" for i in range(10)], path)
    with pytest.raises(DatasetError, match="not in the dataset"):
        check_split(split, [f"c{i}" for i in range(5)], path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DatasetError):
        read_split(tmp_path / "bad.json")


# ----------------------------------------------------------------------------------------- slice sets


def test_slice_set_epoch_rows_draws_negatives_at_the_ratio() -> None:
    images = np.zeros((20, 8, 8), np.uint8)
    positive = np.zeros(20, bool)
    positive[:4] = True
    s = SliceSet(images, images.copy(), positive=positive)
    rows = s.epoch_rows(1.0, np.random.default_rng(0))
    assert rows.size == 8
    assert set(range(4)) <= set(rows.tolist())
    other = s.epoch_rows(1.0, np.random.default_rng(1))
    assert not np.array_equal(rows, other)  # fresh negatives each epoch
    assert s.epoch_rows(100.0, np.random.default_rng(0)).size == 20
    assert s.epoch_rows(0.0, np.random.default_rng(0)).tolist() == [0, 1, 2, 3]
    assert s.epoch_rows(None, np.random.default_rng(0)).size == 20


def test_slice_set_validates() -> None:
    with pytest.raises(DatasetError):
        SliceSet(np.zeros((2, 8, 8), np.uint8), np.zeros((2, 8, 4), np.uint8))
    with pytest.raises(DatasetError):
        SliceSet(np.zeros((2, 8, 8), np.int32), np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DatasetError):
        SliceSet(np.zeros((2, 8, 8), np.uint8), np.zeros((2, 8, 8), np.uint8), rows=np.array([5]))


# ----------------------------------------------------------------------------------------- slice cache


def test_extract_slices_matches_inference_preprocessing_and_band() -> None:
    """The legacy geometry (weights without a model pixel spacing): each slice resized whole."""
    import torch

    ct, labels = make_phantom(SHAPE, (3.0, 1.2, 1.2), seed=5)
    assert not labels[0].any()
    labels[0, 20:28, 20:28] = 3  # a cyst (KiTS21+) alone on slice 0 counts as kidney
    arrays, entry = extract_slices(ct, labels, LEGACY)
    fg = labels > 0
    expected = np.flatnonzero(fg.any(axis=(1, 2)))
    assert entry["slices"] == expected.tolist()
    assert entry["tumor_slices"] == np.flatnonzero((labels == 2).any(axis=(1, 2))).tolist()
    rows = np.flatnonzero(fg.any(axis=(0, 2)))
    first = band_start(int(rows[0]), int(rows[-1]), SHAPE[1])
    assert entry["band"] == [first, band_height(SHAPE[1])]
    assert entry["band"][0] <= rows[0]
    assert rows[-1] < sum(entry["band"])

    z = int(expected[len(expected) // 2])
    ref = resize(window(torch.from_numpy(ct[z][None, None].copy()), 0.0, 255.0), (32, 32))[0, 0].numpy()
    assert np.abs(arrays["kidney_images"][len(expected) // 2] / 255.0 - ref).max() <= 0.5 / 255 + 1e-6
    band = ct[z, first : first + band_height(SHAPE[1])]
    ref_t = resize(window(torch.from_numpy(band[None, None].copy()), 0.0, 255.0), (16, 32))[0, 0].numpy()
    assert np.abs(arrays["tumor_images"][len(expected) // 2] / 255.0 - ref_t).max() <= 0.5 / 255 + 1e-6
    assert arrays["kidney_masks"].shape == (expected.size, 32, 32)
    assert set(np.unique(arrays["kidney_masks"])) <= {0, 1}
    # kidney masks include tumor and cyst; tumor masks only tumor
    assert expected[0] == 0
    assert arrays["kidney_masks"][0].sum() == 16
    has_tumor = np.isin(expected, entry["tumor_slices"])
    assert not arrays["tumor_masks"][~has_tumor].any()
    assert arrays["tumor_masks"][has_tumor].any(axis=(1, 2)).all()
    assert entry["eig_ratios"]
    assert all(r is None or r >= 1.0 for r in entry["eig_ratios"])


def test_cache_slices_of_a_non_square_ct_equal_the_inference_input() -> None:
    """On the model grid (the default), the cached kidney input of a non-square CT with anisotropic
    pixels is the tensor the kidney network gets at inference, and the band lies on the grid rows."""
    import os

    import torch

    from kitsseg.inference.predict import predict_volume
    from oracle import band_pass_unet, make_bundle

    ct, labels = make_phantom((6, 40, 56), (3.0, 1.4, 1.1), seed=2)
    arrays, entry = extract_slices(ct, labels, SPEC, spacing_rc=(1.4, 1.1))
    net = band_pass_unet(0.2, 0.9)
    seen: list[torch.Tensor] = []
    net.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].detach().clone()))
    bundle = make_bundle(net, None, kidney_size=(32, 32), meta={"pixel_spacing_mm": 2.5})
    os.environ["KITSSEG_FUSED_CONV"] = "0"  # the module itself runs, so the hook sees its input
    try:
        predict_volume(ct, bundle, batch_size=len(ct), spacing_rc=(1.4, 1.1))
    finally:
        del os.environ["KITSSEG_FUSED_CONV"]
    inference = torch.cat(seen)[entry["slices"], 0].numpy()
    assert np.abs(arrays["kidney_images"] / 255.0 - inference).max() <= 0.5 / 255 + 1e-6
    assert entry["band_frame"] == "grid"
    rows = np.flatnonzero(arrays["kidney_masks"].any(axis=(0, 2)))
    assert entry["band"] == [band_start(int(rows[0]), int(rows[-1]), 32), 16]


def test_cache_is_built_once_then_reused_and_rebuilt_on_spec_change(dataset: Path, tmp_path: Path) -> None:
    cases = find_cases(dataset)
    events: list[str] = []
    cache, built = open_or_build(cases, tmp_path / "c", SPEC, on_event=lambda n, i: events.append(n))
    assert built
    assert "cache_case" in events
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["spec"]["hu_window"] == [0.0, 255.0]
    assert [c["name"] for c in manifest["cases"]] == [c.name for c in cases]
    assert manifest["n_slices"] == sum(len(c["slices"]) for c in manifest["cases"])
    stamp = (tmp_path / "c" / "kidney_images.npy").stat().st_mtime_ns

    events.clear()
    again, built = open_or_build(cases, tmp_path / "c", SPEC, on_event=lambda n, i: events.append(n))
    assert not built
    assert events == []
    assert (tmp_path / "c" / "kidney_images.npy").stat().st_mtime_ns == stamp
    assert isinstance(again.stage("kidney").images, np.memmap)

    wider = CacheSpec(hu_window=(-200.0, 300.0), kidney_input=(32, 32), tumor_input=(16, 32))
    assert open_cache(tmp_path / "c", wider, fingerprint(cases)) is None
    _, built = open_or_build(cases, tmp_path / "c", wider)
    assert built
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["spec"]["hu_window"] == [-200.0, 300.0]
    leftovers = {p.name for p in (tmp_path / "c").glob(".*")}
    assert leftovers <= {".lock"}  # no temporaries or parts left behind


def test_cache_stage_views_follow_the_split(dataset: Path, tmp_path: Path) -> None:
    cache, _ = open_or_build(find_cases(dataset), tmp_path / "c", SPEC)
    names = cache.case_names
    kidney = cache.stage("kidney", names[:2])
    tumor = cache.stage("tumor", names[:2])
    n = sum(len(cache.case(x)["slices"]) for x in names[:2])
    assert len(kidney) == len(tumor) == n
    assert kidney.positive.all()
    assert tumor.n_positive == sum(len(cache.case(x)["tumor_slices"]) for x in names[:2])
    assert 0 < tumor.n_positive < len(tumor)
    assert set(kidney.cases) == set(names[:2])
    # positive flags agree with the stored tumor masks
    stored = np.asarray(tumor.masks)[tumor.rows].any(axis=(1, 2))
    assert np.array_equal(stored, tumor.positive)
    with pytest.raises(DatasetError):
        cache.stage("kidney", ["case_99999"])


def test_interrupted_build_reuses_finished_parts(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kitsseg.training.slicecache as sc

    cases = find_cases(dataset)
    real = sc.extract_case
    calls: list[str] = []

    def flaky(case, spec):  # noqa: ANN001, ANN202
        calls.append(case.name)
        if case.name == cases[2].name:
            raise RuntimeError("disk unplugged")
        return real(case, spec)

    monkeypatch.setattr(sc, "extract_case", flaky)
    with pytest.raises(RuntimeError):
        build_cache(cases, tmp_path / "c", SPEC)
    assert open_cache(tmp_path / "c", SPEC, fingerprint(cases)) is None
    calls.clear()
    monkeypatch.setattr(sc, "extract_case", lambda case, spec: (calls.append(case.name), real(case, spec))[1])
    _, built = open_or_build(cases, tmp_path / "c", SPEC)
    assert built
    assert calls == [c.name for c in cases[2:]]


@pytest.mark.slow
def test_parallel_build_gives_the_same_cache(dataset: Path, tmp_path: Path) -> None:
    cases = find_cases(dataset)
    one, _ = open_or_build(cases, tmp_path / "one", SPEC)
    two, _ = open_or_build(cases, tmp_path / "two", SPEC, workers=2)
    assert one.manifest["cases"] == two.manifest["cases"]
    for name in ("kidney", "tumor"):
        a, b = one.stage(name), two.stage(name)
        assert np.array_equal(np.asarray(a.images), np.asarray(b.images))
        assert np.array_equal(np.asarray(a.masks), np.asarray(b.masks))
