"""The slice cache: every training slice windowed, resized and stored once as memory-mappable arrays.

Decompressing a KiTS19 volume takes seconds; an epoch touches thousands of slices. So the slices the two
stages train on are extracted once, through the very functions inference uses
(:func:`~kitsseg.inference.preprocess.window`, :func:`~kitsseg.inference.preprocess.resize`,
:func:`~kitsseg.inference.preprocess.band_start`), and stored as
``.npy`` arrays that every later epoch, run, or DDP rank memory-maps instead of re-reading NIfTI files.

Which slices: every slice whose labels show kidney, tumor or cyst (label > 0; cysts of KiTS21+ count as
kidney). The kidney stage trains on all of them (the paper's positive slices). The tumor stage sees the
same slices cut to the case's half-height band (placed with ``band_start`` on the rows the ground-truth
kidney+tumor spans over the whole case, as inference places it on the kidney model's output); slices with
tumor are its positives and the kidney-only slices its negatives, subsampled per epoch at training time, so
the negative ratio can change without a rebuild.

Layout of ``CACHE_DIR``: ``manifest.json`` (spec, dataset fingerprint, per-case slice indices and band),
``kidney_images.npy`` / ``kidney_masks.npy`` ``(N, *kidney_input)`` and ``tumor_images.npy`` /
``tumor_masks.npy`` ``(N, *tumor_input)``, row ``i`` of all four being the same slice. The manifest is
written last, so a folder with a valid manifest always holds complete arrays; the cache is rebuilt when
the window, sizes, dtype or the dataset change. Per-case parts of an interrupted build are kept and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from ..errors import DatasetError, InvalidImageError
from ..inference.preprocess import (
    BAND_FRACTION,
    KIDNEY_INPUT,
    MODEL_SPACING_MM,
    TUMOR_INPUT,
    SliceGrid,
    band_height,
    band_start,
)
from .data import Case, SliceSet, fingerprint, write_json_atomic

if TYPE_CHECKING:
    from nibabel.spatialimages import SpatialImage

CACHE_FORMAT = "kitsseg-slice-cache/1"
MANIFEST = "manifest.json"
ARRAYS = ("kidney_images", "kidney_masks", "tumor_images", "tumor_masks")

#: ``on_event(name, info)`` callback; the cache emits ``"cache_case"`` with ``done``/``total``/``case``.
EventFn = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class CacheSpec:
    """What the cached slices depend on; a cache is reused only when its spec is identical."""

    hu_window: tuple[float, float] = (0.0, 255.0)
    kidney_input: tuple[int, int] = KIDNEY_INPUT
    tumor_input: tuple[int, int] = TUMOR_INPUT
    band_fraction: float = BAND_FRACTION
    dtype: Literal["uint8", "float16"] = "uint8"
    #: In-plane pixel spacing of the model grid (mm): each slice is resampled to it and centred on the
    #: kidney input grid (:class:`kitsseg.inference.preprocess.SliceGrid`, as inference does). ``None``: the
    #: legacy
    #: geometry (each slice resized whole to the input, whatever its pixel size).
    pixel_spacing_mm: float | None = MODEL_SPACING_MM

    def to_dict(self) -> dict[str, Any]:
        return {
            "hu_window": [float(v) for v in self.hu_window],
            "kidney_input": [int(v) for v in self.kidney_input],
            "tumor_input": [int(v) for v in self.tumor_input],
            "band_fraction": float(self.band_fraction),
            "dtype": self.dtype,
            "pixel_spacing_mm": self.pixel_spacing_mm,
        }

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


class SliceCache:
    """An opened, valid slice cache (arrays memory-mapped read-only)."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self._cases = {c["name"]: c for c in manifest["cases"]}
        self._arrays = {name: np.load(root / f"{name}.npy", mmap_mode="r") for name in ARRAYS}

    @property
    def case_names(self) -> list[str]:
        return [c["name"] for c in self.manifest["cases"]]

    @property
    def n_slices(self) -> int:
        return int(self.manifest["n_slices"])

    def case(self, name: str) -> dict[str, Any]:
        return self._cases[name]

    def stage(self, stage: Literal["kidney", "tumor"], names: Sequence[str] | None = None) -> SliceSet:
        """The slices of ``names`` (default all cases) for one stage, memory-mapped."""
        names = list(self.case_names if names is None else names)
        rows: list[np.ndarray] = []
        positive: list[np.ndarray] = []
        cases: list[str] = []
        for name in names:
            if name not in self._cases:
                raise DatasetError(f"case {name} is not in the slice cache at {self.root}")
            entry = self._cases[name]
            slices = np.asarray(entry["slices"], dtype=np.int64)
            rows.append(entry["offset"] + np.arange(slices.size, dtype=np.int64))
            if stage == "tumor":
                positive.append(np.isin(slices, np.asarray(entry["tumor_slices"], dtype=np.int64)))
            else:
                positive.append(np.ones(slices.size, dtype=bool))
            cases += [name] * int(slices.size)
        return SliceSet(
            images=self._arrays[f"{stage}_images"],
            masks=self._arrays[f"{stage}_masks"],
            rows=np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64),
            positive=np.concatenate(positive) if positive else np.zeros(0, dtype=bool),
            cases=cases,
        )

    def __repr__(self) -> str:
        spec = self.manifest["spec"]
        return (
            f"SliceCache(root={str(self.root)!r}, cases={len(self._cases)}, slices={self.n_slices}, "
            f"window={spec['hu_window']}, dtype={spec['dtype']})"
        )


