"""Two-stage inference on a CT slice stack in the internal frame: kidney model first, then tumor model.

Arrays in, arrays out; no file I/O (that is :mod:`kitsseg.io`'s job). The volume is streamed through the
models in batches of slices, so memory beyond the input stays at two boolean masks plus one batch of
float tensors, whatever the number of slices (memory blow-ups on large CTs are a frequent complaint about
peer tools). Probabilities are brought back to the slice's own resolution *before*
thresholding, so the mask edge is placed where the interpolated probability crosses the threshold
rather than on the model grid's blocky boundary.

The tumor model sees only a half-height band of each slice. The band is placed once per case around the
rows spanned by the kidney model's output (on the KiTS19 labels the paper's fixed lower half loses 16% of
kidney tissue, while every case's kidneys span at most 0.42 of the height, so a per-case half-height band
always fits; ``docs/user-guide.md``), and the tumor model runs only on slices where the kidney mask is
non-empty (about a third of the slices, so the tumor stage costs about three times less than running it
everywhere).

Speed (measured in ``benchmarks/README.md`` against the machine's compute floor): the networks
run under ``torch.inference_mode`` in channels-last layout with BatchNorm folded into the convolutions
(:func:`kitsseg.nets.fuse.fuse_conv_bn`), on batches of slices; on CPUs with oneDNN they run on its fused
convolution kernels (ReLU and skip connections applied as each convolution writes its output,
:mod:`kitsseg.nets.fused_unet`), checked against the module at load. Windowing, resizing and thresholding
measured at about 3% of the light model's convolutions, so they are left simple. bfloat16 is a switch
here, off by default; ``segment()`` turns it on where the device computes bf16 natively (AVX-512 BF16 or
AMX, see :func:`native_bf16`), where it runs the networks about twice as fast for the same Dice on the
real validation slices (docs/model-card.md).
"""

from __future__ import annotations

import contextlib
import functools
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InvalidImageError
from ..nets.fuse import fuse_conv_bn, tensor_fingerprint
from ..nets.fused_unet import fused_forward
from ..weights.checkpoint import StageModel, WeightsBundle
from .preprocess import BAND_FRACTION, SliceGrid, band_height, band_start, resize, window_

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
    detail_timings:
        A finer split of ``timings`` for benchmarks: ``"kidney_net"`` and ``"tumor_net"`` (seconds inside
        the networks' forward passes only), ``"prepare"`` (folding BatchNorm into a copy of each model,
        once per loaded model, see :func:`inference_model`). The rest of ``timings`` is windowing,
        resizing, thresholding and copying.
    engine:
        What ran the networks: ``"onednn-fused"`` (the fused CPU kernels of :mod:`kitsseg.nets.fused_unet`) or
        ``"torch"`` (the module itself); when the two stages differ, both, kidney stage first.
    """

    kidney_tumor_mask: np.ndarray
    tumor_mask: np.ndarray
    band: tuple[int, int] | None = None
    tumor_slices: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    detail_timings: dict[str, float] = field(default_factory=dict)
    engine: str = "torch"

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
    batch_size: int = 8,
    device: torch.device | str | None = None,
    bf16: bool = False,
    progress: ProgressFn | None = None,
    spacing_rc: tuple[float, float] | None = None,
) -> Prediction:
    """Run both stages of ``bundle`` on a CT slice stack ``(z, row, col)`` in HU.

    Parameters
    ----------
    ct_hu_zrc:
        CT in Hounsfield units (float or integer), internal frame (``io.load.load_ct(...).data``). Not
        modified.
    bundle:
        Loaded weights; its models must already be on ``device``. Not modified (the networks run as
        folded copies, see :func:`inference_model`).
    batch_size:
        Slices per forward pass; bounds the memory of the float tensors.
    device:
        Where the input batches go; default: the device of the kidney model's parameters.
    bf16:
        Run the networks under bfloat16 autocast (CPU or CUDA). Faster on CPUs with native bf16 (AVX-512
        BF16, AMX; measured in ``benchmarks/README.md``); probabilities are still resized and thresholded
        in float32. On a device without native bf16 (:func:`native_bf16`) it is emulated and slower; a
        note says so.
    progress:
        Called after each batch as ``progress(stage, slices_done, slices_total)``.
    spacing_rc:
        In-plane pixel spacing (row, column) in mm. Weights that carry a model pixel spacing
        (``pixel_spacing_mm`` in their metadata) need it: each slice is resampled to that spacing and
        centred on the model grid (:class:`kitsseg.inference.preprocess.SliceGrid`, the geometry the weights
        were trained with). Weights without it (before 0.5) fit each slice whole into the grid.
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
    details: dict[str, float] = {"prepare": 0.0, "kidney_net": 0.0, "tumor_net": 0.0}
    if bf16 and not native_bf16(device):
        notes.append(
            f"bf16 was requested but {device.type} has no native bfloat16 here; it is emulated and "
            "likely slower than float32"
        )

    t0 = time.perf_counter()
    kidney = np.zeros(ct.shape, dtype=bool)
    indices = np.arange(n_slices)
    square = canvas_for(bundle, (height, width), spacing_rc)
    runner = _StageRunner(bundle.kidney, (lo, hi), batch_size, device, bf16, square)
    for done, idx, mask in runner.run(ct, indices, None):
        kidney[idx] = mask
        if progress is not None:
            progress("kidney", done, n_slices)
    details["prepare"] += runner.prepare_seconds
    details["kidney_net"] = runner.net_seconds
    engines = [runner.engine]
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
        # The band is placed on the canvas (the padded slice or the model grid), the frame the models
        # were trained in, around the rows where the kidney model found kidney.
        rows = square.canvas_rows(np.asarray(kidney.any(axis=(0, 2))), runner.canvas_rows_hit)
        band_h = band_height(square.side, fraction)
        first = band_start(int(rows[0]), int(rows[-1]), square.side, fraction)
        band = square.band_in_slice(first, band_h)
        if rows[-1] - rows[0] + 1 > band_h:
            notes.append(
                f"the kidney mask spans rows {rows[0]}-{rows[-1]}, more than the tumor band of "
                f"{band_h} rows; tumor outside the band cannot be found"
            )
        runner = _StageRunner(bundle.tumor, (lo, hi), batch_size, device, bf16, square)
        for done, idx, mask in runner.run(ct, with_kidney, (first, first + band_h)):
            tumor[idx] = mask
            if progress is not None:
                progress("tumor", done, int(with_kidney.size))
        details["prepare"] += runner.prepare_seconds
        details["tumor_net"] = runner.net_seconds
        if runner.engine not in engines:
            engines.append(runner.engine)
    timings["tumor"] = time.perf_counter() - t0
    tumor_slices = int(with_kidney.size) if band else 0
    return Prediction(kidney, tumor, band, tumor_slices, timings, notes, details, ", ".join(engines))


