"""Benchmark ``kitsseg.segment`` against this machine's compute floor.

One run answers: how far is the pipeline from the fastest it could be on this machine? It

1. builds a synthetic 512x512xN CT (``kitsseg.evaluation.phantom``, stored as int16 HU like real CTs) or takes
a
   given NIfTI;
2. segments it in a fresh subprocess (so peak RSS is this run's alone) and reads the report's per-stage
   timings (load, kidney, tumor, postprocess, write), the time inside the networks, and the peak RSS;
3. counts the FLOPs the networks execute (``torch.utils.flop_counter`` on one slice of each stage's model,
   times the slices the stage really ran on);
4. measures the machine's convolution throughput for the models' own layer shapes at the batch size used
   (each Conv2d/ConvTranspose2d shape alone, channels-last, ``inference_mode``; fp32, and bf16 autocast
   when the CPU has native bf16 or the run used it), exactly as the pipeline runs them
   (``kitsseg.inference.predict.inference_model``: BatchNorm folded);
5. prints the floor (sum over layers of FLOPs / best throughput of fp32 and the precision used), the
   ratio wall / floor, slices per second, and peak RSS against the input's size.

``--paper`` repeats the measurement with the seed paper's 64-channel U-Net (``UNetConfig.paper()``) for
both stages, randomly initialised.

Weights: ``--weights NAME|PATH`` as ``kitsseg segment`` takes them; by default the registry's default
(``kitsseg-starter``). When that cannot be used yet, a randomly initialised ``UNetConfig.cpu_default()``
bundle stands in (same layers and FLOPs; the output says so). Random networks mark about half of all
voxels as kidney, so post-processing and the tumor stage then see unrealistic masks; ``--weights oracle``
is a stand-in of the same size and cost whose hand-set weights find the phantom's kidneys and tumors, so
those stages see realistic masks. Speed is data-independent for dense convolutions, so both give the
networks' true cost.

Run from the repository root (only the package's own dependencies)::

    python benchmarks/bench_segment.py                    # 512x512x300 synthetic CT, default weights
    python benchmarks/bench_segment.py --slices 8 --weights oracle --json out.json
    python benchmarks/bench_segment.py --input CT.nii.gz --paper --bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CHILD_FLAG = "--_child"
RESULT_MARK = "@@bench-result@@ "
SPACING = (2.5, 0.8, 0.8)  # (z, row, col) mm of the synthetic CT
SIZE = 512
#: Batch sizes at which each layer shape is timed for the floor (with the run's own); the best counts.
FLOOR_BATCHES = (4, 8, 16)
STAND_IN_META = {
    "version": "0",
    "pixel_spacing_mm": 1.5625,  # the shipped weights' geometry: slices resampled to the model grid
    "hu_window": [0.0, 255.0],
    "eig_bounds": [1.07, 2.8],
    "eig_unit": "voxel",
    "band_fraction": 0.5,
    "license": "none (benchmark stand-in)",
    "training_data": "none",
}


# ------------------------------------------------------------------------------------------ arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slices", type=int, default=300, help="slices of the synthetic 512x512 CT (default 300)")
    p.add_argument("--input", type=Path, help="benchmark this NIfTI CT instead of a synthetic one")
    p.add_argument(
        "--weights",
        default=None,
        help="registry name or path (default: the registry default, else a random stand-in); "
        "'random' or 'oracle' for the stand-ins",
    )
    p.add_argument("--paper", action="store_true", help="also measure the paper's 64-channel U-Net")
    p.add_argument("--json", type=Path, help="write all numbers to this JSON file")
    p.add_argument("--batch-size", type=int, default=8, help="slices per forward pass (default 8)")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="force bf16 autocast for the networks")
    precision.add_argument("--fp32", action="store_true", help="force float32 for the networks")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: as segment picks)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per layer shape (best is kept)")
    p.add_argument(
        "--runs",
        type=int,
        default=3,
        help="segment runs, each in a fresh process (default 3): the fastest is reported, as the floor "
        "keeps each layer's best repetition; peak RSS is the largest of all runs",
    )
    p.add_argument("--keep", type=Path, help="write the synthetic CT and outputs here instead of a temp dir")
    args = p.parse_args(argv)
    if args.slices < 1 or args.batch_size < 1 or args.reps < 1 or args.runs < 1:
        p.error("--slices, --batch-size, --reps and --runs must be at least 1")
    return args


# ------------------------------------------------------------------------------------------ stand-ins


def band_pass_unet(config: Any, lo: float, hi: float) -> Any:
    """A full-size U-Net whose output is foreground where the windowed input lies in about ``(lo, hi)``.

    All weights are zero except a few taps: the first convolution carries a 3x3 mean of ``x - lo``
    (channel 0, noise down 3x) and ``x - hi`` (channel 1); channel 1 is then summed over 3x3 in each of
    three later convolutions, so anything brighter than ``hi`` within 3 pixels vetoes foreground (no rims
    around bone, or, for the tumor band, around kidney). BatchNorms are identities carrying the biases.
    Every convolution still runs densely, so the cost is that of a trained network of this config.
    """
    import torch
    from torch import nn

    from kitsseg.nets.model import UNet

    net = UNet(config)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.running_mean.zero_()
                m.running_var.fill_(1.0 - m.eps)
        first, second = net.inc[0], net.inc[3]
        first.weight[0, 0] = 1.0 / 9.0
        first.weight[1, 0, 1, 1] = 1.0
        bias = first.bias if first.bias is not None else net.inc[1].bias
        bias[0], bias[1] = -lo, -hi
        top = net.ups[-1].conv  # input cat([skip, up]): the skip's channels come first
        for conv in (second, top[0], top[3]):
            conv.weight[0, 0, 1, 1] = 1.0
            conv.weight[1, 1] = 1.0
        net.head.weight[0, 0, 0, 0] = 40.0
        net.head.weight[0, 1, 0, 0] = -400.0
        net.head.bias[0] = -0.5
    return net.eval()


def write_stand_in(path: Path, config: Any, kind: str) -> Path:
    """Write a ``random`` or ``oracle`` bundle of ``config``: kidney stage 256x256, tumor stage 128x256."""
    import torch

    from kitsseg.inference.preprocess import KIDNEY_INPUT, TUMOR_INPUT
    from kitsseg.nets.model import UNet
    from kitsseg.weights.checkpoint import StageModel, save_bundle

    torch.manual_seed(0)
    if kind == "oracle":  # windowed [0, 255] HU: kidney+tumor ~49-230 HU, tumor ~49-115 HU
        kidney, tumor = band_pass_unet(config, 0.18, 0.9), band_pass_unet(config, 0.18, 0.45)
    else:
        kidney, tumor = UNet(config).eval(), UNet(config).eval()
    stages = {"kidney": StageModel(kidney, KIDNEY_INPUT), "tumor": StageModel(tumor, TUMOR_INPUT)}
    meta = {**STAND_IN_META, "name": f"{kind}-stand-in"}
    return save_bundle(path, stages, meta, half=False)


def resolve_main_weights(spec: str | None, work: Path) -> tuple[Path, str]:
    """The weights file of the main measurement and a line saying what it is."""
    from kitsseg.errors import KitssegError
    from kitsseg.nets.model import UNetConfig
    from kitsseg.weights.resolve import resolve_weights

    cfg = UNetConfig.cpu_default()
    if spec in ("random", "oracle"):
        path = write_stand_in(work / f"{spec}.pt", cfg, spec)
        return path, f"{spec} stand-in, UNetConfig.cpu_default() for both stages (--weights {spec})"
    try:
        path = resolve_weights(spec)
    except KitssegError as exc:
        if spec is not None:
            raise
        path = write_stand_in(work / "random.pt", cfg, "random")
        return path, (
            f"the default weights are not available ({exc}); using a randomly initialised "
            "UNetConfig.cpu_default() bundle instead (same layers and FLOPs; masks are not realistic, "
            "see --weights oracle)"
        )
    return Path(path), f"{spec or 'registry default'}: {path}"


# ------------------------------------------------------------------------------------------ input


def synthetic_ct(work: Path, slices: int) -> tuple[Path, Path, float]:
    """Write a 512x512x``slices`` phantom CT (int16 HU) and its labels; return paths and seconds."""
    import numpy as np

    from kitsseg.evaluation.phantom import make_phantom
    from kitsseg.io.save import write_frame

    t0 = time.perf_counter()
    ct, labels = make_phantom((slices, SIZE, SIZE), SPACING, seed=0, n_tumors=1)
    ct16 = np.rint(ct, out=ct).astype(np.int16)
    del ct
    ct_path = write_frame(ct16, work / "synthetic_ct.nii.gz", spacing=SPACING)
    labels_path = write_frame(labels, work / "synthetic_labels.nii.gz", spacing=SPACING)
    return ct_path, labels_path, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ child


def native_bf16(device: Any) -> bool:
    """``kitsseg.inference.predict.native_bf16``, or the CPU flags where that kitsseg predates it."""
    try:
        from kitsseg.inference.predict import native_bf16 as check
    except ImportError:
        if device.type == "cuda":
            import torch

            return bool(torch.cuda.is_bf16_supported())
        try:
            flags = Path("/proc/cpuinfo").read_text(errors="replace").split()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return check(device)


def _status_mb(field: str) -> float | None:
    """A memory line (``VmRSS``, ``VmHWM``) of ``/proc/self/status`` in MB; None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def vm_rss_mb() -> float:
    value = _status_mb("VmRSS")
    return float("nan") if value is None else value


