"""The training config file: one JSON document that fixes the whole recipe of a weights file.

``configs/starter.json`` in the repository is the recipe of the shipped weights; ``kitsseg train --config
FILE`` runs it. Every lever is an option here (nothing lives in a separate script): the slice sets and how
their grey values map to HU, the model grid and pixel spacing, the validation split, and per stage the
network width, warm start, time budget, batch composition (negatives, pelvic negatives), augmentation,
contrast phases, copy-paste, synthetic tumors and band jitter.
"""

from __future__ import annotations

import json
import math
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
        _check_stage(kw)
        if kw.get("select_by", "dice") not in SELECT_BY:
            raise InvalidOptionError(
                f"select_by must be one of {', '.join(SELECT_BY)}, got {kw.get('select_by')!r}"
            )
        if not 0.0 <= float(kw.get("ema_decay", 0.0)) < 1.0:
            raise InvalidOptionError(f"ema_decay must be in [0, 1), got {kw.get('ema_decay')!r}")
        if kw.get("then") is not None:
            if not isinstance(kw["then"], Mapping):
                raise InvalidOptionError(f"a stage's 'then' must be a JSON object, got {kw['then']!r}")
            second = {k: v for k, v in d.items() if k != "then"}
            second.update(kw["then"])
            if "then" in kw["then"]:
                raise InvalidOptionError("a stage's 'then' phase cannot have its own 'then'")
            kw["then"] = cls.from_dict(second)
        if "phases" in kw:
            kw["phases"] = PhaseConfig(**_options("phases", kw["phases"], PhaseConfig()))
        if "augment" in kw:
            kw["augment"] = AugmentConfig(**_options("augment", kw["augment"], AugmentConfig()))
        if kw.get("synth") is not None:
            from .synthtumor import SynthTumorConfig

            _options("synth", kw["synth"], SynthTumorConfig())
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