def inference_model(model: torch.nn.Module) -> torch.nn.Module:
    """The network as inference runs it: eval mode, BatchNorm folded, channels-last weights.

    The folding works on a copy, so the weights of the caller's model (a loaded bundle) are left as they
    were; a network without BatchNorm has nothing to fold and is itself put in eval mode and channels-last
    layout (same values). The folded copy is kept for the next call with the same, unchanged model (a
    folder of cases costs one folding, not one per case); any change to the model's tensors (training,
    ``load_state_dict``, moving devices) makes a new one. Shared with ``benchmarks/bench_segment.py``,
    which measures the convolution throughput of exactly these layers.
    """
    model.eval()
    cached = _PREPARED.get(model)
    if cached is not None and cached[0] == tensor_fingerprint(model):
        return cached[1]
    # torch's type overloads of Module.to omit memory_format, which it accepts (and documents)
    prepared = fuse_conv_bn(model).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if prepared is not model:  # caching the model itself would keep it alive through the weak key
        _PREPARED[model] = (tensor_fingerprint(model), prepared)
    return prepared


#: Folded copies of models, keyed weakly by the original; see :func:`inference_model`.
_PREPARED: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple[tuple[int, int], ...], torch.nn.Module]] = (
    weakref.WeakKeyDictionary()
)


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively, so that ``bf16=True`` is a speed-up.

    CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and later). CPU: the oneDNN bf16 check when PyTorch
    has it, else the Linux CPU flags ``avx512_bf16`` or ``amx_bf16`` (AVX-512 without them only emulates
    bf16, which is slower than float32).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is not None and torch.backends.mkldnn.is_available():
        try:
            if not bool(check()):
                return False
        except RuntimeError:
            pass
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


