"""Train the shipped starter weights on the real CT slices in ../shared/data/real-slices.

Reproduce (about an hour on 2 CPU cores; resumable):

    python scripts/train_starter.py --stage kidney --minutes 40   # phases: docs/starter-training/README.md
    python scripts/train_starter.py --stage tumor --run-name tumor_v2 --minutes 16 --patience 8
    python scripts/train_starter.py --export src/kitsseg/assets/kitsseg-starter.pt --tumor-run tumor_v2

Data mapping and patient-level split: see ``starter_data.py``. Each stage checkpoints every epoch to
``runs/starter/<stage>/last.pt`` and resumes from it when run again; the best epoch by validation Dice is
kept in ``best.pt``. The training loop is the same recipe as ``kitsseg train`` (loss (1-l)*BCE + l*Dice,
Adam, LR on plateau, Gaussian init), applied to 2D slices instead of KiTS19 volumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from starter_data import WINDOW, load_all, split_groups  # noqa: E402

from kitsseg.checkpoint import StageModel, save_bundle  # noqa: E402
from kitsseg.model import UNet, UNetConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "real-slices"
RUN = ROOT / "runs" / "starter"
HALF = 256  # the kidney input side; the tumor band is 128 rows of the same 256x256 half-resolution slice


def prepare(seed: int, val_fraction: float):
    s = load_all(DATA)
    val = split_groups(s.group, val_fraction, seed)
    img = torch.from_numpy(s.image).unsqueeze(1)
    img = F.interpolate(img, size=(HALF, HALF), mode="bilinear", align_corners=False, antialias=True)
    lab = torch.from_numpy(s.label).unsqueeze(1).float()
    kt = (F.interpolate((lab > 0).float(), size=(HALF, HALF), mode="area") >= 0.5).to(torch.uint8)
    tu = (F.interpolate((lab == 2).float(), size=(HALF, HALF), mode="area") >= 0.5).to(torch.uint8)
    return img.half(), kt, tu, torch.from_numpy(val), s


def augment(x, masks, gen, *, intensity=True):
    """Anatomy-respecting augmentation: small rotation/scale/shift (no left-right flip), intensity jitter."""
    n = x.shape[0]
    ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(10)
    sc = torch.exp((torch.rand(n, generator=gen) * 2 - 1) * math.log(1.2))
    tx, ty = [(torch.rand(n, generator=gen) * 2 - 1) * 0.06 for _ in range(2)]
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    masks = [(F.grid_sample(m, grid, mode="bilinear", align_corners=False) >= 0.5).float() for m in masks]
    if intensity:
        gamma = torch.exp((torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * math.log(1.5))
        x = x.clamp(0, 1) ** gamma
        x = x * (1 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * 0.15)
        x = x + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * 0.1
        x = x + torch.randn(x.shape, generator=gen) * (torch.rand(n, 1, 1, 1, generator=gen) * 0.03)
        blur = torch.rand(n, generator=gen) < 0.25
        if blur.any():
            k = torch.tensor([0.25, 0.5, 0.25])
            k2 = (k[:, None] * k[None, :]).view(1, 1, 3, 3)
            x[blur] = F.conv2d(x[blur], k2, padding=1)
        x = x.clamp(0, 1)
    return x, masks


def loss_fn(logits, target, dice_weight=0.5):
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    dice = 1 - (2 * inter + 1) / (p.sum() + target.sum() + 1)
    return (1 - dice_weight) * bce + dice_weight * dice


def band_rows(kt_mask_rows: torch.Tensor, jitter: int, gen) -> int:
    """Band start (in half-resolution rows) centred on the kidney rows, jittered, clamped into the slice."""
    rows = torch.nonzero(kt_mask_rows).flatten()
    centre = (rows.min() + rows.max() + 1).item() / 2 if len(rows) else HALF * 0.6
    j = int(torch.randint(-jitter, jitter + 1, (1,), generator=gen)) if jitter else 0
    return int(max(0, min(HALF - HALF // 2, round(centre - HALF // 4) + j)))


def random_crop(x, y, focus, crop, gen, *, rows=True):
    """Crop ``crop``-wide windows (and ``crop``-high ones if ``rows``), centred near a random ``focus``
    pixel 80% of the time (else anywhere): training on crops costs a fraction of whole slices on a CPU,
    and the network is fully convolutional, so inference still runs on whole slices."""
    n, _, h, w = x.shape
    ch = crop if rows else h
    xs, ys = [], []
    for i in range(n):
        pts = torch.nonzero(focus[i, 0])
        if len(pts) and torch.rand(1, generator=gen).item() < 0.8:
            r, c = pts[torch.randint(len(pts), (1,), generator=gen)].flatten().tolist()
            r += int(torch.randint(-ch // 3, ch // 3 + 1, (1,), generator=gen))
            c += int(torch.randint(-crop // 3, crop // 3 + 1, (1,), generator=gen))
        else:
            r, c = int(torch.randint(h, (1,), generator=gen)), int(torch.randint(w, (1,), generator=gen))
        r0 = max(0, min(h - ch, r - ch // 2))
        c0 = max(0, min(w - crop, c - crop // 2))
        xs.append(x[i : i + 1, :, r0 : r0 + ch, c0 : c0 + crop])
        ys.append(y[i : i + 1, :, r0 : r0 + ch, c0 : c0 + crop])
    return torch.cat(xs), torch.cat(ys)


def paste_tumors(x, y, k, donors, img, tu, gen, prob):
    """2D TumorCP: paste a real tumor (pixels and mask) from a donor training slice into the kidney of a
    slice without tumor, so the tumor model sees more tumors in more kidneys (copy-paste augmentation,
    Yang et al., MICCAI 2021). Donors are training slices only."""
    for i in range(len(x)):
        if y[i].any() or not k[i].any() or torch.rand(1, generator=gen).item() >= prob:
            continue
        d = donors[torch.randint(len(donors), (1,), generator=gen)].item()
        m = tu[d, 0].bool()
        rows, cols = torch.nonzero(m, as_tuple=True)
        r0, r1, c0, c1 = rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1
        pm, px = m[r0:r1, c0:c1], img[d, 0, r0:r1, c0:c1].float()
        kp = torch.nonzero(k[i, 0])
        r, c = kp[torch.randint(len(kp), (1,), generator=gen)].flatten().tolist()
        h, w = pm.shape
        tr = max(0, min(HALF - h, r - h // 2))
        tc = max(0, min(HALF - w, c - w // 2))
        region_x = x[i, 0, tr : tr + h, tc : tc + w]
        region_x[pm] = px[pm]
        y[i, 0, tr : tr + h, tc : tc + w][pm] = 1.0
        k[i, 0, tr : tr + h, tc : tc + w][pm] = 1.0
    return x, y, k


def deenhance(x, m, gen, prob):
    """Simulate a non-contrast scan: pull kidney (+tumor) pixels towards unenhanced soft tissue (0-45 HU).

    Every training slice is contrast-enhanced, so without this the kidney model learns "bright organ" and
    misses kidneys in non-contrast CT (seen on the shipped example CT). Edges are softened by blurring the
    mask so no artificial outline is left to learn from."""
    soft = F.avg_pool2d(m, 5, stride=1, padding=2)
    for i in range(len(x)):
        if not m[i].any() or torch.rand(1, generator=gen).item() >= prob:
            continue
        a = torch.rand(1, generator=gen).item() * 0.4
        level = (torch.rand(1, generator=gen).item() * 45) / 255.0
        noise = torch.randn(x[i].shape, generator=gen) * 0.015
        target = a * x[i] + (1 - a) * level + noise
        x[i] = x[i] * (1 - soft[i]) + target * soft[i]
    return x


def batch_for(stage, idx, img, kt, tu, gen, train, crop=0, donors=None, paste=0.0, deenh=0.0):
    x = img[idx].float()
    if stage == "kidney":
        y = kt[idx].float()
        if train and deenh > 0:
            x = deenhance(x, y, gen, deenh)
        if train:
            x, (y,) = augment(x, [y], gen)
            if crop:
                x, y = random_crop(x, y, y, crop, gen)
        return x, y
    y, k = tu[idx].float(), kt[idx].float()
    if train and paste > 0 and donors is not None and len(donors):
        x, y, k = paste_tumors(x, y, k, donors, img, tu, gen, paste)
    if train:
        x, (y, k) = augment(x, [y, k], gen)
    xs, ys, ks = [], [], []
    for i in range(len(idx)):
        r0 = band_rows(k[i, 0].amax(1) > 0, 12 if train else 0, gen)
        xs.append(x[i : i + 1, :, r0 : r0 + HALF // 2])
        ys.append(y[i : i + 1, :, r0 : r0 + HALF // 2])
        ks.append(torch.maximum(k, y)[i : i + 1, :, r0 : r0 + HALF // 2])
    x, y, k = torch.cat(xs), torch.cat(ys), torch.cat(ks)
    if train and crop:
        focus = torch.where(y.flatten(1).amax(1).view(-1, 1, 1, 1) > 0, y, k)
        x, y = random_crop(x, y, focus, crop, gen, rows=False)
    return x, y


def evaluate(model, stage, idx, img, kt, tu, gen, threshold=0.5):
    model.eval()
    losses = []
    per_thr = {t: [0.0, 0.0, 0.0] for t in (0.3, 0.4, 0.5, 0.6, 0.7)}
    with torch.inference_mode():
        for b in range(0, len(idx), 32):
            x, y = batch_for(stage, idx[b : b + 32], img, kt, tu, gen, False)
            logits = model(x)
            losses.append(loss_fn(logits, y).item() * len(x))
            p = torch.sigmoid(logits)
            for t, acc in per_thr.items():
                m = (p >= t).float()
                acc[0] += (m * y).sum().item()
                acc[1] += (m * (1 - y)).sum().item()
                acc[2] += ((1 - m) * y).sum().item()
    dice = {t: 2 * a[0] / max(2 * a[0] + a[1] + a[2], 1) for t, a in per_thr.items()}
    model.train()
    return sum(losses) / max(len(idx), 1), dice


#: Training slices without kidney that show the pelvis (iliac wings, sacrum, femoral heads, bladder), picked
#: by eye from montages of all 276 training negatives: (source, patient group). The kidney model's worst
#: false positive is the urinary bladder (docs/model-card.md); ``--pelvic-neg`` draws extra negatives here.
PELVIC_NEGATIVES = (
    {
        ("kits23_slice50", f"kits_{c}")
        for c in (
            11,
            39,
            48,
            74,
            75,
            97,
            119,
            122,
            129,
            130,
            151,
            165,
            187,
            213,
            222,
            242,
            259,
            260,
            282,
            296,
        )
    }
    | {("kits23_mid", f"kits_{c}") for c in (39, 86, 187, 222, 223, 226, 242, 245, 259, 277)}
    | {("curvas", "curvas_10002")}
)


def train_stage(args):
    torch.manual_seed(args.seed)
    img, kt, tu, val, slices = prepare(args.seed, args.val_fraction)
    has_kt = kt.flatten(1).amax(1) > 0
    has_tu = tu.flatten(1).amax(1) > 0
    if args.stage == "kidney":
        pos, neg = has_kt, ~has_kt
        neg_per_batch = 0.25
    else:
        pos, neg = has_tu, has_kt & ~has_tu
        neg_per_batch = args.tumor_neg
    tr_pos = torch.nonzero(pos & ~val).flatten()
    tr_neg = torch.nonzero(neg & ~val).flatten()
    pelvic = torch.tensor(
        [(str(a), str(b)) in PELVIC_NEGATIVES for a, b in zip(slices.source, slices.group, strict=True)]
    )
    tr_pelvic = torch.nonzero(pelvic & neg & ~val).flatten()
    va = torch.nonzero((pos | neg) & val).flatten()
    out = RUN / (args.run_name or args.stage)
    out.mkdir(parents=True, exist_ok=True)
    config = UNetConfig(base_width=args.width, depth=4, norm="batch", upsample="transpose")
    model = UNet(config).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=args.patience)
    gen = torch.Generator().manual_seed(args.seed)
    epoch, best = 0, -1.0
    if (out / "last.pt").exists():
        ck = torch.load(out / "last.pt", weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        gen.set_state(ck["gen"])
        torch.set_rng_state(ck["rng"])
        epoch, best = int(ck["epoch"]), float(ck["best"])
        if args.reset_lr:
            for group in opt.param_groups:
                group["lr"] = args.reset_lr
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode="min", factor=0.5, patience=args.patience
            )
            best = -1.0  # a new phase (new augmentation): select its best epoch afresh
        print(f"resumed {args.stage} at epoch {epoch}, best {best:.4f}", flush=True)
    print(
        f"{args.stage}: train pos {len(tr_pos)} neg {len(tr_neg)} (pelvic {len(tr_pelvic)}), val {len(va)}",
        flush=True,
    )
    deadline = time.time() + args.minutes * 60
    n_neg = int(round(args.batch * neg_per_batch))
    steps = (
        max(1, (len(tr_pos) + len(tr_neg) * neg_per_batch) // args.batch)
        if args.stage == "kidney"
        else max(1, len(tr_pos) // (args.batch - n_neg))
    )
    while epoch < args.epochs and time.time() < deadline:
        t0 = time.time()
        model.train()
        tot = 0.0
        perm = tr_pos[torch.randperm(len(tr_pos), generator=gen)]
        k = args.batch - n_neg
        for s in range(int(steps)):
            pi = perm[(s * k) % len(perm) :][:k]
            ni = tr_neg[torch.randint(len(tr_neg), (n_neg,), generator=gen)]
            n_pel = int(round(n_neg * args.pelvic_neg)) if len(tr_pelvic) else 0
            if n_pel:  # replace part of the negatives by pelvic ones
                ni[:n_pel] = tr_pelvic[torch.randint(len(tr_pelvic), (n_pel,), generator=gen)]
            x, y = batch_for(
                args.stage,
                torch.cat([pi, ni]),
                img,
                kt,
                tu,
                gen,
                True,
                args.crop,
                tr_pos,
                args.paste,
                args.deenhance,
            )
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item()
        vloss, vdice = evaluate(model, args.stage, va, img, kt, tu, gen)
        sched.step(vloss)
        epoch += 1
        rec = {
            "stage": args.stage,
            "epoch": epoch,
            "train_loss": tot / steps,
            "val_loss": vloss,
            "val_dice": {str(t): round(v, 4) for t, v in vdice.items()},
            "lr": opt.param_groups[0]["lr"],
            "seconds": round(time.time() - t0, 1),
        }
        print(json.dumps(rec), flush=True)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if max(vdice.values()) > best:
            best = max(vdice.values())
            thr = max(vdice, key=vdice.get)
            torch.save(
                {
                    "model": model.state_dict(),
                    "config": json.dumps(config.to_dict()),
                    "epoch": epoch,
                    "val_dice": best,
                    "threshold": thr,
                },
                out / "best.tmp",
            )
            os.replace(out / "best.tmp", out / "best.pt")
        torch.save(
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "gen": gen.get_state(),
                "rng": torch.get_rng_state(),
                "epoch": epoch,
                "best": best,
            },
            out / "last.tmp",
        )
        os.replace(out / "last.tmp", out / "last.pt")


def export(path: Path, eig_bounds, min_overlap, runs=None):
    stages = {}
    meta_stages = {}
    runs = runs or {}
    for name, size in (("kidney", (256, 256)), ("tumor", (128, 256))):
        f = RUN / runs.get(name, name) / "best.pt"
        if not f.exists():
            continue
        ck = torch.load(f, weights_only=True)
        model = UNet(UNetConfig.from_dict(json.loads(ck["config"])))
        model.load_state_dict(ck["model"])
        stages[name] = StageModel(model, size, float(ck["threshold"]))
        meta_stages[name] = {"epoch": int(ck["epoch"]), "val_dice": float(ck["val_dice"])}
    meta = {
        "name": "kitsseg-starter",
        "version": "0.2.0",
        "hu_window": list(WINDOW),
        "eig_bounds": list(eig_bounds),
        "eig_unit": "voxel",
        "band_fraction": 0.5,
        "min_overlap": min_overlap,
        "license": "CC BY-NC-SA 4.0 (inherited from the training slices): non-commercial research only",
        "training_data": "real CT slices: KiTS23 (2x298), KiTS19 (97), CURVAS (108); see docs/model-card.md",
        "validation": meta_stages,
    }
    save_bundle(path, stages, meta, half=True)
    print(f"exported {path} ({path.stat().st_size / 1e6:.2f} MB): {meta_stages}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["kidney", "tumor"])
    ap.add_argument("--export", type=Path)
    ap.add_argument("--eig-bounds", default="1.07,2.8")
    ap.add_argument(
        "--min-overlap",
        type=float,
        default=0.2,
        help="tumor-in-kidney overlap threshold stored in the weights (chosen on validation slices)",
    )
    ap.add_argument("--minutes", type=float, default=40)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crop", type=int, default=128, help="train on crops this wide (0: whole inputs)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument(
        "--tumor-neg",
        type=float,
        default=0.5,
        help="fraction of each tumor batch that is kidney-without-tumor",
    )
    ap.add_argument(
        "--paste",
        type=float,
        default=0.5,
        help="tumor stage: probability of pasting a real tumor into a negative slice",
    )
    ap.add_argument(
        "--deenhance",
        type=float,
        default=0.25,
        help="kidney stage: probability of simulating a non-contrast kidney",
    )
    ap.add_argument(
        "--reset-lr",
        type=float,
        default=0.0,
        help="on resume, restart the LR schedule at this LR (a new training phase)",
    )
    ap.add_argument(
        "--pelvic-neg",
        type=float,
        default=0.0,
        help="kidney stage: fraction of each batch's negatives drawn from PELVIC_NEGATIVES",
    )
    ap.add_argument("--run-name", help="checkpoint folder under runs/starter (default: the stage name)")
    ap.add_argument("--patience", type=int, default=3, help="epochs without improvement before the LR halves")
    ap.add_argument("--tumor-run", default="tumor", help="export: the run folder of the tumor model")
    ap.add_argument("--kidney-run", default="kidney", help="export: the run folder of the kidney model")
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    if args.export:
        export(
            args.export,
            [float(v) for v in args.eig_bounds.split(",")],
            args.min_overlap,
            {"tumor": args.tumor_run, "kidney": args.kidney_run},
        )
    elif args.stage:
        train_stage(args)
    else:
        ap.error("give --stage or --export")


if __name__ == "__main__":
    main()