def open_cache(
    cache_dir: str | os.PathLike[str], spec: CacheSpec, source_fingerprint: str
) -> SliceCache | None:
    """The cache in ``cache_dir`` if it is complete and matches ``spec`` and the dataset, else ``None``."""
    root = Path(cache_dir)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if (
        manifest.get("format") != CACHE_FORMAT
        or manifest.get("spec") != spec.to_dict()
        or manifest.get("fingerprint") != source_fingerprint
    ):
        return None
    n = int(manifest.get("n_slices", -1))
    expected = {
        "kidney_images": (n, *spec.kidney_input),
        "kidney_masks": (n, *spec.kidney_input),
        "tumor_images": (n, *spec.tumor_input),
        "tumor_masks": (n, *spec.tumor_input),
    }
    try:
        cache = SliceCache(root, manifest)
    except (OSError, ValueError):
        return None
    if any(tuple(cache._arrays[k].shape) != v for k, v in expected.items()):
        return None
    return cache


def open_or_build(
    cases: Sequence[Case],
    cache_dir: str | os.PathLike[str],
    spec: CacheSpec = CacheSpec(),
    *,
    workers: int = 0,
    on_event: EventFn | None = None,
) -> tuple[SliceCache, bool]:
    """Open the cache for ``cases`` in ``cache_dir``, building it first when missing or stale.

    Returns ``(cache, built)``. ``workers > 1`` extracts that many cases in parallel processes (each
    holds one volume in memory at a time).
    """
    fp = fingerprint(cases)
    cache = open_cache(cache_dir, spec, fp)
    if cache is not None:
        return cache, False
    with _build_lock(Path(cache_dir)):
        cache = open_cache(cache_dir, spec, fp)  # another run may have built it while we waited
        if cache is not None:
            return cache, False
        build_cache(cases, cache_dir, spec, workers=workers, on_event=on_event, source_fingerprint=fp)
    cache = open_cache(cache_dir, spec, fp)
    if cache is None:  # pragma: no cover - would mean a bug in build_cache
        raise DatasetError(f"the slice cache in {cache_dir} could not be opened right after building it")
    return cache, True


@contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """Serialise builds of one cache folder between runs that share it (advisory; POSIX only)."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no lock, builds of a shared folder must not overlap
        yield
        return
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_cache(
    cases: Sequence[Case],
    cache_dir: str | os.PathLike[str],
    spec: CacheSpec = CacheSpec(),
    *,
    workers: int = 0,
    on_event: EventFn | None = None,
    source_fingerprint: str | None = None,
) -> Path:
    """Extract the training slices of ``cases`` into ``cache_dir`` (replacing any cache there)."""
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    if not cases:
        raise DatasetError("no cases to build a slice cache from")
    fp = source_fingerprint or fingerprint(cases)
    (root / MANIFEST).unlink(missing_ok=True)  # invalidate first: a crash below leaves no valid cache
    parts = root / f".parts-{spec.key()}"
    parts.mkdir(exist_ok=True)

    entries: dict[str, dict[str, Any]] = {}
    todo = []
    for case in cases:
        entry = _read_part_entry(parts, case, fp)
        if entry is not None:
            entries[case.name] = entry
        else:
            todo.append(case)
    done = len(entries)
    total = len(cases)
    if on_event is not None:
        on_event("cache_start", {"total": total, "reused": done, "root": str(root)})
    if workers > 1 and len(todo) > 1:
        ctx = get_context("spawn")  # fork after torch has started threads can deadlock
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [pool.submit(_extract_case_part, case, spec, parts, fp) for case in todo]
            for case, fut in zip(todo, futures, strict=True):
                entries[case.name] = fut.result()
                done += 1
                if on_event is not None:
                    on_event("cache_case", {"done": done, "total": total, "case": case.name})
    else:
        for case in todo:
            entries[case.name] = _extract_case_part(case, spec, parts, fp)
            done += 1
            if on_event is not None:
                on_event("cache_case", {"done": done, "total": total, "case": case.name})

    ordered = [entries[c.name] for c in cases]
    offset = 0
    for entry in ordered:
        entry["offset"] = offset
        offset += len(entry["slices"])
    n = offset
    dtype = np.uint8 if spec.dtype == "uint8" else np.float16
    shapes = {
        "kidney_images": ((n, *spec.kidney_input), dtype),
        "kidney_masks": ((n, *spec.kidney_input), np.uint8),
        "tumor_images": ((n, *spec.tumor_input), dtype),
        "tumor_masks": ((n, *spec.tumor_input), np.uint8),
    }
    tmp_paths = {name: root / f".{name}.npy.tmp" for name in ARRAYS}
    try:
        outs = {
            name: np.lib.format.open_memmap(tmp_paths[name], mode="w+", dtype=dt, shape=shape)
            for name, (shape, dt) in shapes.items()
        }
        for entry in ordered:
            k = len(entry["slices"])
            if k == 0:
                continue
            with np.load(parts / f"{entry['name']}.npz") as part:
                for name in ARRAYS:
                    outs[name][entry["offset"] : entry["offset"] + k] = part[name]
        for out in outs.values():
            out.flush()
        del outs
        for name in ARRAYS:
            os.replace(tmp_paths[name], root / f"{name}.npy")
    finally:
        for path in tmp_paths.values():
            path.unlink(missing_ok=True)

    for entry in ordered:
        entry.pop("fingerprint", None)
    manifest = {
        "format": CACHE_FORMAT,
        "spec": spec.to_dict(),
        "fingerprint": fp,
        "n_slices": n,
        "n_tumor_slices": int(sum(len(e["tumor_slices"]) for e in ordered)),
        "cases": ordered,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(root / MANIFEST, manifest)
    shutil.rmtree(parts, ignore_errors=True)
    return root


def _read_part_entry(parts: Path, case: Case, fp: str) -> dict[str, Any] | None:
    """The entry of a case extracted by an earlier, interrupted build of the same spec and dataset."""
    try:
        entry = json.loads((parts / f"{case.name}.json").read_text())
    except (OSError, ValueError):
        return None
    if entry.get("fingerprint") != fp or not (parts / f"{case.name}.npz").is_file():
        return None
    return entry


def _extract_case_part(case: Case, spec: CacheSpec, parts: Path, fp: str) -> dict[str, Any]:
    """Extract one case into ``parts/<name>.npz`` (+ ``.json`` entry), both written atomically."""
    arrays, entry = extract_case(case, spec)
    tmp = parts / f".{case.name}.npz.tmp"
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy's stub: ** could bind allow_pickle
        os.replace(tmp, parts / f"{case.name}.npz")
    finally:
        tmp.unlink(missing_ok=True)
    entry["fingerprint"] = fp
    write_json_atomic(parts / f"{case.name}.json", entry)
    return entry


def extract_case(case: Case, spec: CacheSpec) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read one case and return its cached arrays and manifest entry."""
    from ..io.load import load_ct, load_labels

    ct = load_ct(case.image)
    labels = load_labels(case.labels)
    if tuple(ct.data.shape) != tuple(labels.data.shape):
        raise DatasetError(
            f"case {case.name}: imaging {tuple(ct.data.shape)} and segmentation {tuple(labels.data.shape)} "
            "differ in shape; fix or remove the case"
        )
    # 0..3 are KiTS labels (3: a KiTS21+ cyst, trained as kidney); anything above was silently trained as
    # kidney too (a 255 "ignore" value, an instance map), so it is refused with the values it found.
    values = np.unique(np.asarray(labels.data))
    other = [int(v) for v in values if v > 3]
    if other:
        shown = ", ".join(map(str, other[:5])) + (" ..." if len(other) > 5 else "")
        raise InvalidImageError(
            f"case {case.name}: {case.labels} has label values {shown} (expected 0 background, 1 kidney, "
            "2 tumor, 3 cyst); remap them to KiTS labels or remove the case"
        )
    arrays, entry = extract_slices(
        np.asarray(ct.data), np.asarray(labels.data), spec, spacing_rc=(ct.spacing[1], ct.spacing[2])
    )
    entry["name"] = case.name
    entry["spacing"] = [float(s) for s in ct.spacing]
    return arrays, entry