class _StageRunner:
    """Runs one stage's network over slices, batch by batch, timing the forward passes alone."""

    def __init__(
        self,
        stage: StageModel,
        hu_window: tuple[float, float],
        batch_size: int,
        device: torch.device,
        bf16: bool,
        square: SquarePad | GridCanvas,
    ) -> None:
        self.stage = stage
        self.square = square
        self.canvas_rows_hit = np.zeros(square.side, dtype=bool)
        self.bf16 = bf16 and device.type in ("cpu", "cuda")
        t0 = time.perf_counter()
        self.model = inference_model(stage.model)
        # Checked at the size every batch has (the stage's input size), see kitsseg.nets.fused_unet.
        self.fused = fused_forward(self.model, device, self.bf16, stage.input_size)
        #: Why the fused network was dropped during the run (it raised on a real batch), else None.
        self.fused_error: str | None = None
        self.prepare_seconds = time.perf_counter() - t0
        self.hu_window = hu_window
        self.batch_size = batch_size
        self.device = device
        self.net_seconds = 0.0

    @property
    def engine(self) -> str:
        """What ran the network, for the report's ``network_engine`` (with the reason of a fallback)."""
        if self.fused_error is not None:
            return f"torch (onednn-fused failed on a batch, the module ran instead: {self.fused_error})"
        return "torch" if self.fused is None else "onednn-fused"

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of one batch: the fused network while it works, else the module (bf16 under autocast).

        A fused operator that raises on a real batch (a case its self-check did not meet) is dropped for
        the rest of this stage and the batch is run by the module, so the case is still segmented.
        """
        if self.fused is not None:
            try:
                return self.fused(x)
            except RuntimeError as exc:
                self.fused_error = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
                self.fused = None
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
            if self.bf16
            else contextlib.nullcontext()
        )
        with autocast:
            return self.model(x)

    def run(
        self,
        ct: np.ndarray,
        indices: np.ndarray,
        rows: tuple[int, int] | None,
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield ``(slices_done, slice_indices, mask)`` batch by batch.

        Each slice is put on the canvas (see :class:`SquarePad` and :class:`GridCanvas`), ``rows`` (in
        canvas rows) is cut out for the tumor band, and the result is resized to the model input (a no-op
        on a model grid). ``mask`` is a bool array with the slices' own shape: the sigmoid probabilities,
        brought back from the model grid in float32, then compared with the stage's threshold (strictly
        greater); outside the band it is False. Only one batch of floats exists at a time, and only
        booleans leave the device.
        """
        stage, device, sq = self.stage, self.device, self.square
        r0, r1 = rows if rows is not None else (0, sq.side)
        done = 0
        with torch.inference_mode():
            for start in range(0, len(indices), self.batch_size):
                idx = indices[start : start + self.batch_size]
                # ct[idx] (fancy indexing) is already a fresh copy: window it in place.
                x = torch.from_numpy(np.asarray(ct[idx], dtype=np.float32)).to(device).unsqueeze(1)
                x = sq.pad(window_(x, *self.hu_window))[:, :, r0:r1]
                x = resize(x, stage.input_size).contiguous(memory_format=torch.channels_last)
                t0 = time.perf_counter()
                logits = self._forward(x)  # the fused network computes in bf16 itself
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                self.net_seconds += time.perf_counter() - t0
                done += len(idx)
                yield done, idx, self._masks(logits, (r1 - r0, sq.side_w), r0)

    def _masks(self, logits: torch.Tensor, size: tuple[int, int], first_row: int) -> np.ndarray:
        """Bool masks of one batch at the slices' own size: sigmoid, bilinear resize, then threshold.

        Only slices with a probability above the threshold on the model grid are resized: bilinear
        resampling (``align_corners=False``, no antialiasing on the way back) makes every output a convex
        combination of inputs, so it cannot exceed the input's maximum, and the other slices' masks are
        exactly empty. Most slices of a CT hold no kidney, so this skips most of the full-size work. The
        canvas rows where the probability exceeds the threshold are collected in ``canvas_rows_hit`` (the
        tumor band is placed on them on a model grid).
        """
        sq, threshold = self.square, self.stage.threshold
        probs = torch.sigmoid(logits[:, :1].float())
        hit = (probs.amax(dim=(1, 2, 3)) > threshold).nonzero().flatten()
        out = torch.zeros((probs.shape[0], sq.height, sq.width), dtype=torch.bool)
        if hit.numel():
            canvas = resize(probs[hit], size)
            rows_hit = (canvas[:, 0] > threshold).any(dim=(0, 2)).cpu().numpy()
            self.canvas_rows_hit[first_row : first_row + size[0]] |= rows_hit
            out[hit.cpu()] = (sq.to_slice(canvas, first_row)[:, 0] > threshold).cpu()
        return out.numpy()