def peak_rss_mb() -> float:
    """Peak RSS of this process since it started its program.

    Linux: ``VmHWM`` from ``/proc/self/status``. Not ``ru_maxrss``: that survives ``exec``, so a child
    started by a parent holding 2 GB (the synthetic CT being built) reports the parent's 2 GB as its own
    peak; the 2218 MB the first version of this script printed for every configuration was exactly that.
    Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS), with that caveat.
    """
    value = _status_mb("VmHWM")
    if value is not None:
        return value
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def child(spec: dict[str, Any]) -> None:
    """Segment once in this fresh process and print the measurements as one JSON line."""
    t0 = time.perf_counter()
    import numpy as np

    import kitsseg.inference.predict as predict
    from kitsseg.inference.segment import segment

    import_s = time.perf_counter() - t0
    rss_after_import = vm_rss_mb()
    captured: dict[str, Any] = {}
    original = predict.predict_volume

    def capture(*args: Any, **kwargs: Any) -> Any:  # segment imports predict_volume at call time
        pred = original(*args, **kwargs)
        captured["pred"] = pred
        return pred

    predict.predict_volume = capture
    if spec["device"] in ("cpu", "auto"):
        # What `kitsseg segment` does at its start (library calls leave the process alone since 0.5).
        from kitsseg import tune_process

        tune_process(spec["threads"])
    t0 = time.perf_counter()
    result = segment(
        spec["input"],
        spec["output"],
        weights=spec["weights"],
        device=spec["device"],
        threads=spec["threads"],
        batch_size=spec["batch_size"],
        bf16=spec["bf16"],
    )
    wall = time.perf_counter() - t0
    peak = peak_rss_mb()
    reference = None
    if spec["reference"]:  # outside the timed call: a user's segment run has no reference labels
        from kitsseg.evaluation.metrics import dice, region_mask
        from kitsseg.io.load import load_labels

        ref = load_labels(spec["reference"]).data
        ours = load_labels(spec["output"]).data
        reference = {
            f"dice_{r}": dice(region_mask(ours, r), region_mask(ref, r)) for r in ("kidney_tumor", "tumor")
        }
    pred = captured["pred"]
    kidney_slices = int(np.count_nonzero(pred.kidney_tumor_mask.any(axis=(1, 2))))
    import torch

    out = {
        "wall_s": wall,
        "import_s": import_s,
        "rss_after_import_mb": rss_after_import,
        "peak_rss_mb": peak,
        "timings_s": result.report["timings_s"],
        "detail_s": dict(getattr(pred, "detail_timings", {})),  # absent before the speed work
        "shape_zrc": list(pred.kidney_tumor_mask.shape),
        "kidney_slices": kidney_slices,
        "kidney_voxel_fraction": float(pred.kidney_tumor_mask.mean()),
        "tumor_slices": int(pred.tumor_slices),
        "threads": torch.get_num_threads(),
        "device": result.report.get("device"),
        "notes": list(pred.notes),
        "bf16": bool(result.report.get("bf16")),
        "engine": result.report.get("network_engine", "torch"),  # absent before the fused kernels
        "reference": reference,
    }
    print(RESULT_MARK + json.dumps(out), flush=True)


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), CHILD_FLAG, json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    raise RuntimeError(f"the segment subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def best_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest run, carrying every run's wall time and the largest peak RSS of them all.

    The floor keeps each layer's best repetition, so the wall it is compared with is a best too; one
    run alone moves by 5-10% on a shared 2-core machine. Memory is the other way round: the worst run.
    """
    best = dict(min(runs, key=lambda r: r["wall_s"]))
    best["walls_s"] = [r["wall_s"] for r in runs]
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return best


# ------------------------------------------------------------------------------------------ FLOPs


def layer_shapes(model: Any, input_size: tuple[int, int]) -> tuple[float, list[dict[str, Any]]]:
    """FLOPs of one slice through ``model``, and its convolution layers with their input shapes.

    Layers with the same type, configuration and input shape are listed once with a ``count``.
    """
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    hooks = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        shape = tuple(inputs[0].shape[1:])
        key = (
            type(module).__name__,
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.bias is not None,
            shape,
        )
        if key in seen:
            seen[key]["count"] += 1
        else:
            seen[key] = {"module": module, "shape_chw": shape, "count": 1}

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            hooks.append(m.register_forward_pre_hook(record))
    device = next(model.parameters()).device
    x = torch.zeros((1, 1, *input_size), device=device).contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return float(counter.get_total_flops()), list(seen.values())


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layer_throughput(
    layers: list[dict[str, Any]], batch: int, precisions: list[str], reps: int
) -> list[dict[str, Any]]:
    """Time each layer shape alone at ``batch`` slices: seconds and GFLOP/s per precision (best of reps)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    rows = []
    for layer in layers:
        module = layer["module"]
        device = next(module.parameters()).device
        x = torch.randn((batch, *layer["shape_chw"]), device=device).contiguous(
            memory_format=torch.channels_last
        )
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            module(x)
        flops = float(counter.get_total_flops())
        row = {
            "layer": f"{type(module).__name__} {module.in_channels}->{module.out_channels} "
            f"k{module.kernel_size[0]} s{module.stride[0]} @ {layer['shape_chw'][1]}x{layer['shape_chw'][2]}",
            "count": layer["count"],
            "flops_per_batch": flops,
        }
        for precision in precisions:
            ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
            with torch.inference_mode(), ctx:
                module(x)  # warm-up (oneDNN primitive creation, weight reorders)
                best = float("inf")
                for _ in range(reps):
                    _sync(device)
                    t0 = time.perf_counter()
                    module(x)
                    _sync(device)
                    best = min(best, time.perf_counter() - t0)
            row[f"{precision}_s"] = best
            row[f"{precision}_gflops"] = flops / best / 1e9
        rows.append(row)
        del x
    return rows


def measure_floor(
    weights: Path, run: dict[str, Any], args: argparse.Namespace, precisions: list[str]
) -> dict[str, Any]:
    """FLOPs executed and the compute floor of each stage of one segment run."""
    from kitsseg.weights.checkpoint import load_bundle

    try:
        from kitsseg.inference.predict import inference_model
    except ImportError:  # a kitsseg from before the speed work: the layers as it ran them

        def inference_model(model: Any) -> Any:
            import torch

            return model.eval().to(memory_format=torch.channels_last)

    bundle = load_bundle(weights, args.device)
    used = "bf16" if run.get("bf16", args.bf16) else "fp32"
    stages: dict[str, Any] = {}
    slices_run = {"kidney": run["shape_zrc"][0], "tumor": run["tumor_slices"]}
    for name in ("kidney", "tumor"):
        stage = getattr(bundle, name)
        if stage is None:
            continue
        model = inference_model(stage.model)
        flops_slice, layers = layer_shapes(model, stage.input_size)
        # The machine's throughput for a layer shape is its best over batch sizes, not only at the
        # run's: a floor measured at one batch alone can be slower than the network itself (seen at
        # batch 16, where outputs above glibc's 32 MB mmap threshold page-fault in every call).
        rows = layer_throughput(layers, args.batch_size, precisions, args.reps)
        at_run_batch = (
            sum(  # the floor with the run's batch size alone (session 1's definition)
                r["count"]
                * r["flops_per_batch"]
                / args.batch_size
                / max(r["fp32_gflops"], r[f"{used}_gflops"])
                for r in rows
            )
            / 1e9
        )
        for batch in sorted(set(FLOOR_BATCHES) - {args.batch_size}):
            for row, other in zip(rows, layer_throughput(layers, batch, precisions, args.reps), strict=True):
                for p in precisions:
                    if other[f"{p}_gflops"] > row[f"{p}_gflops"]:
                        row[f"{p}_gflops"] = other[f"{p}_gflops"]
                        row[f"{p}_best_batch"] = batch
        floor_slice = 0.0  # seconds per slice at the best of fp32 and the precision used, layer by layer
        by_precision = {p: 0.0 for p in precisions}
        for row in rows:
            per_slice = row["count"] * row["flops_per_batch"] / args.batch_size
            floor_slice += per_slice / max(row["fp32_gflops"], row[f"{used}_gflops"]) / 1e9
            for p in precisions:
                by_precision[p] += per_slice / row[f"{p}_gflops"] / 1e9
        layer_flops = sum(r["count"] * r["flops_per_batch"] for r in rows) / args.batch_size
        n = slices_run[name]
        stages[name] = {
            "config": stage.model.config.to_dict(),
            "input_size": list(stage.input_size),
            "gflop_per_slice": flops_slice / 1e9,
            "layer_gflop_per_slice": layer_flops / 1e9,
            "slices_run": n,
            "gflop_run": flops_slice * n / 1e9,
            "floor_s_per_slice": floor_slice,
            "conv_gflops": {p: flops_slice / t / 1e9 for p, t in by_precision.items() if t > 0},
            "floor_s": floor_slice * n,
            "floor_s_at_run_batch": at_run_batch * n,
            "layers": rows,
        }
    return stages


# ------------------------------------------------------------------------------------------ report


def summarise(label: str, note: str, run: dict[str, Any], stages: dict[str, Any], input_info: dict) -> dict:
    t = run["timings_s"]
    d = run["detail_s"]
    nets = d.get("kidney_net", 0.0) + d.get("tumor_net", 0.0)
    floor = sum(s["floor_s"] for s in stages.values())
    floor_run_batch = sum(s.get("floor_s_at_run_batch", s["floor_s"]) for s in stages.values())
    gflop = sum(s["gflop_run"] for s in stages.values())
    around = t.get("kidney", 0.0) + t.get("tumor", 0.0) - nets - d.get("prepare", 0.0)
    if d:
        inference = {
            "model preparation (BN folding)": d.get("prepare", 0.0),
            "kidney net": d.get("kidney_net", 0.0),
            "tumor net": d.get("tumor_net", 0.0),
            "window/resize/threshold": around,
        }
    else:  # a kitsseg from before the speed work reports whole stages only
        inference = {"kidney stage (all)": t.get("kidney", 0.0), "tumor stage (all)": t.get("tumor", 0.0)}
    breakdown = {
        "load": t.get("load", 0.0),
        **inference,
        "postprocess": t.get("postprocess", 0.0),
        "write": t.get("write", 0.0),
        "other (model load, checks, report)": run["wall_s"] - t.get("total", 0.0),
    }
    n_slices = run["shape_zrc"][0]
    return {
        "label": label,
        "weights": note,
        "run": run,
        "stages": stages,
        "breakdown_s": breakdown,
        "gflop_executed": gflop,
        "floor_s": floor,
        "wall_s": run["wall_s"],
        "wall_over_floor": run["wall_s"] / floor if floor > 0 else None,
        "floor_s_at_run_batch": floor_run_batch,
        "wall_over_floor_at_run_batch": run["wall_s"] / floor_run_batch if floor_run_batch > 0 else None,
        "nets_over_floor": nets / floor if floor > 0 and d else None,
        "slices_per_s": n_slices / run["wall_s"],
        "peak_rss_mb": run["peak_rss_mb"],
        "peak_rss_over_input_f32": run["peak_rss_mb"] * 2**20 / input_info["float32_bytes"],
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def print_summary(s: dict[str, Any], input_info: dict[str, Any]) -> None:
    run = s["run"]
    print(f"\n=== {s['label']} ===")
    print(f"weights: {s['weights']}")
    print(
        f"device {run['device']}, threads {run['threads']}, kidney slices {run['kidney_slices']}/"
        f"{run['shape_zrc'][0]} (kidney mask {100 * run['kidney_voxel_fraction']:.1f}% of voxels), "
        f"tumor model on {run['tumor_slices']} slices, networks run by {run.get('engine', 'torch')}"
    )
    if run.get("reference"):
        ref = run["reference"]
        print(
            f"Dice vs phantom labels: kidney+tumor {ref['dice_kidney_tumor']:.3f}, "
            f"tumor {ref['dice_tumor']:.3f}"
        )
    for note in run["notes"]:
        print(f"note: {note}")
    print("\nconvolution throughput of the model's own layer shapes (GFLOP/s, all layers together):")
    for name, st in s["stages"].items():
        rates = ", ".join(f"{p} {v:.0f}" for p, v in st["conv_gflops"].items())
        print(
            f"  {name:6s} {st['gflop_per_slice']:.2f} GFLOP/slice x {st['slices_run']} slices = "
            f"{st['gflop_run']:.1f} GFLOP; {rates}; floor {st['floor_s']:.2f} s"
        )
        worst = sorted(st["layers"], key=lambda r: -r["count"] * r["flops_per_batch"])[:3]
        for r in worst:
            rates = ", ".join(f"{k[:-7]} {r[k]:.0f}" for k in r if k.endswith("_gflops"))
            print(f"         {r['count']}x {r['layer']}: {rates}")
    wall = s["wall_s"]
    print(f"\n{'stage':38s} {'seconds':>9s} {'share':>7s}")
    for k, v in s["breakdown_s"].items():
        print(f"{k:38s} {v:9.2f} {100 * v / wall:6.1f}%")
    print(f"{'wall (segment() end to end)':38s} {wall:9.2f}")
    print(
        f"\nFLOPs executed {s['gflop_executed']:.1f} GFLOP; floor {s['floor_s']:.2f} s; "
        f"wall / floor {s['wall_over_floor']:.2f} (networks alone / floor {_fmt(s['nets_over_floor'])}); "
        f"{s['slices_per_s']:.2f} slices/s"
    )
    print(
        f"(floor from the run's batch size alone: {s['floor_s_at_run_batch']:.2f} s, "
        f"wall / that floor {_fmt(s['wall_over_floor_at_run_batch'])})"
    )
    print(
        f"peak RSS {s['peak_rss_mb']:.0f} MB (after imports {run['rss_after_import_mb']:.0f} MB) "
        f"for an input of {input_info['float32_bytes'] / 2**20:.0f} MB as float32 "
        f"({input_info['file_bytes'] / 2**20:.0f} MB on disk): {s['peak_rss_over_input_f32']:.2f}x"
    )


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    from kitsseg.nets.device import select_device, set_threads
    from kitsseg.nets.model import UNetConfig

    device = select_device(args.device)
    threads = set_threads(args.threads)
    try:  # the allocator settings segment() applies: the layer timings of the floor get them too
        from kitsseg.nets.allocator import tune_cpu_allocator

        allocator = tune_cpu_allocator() if device.type == "cpu" else False
    except ImportError:  # a kitsseg from before them
        allocator = None
    with tempfile.TemporaryDirectory(prefix="kitsseg-bench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"kitsseg benchmark: torch {torch.__version__}, {platform.processor() or platform.machine()}, ")
        print(
            f"{threads} threads, device {device}, native bf16: {native_bf16(device)}, precision: "
            f"{'bf16' if args.bf16 else 'fp32' if args.fp32 else 'as segment picks (bf16 where native)'}, "
            f"glibc allocator tuned (kitsseg.nets.allocator): {allocator}"
        )
        reference = None
        if args.input is not None:
            ct_path = args.input
            print(f"input: {ct_path}")
        else:
            ct_path, reference, seconds = synthetic_ct(work, args.slices)
            print(f"input: synthetic {SIZE}x{SIZE}x{args.slices} phantom CT, int16, built in {seconds:.1f} s")
        import nibabel as nib

        shape = nib.load(str(ct_path)).shape[:3]
        input_info = {
            "path": str(ct_path),
            "shape": [int(s) for s in shape],
            "float32_bytes": int(np.prod(shape)) * 4,
            "file_bytes": os.path.getsize(ct_path),
        }
        weights, note = resolve_main_weights(args.weights, work)
        configs = [("default model", weights, note)]
        if args.paper:
            kind = "oracle" if args.weights == "oracle" else "random"
            paper = write_stand_in(work / f"paper-{kind}.pt", UNetConfig.paper(), kind)
            configs.append(
                ("paper's 64-channel U-Net", paper, f"{kind} stand-in, UNetConfig.paper() for both stages")
            )
        precisions = ["fp32"] + (["bf16"] if args.bf16 or native_bf16(device) else [])
        results = []
        for label, path, text in configs:
            print(f"\nsegmenting with the {label} ...", flush=True)
            spec = {
                "input": str(ct_path),
                "output": str(work / f"seg-{len(results)}.nii.gz"),
                "weights": str(path),
                "device": args.device,
                "threads": threads,
                "batch_size": args.batch_size,
                "bf16": True if args.bf16 else False if args.fp32 else None,  # None: segment's default
                "reference": None if reference is None else str(reference),
            }
            run = best_run([run_child(spec) for _ in range(args.runs)])
            walls = ", ".join(f"{w:.2f}" for w in run["walls_s"])
            print(f"segment walls over {args.runs} fresh processes: {walls} s (the fastest is reported)")
            print(f"measuring conv throughput of its layer shapes ({', '.join(precisions)}) ...", flush=True)
            stages = measure_floor(path, run, args, precisions)
            summary = summarise(label, text, run, stages, input_info)
            print_summary(summary, input_info)
            results.append(summary)
        if args.json is not None:
            payload = {
                "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(),
                "threads": threads,
                "device": str(device),
                "native_bf16": native_bf16(device),
                "allocator_tuned": allocator,
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "input": input_info,
                "results": results,
            }
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp_json = args.json.with_name(f".{args.json.name}.tmp")
            tmp_json.write_text(json.dumps(payload, indent=2))
            os.replace(tmp_json, args.json)
            print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == CHILD_FLAG:
        child(json.loads(sys.argv[2]))
        sys.exit(0)
    from kitsseg.errors import KitssegError

    try:
        sys.exit(main())
    except KitssegError as exc:  # a wrong device or input: one line, as the kitsseg command prints it
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