def _read_with_base(path: Path, depth: int, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The JSON of ``path``; with ``"extends": "other.json"`` (relative to it) the other file's settings,
    overridden key by key (nested objects merged), so an ablation states only the lever it changes.

    A document that is not a JSON object (``[]``, ``null``) and an ``extends`` that is not a file name
    are refused here, and a cycle (a extends b extends a) is named as one: they used to end in a
    traceback or in the unhelpful "nests too deeply"."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        via = f" (extended by {chain[-1]})" if chain else ""
        raise InvalidOptionError(f"cannot read training config {path}{via}: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidOptionError(
            f"training config {path} must hold a JSON object ({{...}}), got {json.dumps(raw)[:40]}; "
            "see configs/starter.json"
        )
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    if not isinstance(base_name, str) or not base_name:
        raise InvalidOptionError(f"training config {path}: 'extends' must be a file name, got {base_name!r}")
    here = chain + (path.resolve(),)
    base_path = path.parent / base_name
    if base_path.resolve() in here:
        cycle = " -> ".join(str(p) for p in (*here, base_path.resolve()))
        raise InvalidOptionError(f"training config {path}: 'extends' forms a cycle: {cycle}")
    if depth > 8:
        raise InvalidOptionError(f"training config {path}: 'extends' nests too deeply")
    base = _read_with_base(base_path, depth + 1, here)
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
    try:
        _check_top(raw)
    except InvalidOptionError as exc:
        raise InvalidOptionError(f"training config {p}: {exc}") from None
    stages = {}
    for s in STAGES:
        try:
            stages[s] = StageRecipe.from_dict(raw.get("stages", {}).get(s, {}))
        except InvalidOptionError as exc:
            raise InvalidOptionError(f"training config {p}: stages.{s}: {exc}") from None
    root = Path(data_root) if data_root is not None else (p.parent / raw.get("data_root", ".")).resolve()
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


# ------------------------------------------------------------------------------------------- validation
# Every value is checked when the config is read, before the run folder is touched: a string where a
# number belongs, a negative batch, a grid the U-Net cannot pool, ``[]`` as the whole document used to
# surface mid-run as a Python traceback (often after the run folder was created), and an unknown key at
# the top level or an unknown stage name was silently ignored.

#: The U-Net of a recipe pools 4 times (:func:`.slicetrain._initial_model`): inputs and crops must be
#: multiples of 2**4.
_STEP = 16
_TOP_KEYS = {f.name for f in fields(Recipe)} - {"raw"} | {"description", "trained_spacing_mm"}
#: Stage numbers: name -> (integer?, lowest value, highest value, bounds: "[]", "(]" or "[)").
_STAGE_NUMBERS: dict[str, tuple[bool, float, float, str]] = {
    "width": (True, 1, math.inf, "[]"),
    "patience": (True, 1, math.inf, "[]"),
    "epochs": (True, 0, math.inf, "[]"),
    "batch": (True, 1, math.inf, "[]"),
    "crop": (True, 0, math.inf, "[]"),
    "band_jitter": (True, 0, math.inf, "[]"),
    "lr": (False, 0, math.inf, "(]"),
    "minutes": (False, 0, math.inf, "(]"),
    "neg_fraction": (False, 0, 1, "[]"),
    "pelvic_fraction": (False, 0, 1, "[]"),
    "paste": (False, 0, 1, "[]"),
    "kidney_paste": (False, 0, 1, "[]"),
    "small_lesion_weight": (False, 1, math.inf, "[]"),
    "ema_decay": (False, 0, 1, "[)"),
}


def _is_number(v: object, integer: bool = False) -> bool:
    """A finite JSON number (``true``/``false`` are not numbers; an integer where ``integer``)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    return isinstance(v, int) if integer else math.isfinite(v)


def _number(name: str, v: object, integer: bool, lo: float, hi: float, bounds: str = "[]") -> None:
    kind = "an integer" if integer else "a finite number"
    ok = _is_number(v, integer) and (lo < v if bounds[0] == "(" else lo <= v)  # type: ignore[operator]
    ok = ok and (v < hi if bounds[1] == ")" else v <= hi)  # type: ignore[operator]
    if not ok:
        text = f"> {lo:g}" if bounds[0] == "(" else f">= {lo:g}"
        if hi != math.inf:
            text += f" and {'<' if bounds[1] == ')' else '<='} {hi:g}"
        raise InvalidOptionError(f"{name} must be {kind} {text}, got {json.dumps(v)}")


def _check_stage(kw: Mapping[str, Any]) -> None:
    for name, (integer, lo, hi, bounds) in _STAGE_NUMBERS.items():
        if name in kw:
            _number(name, kw[name], integer, lo, hi, bounds)
    if kw.get("crop", 0) % _STEP:
        raise InvalidOptionError(f"crop must be 0 (off) or a multiple of {_STEP}, got {kw['crop']}")
    if "bf16" in kw and not isinstance(kw["bf16"], bool):
        raise InvalidOptionError(f"bf16 must be true or false, got {json.dumps(kw['bf16'])}")
    if kw.get("init_from") is not None and not (isinstance(kw["init_from"], str) and kw["init_from"]):
        raise InvalidOptionError(f'init_from must be "package" or a weights file, got {kw["init_from"]!r}')


def _options(name: str, value: object, defaults: object) -> dict[str, Any]:
    """``value`` as keyword arguments of the dataclass ``defaults`` is an instance of, each value of its
    default's type (a number, true/false, or a list of as many numbers as the default has)."""
    if not isinstance(value, Mapping):
        raise InvalidOptionError(f"{name} must be a JSON object, got {json.dumps(value)[:40]}")
    known = {f.name: getattr(defaults, f.name) for f in fields(defaults)}  # type: ignore[arg-type]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise InvalidOptionError(f"unknown {name} option(s): {unknown}; known: {sorted(known)}")
    out = dict(value)
    for key, v in value.items():
        default = known[key]
        if isinstance(default, bool):
            ok = isinstance(v, bool)
        elif isinstance(default, int | float):
            ok = _is_number(v)
        elif isinstance(default, tuple):
            ok = isinstance(v, list | tuple) and len(v) == len(default) and all(_is_number(x) for x in v)
            out[key] = tuple(v) if ok else v
        else:
            ok = True
        if not ok:
            raise InvalidOptionError(f"{name}.{key} must be like {json.dumps(default)}, got {json.dumps(v)}")
    return out


def _pair(name: str, v: object, n: int = 2) -> list[float]:
    if not (isinstance(v, list | tuple) and len(v) == n and all(_is_number(x) for x in v)):
        raise InvalidOptionError(f"{name} must be a list of {n} numbers, got {json.dumps(v)[:60]}")
    return [float(x) for x in v]


def _check_top(raw: Mapping[str, Any]) -> None:
    """The top-level keys and values (the stages are checked by :meth:`StageRecipe.from_dict`)."""
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise InvalidOptionError(f"unknown key(s) {unknown}; known: {sorted(_TOP_KEYS)}")
    stages = raw.get("stages", {})
    if not isinstance(stages, Mapping) or not all(isinstance(v, Mapping) for v in stages.values()):
        raise InvalidOptionError(
            f'stages must be an object {{"kidney": {{...}}, "tumor": {{...}}}}, got {stages!r}'
        )
    if set(stages) - set(STAGES):
        raise InvalidOptionError(
            f"unknown stage(s) {sorted(set(stages) - set(STAGES))}; the stages are {STAGES}"
        )
    sources = raw.get("sources")
    if not isinstance(sources, list) or not sources:
        raise InvalidOptionError(
            f"sources must be a non-empty list of slice sets, got {json.dumps(sources)[:60]}"
        )
    known = {f.name for f in fields(SliceSource)}
    for i, src in enumerate(sources):
        if (
            not isinstance(src, Mapping)
            or not isinstance(src.get("name"), str)
            or not isinstance(src.get("path"), str)
        ):
            raise InvalidOptionError(
                f'sources[{i}] must be an object with a "name" and a "path", got {src!r}'
            )
        if set(src) - known:
            raise InvalidOptionError(f"sources[{i}]: unknown key(s) {sorted(set(src) - known)}")
    if not isinstance(raw.get("data_root", "."), str):
        raise InvalidOptionError(f"data_root must be a folder name, got {raw['data_root']!r}")
    grid = raw.get("grid", (256, 256))
    if not (
        isinstance(grid, list | tuple) and len(grid) == 2 and all(_is_number(g, True) for g in grid)
    ) or any(g < _STEP or g % _STEP for g in grid):
        raise InvalidOptionError(f"grid must be [rows, columns], each a multiple of {_STEP}, got {grid!r}")
    lo, hi = _pair("hu_window", raw.get("hu_window", (0.0, 255.0)))
    if not hi > lo:
        raise InvalidOptionError(f"hu_window must be [lo, hi] with lo < hi, got {raw['hu_window']}")
    _number("pixel_spacing_mm", raw.get("pixel_spacing_mm", 1.0), False, 0, math.inf, "(]")
    _number("val_fraction", raw.get("val_fraction", 0.15), False, 0, 1, "()")
    band = raw.get("band_fraction", 0.5)
    _number("band_fraction", band, False, 0, 1, "(]")
    if max(1, int(round(grid[0] * band))) % _STEP:
        raise InvalidOptionError(
            f"band_fraction {band} of the grid's {grid[0]} rows gives a tumor input of "
            f"{max(1, int(round(grid[0] * band)))} rows, not a multiple of {_STEP}"
        )
    if not _is_number(raw.get("seed", 0), integer=True):
        raise InvalidOptionError(f"seed must be an integer, got {json.dumps(raw['seed'])}")
    if "trained_spacing_mm" in raw:
        _pair("trained_spacing_mm", raw["trained_spacing_mm"])
    pelvic = raw.get("pelvic_negatives", [])
    if not isinstance(pelvic, list) or not all(isinstance(x, list) and len(x) == 2 for x in pelvic):
        raise InvalidOptionError(
            f"pelvic_negatives must be a list of [name, path] pairs, got {pelvic!r}"[:200]
        )
    if not isinstance(raw.get("export", {}), Mapping):
        raise InvalidOptionError(f"export must be a JSON object, got {json.dumps(raw['export'])[:40]}")