def canvas_for(
    bundle: WeightsBundle, shape: tuple[int, int], spacing_rc: tuple[float, float] | None
) -> SquarePad | GridCanvas:
    """The canvas that ``bundle``'s networks were trained on, for slices of ``shape``."""
    model_spacing = bundle.metadata.get("pixel_spacing_mm")
    if model_spacing is None:
        return SquarePad.for_shape(*shape)
    if spacing_rc is None:
        raise ValueError("these weights resample slices to their pixel spacing: pass spacing_rc (mm)")
    grid = SliceGrid.for_slice(shape, spacing_rc, bundle.kidney.input_size, float(model_spacing))
    return GridCanvas(grid)


@dataclass(frozen=True)
class GridCanvas:
    """The model grid as canvas: each slice resampled to the weights' pixel spacing and centred
    (:class:`kitsseg.inference.preprocess.SliceGrid`, the geometry training used), probabilities brought back
    to the slice's pixels before thresholding."""

    grid: SliceGrid

    @property
    def height(self) -> int:
        return self.grid.height

    @property
    def width(self) -> int:
        return self.grid.width

    @property
    def side(self) -> int:  # canvas rows
        return self.grid.grid_h

    @property
    def side_w(self) -> int:
        return self.grid.grid_w

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid.to_model(x)

    def to_slice(self, probs: torch.Tensor, first_row: int) -> torch.Tensor:
        """Probabilities of canvas rows ``first_row..`` ``(N, 1, rows, grid_w)`` -> ``(N, 1, H, W)``."""
        full = torch.nn.functional.pad(probs, (0, 0, first_row, self.side - first_row - probs.shape[2]))
        return self.grid.to_slice(full)

    def canvas_rows(self, slice_rows: np.ndarray, rows_hit: np.ndarray) -> np.ndarray:
        """Canvas rows holding kidney: where the kidney model's grid probabilities passed the threshold."""
        rows = np.flatnonzero(rows_hit)
        return rows if rows.size else np.array([0, self.side - 1])

    def band_in_slice(self, first: int, height: int) -> tuple[int, int]:
        """The band ``(first_row, rows)`` in the slice's own rows (reporting only)."""
        g = self.grid
        scale = g.height / g.scaled_h
        return int(round((first - g.top) * scale)), int(round(height * scale))


@dataclass(frozen=True)
class SquarePad:
    """Pad a slice to a square with the window's lowest value (air), centred, and crop results back.

    The models were trained on square slices resized whole, so a non-square slice (a converter's
    122x101 grid, KiTS19's 512x796 case) resized straight to 256x256 would be stretched; padding keeps
    its aspect ratio. Square slices (almost every CT) pass through untouched.
    """

    height: int
    width: int
    side: int
    top: int
    left: int

    @classmethod
    def for_shape(cls, height: int, width: int) -> SquarePad:
        side = max(height, width)
        return cls(height, width, side, (side - height) // 2, (side - width) // 2)

    @property
    def side_w(self) -> int:
        return self.side

    def to_slice(self, probs: torch.Tensor, first_row: int) -> torch.Tensor:
        """``(N, 1, rows, side)`` probabilities from padded row ``first_row`` -> ``(N, 1, height, width)``."""
        return self.crop_rows(probs[:, 0], first_row)[:, None]

    def canvas_rows(self, slice_rows: np.ndarray, rows_hit: np.ndarray) -> np.ndarray:
        """Padded rows holding kidney: the slice rows of the kidney mask, shifted by the padding."""
        return np.flatnonzero(slice_rows) + self.top

    def band_in_slice(self, first: int, height: int) -> tuple[int, int]:
        return first - self.top, height

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, height, width)`` windowed slices (0 = air) -> ``(N, C, side, side)``."""
        if self.height == self.width:
            return x
        bottom = self.side - self.height - self.top
        right = self.side - self.width - self.left
        return torch.nn.functional.pad(x, (self.left, right, self.top, bottom), value=0.0)

    def crop_rows(self, mask: torch.Tensor, first_row: int) -> torch.Tensor:
        """A ``(N, rows, side)`` result starting at padded row ``first_row`` -> ``(N, height, width)``."""
        out = torch.zeros((mask.shape[0], self.height, self.width), dtype=mask.dtype, device=mask.device)
        lo = max(first_row, self.top)
        hi = min(first_row + mask.shape[1], self.top + self.height)
        if hi > lo:
            out[:, lo - self.top : hi - self.top] = mask[
                :, lo - first_row : hi - first_row, self.left : self.left + self.width
            ]
        return out