def extract_slices(
    ct_hu_zrc: np.ndarray,
    labels_zrc: np.ndarray,
    spec: CacheSpec,
    *,
    chunk: int = 32,
    spacing_rc: tuple[float, float] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Cut the training slices of one case (frame arrays) exactly as inference will see them.

    Returns the four arrays (``kidney_images`` ... ``tumor_masks``) and the manifest entry
    (``shape``, ``slices``, ``tumor_slices``, ``band``, ``eig_ratios``). With a model pixel spacing in
    ``spec`` (the default) slices go through :class:`kitsseg.inference.preprocess.SliceGrid` at ``spacing_rc``
    and the band (``entry["band"]``, in grid rows) is placed on the grid rows of the labels, as inference
    places it on the kidney model's grid rows.
    """
    if spec.pixel_spacing_mm is not None:
        if spacing_rc is None:
            raise ValueError("a spacing-aware cache spec needs the slices' spacing_rc (mm)")
        return _extract_on_grid(ct_hu_zrc, labels_zrc, spec, spacing_rc, chunk)
    import torch

    from ..inference.preprocess import resize, window

    lab = np.asarray(labels_zrc)
    n_z, height, width = lab.shape
    fg = lab > 0  # kidney, tumor, and cyst (KiTS21+) count as kidney
    slices = np.flatnonzero(fg.any(axis=(1, 2)))
    tumor_slices = np.flatnonzero((lab == 2).any(axis=(1, 2)))
    band_h = band_height(height, spec.band_fraction)
    if slices.size:
        rows = np.flatnonzero(fg.any(axis=(0, 2)))
        first = band_start(int(rows[0]), int(rows[-1]), height, spec.band_fraction)
    else:
        first = band_start(0, height - 1, height, spec.band_fraction)
    dtype = np.uint8 if spec.dtype == "uint8" else np.float16
    k = int(slices.size)
    out = {
        "kidney_images": np.zeros((k, *spec.kidney_input), dtype=dtype),
        "kidney_masks": np.zeros((k, *spec.kidney_input), dtype=np.uint8),
        "tumor_images": np.zeros((k, *spec.tumor_input), dtype=dtype),
        "tumor_masks": np.zeros((k, *spec.tumor_input), dtype=np.uint8),
    }
    lo, hi = spec.hu_window
    for start in range(0, k, chunk):
        idx = slices[start : start + chunk]
        hu = torch.from_numpy(np.ascontiguousarray(ct_hu_zrc[idx], dtype=np.float32)).unsqueeze(1)
        img = window(hu, lo, hi)
        kid = torch.from_numpy(fg[idx].astype(np.float32)).unsqueeze(1)
        tum = torch.from_numpy((lab[idx] == 2).astype(np.float32)).unsqueeze(1)
        band = slice(first, first + band_h)
        sl = slice(start, start + idx.size)
        out["kidney_images"][sl] = _to_store(resize(img, spec.kidney_input), dtype)
        out["kidney_masks"][sl] = _mask_to_store(resize(kid, spec.kidney_input, mode="nearest"))
        out["tumor_images"][sl] = _to_store(resize(img[:, :, band], spec.tumor_input), dtype)
        out["tumor_masks"][sl] = _mask_to_store(resize(tum[:, :, band], spec.tumor_input, mode="nearest"))
    entry: dict[str, Any] = {
        "shape": [int(n_z), int(height), int(width)],
        "slices": [int(s) for s in slices],
        "tumor_slices": [int(s) for s in tumor_slices],
        "band": [int(first), int(band_h)],
        "eig_ratios": tumor_eig_ratios(lab),
    }
    return out, entry


def _extract_on_grid(
    ct_hu_zrc: np.ndarray,
    labels_zrc: np.ndarray,
    spec: CacheSpec,
    spacing_rc: tuple[float, float],
    chunk: int,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """:func:`extract_slices` on the model grid (resampled to ``spec.pixel_spacing_mm``, centred)."""
    import torch

    from ..inference.preprocess import resize, window

    lab = np.asarray(labels_zrc)
    n_z, height, width = lab.shape
    grid = SliceGrid.for_slice((height, width), spacing_rc, spec.kidney_input, spec.pixel_spacing_mm)
    fg = lab > 0  # kidney, tumor, and cyst (KiTS21+) count as kidney
    slices = np.flatnonzero(fg.any(axis=(1, 2)))
    tumor_slices = np.flatnonzero((lab == 2).any(axis=(1, 2)))
    dtype = np.uint8 if spec.dtype == "uint8" else np.float16
    k = int(slices.size)
    grid_h = spec.kidney_input[0]
    band_h = band_height(grid_h, spec.band_fraction)
    out = {
        "kidney_images": np.zeros((k, *spec.kidney_input), dtype=dtype),
        "kidney_masks": np.zeros((k, *spec.kidney_input), dtype=np.uint8),
        "tumor_images": np.zeros((k, *spec.tumor_input), dtype=dtype),
        "tumor_masks": np.zeros((k, *spec.tumor_input), dtype=np.uint8),
    }
    rows_hit = np.zeros(grid_h, dtype=bool)
    images, tumors = [], []
    lo, hi = spec.hu_window
    for start in range(0, k, chunk):
        idx = slices[start : start + chunk]
        hu = torch.from_numpy(np.ascontiguousarray(ct_hu_zrc[idx], dtype=np.float32)).unsqueeze(1)
        img = grid.to_model(window(hu, lo, hi))
        kid = (grid.to_model(torch.from_numpy(fg[idx].astype(np.float32))[:, None]) >= 0.5).float()
        tum = (grid.to_model(torch.from_numpy((lab[idx] == 2).astype(np.float32))[:, None]) >= 0.5).float()
        rows_hit |= kid[:, 0].amax(dim=(0, 2)).numpy() > 0
        sl = slice(start, start + idx.size)
        out["kidney_images"][sl] = _to_store(img, dtype)
        out["kidney_masks"][sl] = _mask_to_store(kid)
        images.append(img)
        tumors.append(tum)
    rows = np.flatnonzero(rows_hit)
    first = band_start(int(rows[0]), int(rows[-1]), grid_h, spec.band_fraction) if rows.size else (
        band_start(0, grid_h - 1, grid_h, spec.band_fraction)
    )
    for start, (img, tum) in zip(range(0, k, chunk), zip(images, tumors, strict=True), strict=True):
        sl = slice(start, start + img.shape[0])
        band = slice(first, first + band_h)
        out["tumor_images"][sl] = _to_store(resize(img[:, :, band], spec.tumor_input), dtype)
        out["tumor_masks"][sl] = _mask_to_store(resize(tum[:, :, band], spec.tumor_input, mode="nearest"))
    # Positive tumor slices are those whose stored target shows tumor: a tumor of a few voxels can vanish
    # when resampled to the grid, and must then not be counted as one the model should find.
    tumor_slices = slices[out["tumor_masks"].any(axis=(1, 2))] if k else tumor_slices
    entry: dict[str, Any] = {
        "shape": [int(n_z), int(height), int(width)],
        "slices": [int(s) for s in slices],
        "tumor_slices": [int(s) for s in tumor_slices],
        "band": [int(first), int(band_h)],
        "band_frame": "grid",
        "eig_ratios": tumor_eig_ratios(lab),
    }
    return out, entry


def _to_store(x: Any, dtype: Any) -> np.ndarray:
    arr = x[:, 0].numpy()
    if dtype == np.uint8:
        return np.rint(arr * 255.0).astype(np.uint8)
    return arr.astype(np.float16)


def _mask_to_store(x: Any) -> np.ndarray:
    return (x[:, 0].numpy() > 0.5).astype(np.uint8)


def tumor_eig_ratios(labels_zrc: np.ndarray) -> list[float | None]:
    """Eigenvalue ratios of the case's 3D tumor components (voxel units), for the exported shape bounds.

    Computed while the labels are in memory anyway, so exporting needs no second pass over the dataset.
    The definition is :func:`kitsseg.postprocess.shapestats.tumor_ratios` with its defaults (the one ``kitsseg
    stats`` uses); a degenerate (infinite) ratio is stored as ``None``.
    """
    from ..postprocess.shapestats import tumor_ratios

    ratios, _, _ = tumor_ratios(labels_zrc, unit="voxel")
    return [float(r) if np.isfinite(r) else None for r in ratios]  # type: ignore[misc]


def choose_pixel_spacing(cases: Sequence[Case], grid: tuple[int, int]) -> float:
    """The model grid's pixel spacing chosen from the data: the median case's in-plane field of view
    (its longer side, in mm) spread over the grid, rounded to 0.01 mm. Reads headers only.

    For KiTS19 (512 x 512 at a median 0.78 mm) this is about 1.56 mm: the typical slice is resampled by
    a factor of two, as the legacy geometry did, while finer or coarser scans keep their true size.
    """
    import nibabel as nib

    fovs = []
    for case in cases:
        try:
            img = cast("SpatialImage", nib.load(str(case.image)))
        except Exception as exc:  # nibabel raises many types for a file that is not NIfTI
            # A text file named imaging.nii.gz was a nibabel traceback here: let the CT loader name the
            # problem in its one line (InvalidImageError), as it does for every other command.
            from ..io.load import load_ct

            load_ct(case.image)
            raise InvalidImageError(
                f"{case.image} is not a readable NIfTI file ({type(exc).__name__}: {exc})"
            ) from None
        codes = nib.aff2axcodes(img.affine)
        zooms = img.header.get_zooms()[:3]
        shape = img.shape[:3]
        inplane = [i for i, c in enumerate(codes) if c not in ("S", "I")] or [0, 1]
        fovs.append(max(float(shape[i]) * float(zooms[i]) for i in inplane[:2]))
    if not fovs:
        return MODEL_SPACING_MM
    return round(float(np.median(fovs)) / float(min(grid)), 2)
