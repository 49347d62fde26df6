"""The files of a training run's stage folder: ``last.pt`` (exact resume), ``best.pt``, ``log.jsonl``.

Training checkpoints hold only tensors and plain containers and are read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import KitssegError
from ..io.atomic import atomic_output, write_text_atomic
from ..nets.model import UNet, UNetConfig
from ..weights.checkpoint import StageModel
from .config import Stage, TrainConfig

STATE_FORMAT = "kitsseg-train-state/1"
BEST_FORMAT = "kitsseg-best-model/1"
LAST, BEST, LOG = "last.pt", "best.pt", "log.jsonl"


@dataclass
class StageResult:
    """What one stage's training produced."""

    stage: Stage
    out_dir: Path
    best_epoch: int
    best_dice: float
    epochs_completed: int
    stopped_early: bool
    input_size: tuple[int, int]
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best_path(self) -> Path:
        return self.out_dir / BEST

    @property
    def last_path(self) -> Path:
        return self.out_dir / LAST

    @property
    def log_path(self) -> Path:
        return self.out_dir / LOG

    def stage_model(self, threshold: float = 0.5) -> StageModel:
        """The best model of this stage, ready for :func:`~kitsseg.training.train.export_weights`."""
        return load_best(self.out_dir, threshold=threshold)


# --------------------------------------------------------------------------------------------- checkpoints


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def _load_trusted(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file cannot be used
        raise KitssegError(
            f"{path}: cannot read this training checkpoint ({type(exc).__name__}: {exc}); "
            "delete it to start the stage afresh"
        ) from exc
    if not isinstance(payload, dict):
        raise KitssegError(f"{path}: not a kitsseg training checkpoint")
    return payload


def _stage_meta(stage: Stage, config: TrainConfig, input_size: tuple[int, int]) -> dict[str, Any]:
    """What a checkpoint must agree on with the run that resumes it."""
    return {
        "stage": stage,
        "unet": config.unet.to_dict(),
        "input_size": [int(s) for s in input_size],
        "hu_window": [float(v) for v in config.hu_window],
    }


def load_best(stage_dir: str | os.PathLike[str], threshold: float = 0.5) -> StageModel:
    """The best model a stage saved (``STAGE_DIR/best.pt``) as a :class:`StageModel`."""
    path = Path(stage_dir) / BEST
    if not path.is_file():
        raise KitssegError(f"{path} does not exist: that stage has not finished an epoch yet")
    payload = _load_trusted(path)
    if payload.get("format") != BEST_FORMAT:
        raise KitssegError(f"{path}: not a kitsseg best-model checkpoint")
    meta = json.loads(payload["meta"])
    model = UNet(UNetConfig.from_dict(meta["unet"]))
    model.load_state_dict(payload["model"])
    model.eval()
    size = tuple(int(s) for s in meta["input_size"])
    extra = {"val_dice": float(payload["val_dice"]), "best_epoch": int(payload["epoch"])}
    return StageModel(model, (size[0], size[1]), threshold, extra)


def _write_log(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite ``log.jsonl`` from the checkpoint's history (drops lines of an epoch that was not saved)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in history))
