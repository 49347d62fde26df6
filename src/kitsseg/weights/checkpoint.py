"""The weights file format: tensors plus JSON metadata, loaded without executing any code.

A kitsseg weights file is written with ``torch.save`` and read only with ``torch.load(weights_only=True)``,
which refuses anything but tensors and plain containers, so a file from the internet cannot run code. It
holds one JSON string of metadata (model configs, HU window, input sizes, thresholds, eigenvalue-ratio
bounds, provenance) and one state dict per stage (``kidney`` and optionally ``tumor``), stored in fp16 to
keep shipped files small; they are cast back to fp32 when loaded. No new dependency is needed for this
(safetensors would be the alternative; torch's restricted unpickler gives the same guarantee here).

The safe loader still inflates every tensor record into memory, and a zip archive can declare members far
larger than the file (issue 18: a 2 MB archive that inflates to 2 GiB took 4.3 GB of memory before
torch refused it). So before ``torch.load`` the archive's central directory is read (``zipfile``: names and
declared sizes only, nothing is inflated) and a file that would inflate beyond :data:`MAX_INFLATED_BYTES`
is refused; torch's reader allocates each record by its declared size, so the declared sum bounds memory.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightsError
from ..io.atomic import atomic_output
from ..nets.model import UNet, UNetConfig

FORMAT = "kitsseg-weights/1"
STAGES = ("kidney", "tumor")
#: Most bytes the members of a weights archive may declare in all (inflated). The starter weights inflate
#: to 7.8 MB and two of the paper's 64-channel U-Nets (31.0 M parameters each) to 0.12 GB in fp16 (counted
#: with ``UNet(UNetConfig.paper())``); 1 GiB leaves room for larger
#: models while keeping a hostile archive from taking the machine's memory. ``max_inflated`` overrides it.
MAX_INFLATED_BYTES = 1 << 30


@dataclass
class StageModel:
    """One trained network and how to feed it."""

    model: UNet
    input_size: tuple[int, int]
    threshold: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class WeightsBundle:
    """Everything inference needs: the kidney model, the optional tumor model, and shared metadata.

    ``metadata`` keys used by the pipeline: ``hu_window`` ``[lo, hi]``, ``eig_bounds`` ``[lo, hi]``,
    ``eig_unit`` (``"voxel"``), ``band_fraction``; provenance keys (``name``, ``version``, ``license``,
    ``training_data``) are reported, not interpreted.
    """

    kidney: StageModel
    tumor: StageModel | None
    metadata: dict[str, Any]

    @property
    def hu_window(self) -> tuple[float, float]:
        lo, hi = self.metadata.get("hu_window", [0.0, 255.0])
        return float(lo), float(hi)

    @property
    def eig_bounds(self) -> tuple[float, float]:
        lo, hi = self.metadata.get("eig_bounds", [1.07, 2.8])
        return float(lo), float(hi)


def save_bundle(
    path: str | os.PathLike[str],
    stages: dict[str, StageModel],
    metadata: dict[str, Any],
    *,
    half: bool = True,
) -> Path:
    """Write a weights file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    if "kidney" not in stages:
        raise ValueError("a weights bundle needs at least the kidney stage")
    meta = dict(metadata)
    meta["format"] = FORMAT
    meta["stages"] = {}
    payload: dict[str, Any] = {}
    for name, stage in stages.items():
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; expected one of {STAGES}")
        meta["stages"][name] = {
            "config": stage.model.config.to_dict(),
            "input_size": list(stage.input_size),
            "threshold": float(stage.threshold),
            **stage.extra,
        }
        sd = stage.model.state_dict()
        payload[name] = {
            k: (v.detach().to(torch.float16) if half and v.is_floating_point() else v.detach()).contiguous()
            for k, v in sd.items()
        }
    payload["metadata"] = json.dumps(meta, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:  # readable like any open()-made file, so weights can be shared
        torch.save(payload, tmp)
    return path


def read_metadata(path: str | os.PathLike[str], *, max_inflated: int | None = None) -> dict[str, Any]:
    """Read only the metadata of a weights file (still through the safe loader, within the size bound)."""
    return json.loads(_safe_load(path, max_inflated)["metadata"])


def load_bundle(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", *, max_inflated: int | None = None
) -> WeightsBundle:
    """Load a weights file safely and rebuild its networks in eval mode on ``device``.

    ``max_inflated``: the bound of :func:`check_inflated_size` (default :data:`MAX_INFLATED_BYTES`).
    """
    payload = _safe_load(path, max_inflated)
    try:
        meta = json.loads(payload["metadata"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise WeightsError(
            f"{path}: not a kitsseg weights file (no metadata); re-export or re-download it"
        ) from exc
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{path}: weights format {meta.get('format')!r}, expected {FORMAT!r}")
    stages: dict[str, StageModel] = {}
    for name, info in meta.get("stages", {}).items():
        info = dict(info)
        config = UNetConfig.from_dict(info.pop("config"))
        model = UNet(config)
        state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in payload[name].items()}
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise WeightsError(f"{path}: {name} tensors do not match their config: {exc}") from exc
        model.eval().to(device)
        size = tuple(int(s) for s in info.pop("input_size"))
        threshold = float(info.pop("threshold", 0.5))
        stages[name] = StageModel(model, (size[0], size[1]), threshold, info)
    if "kidney" not in stages:
        raise WeightsError(f"{path}: weights file has no kidney model")
    return WeightsBundle(stages["kidney"], stages.get("tumor"), meta)


def check_inflated_size(path: str | os.PathLike[str], max_inflated: int | None = None) -> int:
    """Refuse a weights file that is not a zip archive or whose members would inflate beyond the bound.

    Reads only the central directory (the declared sizes); returns the declared total in bytes. Raises
    :class:`WeightsError` (missing file, not a torch zip archive, too large once inflated).
    """
    limit = MAX_INFLATED_BYTES if max_inflated is None else int(max_inflated)
    try:
        with zipfile.ZipFile(path) as archive:
            total = sum(max(int(info.file_size), 0) for info in archive.infolist())
    except FileNotFoundError as exc:
        raise WeightsError(f"weights file {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise WeightsError(f"weights file {path} is a folder; give the weights file itself") from exc
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise WeightsError(
            f"{path}: cannot be read as kitsseg weights (not a torch zip archive: {exc}); it may be "
            "truncated or corrupt: download or export it again"
        ) from exc
    if total > limit:
        raise WeightsError(
            f"{path}: refused, its members would inflate to {total / 2**20:.0f} MiB, more than the "
            f"{limit / 2**20:.0f} MiB a kitsseg weights file may hold (a compressed archive of this kind is "
            "how a file exhausts memory on loading); use weights exported by kitsseg"
        )
    return total


def _safe_load(path: str | os.PathLike[str], max_inflated: int | None = None) -> dict[str, Any]:
    check_inflated_size(path, max_inflated)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise WeightsError(f"weights file {path} does not exist") from exc
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a safe weights file"
        raise WeightsError(
            f"{path}: cannot be read as kitsseg weights ({type(exc).__name__}); it may be truncated, "
            "corrupt, or contain code, which is never executed"
        ) from exc
    if not isinstance(payload, dict):
        raise WeightsError(f"{path}: not a kitsseg weights file")
    return payload
