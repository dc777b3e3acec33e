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

from .projection import project_real


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


def class_log_posteriors(evidence: torch.Tensor, forced, temperature: float) -> torch.Tensor:
    """Log class posteriors (B, K) from the class log-evidences (annealed by ``temperature``),
    or the ``forced`` classes (B,) where given."""
    if forced is None:
        return torch.log_softmax(evidence / temperature, dim=1)
    logp = torch.full(evidence.shape, -float("inf"), dtype=evidence.dtype, device=evidence.device)
    logp[torch.arange(len(evidence)), torch.as_tensor(forced, device=evidence.device)] = 0.0
    return logp


def score_all(xw: torch.Tensor, phase: torch.Tensor, q: torch.Tensor, vol_ft: list, rots: torch.Tensor,
              coords: torch.Tensor, profile: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (B, K, T, S, L) of every fine candidate, and the projections (K B T L, 2, M) in
    class-major order, on ``coords`` (M): xw (K, B, T, M) the images centred at each class's T
    pose centres and weighted (w C / sigma2), phase (S, M) the shift offsets' factors, q (B, M),
    vol_ft the K references' slice grids, rots (B, K, T, L, 3, 3)."""
    k_cls, b, t, m = xw.shape
    n_sh, n_rot = phase.shape[0], rots.shape[3]
    a = as_real((xw[:, :, :, None, :] * phase).reshape(k_cls * b * t, n_sh, m))
    projs = torch.empty((k_cls, b * t * n_rot, 2, m), dtype=a.dtype, device=a.device)
    for j in range(k_cls):
        project_real(vol_ft[j], rots[:, j].reshape(-1, 3, 3), coords, out=projs[j])
    pw = projs[:, :, 0].square()
    pw.addcmul_(projs[:, :, 1], projs[:, :, 1])
    qg = q[None, :, None, :].expand(k_cls, b, t, m).reshape(-1, m)
    s = scores_per_image(a, qg, projs.view(k_cls * b * t, n_rot, 2 * m), pw.view(k_cls * b * t, n_rot, m),
                         profile).reshape(k_cls, b, t, n_sh, n_rot).transpose(0, 1)
    return s, projs.view(-1, 2, m)


def significant_rotations(s_pre: torch.Tensor, log_prior: torch.Tensor, forced, temperature: float,
                          mass: float, per_class: int) -> torch.Tensor:
    """(B, K, T, L) the candidate rotations worth scoring on all frequencies, from their scores
    (B, K, T, S, L) on a pre-pass's: the most probable ones (shifts summed; class posteriors as
    in the E-step) that carry ``mass`` of an image's posterior there, and every class's
    ``per_class`` best, so that each class's evidence is formed from its own best poses. The
    low-frequency posterior is the broader: it keeps more rotations than the full one needs
    (measured on adenylate kinase: 2e-4 of the full posterior left out on average)."""
    lp = torch.logsumexp(s_pre, dim=3) + log_prior[None, :, None, None]  # (B, K, T, L)
    b, k_cls, t, n_rot = lp.shape
    flat = lp.reshape(b, k_cls, t * n_rot)
    within = torch.log_softmax(flat, dim=2)
    joint = (within + class_log_posteriors(torch.logsumexp(flat, dim=2), forced, temperature)[:, :, None]).exp()
    vals, idx = torch.sort(joint.reshape(b, -1), dim=1, descending=True)
    keep = torch.zeros((b, k_cls * t * n_rot), dtype=torch.bool, device=lp.device)
    keep.scatter_(1, idx, (torch.cumsum(vals, 1) - vals) < mass)
    keep = keep.view(b, k_cls, t * n_rot)
    keep.scatter_(2, torch.topk(within, min(per_class, t * n_rot), dim=2).indices, True)
    return keep.view(b, k_cls, t, n_rot)


def score_selected(xw: torch.Tensor, phase: torch.Tensor, q: torch.Tensor, vol_ft: list, rots: torch.Tensor,
                   coords: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`score_all` for the candidates ``keep`` (B, K, T, L) selects: scores (B, K, T, S, L)
    (-inf where not kept), their projections (N, 2, M) and each candidate's row in them
    (B, K, T, L; -1 where not kept).

    With the images' centre and weight in xw, a projection P's cross term with every shift
    offset s is Re sum_k xw_k conj(P_k) phase_sk: one product vector per candidate, then one
    GEMM against the S phase vectors."""
    b, k_cls, t, n_rot = keep.shape
    n_sh, m = phase.shape
    dtype, device = xw.real.dtype, xw.device
    j_i, b_i, t_i, l_i = keep.permute(1, 0, 2, 3).nonzero().unbind(1)  # class-major
    n_sel = len(j_i)
    projs = torch.empty((n_sel, 2, m), dtype=dtype, device=device)
    start = 0
    for j, count in enumerate(torch.bincount(j_i, minlength=k_cls).tolist()):
        part = slice(start, start + count)
        if count:
            project_real(vol_ft[j], rots[b_i[part], j, t_i[part], l_i[part]], coords, out=projs[part])
        start += count
    u = xw[j_i, b_i, t_i].mul_(torch.complex(projs[:, 0], -projs[:, 1]))
    cross = u.real @ phase.real.T
    cross.sub_(u.imag @ phase.imag.T)
    del u
    quad = torch.einsum("nm,nm->n", projs[:, 0].square().addcmul_(projs[:, 1], projs[:, 1]), q[b_i])
    s = torch.full((b, k_cls, t, n_sh, n_rot), -float("inf"), dtype=dtype, device=device)
    s.permute(1, 0, 2, 4, 3)[j_i, b_i, t_i, l_i] = cross.sub_(0.5 * quad[:, None])
    proj_row = torch.full((b, k_cls, t, n_rot), -1, dtype=torch.long, device=device)
    proj_row.permute(1, 0, 2, 3)[j_i, b_i, t_i, l_i] = torch.arange(n_sel, device=device)
    return s, projs, proj_row
