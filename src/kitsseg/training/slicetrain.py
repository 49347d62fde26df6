"""Train both stages on real slice sets from a recipe (:mod:`.recipe`), resumable, and export the weights.

Each stage writes ``OUT/<stage>/last.pt`` (model, optimiser, LR schedule, random state) after every epoch
and resumes from it when run again, so a CPU run can be spread over sessions (``minutes`` is the budget of
one invocation, ``epochs`` the total); ``best.pt`` keeps the epoch with the best validation score that the
stage's ``select_by`` names (pooled Dice, or mean per-slice Dice) and the probability threshold that was
best on the validation slices by that score; ``best-dice.pt`` and ``best-slice_dice.pt`` keep the best
epoch by each score; ``log.jsonl`` has one line per epoch with both.
Validation is on whole patients held out by :func:`.slicesets.split_groups`, on the model grid, without
augmentation; the tumor stage is validated on the band placed around the ground-truth kidney.

Loss 0.5 x BCE + 0.5 x soft Dice (:func:`kitsseg.training.losses.bce_dice_loss`), Adam, LR halved on a
validation- loss plateau, bf16 autocast on CPUs: the recipe of :mod:`kitsseg.training.train`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._version import __version__
from ..errors import InvalidOptionError
from ..inference.preprocess import band_height, band_start
from ..nets.model import UNet, UNetConfig
from ..weights.checkpoint import StageModel, load_bundle, save_bundle
from .augment import augment_batch
from .copypaste import paste_kidneys, paste_tumors
from .lesions2d import LesionTally, lesion_counts, lesion_weights
from .losses import bce_dice_loss
from .phases import render_phases
from .recipe import STAGES, Recipe, StageRecipe
from .slicesets import GridSlices, concat, load_source, split_groups

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
LogFn = Callable[[str], None]


@dataclass
class Validation:
    """One validation pass: loss, and per threshold the pooled Dice, the mean per-slice Dice and (tumor
    stage) the lesion counts."""

    loss: float
    dice: dict[float, float]
    slice_dice: dict[float, float]
    lesions: dict[float, LesionTally]

    def scores(self) -> dict[str, dict[float, float]]:
        """Each ``select_by`` score per threshold (``lesion_f1`` only where lesions were counted)."""
        out = {"dice": self.dice, "slice_dice": self.slice_dice}
        if self.lesions:
            out["lesion_f1"] = {t: v.f1 for t, v in self.lesions.items()}
        return out


@dataclass
class PreparedData:
    slices: GridSlices
    val: np.ndarray  # bool per slice


def prepare_data(recipe: Recipe) -> PreparedData:
    """Load every source onto the model grid and draw the patient-level validation split."""
    parts = [
        load_source(recipe.data_root, s, recipe.hu_window, recipe.grid, recipe.pixel_spacing_mm)
        for s in recipe.sources
    ]
    slices = concat(parts)
    return PreparedData(slices, split_groups(slices.group, recipe.val_fraction, recipe.seed))


def band_rows(
    kidney_rows: torch.Tensor, grid_h: int, fraction: float, jitter: int, gen: torch.Generator
) -> int:
    """First row of the tumor band around the kidney rows (a bool vector), with +-``jitter`` rows, clamped:
    the rule of :func:`kitsseg.inference.preprocess.band_start` that inference applies to the kidney model's
    rows."""
    rows = torch.nonzero(kidney_rows).flatten()
    if len(rows):
        first = band_start(int(rows.min()), int(rows.max()), grid_h, fraction)
    else:
        first = band_start(0, grid_h - 1, grid_h, fraction)
    j = int(torch.randint(-jitter, jitter + 1, (1,), generator=gen)) if jitter else 0
    return max(0, min(grid_h - band_height(grid_h, fraction), first + j))


def make_batch(
    stage: str,
    idx: torch.Tensor,
    data: GridSlices,
    recipe: Recipe,
    sr: StageRecipe,
    gen: torch.Generator,
    train: bool,
    donors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Network input and target of one batch (augmented when ``train``)."""
    x = data.image[idx].float()
    kt = data.kidney[idx].float()
    tu = data.tumor[idx].float()
    if train and stage == "kidney" and sr.kidney_paste > 0 and donors is not None:
        x, kt = paste_kidneys(
            x, kt, data.image, data.kidney, gen, sr.kidney_paste, donors, recipe.pixel_spacing_mm
        )
    if train and stage == "tumor":
        if sr.paste > 0 and donors is not None:
            x, tu, kt = paste_tumors(x, tu, kt, data.image, data.tumor, gen, sr.paste, donors)
        if sr.synth:
            from .synthtumor import SynthTumorConfig, synthesize_tumors

            x, kt, tu = synthesize_tumors(
                x, kt, tu, recipe.pixel_spacing_mm, gen, SynthTumorConfig(**sr.synth)
            )
    if train:
        x = render_phases(x, kt, tu, gen, sr.phases, recipe.pixel_spacing_mm)
        x, masks = augment_batch(x, torch.cat([kt, tu], 1), sr.augment, gen)
        kt, tu = masks[:, :1], masks[:, 1:]
    if stage == "kidney":
        y = kt
        if train and sr.crop:
            x, y = _crop(x, y, y, sr.crop, gen)
        return x, y
    grid_h = x.shape[-2]
    band_h = band_height(grid_h, recipe.band_fraction)
    xs, ys, ks = [], [], []
    for i in range(len(idx)):
        r0 = band_rows(
            kt[i, 0].amax(1) > 0, grid_h, recipe.band_fraction, sr.band_jitter if train else 0, gen
        )
        xs.append(x[i : i + 1, :, r0 : r0 + band_h])
        ys.append(tu[i : i + 1, :, r0 : r0 + band_h])
        ks.append(kt[i : i + 1, :, r0 : r0 + band_h])
    xb, yb = torch.cat(xs), torch.cat(ys)
    if train and sr.crop:
        kb = torch.cat(ks)
        focus = torch.where(yb.flatten(1).amax(1).view(-1, 1, 1, 1) > 0, yb, kb)
        xb, yb = _crop(xb, yb, focus, sr.crop, gen)
    return xb, yb


