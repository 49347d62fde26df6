"""2D TumorCP: paste real tumors from training slices into kidneys of tumor-free slices.

Copy-paste of real tumors (Yang et al., MICCAI 2021) shows the tumor model more tumors in more kidneys; on
the starter's validation slices it was the tumor lever that mattered most (model card). Donors are
training slices only, never validation ones.
"""

from __future__ import annotations

import torch


def paste_tumors(
    x: torch.Tensor,
    tumor: torch.Tensor,
    kidney: torch.Tensor,
    donor_images: torch.Tensor,
    donor_tumors: torch.Tensor,
    gen: torch.Generator,
    prob: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return new ``(x, tumor, kidney)`` where, with probability ``prob``, each slice that has kidney but
    no tumor gets one donor tumor (pixels and mask) centred on a random kidney pixel. All tensors
    ``(N, 1, H, W)`` on the same grid; donors ``(D, 1, H, W)``."""
    x, tumor, kidney = x.clone(), tumor.clone(), kidney.clone()
    h_img, w_img = x.shape[-2:]
    n_donors = donor_images.shape[0]
    for i in range(x.shape[0]):
        draw = float(torch.rand(1, generator=gen))
        if n_donors == 0 or tumor[i].any() or not kidney[i].any() or draw >= prob:
            continue
        d = int(torch.randint(n_donors, (1,), generator=gen))
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
