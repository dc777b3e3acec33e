"""E-step kernels: scores of images against projections, written as matrix products.

For Gaussian noise with variance sigma2_k per Fourier coefficient (E|N_k|^2),
log p(X | pose, V) = -1/2 sum_k w_k |X_k - C_k P_k|^2 / sigma2_k + const, with w_k
the half-plane weights. Expanding, the pose-dependent part is

    score = Re sum_k A_k conj(P_k) - 1/2 sum_k Q_k |P_k|^2,
    A_k = w_k C_k X_k / sigma2_k (the whitened, CTF-weighted image, per shift),
    Q_k = w_k C_k^2 / sigma2_k,

so that scores for many images (x shifts) and many projections are two GEMMs.
Complex vectors are handled as real ones [Re, Im] of length 2M.
"""
from __future__ import annotations

import torch


def as_real(z: torch.Tensor) -> torch.Tensor:
    """(..., M) complex -> (..., 2M) real [Re, Im]."""
    return torch.cat([z.real, z.imag], dim=-1)


def weighted_images(images_ft: torch.Tensor, ctf: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """A = w C X / sigma2 as (..., M) complex; ``weight`` (M,) = w / sigma2; ctf (n, M) broadcast over shifts."""
    if ctf is None:
        return images_ft * weight
    if images_ft.dim() == 3:
        return images_ft * (ctf * weight)[:, None, :]
    return images_ft * (ctf * weight)


def quadratic_weights(ctf: torch.Tensor | None, weight: torch.Tensor, n: int) -> torch.Tensor:
    """Q = w C^2 / sigma2, (n, M)."""
    if ctf is None:
        return weight.expand(n, -1)
    return ctf * ctf * weight


def scores_shared(a_real: torch.Tensor, q: torch.Tensor, proj_real: torch.Tensor, proj_power: torch.Tensor,
                  profile_scale: bool = False) -> torch.Tensor:
    """Scores (B, S, R) of images (B, S, 2M) x Q (B, M) against shared projections (R, 2M), |P|^2 (R, M).

    ``profile_scale`` maximises over an unknown per-image scale of the reference
    (score = max(cross, 0)^2 / (2 quad)), for a first iteration against a
    reference of arbitrary intensity scale.
    """
    cross = torch.matmul(a_real, proj_real.T)
    quad = (q @ proj_power.T)[:, None, :]
    return _score_from(cross, quad, profile_scale)


def scores_per_image(a_real: torch.Tensor, q: torch.Tensor, proj_real: torch.Tensor, proj_power: torch.Tensor,
                     profile_scale: bool = False) -> torch.Tensor:
    """Scores (G, S, L) when every group g (an image and one candidate pose centre) has its own
    projections: a_real (G, S, 2M), q (G, M), proj_real (G, L, 2M), proj_power (G, L, M)."""
    cross = torch.bmm(a_real, proj_real.transpose(1, 2))
    quad = torch.einsum("gm,glm->gl", q, proj_power)[:, None, :]
    return _score_from(cross, quad, profile_scale)


def _score_from(cross: torch.Tensor, quad: torch.Tensor, profile_scale: bool) -> torch.Tensor:
    """The score from the cross term (overwritten: the largest tensor of a chunk is not copied)
    and the broadcast quadratic term."""
    if profile_scale:
        return cross.clamp_(min=0).square_().div_(2.0 * quad.clamp(min=1e-20))
    return cross.sub_(0.5 * quad)


class TopK:
    """Running top-k of scores over chunks, with the flat candidate index of each kept score."""

    def __init__(self, batch: int, k: int, device):
        self.k = k
        self.values = torch.full((batch, 0), -float("inf"), device=device)
        self.index = torch.zeros((batch, 0), dtype=torch.long, device=device)

    def update(self, values: torch.Tensor, index: torch.Tensor) -> None:
        """Merge a chunk's best candidates: scores (B, n) and their flat candidate indices (B, n)
        (the chunk's own top k: merging then concatenates k columns, not the whole chunk)."""
        values = torch.cat([self.values, values], 1)
        index = torch.cat([self.index, index], 1)
        k = min(self.k, values.shape[1])
        self.values, pos = torch.topk(values, k, dim=1)
        self.index = torch.gather(index, 1, pos)