def _crop(x: torch.Tensor, y: torch.Tensor, focus: torch.Tensor, crop: int, gen: torch.Generator):
    """Crops of ``crop`` x ``crop`` (fewer rows if the input has fewer) centred near a random focus pixel 80%
    of the time (else anywhere): a fraction of the cost of whole inputs on a CPU, and the network is fully
    convolutional, so inference still runs on the whole grid."""
    n, _, h, w = x.shape
    ch = min(crop, h)
    xs, ys = [], []
    for i in range(n):
        pts = torch.nonzero(focus[i, 0])
        if len(pts) and float(torch.rand(1, generator=gen)) < 0.8:
            r, c = pts[int(torch.randint(len(pts), (1,), generator=gen))].tolist()
        else:
            r, c = int(torch.randint(h, (1,), generator=gen)), int(torch.randint(w, (1,), generator=gen))
        r0, c0 = max(0, min(h - ch, r - ch // 2)), max(0, min(w - crop, c - crop // 2))
        xs.append(x[i : i + 1, :, r0 : r0 + ch, c0 : c0 + crop])
        ys.append(y[i : i + 1, :, r0 : r0 + ch, c0 : c0 + crop])
    return torch.cat(xs), torch.cat(ys)


def validate(
    model: torch.nn.Module, stage: str, idx: torch.Tensor, data: GridSlices, recipe: Recipe, sr: StageRecipe
) -> Validation:
    """Validation loss, pooled Dice per threshold, mean per-slice Dice per threshold (a slice with neither
    prediction nor target scores 1) and, for the tumor stage, lesion counts per threshold
    (:func:`.lesions2d.lesion_counts`), on the model grid without augmentation."""
    gen = torch.Generator().manual_seed(0)
    model.eval()
    counts = {t: [0.0, 0.0, 0.0] for t in THRESHOLDS}
    per_slice = {t: 0.0 for t in THRESHOLDS}
    lesions = {t: LesionTally() for t in THRESHOLDS}
    total = 0.0
    with torch.inference_mode():
        for b in range(0, len(idx), 32):
            x, y = make_batch(stage, idx[b : b + 32], data, recipe, sr, gen, False)
            logits = model(x.contiguous(memory_format=torch.channels_last)).float()
            total += float(bce_dice_loss(logits, y)) * len(x)
            p = torch.sigmoid(logits)
            for t, c in counts.items():
                m = (p > t).float()
                tp = (m * y).flatten(1).sum(1)
                fp = (m * (1 - y)).flatten(1).sum(1)
                fn = ((1 - m) * y).flatten(1).sum(1)
                c[0] += float(tp.sum())
                c[1] += float(fp.sum())
                c[2] += float(fn.sum())
                denom = 2 * tp + fp + fn
                per_slice[t] += float(torch.where(denom > 0, 2 * tp / denom.clamp(min=1), 1.0).sum())
                if stage == "tumor":
                    lesions[t].add(
                        lesion_counts(m[:, 0].numpy() > 0, y[:, 0].numpy() > 0.5, recipe.pixel_spacing_mm)
                    )
    model.train()
    dice = {t: 2 * c[0] / max(2 * c[0] + c[1] + c[2], 1.0) for t, c in counts.items()}
    slice_dice = {t: v / max(len(idx), 1) for t, v in per_slice.items()}
    return Validation(total / max(len(idx), 1), dice, slice_dice, lesions if stage == "tumor" else {})


def _initial_model(sr: StageRecipe, stage: str) -> tuple[UNet, float | None]:
    """The stage's starting network and, when warm-started, the threshold the source weights use."""
    config = UNetConfig(base_width=sr.width, depth=4, norm="batch", upsample="transpose")
    if sr.init_from:
        from ..weights.registry import PACKAGE_ASSETS

        path = PACKAGE_ASSETS / "kitsseg-starter.pt" if sr.init_from == "package" else Path(sr.init_from)
        bundle = load_bundle(path)
        src = bundle.kidney if stage == "kidney" else bundle.tumor
        if src is None:  # an option error, not a traceback: the recipe names the wrong file
            raise InvalidOptionError(f"init_from {path} has no {stage} model to start from")
        if src.model.config != config:
            raise InvalidOptionError(
                f"init_from {path}: its {stage} network is {src.model.config}, the recipe asks {config}"
            )
        model = UNet(config)
        model.load_state_dict(src.model.state_dict())
        return model, float(src.threshold)
    return UNet(config), None


def train_stage(
    recipe: Recipe, stage: str, out: str | os.PathLike[str], data: PreparedData, log: LogFn = print
) -> Path:
    """Train (or resume) one stage for its time budget; returns its ``best.pt``."""
    sr = recipe.stages[stage]
    folder = Path(out) / stage
    s = data.slices
    val = torch.from_numpy(data.val)
    has_kt = s.kidney.flatten(1).amax(1) > 0
    has_tu = s.tumor.flatten(1).amax(1) > 0
    pos, neg = (has_kt, ~has_kt) if stage == "kidney" else (has_tu, has_kt & ~has_tu)
    tr_pos = torch.nonzero(pos & ~val).flatten()
    tr_neg = torch.nonzero(neg & ~val).flatten()
    pelvic_set = set(recipe.pelvic_negatives)
    pelvic = torch.tensor([(str(a), str(b)) in pelvic_set for a, b in zip(s.source, s.group, strict=True)])
    tr_pelvic = torch.nonzero(pelvic & neg & ~val).flatten()
    va = torch.nonzero((pos | neg) & val).flatten()
    donors = torch.nonzero((has_tu if stage == "tumor" else has_kt) & ~val).flatten()

    torch.manual_seed(recipe.seed)
    model, source_threshold = _initial_model(sr, stage)
    # Created only now: an init_from that is missing, corrupt or of another network used to leave an
    # empty RUN/<stage> folder behind on a refused run.
    folder.mkdir(parents=True, exist_ok=True)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if sr.total_epochs == 0:
        return _carry_over(model, source_threshold, stage, folder, va, s, recipe, sr, log)
    last = folder / "last.pt"
    ck = torch.load(last, weights_only=True) if last.exists() else None
    start = sr.at_epoch(int(ck["epoch"]) if ck is not None else 0)
    opt = torch.optim.Adam(model.parameters(), lr=sr.lr)
    ema = _weight_average(model, sr.ema_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=start.patience)
    gen = torch.Generator().manual_seed(recipe.seed)
    epoch, best = 0, -1.0
    bests: dict[str, float] = {}
    if ck is not None:
        model.load_state_dict(ck["model"])
        if ema is not None and "ema" in ck:
            ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        gen.set_state(ck["gen"])
        torch.set_rng_state(ck["rng"])
        epoch, best = int(ck["epoch"]), float(ck["best"])
        bests = {str(k): float(v) for k, v in ck.get("bests", {start.select_by: best}).items()}
        log(f"resumed {stage} at epoch {epoch}, best {best:.4f}")
    log(f"{stage}: train pos {len(tr_pos)} neg {len(tr_neg)} (pelvic {len(tr_pelvic)}), val {len(va)}")
    deadline = time.time() + sr.minutes * 60
    base = sr
    while epoch < base.total_epochs and time.time() < deadline:
        sr = base.at_epoch(epoch)
        if base.then is not None and epoch == base.epochs:  # the second phase starts now
            for group in opt.param_groups:
                group["lr"] = sr.lr
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode="min", factor=0.5, patience=sr.patience
            )
            best, bests = -1.0, {}
            log(f"{stage}: second phase from epoch {epoch + 1}, LR {sr.lr}")
        n_neg = int(round(sr.batch * sr.neg_fraction))
        k = sr.batch - n_neg
        steps = max(1, len(tr_pos) // max(k, 1))
        t0 = time.time()
        model.train()
        total = 0.0
        perm = tr_pos[torch.randperm(len(tr_pos), generator=gen)]
        for step in range(steps):
            pi = perm[step * k : (step + 1) * k]
            ni = tr_neg[torch.randint(len(tr_neg), (n_neg,), generator=gen)] if len(tr_neg) else tr_neg
            n_pel = int(round(n_neg * sr.pelvic_fraction)) if len(tr_pelvic) else 0
            if n_pel:
                ni[:n_pel] = tr_pelvic[torch.randint(len(tr_pelvic), (n_pel,), generator=gen)]
            x, y = make_batch(stage, torch.cat([pi, ni]), s, recipe, sr, gen, True, donors)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=sr.bf16):
                logits = model(x.contiguous(memory_format=torch.channels_last))
            weight = (
                lesion_weights(y, recipe.pixel_spacing_mm, sr.small_lesion_weight)
                if sr.small_lesion_weight > 1.0
                else None
            )
            loss = bce_dice_loss(logits.float(), y, pixel_weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            total += float(loss.detach())
        # With weight averaging, the averaged network is validated, chosen and exported.
        scored = model if ema is None else ema.module
        v = validate(scored, stage, va, s, recipe, sr)
        scores = v.scores()
        sched.step(v.loss)
        epoch += 1
        rec = {
            "stage": stage,
            "epoch": epoch,
            "train_loss": round(total / steps, 5),
            "val_loss": round(v.loss, 5),
            **{
                f"val_{name}": {str(t): round(val, 4) for t, val in score.items()}
                for name, score in scores.items()
            },
            **({"val_lesions": {str(t): n.to_dict() for t, n in v.lesions.items()}} if v.lesions else {}),
            "lr": opt.param_groups[0]["lr"],
            "seconds": round(time.time() - t0, 1),
        }
        log(json.dumps(rec))
        with open(folder / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        # The best epoch by each score is kept (best-dice.pt, best-slice_dice.pt, best-lesion_f1.pt), so
        # one run can be exported either way; best.pt is the one the recipe's select_by names.
        for name, score in scores.items():
            if max(score.values()) <= bests.get(name, -1.0):
                continue
            bests[name] = max(score.values())
            payload = {
                "model": scored.state_dict(),
                "config": json.dumps(model.config.to_dict()),
                "epoch": epoch,
                "val_dice": bests[name],
                "threshold": max(score, key=lambda t: score[t]),
                "select_by": name,
            }
            _save(folder / f"best-{name}.pt", payload)
            if name == sr.select_by:
                _save(folder / "best.pt", payload)
        best = bests[sr.select_by]
        _save(
            last,
            {
                "model": model.state_dict(),
                **({"ema": ema.state_dict()} if ema is not None else {}),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "gen": gen.get_state(),
                "rng": torch.get_rng_state(),
                "epoch": epoch,
                "best": best,
                "bests": dict(bests),
            },
        )
    return folder / "best.pt"


def _weight_average(model: UNet, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of the network's weights and BatchNorm statistics (``decay`` per
    optimiser step; ``None`` when 0). Validation scores of the raw weights jump from epoch to epoch (a few
    hundred tumor slices, small batches), so the epoch that wins is partly luck; the average of the last
    ``~1 / (1 - decay)`` steps moves smoothly and is the better-generalising network (Polyak averaging;
    Izmailov et al. 2018 for weight averaging in deep networks)."""
    if decay <= 0.0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _carry_over(
    model: UNet,
    threshold: float | None,
    stage: str,
    folder: Path,
    va: torch.Tensor,
    data: GridSlices,
    recipe: Recipe,
    sr: StageRecipe,
    log: LogFn,
) -> Path:
    """A stage with 0 epochs exports its warm-start network unchanged, with the source weights' threshold
    (validated once, so the log records its score): a recipe can retrain one stage and keep the other."""
    if threshold is None:
        raise InvalidOptionError(
            f"{stage}: a stage with 0 epochs needs init_from (its network is kept as is)"
        )
    score = validate(model, stage, va, data, recipe, sr).scores()[sr.select_by]
    nearest = min(score, key=lambda t: abs(t - threshold))
    log(
        f"{stage}: 0 epochs, the network of {sr.init_from} is kept "
        f"(validation {score[nearest]:.4f} at threshold {nearest})"
    )
    payload = {
        "model": model.state_dict(),
        "config": json.dumps(model.config.to_dict()),
        "epoch": 0,
        "val_dice": score[nearest],
        "threshold": threshold,
        "select_by": sr.select_by,
    }
    _save(folder / "best.pt", payload)
    return folder / "best.pt"


def _save(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export(recipe: Recipe, out: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Write the weights file from both stages' ``best.pt``, with the recipe's geometry in its metadata."""
    stages: dict[str, StageModel] = {}
    validation: dict[str, Any] = {}
    sizes = {"kidney": tuple(recipe.grid), "tumor": recipe.tumor_input}
    for stage in STAGES:
        f = Path(out) / stage / "best.pt"
        if not f.exists():
            # A stage not trained in this run (``--model tumor``) is exported from its warm start, the
            # network a 0-epoch stage keeps, so a one-stage run still gives a complete weights file.
            sr = recipe.stages[stage]
            if not sr.init_from:
                if stage == "kidney":
                    raise InvalidOptionError(
                        f"cannot export weights: {out} has no trained kidney stage and the recipe's kidney "
                        "stage has no init_from to take it from (train it: --model kidney or both)"
                    )
                continue
            model, threshold = _initial_model(sr, stage)
            stages[stage] = StageModel(model, sizes[stage], float(threshold))  # type: ignore[arg-type]
            validation[stage] = {"epoch": 0, "kept_from": str(sr.init_from)}
            continue
        ck = torch.load(f, weights_only=True)
        model = UNet(UNetConfig.from_dict(json.loads(ck["config"])))
        model.load_state_dict(ck["model"])
        stages[stage] = StageModel(model, sizes[stage], float(ck["threshold"]))  # type: ignore[arg-type]
        validation[stage] = {
            "epoch": int(ck["epoch"]),
            "val_dice": round(float(ck["val_dice"]), 4),  # the score select_by names
            "select_by": str(ck.get("select_by", "dice")),
        }
    meta: dict[str, Any] = {
        "name": "kitsseg-starter",
        "hu_window": list(recipe.hu_window),
        "pixel_spacing_mm": recipe.pixel_spacing_mm,
        "band_fraction": recipe.band_fraction,
        "eig_bounds": [1.07, 2.8],
        "eig_unit": "voxel",
        "trained_spacing_mm": [
            float(recipe.raw.get("trained_spacing_mm", [0.4375, 1.041])[0]),
            float(recipe.raw.get("trained_spacing_mm", [0.4375, 1.041])[1]),
        ],
        "validation": validation,
        "kitsseg_version": __version__,
        **dict(recipe.export),
    }
    return save_bundle(path, stages, meta, half=True)


def train_from_config(
    recipe: Recipe,
    out: str | os.PathLike[str],
    *,
    stages: tuple[str, ...] = STAGES,
    export_to: str | os.PathLike[str] | None = None,
    log: LogFn = print,
) -> Path | None:
    """Run the recipe's stages (resuming each from its last checkpoint), then export if asked."""
    kidney_source = Path(out) / "kidney" / "best.pt"
    if export_to is not None and "kidney" not in stages and not kidney_source.exists():
        if not recipe.stages["kidney"].init_from:
            raise InvalidOptionError(
                f"cannot export weights: {out} has no trained kidney stage and the recipe's kidney stage has "
                "no init_from to take it from (train it: --model kidney or both)"
            )
    data = prepare_data(recipe)
    log(
        f"{len(data.slices)} slices on a {recipe.grid} grid at {recipe.pixel_spacing_mm} mm, "
        f"{int(data.val.sum())} held out"
    )
    for stage in stages:
        train_stage(recipe, stage, out, data, log)
    if export_to is not None:
        return export(recipe, out, export_to)
    return None
