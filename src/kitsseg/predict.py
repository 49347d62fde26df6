"""Two-stage inference on a CT slice stack in the internal frame: kidney model first, then tumor model.

Arrays in, arrays out; no file I/O (that is ``volume.py``'s job). The volume is streamed through the
models in batches of slices, so memory beyond the input stays at two boolean masks plus one batch of
float tensors, whatever the number of slices (REFERENCE section 4: memory blow-ups on large CTs are a top
complaint about peer tools). Probabilities are brought back to the slice's own resolution *before*
thresholding, so the mask edge is placed where the interpolated probability crosses the threshold
rather than on the model grid's blocky boundary.

The tumor model sees only a half-height band of each slice. The band is placed once per case around the
rows spanned by the kidney model's output (REFERENCE section 2: the paper's fixed lower half loses 16% of
kidney tissue; every KiTS19 case spans at most 0.42 of the height, so a per-case half-height band always
fits), and the tumor model runs only on slices where the kidney mask is non-empty (about a third of the
slices, so the tumor stage costs about three times less than running it everywhere).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .checkpoint import StageModel, WeightsBundle
from .errors import InvalidImageError
from .preprocess import BAND_FRACTION, band_height, band_start, resize, window

#: ``progress(stage, done, total)``: ``stage`` is ``"kidney"`` or ``"tumor"``, counts are slices.
ProgressFn = Callable[[str, int, int], None]


@dataclass
class Prediction:
    """The raw (not post-processed) network output of one case, in the internal frame.

    Attributes
    ----------
    kidney_tumor_mask:
        ``(z, row, col)`` bool, kidney model above its threshold (kidney and tumor together).
    tumor_mask:
        ``(z, row, col)`` bool, tumor model above its threshold; only inside the band of the kidney's slices.
    band:
        ``(first_row, height)`` of the tumor band, or ``None`` when the tumor model did not run.
    tumor_slices:
        Number of slices the tumor model was run on.
    timings:
        Seconds per stage: ``"kidney"`` (windowing, resizing and the kidney model) and ``"tumor"``.
    notes:
        Human-readable remarks (no tumor model in the weights, no kidney found...), copied into the report.
    """

    kidney_tumor_mask: np.ndarray
    tumor_mask: np.ndarray
    band: tuple[int, int] | None = None
    tumor_slices: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return (
            f"Prediction(shape={self.kidney_tumor_mask.shape}, "
            f"kidney_tumor_voxels={int(self.kidney_tumor_mask.sum())}, "
            f"tumor_voxels={int(self.tumor_mask.sum())}, "
            f"band={self.band}, tumor_slices={self.tumor_slices})"
        )


def predict_volume(
    ct_hu_zrc: np.ndarray,
    bundle: WeightsBundle,
    *,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    bf16: bool = False,
    progress: ProgressFn | None = None,
) -> Prediction:
    """Run both stages of ``bundle`` on a CT slice stack ``(z, row, col)`` in HU.

    Parameters
    ----------
    ct_hu_zrc:
        CT in Hounsfield units, internal frame (``volume.load_ct(...).data``). Not modified.
    bundle:
        Loaded weights; its models must already be on ``device``.
    batch_size:
        Slices per forward pass; bounds the memory of the float tensors.
    device:
        Where the input batches go; default: the device of the kidney model's parameters.
    bf16:
        Run the networks under bfloat16 autocast (CPU or CUDA). About 2.5x faster on CPUs with AVX-512
        bf16 (REFERENCE section 5); probabilities are still resized and thresholded in float32.
    progress:
        Called after each batch as ``progress(stage, slices_done, slices_total)``.
    """
    ct = np.asarray(ct_hu_zrc)
    if ct.ndim != 3 or min(ct.shape) < 1:
        raise InvalidImageError(f"expected a CT slice stack (z, row, col), got an array of shape {ct.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if device is None:
        device = next(bundle.kidney.model.parameters()).device
    device = torch.device(device)
    lo, hi = bundle.hu_window
    n_slices, height, width = ct.shape
    notes: list[str] = []
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    kidney = np.zeros(ct.shape, dtype=bool)
    indices = np.arange(n_slices)
    for done, idx, mask in _run_stage(
        bundle.kidney, ct, indices, None, (lo, hi), batch_size, device, bf16, (height, width)
    ):
        kidney[idx] = mask
        if progress is not None:
            progress("kidney", done, n_slices)
    timings["kidney"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tumor = np.zeros(ct.shape, dtype=bool)
    band: tuple[int, int] | None = None
    with_kidney = np.flatnonzero(kidney.any(axis=(1, 2)))
    if bundle.tumor is None:
        notes.append("the weights have no tumor model; the tumor mask is empty")
    elif with_kidney.size == 0:
        notes.append("the kidney model found no kidney; the tumor model was not run")
    else:
        fraction = float(bundle.metadata.get("band_fraction", BAND_FRACTION))
        rows = np.flatnonzero(kidney.any(axis=(0, 2)))
        band_h = band_height(height, fraction)
        first = band_start(int(rows[0]), int(rows[-1]), height, fraction)
        band = (first, band_h)
        if rows[-1] - rows[0] + 1 > band_h:
            notes.append(
                f"the kidney mask spans rows {rows[0]}-{rows[-1]}, more than the tumor band of "
                f"{band_h} rows; tumor outside the band cannot be found"
            )
        band_rows = (first, first + band_h)
        for done, idx, mask in _run_stage(
            bundle.tumor, ct, with_kidney, band_rows, (lo, hi), batch_size, device, bf16, (band_h, width)
        ):
            tumor[idx, first : first + band_h, :] = mask
            if progress is not None:
                progress("tumor", done, int(with_kidney.size))
    timings["tumor"] = time.perf_counter() - t0
    return Prediction(kidney, tumor, band, int(with_kidney.size) if band else 0, timings, notes)


def _run_stage(
    stage: StageModel,
    ct: np.ndarray,
    indices: np.ndarray,
    rows: tuple[int, int] | None,
    hu_window: tuple[float, float],
    batch_size: int,
    device: torch.device,
    bf16: bool,
    out_size: tuple[int, int],
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(slices_done, slice_indices, mask)`` batch by batch.

    ``mask`` is a bool array ``(n, *out_size)``: the sigmoid probabilities, resized back from the model
    grid to ``out_size`` in float32, then compared with the stage's threshold (strictly greater). Only one
    batch of floats exists at a time, and only booleans leave the device.
    """
    model = stage.model.to(memory_format=torch.channels_last)
    model.eval()
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if bf16 and device.type in ("cpu", "cuda")
        else contextlib.nullcontext()
    )
    done = 0
    with torch.inference_mode():
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            block = ct[idx] if rows is None else ct[idx, rows[0] : rows[1], :]
            x = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).to(device).unsqueeze(1)
            x = resize(window(x, *hu_window), stage.input_size)
            x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = model(x)
            probs = resize(torch.sigmoid(logits.float()), out_size)
            done += len(idx)
            yield done, idx, (probs[:, 0] > stage.threshold).cpu().numpy()
