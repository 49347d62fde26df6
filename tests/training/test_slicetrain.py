"""Training from a recipe file on a slice set: real optimiser steps, checkpoints, resume, export, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kitsseg.cli import app
from kitsseg.errors import InvalidOptionError
from kitsseg.inference.predict import predict_volume
from kitsseg.training.recipe import load_recipe
from kitsseg.training.slicesets import GridSlices
from kitsseg.training.slicetrain import THRESHOLDS, train_from_config, validate
from kitsseg.weights.checkpoint import load_bundle


def write_slice_set(path: Path, n: int = 24, size: int = 48) -> None:
    """Slices with a bright 'kidney' disk (label 1, some with a 'tumor' label 2 inside) on soft tissue; a
    quarter have no kidney. Grey values are clip(HU, 0, 255); every patient has two slices."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    images = np.full((n, size, size), 40, np.uint8)
    labels = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        if i % 4 == 3:
            continue
        cy, cx = rng.integers(14, size - 14, 2)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= 8**2
        images[i][disk] = 180
        labels[i][disk] = 1
        if i % 2 == 0:
            tumor = (yy - cy) ** 2 + (xx - cx - 3) ** 2 <= 3**2
            images[i][tumor] = 90
            labels[i][tumor] = 2
    np.savez(
        path,
        image_u8=images,
        label=labels,
        case_id=np.arange(n) // 2,
        spacing_rc_mm=np.full((n, 2), 2.0, np.float32),
    )


def write_recipe(folder: Path, minutes: float = 0.2, epochs: int = 2) -> Path:
    write_slice_set(folder / "set.npz")
    stage = {
        "width": 4,
        "lr": 0.003,
        "minutes": minutes,
        "epochs": epochs,
        "batch": 8,
        "bf16": False,
        "neg_fraction": 0.25,
        "phases": {"p_noise": 0.0},
    }
    recipe = {
        "data_root": ".",
        "pixel_spacing_mm": 3.0,
        "grid": [32, 32],
        "val_fraction": 0.25,
        "sources": [{"name": "toy", "path": "set.npz"}],
        "stages": {"kidney": stage, "tumor": {**stage, "paste": 0.5, "band_jitter": 2}},
        "export": {"version": "test"},
    }
    path = folder / "recipe.json"
    path.write_text(json.dumps(recipe))
    return path


