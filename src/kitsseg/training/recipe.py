"""The training config file: one JSON document that fixes the whole recipe of a weights file.

``configs/starter.json`` in the repository is the recipe of the shipped weights; ``kitsseg train --config
FILE`` runs it. Every lever is an option here (nothing lives in a separate script): the slice sets and how
their grey values map to HU, the model grid and pixel spacing, the validation split, and per stage the
network width, warm start, time budget, batch composition (negatives, pelvic negatives), augmentation,
contrast phases, copy-paste, synthetic tumors and band jitter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import InvalidOptionError
from ..inference.preprocess import MODEL_SPACING_MM
from .augment import AugmentConfig
from .phases import PhaseConfig
from .slicesets import SliceSource

STAGES = ("kidney", "tumor")
SELECT_BY = ("dice", "slice_dice", "lesion_f1")


@dataclass(frozen=True)
class StageRecipe:
    """One stage's training options (see the module docstring; defaults are the starter recipe's)."""

    width: int = 16
    init_from: str | None = None  # "package" (the weights shipped with kitsseg) or a weights file
    lr: float = 1e-3
    patience: int = 3
    minutes: float = 30.0
    epochs: int = 200
    batch: int = 16
    crop: int = 0  # train on crops this wide (0: whole grid inputs)
    neg_fraction: float = 0.25  # of each batch: kidney stage: slices without kidney; tumor: kidney, no tumor
    pelvic_fraction: float = 0.0  # of the negatives, drawn from the config's pelvic_negatives
    band_jitter: int = 12  # tumor stage: +- rows of band placement jitter
    paste: float = 0.0  # tumor stage: copy-paste probability per tumor-free kidney slice
    kidney_paste: float = 0.0  # kidney stage: probability of pasting a real kidney into a kidney-free slice
    synth: Mapping[str, Any] | None = None  # tumor synthesis options (training.synthtumor.SynthTumorConfig)
    phases: PhaseConfig = field(default_factory=PhaseConfig)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(scale=(0.75, 1.33)))
    bf16: bool = True
    #: Which validation score picks the exported epoch and threshold: ``"dice"`` (pooled over the
    #: validation slices: dominated by large objects) or ``"slice_dice"`` (the mean Dice per validation
    #: slice, a slice with neither prediction nor target scoring 1: each slice counts once, so a missed
    #: small tumor or a false positive on a tumor-free kidney slice costs as much as a large tumor's).
    #: ``"lesion_f1"`` (tumor stage only): the lesion F1 of :mod:`.lesions2d` on the validation slices,
    #: each tumor region counted once whatever its size, every invented region charged.
    select_by: str = "dice"
    #: Tumor stage: cap of the size-balanced BCE weights (:func:`.lesions2d.lesion_weights`); tumor
    #: regions under 4 cm get up to this weight. 1 (default): the paper's unweighted loss.
    small_lesion_weight: float = 1.0
    #: Exponential moving average of the weights, per optimiser step (0: off; e.g. 0.99 averages about
    #: the last 100 steps): the averaged network is validated, chosen and exported (``slicetrain``).
    ema_decay: float = 0.0
    #: A second phase: after ``epochs``, ``then.epochs`` more with these options changed (the LR schedule
    #: restarts at ``then.lr`` and the exported epoch is chosen within this phase), e.g. a new augmentation
    #: on top of a converged model.
    then: StageRecipe | None = None

    @property
    def total_epochs(self) -> int:
        return self.epochs + (self.then.epochs if self.then is not None else 0)

    def at_epoch(self, epoch: int) -> StageRecipe:
        """The options in force for 0-based ``epoch``."""
        return self if self.then is None or epoch < self.epochs else self.then

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StageRecipe:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InvalidOptionError(f"unknown stage option(s) in the training config: {sorted(unknown)}")
        kw: dict[str, Any] = dict(d)
        if kw.get("select_by", "dice") not in SELECT_BY:
            raise InvalidOptionError(
                f"select_by must be one of {', '.join(SELECT_BY)}, got {kw.get('select_by')!r}"
            )
        if not 0.0 <= float(kw.get("ema_decay", 0.0)) < 1.0:
            raise InvalidOptionError(f"ema_decay must be in [0, 1), got {kw.get('ema_decay')!r}")
        if kw.get("then") is not None:
            second = {k: v for k, v in d.items() if k != "then"}
            second.update(kw["then"])
            if "then" in kw["then"]:
                raise InvalidOptionError("a stage's 'then' phase cannot have its own 'then'")
            kw["then"] = cls.from_dict(second)
        if "phases" in kw:
            kw["phases"] = PhaseConfig(**kw["phases"])
        if "augment" in kw:
            a = dict(kw["augment"])
            for k in ("scale", "contrast", "gamma"):
                if k in a:
                    a[k] = tuple(a[k])
            kw["augment"] = AugmentConfig(**a)
        return cls(**kw)


@dataclass(frozen=True)
class Recipe:
    """A whole training config (both stages, the data, the export metadata)."""

    data_root: Path
    sources: tuple[SliceSource, ...]
    stages: dict[str, StageRecipe]
    hu_window: tuple[float, float] = (0.0, 255.0)
    pixel_spacing_mm: float = MODEL_SPACING_MM
    grid: tuple[int, int] = (256, 256)
    band_fraction: float = 0.5
    val_fraction: float = 0.15
    seed: int = 0
    pelvic_negatives: tuple[tuple[str, str], ...] = ()
    export: Mapping[str, Any] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def tumor_input(self) -> tuple[int, int]:
        return (max(1, int(round(self.grid[0] * self.band_fraction))), self.grid[1])


def _read_with_base(path: Path, depth: int) -> dict[str, Any]:
    """The JSON of ``path``; with ``"extends": "other.json"`` (relative to it) the other file's settings,
    overridden key by key (nested objects merged), so an ablation states only the lever it changes."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidOptionError(f"cannot read training config {path}: {exc}") from exc
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    if depth > 8:
        raise InvalidOptionError(f"training config {path}: 'extends' nests too deeply")
    base = _read_with_base(path.parent / str(base_name), depth + 1)
    base.pop("data_root", None) if "data_root" in raw else None
    return _merge(base, raw)


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_recipe(path: str | os.PathLike[str], data_root: str | os.PathLike[str] | None = None) -> Recipe:
    """Read a training config. ``data_root`` in the file is relative to the file; the argument wins."""
    p = Path(path)
    raw = _read_with_base(p, depth=0)
    root = Path(data_root) if data_root is not None else (p.parent / raw.get("data_root", ".")).resolve()
    stages = {s: StageRecipe.from_dict(raw.get("stages", {}).get(s, {})) for s in STAGES}
    kidney = stages["kidney"]
    for phase in (kidney, kidney.then):
        if phase is not None and (phase.select_by == "lesion_f1" or phase.small_lesion_weight > 1.0):
            raise InvalidOptionError(
                "select_by 'lesion_f1' and small_lesion_weight are tumor-stage options (the kidney stage "
                "has no lesions to count)"
            )
    return Recipe(
        data_root=root,
        sources=tuple(SliceSource.from_dict(s) for s in raw["sources"]),
        stages=stages,
        hu_window=tuple(raw.get("hu_window", (0.0, 255.0))),  # type: ignore[arg-type]
        pixel_spacing_mm=float(raw.get("pixel_spacing_mm", MODEL_SPACING_MM)),
        grid=tuple(raw.get("grid", (256, 256))),  # type: ignore[arg-type]
        band_fraction=float(raw.get("band_fraction", 0.5)),
        val_fraction=float(raw.get("val_fraction", 0.15)),
        seed=int(raw.get("seed", 0)),
        pelvic_negatives=tuple((str(a), str(b)) for a, b in raw.get("pelvic_negatives", ())),
        export=raw.get("export", {}),
        raw=raw,
    )
