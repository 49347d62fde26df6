"""2D TumorCP: paste real tumors from training slices into kidneys of tumor-free slices.

Copy-paste of real tumors (Yang et al., MICCAI 2021) shows the tumor model more tumors in more kidneys; on
the starter's validation slices it was the tumor lever that mattered most (model card). Donors are
training slices only, never validation ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paste_tumors(
    x: torch.Tensor,
    tumor: torch.Tensor,
    kidney: torch.Tensor,
    donor_images: torch.Tensor,
    donor_tumors: torch.Tensor,
    gen: torch.Generator,
    prob: float,
    donors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return new ``(x, tumor, kidney)`` where, with probability ``prob``, each slice that has kidney but
    no tumor gets one donor tumor (pixels and mask) centred on a random kidney pixel. All tensors
    ``(N, 1, H, W)`` on the same grid; donor arrays ``(D, 1, H, W)``, of which only the rows ``donors``
    (default all) are drawn from (indices, so the donor set is not copied every batch)."""
    x, tumor, kidney = x.clone(), tumor.clone(), kidney.clone()
    h_img, w_img = x.shape[-2:]
    pool = torch.arange(donor_images.shape[0]) if donors is None else donors
    n_donors = len(pool)
    for i in range(x.shape[0]):
        draw = float(torch.rand(1, generator=gen))
        if n_donors == 0 or tumor[i].any() or not kidney[i].any() or draw >= prob:
            continue
        d = int(pool[int(torch.randint(n_donors, (1,), generator=gen))])
        m = donor_tumors[d, 0] > 0
        rows, cols = torch.nonzero(m, as_tuple=True)
        r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        pm, px = m[r0:r1, c0:c1], donor_images[d, 0, r0:r1, c0:c1].to(x.dtype)
        kp = torch.nonzero(kidney[i, 0] > 0)
        r, c = kp[int(torch.randint(len(kp), (1,), generator=gen))].tolist()
        h, w = pm.shape
        tr = max(0, min(h_img - h, r - h // 2))
        tc = max(0, min(w_img - w, c - w // 2))
        x[i, 0, tr : tr + h, tc : tc + w][pm] = px[pm]
        tumor[i, 0, tr : tr + h, tc : tc + w][pm] = 1
        kidney[i, 0, tr : tr + h, tc : tc + w][pm] = 1
    return x, tumor, kidney


def paste_kidneys(
    x: torch.Tensor,
    kidney: torch.Tensor,
    donor_images: torch.Tensor,
    donor_kidneys: torch.Tensor,
    gen: torch.Generator,
    prob: float,
    donors: torch.Tensor | None = None,
    spacing_mm: float = 1.5625,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return new ``(x, kidney)`` where, with probability ``prob``, each slice without kidney gets one real
    kidney cross-section (a connected region of a donor's kidney mask, its pixels blended in over a soft
    edge) at a random retroperitoneal place: on soft tissue, behind the body's centre, 35-110 mm to
    either side of the midline (where kidneys lie, whatever the level).

    Why: a 2D network learns the kidney's surroundings as much as the kidney, and misses kidneys where the
    training slices never show one (a low-lying or pelvic kidney beside the psoas, next to the iliac crest,
    as in the validation CT from outside KiTS). Pasted kidneys in slices of other levels teach appearance
    over position. Donors are training slices only.
    """
    from scipy import ndimage

    x, kidney = x.clone(), kidney.clone()
    h_img, w_img = x.shape[-2:]
    pool = torch.arange(donor_images.shape[0]) if donors is None else donors
    n_donors = len(pool)
    for i in range(x.shape[0]):
        draw = float(torch.rand(1, generator=gen))
        if n_donors == 0 or kidney[i].any() or draw >= prob:
            continue
        d = int(pool[int(torch.randint(n_donors, (1,), generator=gen))])
        lab, n = ndimage.label(donor_kidneys[d, 0].numpy() > 0)
        if n == 0:
            continue
        pick = int(torch.randint(n, (1,), generator=gen)) + 1
        region = torch.from_numpy(lab == pick)
        rows, cols = torch.nonzero(region, as_tuple=True)
        r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        h, w = r1 - r0, c1 - c0
        if h < 4 or w < 4 or h >= h_img - 4 or w >= w_img - 4:
            continue
        pm = region[r0:r1, c0:c1].float()[None, None]
        alpha = F.avg_pool2d(F.pad(pm, (1, 1, 1, 1)), 3, stride=1)[0, 0].clamp(0, 1)
        px = donor_images[d, 0, r0:r1, c0:c1].to(x.dtype)
        # Centre on soft tissue of this slice (20-80 HU in the 0-255 HU window), in the retroperitoneum.
        body = (x[i, 0] > 20 / 255.0) & (x[i, 0] < 80 / 255.0)
        inside = torch.nonzero(x[i, 0] > 0)
        if len(inside) == 0:
            continue
        centre_r, centre_c = inside.float().mean(0).tolist()
        rr = torch.arange(h_img, dtype=torch.float32)[:, None]
        cc = torch.arange(w_img, dtype=torch.float32)[None, :]
        lateral = (cc - centre_c).abs() * spacing_mm
        body &= (rr > centre_r) & (lateral >= 35.0) & (lateral <= 110.0)
        body[: h // 2 + 1] = False
        body[h_img - h // 2 - 1 :] = False
        body[:, : w // 2 + 1] = False
        body[:, w_img - w // 2 - 1 :] = False
        spots = torch.nonzero(body)
        if len(spots) == 0:
            continue
        r, c = spots[int(torch.randint(len(spots), (1,), generator=gen))].tolist()
        tr, tc = r - h // 2, c - w // 2
        target = x[i, 0, tr : tr + h, tc : tc + w]
        x[i, 0, tr : tr + h, tc : tc + w] = target * (1 - alpha) + px * alpha
        kidney[i, 0, tr : tr + h, tc : tc + w] = torch.maximum(
            kidney[i, 0, tr : tr + h, tc : tc + w], (alpha >= 0.5).to(kidney.dtype)
        )
    return x, kidney