def test_recipe_trains_resumes_and_exports_spacing_aware_weights(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    recipe = load_recipe(write_recipe(tmp_path, epochs=1))
    out = tmp_path / "run"
    weights = train_from_config(recipe, out, export_to=tmp_path / "w.pt", log=lambda _m: None)
    for stage in ("kidney", "tumor"):
        log = [json.loads(line) for line in (out / stage / "log.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in log] == [1]
        assert np.isfinite(log[0]["train_loss"])
        assert (out / stage / "best.pt").exists()
    # Resume: the epoch count continues from the checkpoint, it does not restart.
    more = load_recipe(write_recipe(tmp_path, epochs=2))
    train_from_config(more, out, stages=("kidney",), log=lambda _m: None)
    log = [json.loads(line) for line in (out / "kidney" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    bundle = load_bundle(weights)
    assert bundle.metadata["pixel_spacing_mm"] == 3.0
    assert bundle.kidney.input_size == (32, 32)
    assert bundle.tumor is not None
    assert bundle.tumor.input_size == (16, 32)
    # The exported weights run through inference at a slice's own spacing.
    pred = predict_volume(np.zeros((2, 40, 60), np.float32), bundle, spacing_rc=(1.0, 1.5))
    assert pred.kidney_tumor_mask.shape == (2, 40, 60)


def test_unknown_stage_options_are_refused(tmp_path: Path) -> None:
    path = write_recipe(tmp_path)
    raw = json.loads(path.read_text())
    raw["stages"]["kidney"]["learning_rate"] = 0.1
    path.write_text(json.dumps(raw))
    with pytest.raises(InvalidOptionError, match="learning_rate"):
        load_recipe(path)


@pytest.mark.slow
def test_cli_train_with_a_config_writes_weights(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    path = write_recipe(tmp_path, epochs=1)
    result = CliRunner().invoke(
        app,
        ["train", "--config", str(path), "-o", str(tmp_path / "run"), "--model", "kidney", "--threads", "1"],
    )
    assert result.exit_code == 0, result.output
    bundle = load_bundle(tmp_path / "run" / "weights.pt")
    assert bundle.tumor is None
    assert bundle.metadata["pixel_spacing_mm"] == 3.0


def test_a_second_phase_restarts_the_lr_and_the_selection(tmp_path: Path) -> None:
    """``then``: after the first phase's epochs, the options change, the LR restarts at ``then.lr``, and
    the exported epoch is chosen within the second phase; resuming mid-phase keeps the phase."""
    torch.set_num_threads(1)
    path = write_recipe(tmp_path, epochs=1)
    raw = json.loads(path.read_text())
    raw["stages"]["kidney"]["then"] = {"epochs": 2, "lr": 0.0005, "kidney_paste": 1.0}
    path.write_text(json.dumps(raw))
    recipe = load_recipe(path)
    assert recipe.stages["kidney"].total_epochs == 3
    assert recipe.stages["kidney"].at_epoch(0).kidney_paste == 0.0
    assert recipe.stages["kidney"].at_epoch(1).kidney_paste == 1.0
    out = tmp_path / "run"
    messages: list[str] = []
    train_from_config(recipe, out, stages=("kidney",), log=messages.append)
    log = [json.loads(line) for line in (out / "kidney" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert log[0]["lr"] == 0.003
    assert log[1]["lr"] == 0.0005
    assert any("second phase from epoch 2" in m for m in messages)
    best = torch.load(out / "kidney" / "best.pt", weights_only=True)
    assert best["epoch"] >= 2  # chosen within the second phase


def test_kidney_paste_puts_a_real_kidney_beside_the_spine_of_a_kidney_free_slice() -> None:
    from kitsseg.training.copypaste import paste_kidneys

    size = 96
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - 48) ** 2 + (xx - 48) ** 2 <= 44**2).astype(np.float32) * (50 / 255)  # soft tissue
    donor = body.copy()
    kidney = ((yy - 60) ** 2 + (xx - 25) ** 2 <= 7**2).astype(np.float32)
    donor[kidney > 0] = 200 / 255
    images = torch.from_numpy(np.stack([body, donor]))[:, None]
    kidneys = torch.from_numpy(np.stack([np.zeros_like(kidney), kidney]))[:, None]
    x, k = paste_kidneys(
        images[:1],
        kidneys[:1],
        images,
        kidneys,
        torch.Generator().manual_seed(0),
        1.0,
        torch.tensor([1]),
        spacing_mm=1.5,
    )
    assert torch.equal(images[0], body_t := torch.from_numpy(body)[None])  # inputs untouched
    pasted = k[0, 0] > 0
    assert 0.8 * kidney.sum() <= pasted.sum() <= 1.2 * kidney.sum()
    rows, cols = np.nonzero(pasted.numpy())
    assert rows.mean() > 48  # behind the body's centre
    assert 35 <= abs(cols.mean() - 48) * 1.5 <= 110 + 7 * 1.5  # beside the midline, where kidneys lie
    assert float(x[0, 0][pasted].mean()) > 150 / 255  # the kidney's own pixels
    assert torch.equal(
        x[0, 0][~(torch.nn.functional.max_pool2d(pasted[None].float(), 3, 1, 1)[0] > 0)],
        body_t[0][~(torch.nn.functional.max_pool2d(pasted[None].float(), 3, 1, 1)[0] > 0)],
    )


def test_select_by_slice_dice_exports_that_epoch_and_keeps_both_bests(tmp_path: Path) -> None:
    """Both validation scores are logged each epoch; ``best-dice.pt`` and ``best-slice_dice.pt`` hold each
    score's best epoch and threshold, ``best.pt`` (what export reads) the one ``select_by`` names."""
    torch.set_num_threads(1)
    path = write_recipe(tmp_path, epochs=3)
    raw = json.loads(path.read_text())
    raw["stages"]["tumor"]["select_by"] = "slice_dice"
    path.write_text(json.dumps(raw))
    recipe = load_recipe(path)
    out = tmp_path / "run"
    train_from_config(recipe, out, stages=("tumor",), log=lambda _m: None)
    log = [json.loads(line) for line in (out / "tumor" / "log.jsonl").read_text().splitlines()]
    for name, key in (("dice", "val_dice"), ("slice_dice", "val_slice_dice")):
        ck = torch.load(out / "tumor" / f"best-{name}.pt", weights_only=True)
        scores = [max(r[key].values()) for r in log]
        assert ck["epoch"] == 1 + scores.index(max(scores))  # the first epoch with the top score
        assert ck["select_by"] == name
        assert ck["threshold"] == float(max(log[ck["epoch"] - 1][key].items(), key=lambda kv: kv[1])[0])
    best = torch.load(out / "tumor" / "best.pt", weights_only=True)
    assert best["select_by"] == "slice_dice"
    raw["stages"]["tumor"]["select_by"] = "lesions"
    path.write_text(json.dumps(raw))
    with pytest.raises(InvalidOptionError, match="select_by"):
        load_recipe(path)


def test_slice_dice_counts_each_slice_once_and_empty_slices_as_one(tmp_path: Path) -> None:
    """A model that predicts nothing: pooled Dice 0, per-slice Dice = the fraction of slices without
    target (each scores 1), whatever the targets' sizes."""

    class Nothing(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full_like(x, -20.0)

    n = 8
    kidney = torch.zeros(n, 1, 32, 32, dtype=torch.uint8)
    kidney[:6, :, 4:30, 4:30] = 1  # six slices with target (big), two without
    data = GridSlices(
        torch.zeros(n, 1, 32, 32).half(),
        kidney,
        torch.zeros_like(kidney),
        np.array(["g"] * n),
        np.array(["s"] * n),
        np.ones((n, 2)),
    )
    recipe = load_recipe(write_recipe(tmp_path))
    stage = recipe.stages["kidney"]
    v = validate(Nothing(), "kidney", torch.arange(n), data, recipe, stage)
    assert v.lesions == {}  # lesions are counted for the tumor stage only
    for t in THRESHOLDS:
        assert v.dice[t] == 0.0
        assert v.slice_dice[t] == pytest.approx(2 / 8)


def test_a_stage_with_zero_epochs_keeps_its_warm_start_network_and_threshold(tmp_path: Path) -> None:
    """``epochs: 0`` with ``init_from``: the source weights' network and threshold are exported unchanged
    (a recipe that retrains the kidney stage and keeps the tumor stage); without ``init_from``: refused."""
    torch.set_num_threads(1)
    path = write_recipe(tmp_path, epochs=1)
    first = train_from_config(
        load_recipe(path), tmp_path / "a", export_to=tmp_path / "a.pt", log=lambda _m: None
    )
    source = load_bundle(first)
    assert source.tumor is not None
    raw = json.loads(path.read_text())
    raw["stages"]["tumor"].update({"epochs": 0, "init_from": str(first)})
    path.write_text(json.dumps(raw))
    messages: list[str] = []
    kept = train_from_config(
        load_recipe(path), tmp_path / "b", export_to=tmp_path / "b.pt", log=messages.append
    )
    bundle = load_bundle(kept)
    assert bundle.tumor is not None
    assert bundle.tumor.threshold == source.tumor.threshold
    for name, value in source.tumor.model.state_dict().items():
        assert torch.equal(bundle.tumor.model.state_dict()[name], value), name
    assert any("0 epochs" in m for m in messages)
    assert not (tmp_path / "b" / "tumor" / "log.jsonl").exists()  # nothing was trained
    raw["stages"]["tumor"].pop("init_from")
    path.write_text(json.dumps(raw))
    with pytest.raises(InvalidOptionError, match="0 epochs needs init_from"):
        train_from_config(load_recipe(path), tmp_path / "c", stages=("tumor",), log=lambda _m: None)


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.json")),
    ids=lambda p: p.name,
)
def test_every_committed_recipe_loads(path: Path, tmp_path: Path) -> None:
    """The shipped recipe and every ablation resolve (``extends`` chains, known options only) without data:
    a renamed or removed option in the library fails here, not in a long run."""
    recipe = load_recipe(path, data_root=tmp_path)
    assert recipe.sources
    assert recipe.stages["kidney"].width == 16
    if path.name == "starter.json":
        assert recipe.stages["kidney"].augment.p_flip == 0.5  # the 0.4.0 kidney lever
        assert recipe.stages["tumor"].synth == {"prob": 0.3}  # the 0.5.0 tumor lever
        assert recipe.stages["tumor"].epochs == 30
    if path.name in ("tumor-rerun.json", "tumor-lesion-select.json", "tumor-select-slice.json"):
        assert recipe.stages["tumor"].synth is None  # controls without the shipped recipe's lever


def test_lesion_f1_choice_and_size_balanced_loss_in_a_real_run(tmp_path: Path) -> None:
    """The tumor stage logs lesion counts and the lesion F1 per threshold each epoch; with ``select_by:
    "lesion_f1"`` best.pt is that score's best epoch, and ``small_lesion_weight`` changes the training (the
    toy tumors are about 14 mm across, under 4 cm, so they are weighted). Kidney stage: both refused."""
    torch.set_num_threads(1)
    path = write_recipe(tmp_path, epochs=2)
    raw = json.loads(path.read_text())
    raw["stages"]["tumor"]["select_by"] = "lesion_f1"
    path.write_text(json.dumps(raw))
    runs = {}
    for cap in (1.0, 10.0):
        raw["stages"]["tumor"]["small_lesion_weight"] = cap
        path.write_text(json.dumps(raw))
        out = tmp_path / f"run{cap:g}"
        train_from_config(load_recipe(path), out, stages=("tumor",), log=lambda _m: None)
        runs[cap] = out
    log = [json.loads(line) for line in (runs[1.0] / "tumor" / "log.jsonl").read_text().splitlines()]
    for rec in log:
        assert set(rec["val_lesions"]["0.5"]) == {"<=20mm", "20-40mm", ">40mm", "fp"}
    scores = [max(r["val_lesion_f1"].values()) for r in log]
    best = torch.load(runs[1.0] / "tumor" / "best.pt", weights_only=True)
    assert best["select_by"] == "lesion_f1"
    assert best["epoch"] == 1 + scores.index(max(scores))
    assert (runs[1.0] / "tumor" / "best-dice.pt").exists()
    a = torch.load(runs[1.0] / "tumor" / "last.pt", weights_only=True)["model"]
    b = torch.load(runs[10.0] / "tumor" / "last.pt", weights_only=True)["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    for option in ({"select_by": "lesion_f1"}, {"small_lesion_weight": 5.0}):
        raw["stages"]["tumor"] = {k: v for k, v in raw["stages"]["tumor"].items() if k not in option}
        raw["stages"]["kidney"] = {**raw["stages"]["kidney"], **option}
        path.write_text(json.dumps(raw))
        with pytest.raises(InvalidOptionError, match="tumor-stage"):
            load_recipe(path)
        raw["stages"]["kidney"] = {k: v for k, v in raw["stages"]["kidney"].items() if k not in option}


def test_weight_average_is_what_is_validated_exported_and_resumed(tmp_path: Path) -> None:
    """``ema_decay``: the moving average of the weights (and BatchNorm statistics) is the network scored and
    saved in best.pt, not the last optimiser step's; its state is in last.pt and a resumed run continues
    it (``n_averaged`` counts every optimiser step of both invocations). Out of [0, 1): refused."""
    torch.set_num_threads(1)
    path = write_recipe(tmp_path, epochs=1)
    raw = json.loads(path.read_text())
    raw["stages"]["tumor"].update(ema_decay=0.9, batch=2)  # several steps per epoch
    path.write_text(json.dumps(raw))
    out = tmp_path / "run"
    train_from_config(load_recipe(path), out, stages=("tumor",), log=lambda _m: None)
    last = torch.load(out / "tumor" / "last.pt", weights_only=True)
    best = torch.load(out / "tumor" / "best.pt", weights_only=True)
    averaged = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert averaged.keys() == best["model"].keys()
    assert all(torch.equal(averaged[k], best["model"][k]) for k in averaged)
    assert any(not torch.equal(last["model"][k], best["model"][k]) for k in averaged)
    steps_one_epoch = int(last["ema"]["n_averaged"])
    assert steps_one_epoch > 1
    raw["stages"]["tumor"]["epochs"] = 2
    path.write_text(json.dumps(raw))
    train_from_config(load_recipe(path), out, stages=("tumor",), log=lambda _m: None)
    resumed = torch.load(out / "tumor" / "last.pt", weights_only=True)
    assert int(resumed["epoch"]) == 2
    assert int(resumed["ema"]["n_averaged"]) == 2 * steps_one_epoch
    raw["stages"]["tumor"]["ema_decay"] = 1.0
    path.write_text(json.dumps(raw))
    with pytest.raises(InvalidOptionError, match="ema_decay"):
        load_recipe(path)


def test_a_one_stage_run_exports_the_other_stage_from_its_warm_start(tmp_path: Path) -> None:
    """``--model tumor`` with a recipe whose kidney stage has ``init_from``: the export takes the kidney
    network and threshold from there (a complete weights file); without ``init_from``: one clear error."""
    torch.set_num_threads(1)
    path = write_recipe(tmp_path, epochs=1)
    first = train_from_config(
        load_recipe(path), tmp_path / "a", export_to=tmp_path / "a.pt", log=lambda _m: None
    )
    source = load_bundle(first)
    raw = json.loads(path.read_text())
    raw["stages"]["kidney"]["init_from"] = str(first)
    path.write_text(json.dumps(raw))
    out = train_from_config(
        load_recipe(path), tmp_path / "b", stages=("tumor",), export_to=tmp_path / "b.pt", log=lambda _m: None
    )
    bundle = load_bundle(out)
    assert not (tmp_path / "b" / "kidney").exists()
    assert bundle.kidney.threshold == source.kidney.threshold
    for name, value in source.kidney.model.state_dict().items():
        assert torch.equal(bundle.kidney.model.state_dict()[name], value), name
    assert bundle.tumor is not None
    assert bundle.metadata["validation"]["kidney"] == {"epoch": 0, "kept_from": str(first)}
    raw["stages"]["kidney"].pop("init_from")
    path.write_text(json.dumps(raw))
    with pytest.raises(InvalidOptionError, match="no trained kidney stage"):
        train_from_config(
            load_recipe(path),
            tmp_path / "b",
            stages=("tumor",),
            export_to=tmp_path / "c.pt",
            log=lambda _m: None,
        )


def _mutate(path: Path, change: object) -> None:
    """Rewrite the recipe at ``path``: ``change`` is the new text, or a function editing the parsed JSON."""
    if isinstance(change, str):
        path.write_text(change)
        return
    raw = json.loads(path.read_text())
    change(raw)  # type: ignore[operator]
    path.write_text(json.dumps(raw))


def _stage(key: str, value: object):  # noqa: ANN202
    return lambda raw: raw["stages"]["kidney"].update({key: value})


def _top(key: str, value: object):  # noqa: ANN202
    return lambda raw: raw.update({key: value})


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ("[]", "must hold a JSON object"),
        ("null", "must hold a JSON object"),
        (_top("bogus", 1), "unknown key(s) ['bogus']"),
        (lambda raw: raw["stages"].update(liver={}), "unknown stage(s) ['liver']"),
        (_top("stages", []), "stages must be an object"),
        (lambda raw: raw.pop("sources"), "sources must be a non-empty list"),
        (_top("sources", [{"name": "toy", "path": "set.npz", "x": 1}]), "sources[0]: unknown key(s)"),
        (_stage("epochs", "2"), "stages.kidney: epochs must be an integer >= 0"),
        (_stage("epochs", 1.5), "epochs must be an integer"),
        (_stage("lr", "fast"), "lr must be a finite number > 0"),
        (_stage("lr", 0), "lr must be a finite number > 0"),
        (_stage("lr", float("nan")), "lr must be a finite number > 0"),
        (_stage("batch", 0), "batch must be an integer >= 1"),
        (_stage("batch", -4), "batch must be an integer >= 1"),
        (_stage("width", 0), "width must be an integer >= 1"),
        (_stage("crop", 20), "crop must be 0 (off) or a multiple of 16"),
        (_stage("crop", -16), "crop must be an integer >= 0"),
        (_stage("minutes", 0), "minutes must be a finite number > 0"),
        (_stage("neg_fraction", 2.0), "neg_fraction must be a finite number >= 0 and <= 1"),
        (_stage("bf16", "yes"), "bf16 must be true or false"),
        (_stage("phases", [1]), "phases must be a JSON object"),
        (_stage("phases", {"bogus": 1}), "unknown phases option(s): ['bogus']"),
        (_stage("augment", {"bogus": 1}), "unknown augment option(s): ['bogus']"),
        (_stage("augment", {"scale": 1.0}), "augment.scale must be like [0.9, 1.1]"),
        (_stage("synth", {"bogus": 1}), "unknown synth option(s): ['bogus']"),
        (_stage("then", "x"), "'then' must be a JSON object"),
        (_stage("ema_decay", "x"), "ema_decay must be a finite number >= 0 and < 1"),
        (_top("grid", [30, 30]), "grid must be [rows, columns], each a multiple of 16"),
        (_top("grid", "32"), "grid must be"),
        (_top("grid", [32, 32, 32]), "grid must be"),
        (_top("pixel_spacing_mm", 0), "pixel_spacing_mm must be a finite number > 0"),
        (_top("hu_window", [255, 0]), "hu_window must be [lo, hi] with lo < hi"),
        (_top("hu_window", [1]), "hu_window must be a list of 2 numbers"),
        (_top("val_fraction", 1), "val_fraction must be a finite number > 0 and < 1"),
        (_top("band_fraction", 0.3), "not a multiple of 16"),
        (_top("seed", "x"), "seed must be an integer"),
        (_top("export", []), "export must be a JSON object"),
        (_top("extends", 5), "'extends' must be a file name"),
        (_top("extends", "recipe.json"), "'extends' forms a cycle"),
        (_top("extends", "missing.json"), "(extended by"),
    ],
)
def test_a_bad_recipe_is_one_option_error_before_the_run_folder(
    change: object, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Wrong types, out-of-range values, unknown keys and stages, a document that is not an object and an
    ``extends`` cycle are refused when the recipe is read (they were tracebacks mid-run, after the run
    folder was created, or were silently ignored), and the CLI prints one line, exit 2, no run folder."""
    path = write_recipe(tmp_path, epochs=1)
    _mutate(path, change)
    with pytest.raises(InvalidOptionError) as info:
        load_recipe(path)
    assert fragment in str(info.value)
    from robustness import assert_one_error, run_cli

    capsys.readouterr()
    assert run_cli(["train", "--config", path, "-o", tmp_path / "run"]) == InvalidOptionError.exit_code
    assert_one_error(capsys.readouterr().err, fragment)
    assert not (tmp_path / "run").exists()


def test_extends_cycle_through_two_files_names_the_chain(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, epochs=1)
    _mutate(path, _top("extends", "b.json"))
    (tmp_path / "b.json").write_text(json.dumps({"extends": "recipe.json"}))
    with pytest.raises(InvalidOptionError, match="forms a cycle: .*recipe.json -> .*b.json -> .*recipe.json"):
        load_recipe(path)


@pytest.mark.parametrize("bad", ["text", "npy", "truncated", "fields"])
def test_an_unreadable_slice_set_is_one_dataset_error(bad: str, tmp_path: Path) -> None:
    """A slice set that is text, a bare .npy, a cut-off .npz or lacks the named arrays was a ValueError or
    KeyError traceback from np.load."""
    from kitsseg.errors import DatasetError

    path = write_recipe(tmp_path, epochs=1)
    source = {"name": "toy", "path": "bad.npz"}
    if bad == "text":
        (tmp_path / "bad.npz").write_text("not an archive")
    elif bad == "npy":
        np.save(tmp_path / "bad.npy", np.zeros(3))
        source["path"] = "bad.npy"
    elif bad == "truncated":
        (tmp_path / "bad.npz").write_bytes((tmp_path / "set.npz").read_bytes()[:500])
    else:
        source = {"name": "toy", "path": "set.npz", "fields": [["img", "lab", "case"]]}
    _mutate(path, _top("sources", [source]))
    with pytest.raises(DatasetError, match="slice set 'toy'"):
        train_from_config(load_recipe(path), tmp_path / "run", log=lambda _m: None)
    assert not (tmp_path / "run").exists()


def test_a_bad_init_from_leaves_no_stage_folder(tmp_path: Path) -> None:
    """A missing init_from file, or one whose network differs, used to leave an empty RUN/kidney behind (the
    mismatch was a ValueError traceback in the CLI)."""
    from kitsseg.errors import WeightsError

    path = write_recipe(tmp_path, epochs=1)
    _mutate(path, _stage("init_from", str(tmp_path / "none.pt")))
    with pytest.raises(WeightsError):
        train_from_config(load_recipe(path), tmp_path / "run", stages=("kidney",), log=lambda _m: None)
    assert not (tmp_path / "run").exists()
    weights = train_from_config(
        load_recipe(write_recipe(tmp_path, epochs=1)),
        tmp_path / "a",
        export_to=tmp_path / "a.pt",
        log=lambda _m: None,
    )
    _mutate(path, lambda raw: raw["stages"]["kidney"].update(init_from=str(weights), width=8))
    with pytest.raises(InvalidOptionError, match="the recipe asks"):
        train_from_config(load_recipe(path), tmp_path / "run", stages=("kidney",), log=lambda _m: None)
    assert not (tmp_path / "run").exists()
