"""Training: augmentation, the loop lowering the loss, exact resume, export, segmenting with it, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kitsseg.errors import DatasetError, InvalidOptionError
from kitsseg.evaluation.phantom import write_phantom
from kitsseg.io.load import load_labels
from kitsseg.nets.model import UNet, UNetConfig
from kitsseg.postprocess.shapestats import tumor_ratios
from kitsseg.training.augment import AugmentConfig, augment_batch
from kitsseg.training.config import PAPER_EIG_BOUNDS, TrainConfig
from kitsseg.training.data import SliceSet, find_cases, read_split
from kitsseg.training.loop import train_stage
from kitsseg.training.runfiles import load_best
from kitsseg.training.train import eig_bounds_from_ratios, export_weights, train
from kitsseg.weights.checkpoint import load_bundle, read_metadata

TINY = UNetConfig(base_width=4, depth=2)


def tiny_config(**kw: object) -> TrainConfig:
    base = dict(
        epochs=2,
        batch_size=4,
        lr=1e-3,
        unet=TINY,
        kidney_input=(32, 32),
        tumor_input=(16, 32),
        device="cpu",
        threads=1,
        max_steps=2,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kits") / "data"
    for i in range(4):
        write_phantom(root, name=f"case_{i:05d}", shape=(12, 64, 64), spacing=(3.0, 1.2, 1.2), seed=i)
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(dataset: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """Both stages, 2 epochs, in one go."""
    run = tmp_path_factory.mktemp("ref") / "run"
    return train(dataset, run, tiny_config(cache_dir=cache_dir))


# ----------------------------------------------------------------------------------------- augmentation


def _blob(h: int = 32, w: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.full((6, 1, h, w), 0.2)
    mask = torch.zeros(6, 1, h, w)
    mask[:, :, h // 3 : 2 * h // 3, 2 : w // 4] = 1  # on the image's left only
    img[mask.bool()] = 0.8
    return img, mask


def test_augment_keeps_masks_binary_values_in_range_and_never_flips() -> None:
    img, mask = _blob(16, 32)
    x, y = augment_batch(
        img, mask, AugmentConfig(p_spatial=1.0, p_intensity=1.0), torch.Generator().manual_seed(0)
    )
    assert x.shape == img.shape
    assert y.shape == mask.shape
    assert set(torch.unique(y).tolist()) <= {0.0, 1.0}
    assert float(x.min()) >= 0.0
    assert float(x.max()) <= 1.0
    cols = torch.arange(32).float()
    centre = (y[:, 0].sum(dim=1) * cols).sum(dim=1) / y[:, 0].sum(dim=(1, 2))
    assert (centre < 12).all()  # still on the left: no left-right flip
    area = y.sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3))
    assert ((area > 0.7) & (area < 1.4)).all()  # small rotation and scale only
    assert torch.equal(img, _blob(16, 32)[0])  # inputs untouched


def test_augment_is_reproducible_and_identity_when_off() -> None:
    img, mask = _blob()
    cfg = AugmentConfig(p_spatial=1.0, p_intensity=1.0)
    a = augment_batch(img, mask, cfg, torch.Generator().manual_seed(5))
    b = augment_batch(img, mask, cfg, torch.Generator().manual_seed(5))
    c = augment_batch(img, mask, cfg, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    off = augment_batch(img, mask, AugmentConfig(enabled=False), torch.Generator())
    assert off[0] is img
    assert off[1] is mask
    still = AugmentConfig(p_spatial=1.0, rotate_deg=0.0, scale=(1.0, 1.0), p_intensity=0.0)
    x, y = augment_batch(img, mask, still, torch.Generator().manual_seed(0))
    assert torch.allclose(x, img, atol=1e-5)
    assert torch.equal(y, mask)


def test_mirroring_flips_image_and_mask_together_and_leaves_old_recipes_unchanged() -> None:
    img, mask = _blob(16, 32)
    still = {"p_spatial": 0.0, "p_intensity": 0.0}
    x, y = augment_batch(img, mask, AugmentConfig(p_flip=1.0, **still), torch.Generator().manual_seed(0))
    assert torch.equal(x, img.flip(-1))
    assert torch.equal(y, mask.flip(-1))
    # About half the samples at p 0.5, each with its mask.
    x, y = augment_batch(img, mask, AugmentConfig(p_flip=0.5, **still), torch.Generator().manual_seed(1))
    flipped = [bool(torch.equal(y[i], mask[i].flip(-1))) for i in range(len(y))]
    assert 0 < sum(flipped) < len(y)
    for i, f in enumerate(flipped):
        assert torch.equal(x[i], img[i].flip(-1) if f else img[i])
    # p_flip 0 draws no random number for it (recipes from before the option keep their batches): the
    # generator ends where it ends without mirroring, and one draw short of where mirroring leaves it.
    cfg = AugmentConfig(p_spatial=1.0, p_intensity=1.0)
    g0, g1 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    augment_batch(img, mask, cfg, g0)
    augment_batch(img, mask, dataclasses.replace(cfg, p_flip=0.5), g1)
    assert not torch.equal(g0.get_state(), g1.get_state())
    torch.rand(len(img), generator=g0)
    assert torch.equal(g0.get_state(), g1.get_state())


# ----------------------------------------------------------------------------------------- the loop


def _disk_set(n: int = 8, size: int = 32, seed: int = 0) -> SliceSet:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.zeros((n, size, size), np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        cy, cx, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(4, 8)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        masks[i] = disk
        images[i] = 0.3 + 0.5 * disk + rng.normal(0, 0.05, (size, size))
    return SliceSet(np.clip(images, 0, 1), masks)


def test_training_steps_lower_the_loss_on_a_fixed_batch(tmp_path: Path) -> None:
    data = _disk_set()
    cfg = tiny_config(epochs=12, batch_size=8, lr=1e-2, augment=AugmentConfig(enabled=False), max_steps=None)
    res = train_stage("kidney", data, data, tmp_path / "k", cfg)
    losses = [r["train_loss"] for r in res.history]
    assert len(losses) == 12
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0]
    assert res.best_dice == max(r["val_dice"] for r in res.history)
    log = [json.loads(line) for line in (tmp_path / "k" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, 13))
    assert set(log[0]) >= {"epoch", "train_loss", "val_loss", "val_dice", "lr", "seconds"}


def test_train_stage_in_memory_arrays_and_export(tmp_path: Path) -> None:
    """The path a script takes with its own 2D slices: two stages, then a weights file."""
    kid = _disk_set(6)
    u8 = SliceSet((kid.images * 255).astype(np.uint8), kid.masks)
    tum_images = (np.random.default_rng(1).random((6, 16, 32)) * 255).astype(np.uint8)
    tum_masks = np.zeros((6, 16, 32), np.uint8)
    tum_masks[:3, 4:8, 4:8] = 1
    tum = SliceSet(tum_images, tum_masks, positive=tum_masks.any(axis=(1, 2)))
    cfg = tiny_config(epochs=1)
    k = train_stage("kidney", u8, u8, tmp_path / "kidney", cfg)
    t = train_stage("tumor", tum, tum, tmp_path / "tumor", cfg)
    assert k.input_size == (32, 32)
    assert t.input_size == (16, 32)
    path = export_weights(
        tmp_path / "w.pt",
        {"kidney": k.stage_model(), "tumor": t.stage_model()},
        hu_window=(-110.0, 330.0),
        eig_bounds=(1.07, 2.79),
        name="starter",
        training_data="disks",
    )
    bundle = load_bundle(path)
    assert bundle.hu_window == (-110.0, 330.0)
    assert bundle.tumor is not None
    assert bundle.tumor.input_size == (16, 32)
    assert bundle.metadata["eig_unit"] == "voxel"
    assert bundle.metadata["band_fraction"] == 0.5


def test_train_stage_sets_its_threads_only_while_it_runs(tmp_path: Path) -> None:
    """``threads`` applies to the training and is undone after it: a library call leaves the process alone."""
    data = _disk_set(4)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen: list[int] = []
    try:
        train_stage(
            "kidney",
            data,
            data,
            tmp_path / "k",
            tiny_config(epochs=1, threads=1),
            on_event=lambda name, info: seen.append(torch.get_num_threads()),
        )
        assert seen
        assert set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_channels_last_and_scaler_resume(tmp_path: Path, amp: str) -> None:
    """The CUDA code path (autocast, grad scaler, NHWC) exercised on the CPU."""
    data = _disk_set(8)
    cfg = tiny_config(epochs=1, amp=amp, channels_last=True, lr=1e-2)
    train_stage("kidney", data, data, tmp_path / "k", cfg)
    res = train_stage("kidney", data, data, tmp_path / "k", dataclasses.replace(cfg, epochs=2, resume=True))
    assert [r["epoch"] for r in res.history] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) for r in res.history)
    scaler = torch.load(tmp_path / "k" / "last.pt", weights_only=True)["scaler"]
    assert bool(scaler) == (amp == "fp16")  # the fp16 grad scaler's state is checkpointed


def test_slice_dataset_pickles_memory_maps_by_name(tmp_path: Path) -> None:
    """DataLoader workers started by spawn/forkserver must not receive a copy of the whole cache."""
    import pickle

    from kitsseg.training.loop import _SliceDataset

    arr = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.uint8, shape=(50, 64, 64))
    arr[:] = np.arange(50, dtype=np.uint8)[:, None, None]
    arr.flush()
    images = np.load(tmp_path / "a.npy", mmap_mode="r")
    ds = _SliceDataset(images, images, np.array([3, 7]))
    blob = pickle.dumps(ds)
    assert len(blob) < 2000
    back = pickle.loads(blob)
    assert int(back[1][0][0, 0]) == 7
    view = _SliceDataset(images[10:], images[10:], np.array([0]))  # a view is copied, never mis-mapped
    assert int(pickle.loads(pickle.dumps(view))[0][0][0, 0]) == 10


def test_tumor_stage_refuses_sets_without_tumor(tmp_path: Path) -> None:
    data = SliceSet(
        np.zeros((4, 16, 32), np.uint8), np.zeros((4, 16, 32), np.uint8), positive=np.zeros(4, bool)
    )
    with pytest.raises(DatasetError, match="tumor"):
        train_stage("tumor", data, data, tmp_path / "t", tiny_config())


# ----------------------------------------------------------------------------------------- whole runs


def test_run_folder_layout_split_and_logs(reference) -> None:  # noqa: ANN001
    run = reference.run_dir
    split = read_split(run / "split.json")
    assert split == reference.split
    assert not set(split.train) & set(split.val)
    assert len(split.val) == 1
    assert set(split.train) | set(split.val) == {f"case_{i:05d}" for i in range(4)}
    for stage in ("kidney", "tumor"):
        assert {p.name for p in (run / stage).iterdir()} == {"last.pt", "best.pt", "log.jsonl"}
        lines = (run / stage / "log.jsonl").read_text().splitlines()
        assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
        payload = torch.load(run / stage / "last.pt", weights_only=True)  # no pickle needed
        assert payload["epoch"] == 2
        assert isinstance(payload["rng_torch"], torch.Tensor)


def test_resume_continues_exactly(reference, dataset: Path, cache_dir: Path, tmp_path: Path) -> None:  # noqa: ANN001
    run = tmp_path / "run"
    first = train(dataset, run, tiny_config(cache_dir=cache_dir, epochs=1))
    assert first.stages["kidney"].epochs_completed == 1
    events: list[tuple[str, dict]] = []
    second = train(
        dataset,
        run,
        tiny_config(cache_dir=cache_dir, epochs=2, resume=True, val_fraction=0.5),
        on_event=lambda n, i: events.append((n, i)),
    )
    assert second.split == reference.split  # the saved split wins over a changed --val-fraction
    assert not second.cache_built
    starts = [i for n, i in events if n == "stage_start"]
    assert [s["start_epoch"] for s in starts] == [1, 1]
    for stage in ("kidney", "tumor"):
        a = torch.load(reference.run_dir / stage / "last.pt", weights_only=True)
        b = torch.load(run / stage / "last.pt", weights_only=True)
        assert a["epoch"] == b["epoch"] == 2
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), f"{stage} {key} differs after resume"
        sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
        assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
        assert a["scheduler"] == b["scheduler"]
        assert torch.equal(a["rng_torch"], b["rng_torch"])
        la = [json.loads(x) for x in (reference.run_dir / stage / "log.jsonl").read_text().splitlines()]
        lb = [json.loads(x) for x in (run / stage / "log.jsonl").read_text().splitlines()]
        strip = [{k: v for k, v in r.items() if k != "seconds"} for r in la]
        assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in lb]


def test_finished_run_is_not_retrained_and_is_protected(reference, dataset: Path, cache_dir: Path) -> None:  # noqa: ANN001
    stamp = (reference.run_dir / "kidney" / "last.pt").stat().st_mtime_ns
    again = train(dataset, reference.run_dir, tiny_config(cache_dir=cache_dir, resume=True))
    assert again.stages["kidney"].epochs_completed == 2
    assert (reference.run_dir / "kidney" / "last.pt").stat().st_mtime_ns == stamp
    with pytest.raises(InvalidOptionError, match="--resume"):
        train(dataset, reference.run_dir, tiny_config(cache_dir=cache_dir))
    with pytest.raises(InvalidOptionError, match="hu-window"):
        train(
            dataset,
            reference.run_dir,
            tiny_config(cache_dir=cache_dir, resume=True, epochs=3, hu_window=(-100.0, 200.0)),
        )


def test_exported_weights_carry_metadata_and_eig_bounds(reference, dataset: Path) -> None:  # noqa: ANN001
    meta = read_metadata(reference.weights_path)
    assert meta["hu_window"] == [0.0, 255.0]
    assert meta["eig_unit"] == "voxel"
    assert meta["band_fraction"] == 0.5
    assert meta["license"] == "same as the training data"
    assert meta["name"]
    assert meta["version"]
    assert "training" in meta["training_data"]
    assert set(meta["stages"]) == {"kidney", "tumor"}
    assert meta["stages"]["kidney"]["input_size"] == [32, 32]
    assert meta["stages"]["tumor"]["input_size"] == [16, 32]
    assert meta["stages"]["kidney"]["config"] == TINY.to_dict()
    ratios = []
    for name in reference.split.train:
        r, _, _ = tumor_ratios(load_labels(dataset / name / "segmentation.nii.gz").data)
        ratios += r
    assert meta["eig_bounds"] == list(eig_bounds_from_ratios(ratios))
    assert meta["eig_bounds"] != list(PAPER_EIG_BOUNDS)
    bundle = load_bundle(reference.weights_path)
    best = load_best(reference.run_dir / "kidney")
    for key, value in best.model.state_dict().items():
        assert torch.allclose(
            bundle.kidney.model.state_dict()[key].float(), value.float(), atol=1e-2, rtol=1e-2
        )


def test_exported_weights_segment_a_phantom(reference, tmp_path: Path) -> None:  # noqa: ANN001
    from kitsseg.inference.segment import segment
    from kitsseg.io.load import load_ct

    ct_path, _ = write_phantom(
        tmp_path, name="case_00042", shape=(12, 64, 64), spacing=(3.0, 1.2, 1.2), seed=42
    )
    out = tmp_path / "mask.nii.gz"
    result = segment(ct_path, out, weights=reference.weights_path, device="cpu", threads=1)
    assert out.is_file()
    assert result.output_path == out
    labels = load_labels(out).data
    assert labels.shape == load_ct(ct_path).data.shape
    assert set(np.unique(labels).tolist()) <= {0, 1, 2}


def test_tumor_only_run_needs_and_uses_kidney_weights(
    reference, dataset: Path, cache_dir: Path, tmp_path: Path
) -> None:  # noqa: ANN001
    with pytest.raises(InvalidOptionError, match="--kidney-weights"):
        train(dataset, tmp_path / "a", tiny_config(cache_dir=cache_dir, model="tumor"))
    with pytest.raises(InvalidOptionError, match="window"):
        train(
            dataset,
            tmp_path / "b",
            tiny_config(
                cache_dir=cache_dir,
                model="tumor",
                kidney_weights=reference.weights_path,
                hu_window=(-100.0, 200.0),
            ),
        )
    res = train(
        dataset,
        tmp_path / "c",
        tiny_config(cache_dir=cache_dir, model="tumor", epochs=1, kidney_weights=reference.weights_path),
    )
    assert set(res.stages) == {"tumor"}
    bundle = load_bundle(res.weights_path)
    ref = load_bundle(reference.weights_path)
    assert bundle.tumor is not None
    for key, value in ref.kidney.model.state_dict().items():
        assert torch.equal(bundle.kidney.model.state_dict()[key], value)


def test_kidney_only_run_exports_a_kidney_bundle(dataset: Path, cache_dir: Path, tmp_path: Path) -> None:
    res = train(dataset, tmp_path / "k", tiny_config(cache_dir=cache_dir, model="kidney", epochs=1, seed=1))
    bundle = load_bundle(res.weights_path)
    assert bundle.tumor is None
    assert not (tmp_path / "k" / "tumor").exists()
    assert res.split.val != read_split(tmp_path / "k" / "split.json").train


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="divisible"):
        tiny_config(kidney_input=(30, 32)).validate()
    with pytest.raises(ValueError, match="val_fraction"):
        tiny_config(val_fraction=0.0).validate()
    data = dataclasses.asdict(tiny_config())
    assert data["unet"]["base_width"] == 4


# ----------------------------------------------------------------------------------------- CLI


def test_cli_train_smoke(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kitsseg.cli import main

    main(
        [
            "train",
            str(dataset),
            "-o",
            str(tmp_path / "run"),
            "--model",
            "kidney",
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--base-width",
            "4",
            "--depth",
            "2",
            "--max-steps",
            "1",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--hu-window",
            "-100,300",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    out = capsys.readouterr().out
    assert "kidney epoch 1/1" in out
    assert "weights.pt" in out
    meta = read_metadata(tmp_path / "run" / "weights.pt")
    assert meta["hu_window"] == [-100.0, 300.0]
    assert meta["stages"]["kidney"]["input_size"] == [256, 256]
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["spec"]["kidney_input"] == [256, 256]


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--hu-window", "300,100"], 2),
        (["--paper-config", "--base-width", "8"], 2),
        (["--hu-window", "zero"], 2),
        (["--val-fraction", "1"], 2),
    ],
)
def test_cli_rejects_bad_options(
    dataset: Path, tmp_path: Path, args: list[str], code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    from kitsseg.cli import main

    with pytest.raises(SystemExit) as info:
        main(["train", str(dataset), "-o", str(tmp_path / "run"), *args])
    assert info.value.code == code
    assert args[0] in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_missing_dataset_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kitsseg.cli import main

    with pytest.raises(SystemExit) as info:
        main(["train", str(tmp_path / "nowhere"), "-o", str(tmp_path / "run"), "--device", "cpu"])
    assert info.value.code == DatasetError.exit_code
    assert "does not exist" in capsys.readouterr().err


def test_find_cases_used_by_train(dataset: Path) -> None:
    assert len(find_cases(dataset)) == 4


def test_unet_from_best_matches_config(reference) -> None:  # noqa: ANN001
    best = load_best(reference.run_dir / "tumor")
    assert isinstance(best.model, UNet)
    assert best.input_size == (16, 32)
    assert best.extra["best_epoch"] == reference.stages["tumor"].best_epoch


def _copy_dataset(dataset: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(dataset, tmp_path / "data"))


def test_label_values_above_cyst_are_refused(dataset: Path, tmp_path: Path) -> None:
    """Labels 4..255 (an ignore value, an instance map) were silently trained as kidney; 3 (a KiTS21+ cyst)
    still is, by design."""
    import nibabel as nib

    from kitsseg.errors import InvalidImageError

    data = _copy_dataset(dataset, tmp_path)
    seg = data / "case_00001" / "segmentation.nii.gz"
    img = nib.load(seg)
    labels = np.asarray(img.dataobj).astype(np.uint8)
    labels[0, 0, 0] = 255
    nib.save(nib.Nifti1Image(labels, img.affine), seg)
    with pytest.raises(InvalidImageError, match="case_00001: .* has label values 255"):
        train(data, tmp_path / "run", tiny_config(model="kidney", epochs=1))
    # found while the cache was built, after split.json was written: the new run folder is gone
    assert not (tmp_path / "run").exists()


def test_a_refused_case_keeps_a_run_folder_that_existed(dataset: Path, tmp_path: Path) -> None:
    """Only a run folder the refused call created is removed; one the user made keeps what it held."""
    import nibabel as nib

    from kitsseg.errors import InvalidImageError

    data = _copy_dataset(dataset, tmp_path)
    seg = data / "case_00001" / "segmentation.nii.gz"
    img = nib.load(seg)
    labels = np.asarray(img.dataobj).astype(np.uint8)
    labels[0, 0, 0] = 255
    nib.save(nib.Nifti1Image(labels, img.affine), seg)
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(InvalidImageError, match="has label values 255"):
        train(data, run, tiny_config(model="kidney", epochs=1))
    assert (run / "notes.txt").read_text() == "mine"


def test_a_text_imaging_file_is_refused_before_the_run_files(dataset: Path, tmp_path: Path) -> None:
    """A text file named imaging.nii.gz was a nibabel ImageFileError traceback (from the header scan that
    chooses the pixel spacing), after split.json and config.json had been written."""
    from kitsseg.errors import InvalidImageError

    data = _copy_dataset(dataset, tmp_path)
    (data / "case_00002" / "imaging.nii.gz").write_text("not a volume")
    with pytest.raises(InvalidImageError, match="case_00002/imaging.nii.gz is not a readable NIfTI file"):
        train(data, tmp_path / "run", tiny_config(model="kidney", epochs=1))
    assert not (tmp_path / "run").exists()
