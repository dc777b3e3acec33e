"""Multiclass refinement (3D classification): expectation-maximisation over class x pose x shift.

Maximises sum_i log sum_j pi_j int p(X_i | phi, V_j) p(phi) dphi + sum_j log p(V_j):

* E-step (per batch of images, read once per iteration): a coarse global search
  (all rotations of a uniform grid at twice the fine step, shifts on a grid, on
  frequencies up to a coarse limit) keeps the best few poses of every class; each
  is refined on a fine local grid (rotations and shifts) at the current
  resolution, and the posterior over class x pose x shift is formed over the fine
  candidates (late on, only those that a pre-pass on half the frequencies finds
  significant are scored on all of them). Later iterations (or particles with a
  prior alignment) search locally around the current pose with a Gaussian angular
  prior. Scores are GEMMs (see :mod:`hetplugin.core.search`). A refinement around the
  particles' alignment (e.g. a focused one, :mod:`hetplugin.core.focused`) may halve its
  step, and its range with it, each time poses settle (``finest_step_deg``).
* M-step: posterior-weighted, CTF-weighted backprojection of every significant
  (class, pose, shift) into per-class half-set accumulators; per-class half-set
  FSC gives the spectral SNR, hence a Wiener (smoothness) prior with fudge T and
  a resolution estimate per class; class priors pi_j from the posteriors; the
  noise spectrum from the residuals at the best poses.
* Frequency marching: each iteration works on frequencies up to the current
  resolution (best class FSC 0.143 plus a margin) in a Fourier-cropped grid.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .dataset import ParticleDataset
from .device import large_blocks_returned, release_memory
from .fit import fit_rotation, match_classes, rotate_volume
from .fourier import half_plane_coords, lowpass_volume, shift_phase
from .fsc import fsc, fsc_to_snr, resolution_at
from .iterations import default_iterations, realignment_moving, refined_step
from .masks import spherical_mask
from .poses import global_grid, local_grid, shift_grid
from .projection import frequency_mask, prepare_volume, project_ft, slice_grid
from .reconstruct import Backprojector
from .rotations import angular_distance_deg
from .search import (TopK, as_real, class_log_posteriors, quadratic_weights, score_all, score_selected,
                     scores_shared, significant_rotations, weighted_images)
from .symmetry import symmetry_group

# E-step batches are sized so that the fine search's tensors stay near this (see _batch_size)
BATCH_BYTES = 32 << 20
# the coarse search scores its grid's rotations in chunks of about this many scores (8 MB)
COARSE_CHUNK_SCORES = 1 << 21
# the global fine search's pre-pass (see _fine_search): on where the E-step limit is at least twice
# this (index units); the rotations scored in full carry this share of an image's posterior on
# the pre-pass's frequencies, and include each class's best few
PREPASS_MIN_SHELLS = 8.0
PREPASS_MASS = 0.9999
PREPASS_PER_CLASS = 3
# ... unless it kept over this share of a batch's rotations (then the full search costs less)
PREPASS_MAX_KEPT = 0.6


@dataclass
class MulticlassOptions:
    """Settings of a multiclass refinement (units in the names; see the CLI for help texts)."""
    n_classes: int = 2
    iterations: int = 0           # 0: default_iterations(n_classes)
    initial_lowpass_A: float = 30.0
    tau2_fudge: float = 4.0
    angular_step_deg: float = 7.5
    offset_range_A: float | None = None
    offset_step_A: float | None = None
    local_search_deg: float = 0.0
    global_iterations: int = 4
    alignment_iterations: int = 4
    realign_iterations: int = 5
    realign_lowpass_A: float = 20.0
    symmetry: str = "C1"
    particle_diameter_A: float | None = None
    resolution_limit_A: float | None = None
    min_class_size: int = 20
    top_poses: int = 6
    seed: int = 0
    batch_size: int = 64
    max_significant: int = 32
    finest_step_deg: float | None = None  # local searches around the alignment refine their step to this
    anneal_iterations: int | None = None
    classification_frequency_cap: bool = True
    anneal_spread: float = 2.0
    stop_change_fraction: float = 0.002

    def __post_init__(self) -> None:
        if self.iterations == 0:
            self.iterations = default_iterations(self.n_classes)

    def check(self, n_particles: int) -> None:
        if self.n_classes < 1:
            raise ValueError("the number of classes must be at least 1")
        if self.n_classes * self.min_class_size > n_particles:
            raise ValueError(f"{self.n_classes} classes x minimum class size {self.min_class_size} = "
                             f"{self.n_classes * self.min_class_size} exceeds the {n_particles} particles; "
                             "ask for fewer classes or a smaller minimum class size")
        if self.angular_step_deg <= 0 or self.iterations < 1:
            raise ValueError("angular step and iterations must be positive")
        if self.initial_lowpass_A <= 0 or self.realign_lowpass_A <= 0:
            raise ValueError("the initial and re-alignment low-pass resolutions must be positive (A)")


@dataclass
class MulticlassState:
    """Everything needed to continue a run after an iteration (saved to disk between iterations).

    :meth:`MulticlassRefiner.iterate` consumes a state: it drops the maps and half maps."""
    iteration: int
    maps: np.ndarray              # (K, D, D, D) float32 class maps from all particles (the result)
    half_maps: np.ndarray         # (2, K, D, D, D) per half-set maps: the E-step references of the other half
    class_prior: np.ndarray       # (K,)
    sigma2: np.ndarray            # (D//2+1,) noise power per shell, E|N_k|^2
    r_current: float              # E-step frequency limit (index units)
    rotations: np.ndarray         # (N, 3, 3) best pose
    origins_px: np.ndarray        # (N, 2) RELION origins of the best pose
    classes: np.ndarray           # (N,) 0-based best class (-1 before the first iteration)
    posteriors: np.ndarray        # (N, K) class posteriors
    max_prob: np.ndarray          # (N,) largest posterior over class x pose x shift
    loglik: np.ndarray            # (N,) log-likelihood contribution
    n_significant: np.ndarray     # (N,) number of (class, pose, shift) kept for the M-step
    evidence: np.ndarray          # (N, K) class log-evidence (prior included) of the last E-step
    resolution_A: np.ndarray      # (K,) FSC 0.143 per class
    fsc_curves: np.ndarray        # (K, D//2+1)
    one_reference: bool = False   # classes seeded from one reference: align first, then split
    references: np.ndarray | None = None  # (1 or K, D, D, D) the references: class re-alignment starts from
                                          # them low-passed, and class maps are turned into their frame
    history: list = field(default_factory=list)


class MulticlassRefiner:
    """Runs iterations of multiclass refinement on a :class:`ParticleDataset`."""

    def __init__(self, dataset: ParticleDataset, options: MulticlassOptions, mask: np.ndarray | None = None,
                 log=print):
        options.check(len(dataset))
        self.ds, self.opt, self.log = dataset, options, log
        self.box, self.px = dataset.box, dataset.pixel_size_A
        self.device, self.dtype = dataset.device, dataset.dtype
        self.sym = symmetry_group(options.symmetry)
        diameter_A = options.particle_diameter_A or 0.8 * self.box * self.px
        self.radius_px = min(diameter_A / 2 / self.px, self.box / 2 - 2)
        self.solvent = spherical_mask(self.box, self.radius_px, edge_px=3) if mask is None else mask.astype(np.float32)
        self.fsc_mask = spherical_mask(self.box, self.radius_px + 2, edge_px=3)
        off_range = options.offset_range_A if options.offset_range_A is not None else 5.0 * self.px
        off_step = options.offset_step_A if options.offset_step_A is not None else self.px
        self.shift_step_px = max(off_step / self.px, 0.25)
        self.shift_range_px = off_range / self.px
        step = options.angular_step_deg
        self.coarse_step_deg = 2.0 * step
        self.coarse_grid = global_grid(self.coarse_step_deg, self.sym)
        # global iterations: coarse grid (2 x step, shifts up to 2 x offset step apart), then the 3x3x3
        # cube of rotations at the fine step around each kept coarse pose and the 3x3 shifts
        self.fine_rot = local_grid(step, step * math.sqrt(3) + 1e-6)
        self.fine_shift = shift_grid(self.shift_step_px * math.sqrt(2) + 1e-6, self.shift_step_px)
        # local iterations: half the step within one step of the current pose, half-step shifts
        self.local_rot = local_grid(0.5 * step, step + 1e-6)
        self.local_shift = shift_grid(self.shift_step_px * math.sqrt(2) * 0.5 + 1e-6, 0.5 * self.shift_step_px)
        self.local_range_deg = step
        if options.local_search_deg > 0 and dataset.has_alignment:
            # particles with alignment: the user's range around it at the fine step, full origin range
            self.local_rot = local_grid(step, options.local_search_deg)
            self.local_shift = shift_grid(self.shift_range_px, self.shift_step_px)
            self.local_range_deg = options.local_search_deg
        self.halves = np.where(np.random.default_rng(options.seed).permutation(len(dataset)) % 2 == 0, 1, 2)
        self.r_limit = self.box / 2 - 1
        if options.resolution_limit_A:
            self.r_limit = min(self.r_limit, self.box * self.px / options.resolution_limit_A)
        # the E-step's first and lowest frequency limit (index units): the initial low-pass
        self.r_initial = min(self.box * self.px / options.initial_lowpass_A, self.r_limit)
        self._prepass_off = False  # set by a batch whose pre-pass kept most rotations (see _fine_search)
        # the class re-alignment's start: the reference at the re-alignment resolution, or at the
        # initial low-pass where that is finer (see stage)
        self.realign_lowpass_A = min(options.initial_lowpass_A, options.realign_lowpass_A)
        self.r_realign = min(self.box * self.px / self.realign_lowpass_A, self.r_limit)

    # ------------------------------------------------------------------ set-up
    def initial_state(self, references: np.ndarray) -> MulticlassState:
        """State before iteration 1 from one reference (K copies) or K references (K, D, D, D)."""
        k, n = self.opt.n_classes, len(self.ds)
        refs = np.asarray(references, dtype=np.float32)
        if refs.ndim == 3:
            refs = refs[None]
        if refs.shape[0] not in (1, k) or refs.shape[1:] != (self.box,) * 3:
            raise ValueError(f"references must be one map or {k} maps of {self.box}^3, got {refs.shape}")
        if refs.shape[0] == 1 and k > 1 and self.opt.iterations <= self.opt.alignment_iterations:
            raise ValueError(f"{self.opt.iterations} iterations leave none for classification after "
                             f"{self.opt.alignment_iterations} alignment iterations (one reference); ask for "
                             "more iterations or fewer alignment iterations")
        references = refs.copy()
        maps = [self._lowpassed(references[j % len(references)]) for j in range(k)]
        rot = self.ds.rotations() if self.ds.has_alignment else np.tile(np.eye(3), (n, 1, 1))
        return MulticlassState(
            iteration=0, maps=np.stack(maps), half_maps=np.stack([maps, maps]), class_prior=np.full(k, 1.0 / k), sigma2=self.initial_sigma2(),
            r_current=float(self.r_initial), rotations=rot, origins_px=self.ds.origins_px().copy(),
            classes=np.full(n, -1), posteriors=np.full((n, k), 1.0 / k), max_prob=np.zeros(n), loglik=np.zeros(n),
            n_significant=np.zeros(n, dtype=np.int64), evidence=np.zeros((n, k)), resolution_A=np.full(k, np.inf),
            fsc_curves=np.zeros((k, self.box // 2 + 1)), one_reference=bool(refs.shape[0] == 1 and k > 1),
            references=references, history=[])

    def _lowpassed(self, reference: np.ndarray, resolution_A: float | None = None) -> np.ndarray:
        """A reference low-passed to ``resolution_A`` (default: the initial low-pass), in the solvent mask."""
        ref = torch.as_tensor(reference, dtype=torch.float32)
        res = self.opt.initial_lowpass_A if resolution_A is None else resolution_A
        return (lowpass_volume(ref, res, self.px).numpy() * self.solvent).astype(np.float32)

    def initial_sigma2(self, max_images: int = 1000) -> np.ndarray:
        """Noise power per shell from the images' power spectrum (at low SNR the images are mostly noise)."""
        rows = np.random.default_rng(self.opt.seed).permutation(len(self.ds))[:max_images]
        sel, k = self.ds.coords()
        shells = torch.as_tensor(np.rint(np.hypot(k[:, 0].cpu().numpy(), k[:, 1].cpu().numpy())).astype(np.int64))
        n_shells = self.box // 2 + 1
        num = torch.zeros(n_shells, dtype=torch.float64)
        den = torch.zeros(n_shells, dtype=torch.float64)
        for batch in self.ds.batches(64, np.sort(rows)):
            power = (self.ds.images_ft(batch, sel, k, centre=False).abs() ** 2).to(torch.float64).cpu()
            num.index_add_(0, shells, power.sum(0))
            den.index_add_(0, shells, torch.full((len(k),), float(len(batch)), dtype=torch.float64))
        s2 = (num / den.clamp(min=1)).numpy()
        s2[den.numpy() == 0] = s2[den.numpy() > 0][-1]
        return s2

    # ------------------------------------------------------------------ one iteration
    def iterate(self, state: MulticlassState) -> MulticlassState:
        """Run one E/M iteration from ``state``; returns the new state.

        ``state`` is consumed: once the E-step has used them, its ``maps`` and ``half_maps`` are
        dropped (set to None) so that the M-step does not hold them beside the new ones (3K maps:
        48 MB at box 128 and K = 2, 770 MB at box 256 and K = 4). Save it first if it is needed."""
        t0 = time.time()
        given = state
        self._prepass_off = False
        opt, it = self.opt, state.iteration + 1
        k_cls, n = opt.n_classes, len(self.ds)
        r_cur = float(min(state.r_current, self.r_limit))
        # from one reference: the first iterations align all particles as one class (consensus
        # poses), then classes are seeded from a random split and refined with local searches;
        # after the annealed classification each class is aligned again (see stage)
        stage = self.stage(it, state)
        aligning, realigning = stage == "alignment", stage == "class alignment"
        k_act = 1 if aligning else k_cls
        first_from_one_ref = state.one_reference and not aligning and state.classes.min() < 0
        first_realign = realigning and all(h["stage"] != "class alignment" for h in state.history)
        if (first_from_one_ref and it > 1) or first_realign:
            # classes are split (and re-aligned) at low resolution, where conformations differ most
            # and maps from a fraction of the particles are still well determined; frequencies then
            # march out. The noise model starts again from the images' power (flat posteriors)
            r_cur = self.r_realign if first_realign else min(r_cur, self.r_initial)
            state = dataclasses.replace(state, sigma2=self.initial_sigma2())
        elif not realigning and self.realigns(state):
            # after the re-alignment (which marched out from its own low-pass again) the
            # limit goes back to where the classification had taken it, from the second iteration on
            past = [h["stage"] for h in state.history]
            if "class alignment" in past and past[-1] != "class alignment":
                r_cur = max(r_cur, state.history[past.index("class alignment") - 1]["r_current"])
        grid_box = int(min(self.box, 2 * math.ceil(r_cur + 2)))
        grid_box += grid_box % 2
        sel_np = frequency_mask(self.box, r_cur)
        coords_np = half_plane_coords(self.box)[sel_np]
        radius_np = np.hypot(coords_np[:, 0], coords_np[:, 1])
        order = np.argsort(radius_np, kind="stable")
        coords = torch.as_tensor(coords_np[order], dtype=self.dtype, device=self.device)
        shells = torch.as_tensor(np.rint(radius_np[order]).astype(np.int64), device=self.device)
        sel = torch.as_tensor(sel_np, device=self.device)
        order_t = torch.as_tensor(order, device=self.device)
        herm = torch.where(coords[:, 0] == 0, 1.0, 2.0).to(self.dtype)
        sigma2 = torch.as_tensor(state.sigma2, dtype=self.dtype, device=self.device)[shells]
        weight = herm / sigma2
        profile = it == 1
        use_prior_pose = opt.local_search_deg > 0 and self.ds.has_alignment
        step_now = refined_step(state.history, opt.angular_step_deg, opt.finest_step_deg if use_prior_pose else None,
                                0.5 * self.px)
        if step_now < opt.angular_step_deg:
            # the search range shrinks with the step, so an iteration costs the same at every step
            self.local_range_deg = max(opt.local_search_deg * step_now / opt.angular_step_deg, 2 * step_now)
            self.local_rot = local_grid(step_now, self.local_range_deg + 1e-6)
            self.log(f"iteration {it}: local search at {step_now:g} deg within {self.local_range_deg:g} deg")
        # after the class re-alignment, one global search over all classes lets particles that no
        # class's consensus pose fitted (e.g. a closed state's, held in the open class) find their class
        after_realign = not realigning and bool(state.history) and state.history[-1]["stage"] == "class alignment"
        if after_realign and len(self.sym) == 1:
            state = self._into_reference_frame(state)
        global_search = not use_prior_pose and (realigning or after_realign or (
            it <= opt.global_iterations and (aligning or not state.one_reference)))
        # the coarse grid's angular error decorrelates frequencies beyond ~1/(2 pi radius step); at
        # least 8 shells are kept, below which poses of most particles are ambiguous
        r_coarse = min(r_cur, max(8.0, self.box / (2 * math.pi * math.radians(self.coarse_step_deg) * self.radius_px)))
        coarse_shift = shift_grid(self.shift_range_px,
                                  max(self.shift_step_px, min(2 * self.shift_step_px, self.box / (4 * r_coarse))))
        m_coarse = int(np.searchsorted(radius_np[order], r_coarse, side="right"))
        pad = 2
        rng = np.random.default_rng([opt.seed, it])
        forced = rng.integers(0, k_cls, n) if first_from_one_ref else None
        temperature = self.temperature(state)
        bps = [[Backprojector(self.box, pad, self.device, self.dtype, r_cur, grid_box) for _ in (1, 2)]
               for _ in range(k_act)]
        new = dict(rot=state.rotations.copy(), org=state.origins_px.copy(), cls=np.zeros(n, np.int64),
                   post=np.zeros((n, k_act)), maxp=np.zeros(n), ll=np.zeros(n), nsig=np.zeros(n, np.int64),
                   evid=np.zeros((n, k_act)), temperature=temperature)
        n_shells = self.box // 2 + 1
        s2_num = torch.zeros(n_shells, dtype=torch.float64, device=self.device)
        s2_den = torch.zeros(n_shells, dtype=torch.float64, device=self.device)
        log_prior = torch.as_tensor(np.log(np.maximum(state.class_prior[:k_act], 1e-10)), dtype=self.dtype,
                                    device=self.device)
        # while classes are re-aligned, each particle is searched in its class only
        groups = [list(range(k_act))] if not realigning else [[j] for j in range(k_cls)]
        # the global search after the re-alignment looks for a better class, not for a pose the
        # class's own global search missed: half the coarse poses are kept (8 of its 25 s saved)
        n_top = max(1, opt.top_poses // 2) if after_realign else opt.top_poses
        batch = self._batch_size(len(groups[0]), global_search, len(coords), n_top)

        def expect(half: int) -> None:
            # each half-set is scored against the maps of the other half (no particle sees its own
            # noise); its references and batch tensors live in this scope only, so that they are
            # freed before the M-step instead of adding to its peak
            refs = [self._lowpassed(state.references[j % len(state.references)], self.realign_lowpass_A)
                    for j in range(k_cls)] \
                if first_realign else state.half_maps[2 - half]
            vol_ft = [slice_grid(prepare_volume(torch.as_tensor(refs[j], dtype=self.dtype, device=self.device),
                                                pad, pad * grid_box, half=True)) for j in range(k_act)]
            proj_c = None
            if global_search:
                rot_c = torch.as_tensor(self.coarse_grid, dtype=self.dtype, device=self.device)
                proj_c = []
                for j in range(k_act):
                    p = project_ft(vol_ft[j], rot_c, coords[:m_coarse], pad)
                    proj_c.append((as_real(p), p.abs() ** 2))
            for cls in groups:
                in_half = self.halves == half
                if realigning:
                    in_half &= state.classes == cls[0]
                for rows in self.ds.batches(batch, np.flatnonzero(in_half)):
                    x = self.ds.images_ft(rows, sel, coords, centre=False)[:, order_t]
                    ctf = self.ds.ctf(rows, coords)
                    b = len(rows)
                    q = quadratic_weights(ctf, weight, b)
                    if global_search:
                        centres_rot, centres_org = self._coarse_search(
                            x, ctf, weight, q, state, rows, coords, m_coarse, [proj_c[j] for j in cls], profile,
                            coarse_shift, n_top)
                        ang_prior = None
                    else:
                        centres_rot = torch.as_tensor(state.rotations[rows], dtype=self.dtype,
                                                      device=self.device)[:, None, None].expand(b, len(cls), 1, 3, 3)
                        centres_org = torch.as_tensor(state.origins_px[rows], dtype=self.dtype,
                                                      device=self.device)[:, None, None].expand(b, len(cls), 1, 2)
                        ang_prior = True
                    res = self._fine_search(x, ctf, weight, q, [vol_ft[j] for j in cls], centres_rot, centres_org,
                                            coords, profile, ang_prior, log_prior[cls],
                                            None if forced is None else forced[rows], temperature)
                    self._accumulate(res, x, ctf, weight, coords, rows, [bps[j] for j in cls], new, shells, herm,
                                     s2_num, s2_den, cls)
                    del res  # the batch's projections are freed before the next batch makes its own

        for half in (1, 2):
            expect(half)
            release_memory()
        for used in (given, state):
            used.maps = used.half_maps = None
        with large_blocks_returned():
            state = self._maximise(state, bps, new, s2_num, s2_den, r_cur, it, t0, stage)
        state.history[-1]["angular_step_deg"] = step_now
        release_memory()
        return state

    def anneal_end(self, state: MulticlassState) -> int:
        """Last iteration of the annealed classification."""
        start = self.opt.alignment_iterations if state.one_reference else 0
        n_anneal = self.opt.anneal_iterations if self.opt.anneal_iterations is not None \
            else (self.opt.iterations - start) // 2
        return start + n_anneal

    def realigns(self, state: MulticlassState) -> bool:
        """Whether this run re-aligns its classes (see stage): from one reference, with global searches."""
        local_only = self.opt.local_search_deg > 0 and self.ds.has_alignment
        return state.one_reference and self.opt.n_classes > 1 and self.opt.realign_iterations > 0 and not local_only

    def stage(self, it: int, state: MulticlassState) -> str:
        """'alignment', 'classification' or 'class alignment' for iteration ``it`` after ``state``.

        From one reference, consensus poses can be wrong for particles in a state that differs
        much from the consensus (a compact closed state aligned to a map dominated by the open
        one, whose shape orients it better at low resolution), and local searches keep them wrong:
        the class sorts well, but its map is a smear. So once the classification has settled
        after annealing (or when only the re-alignment and one more iteration are left), each
        class is aligned again on its own, as a refinement of its particles (assignments held)
        from the reference low-passed to ``realign_lowpass_A`` (or the initial low-pass where that
        is finer) with a global search, for ``realign_iterations`` or more
        while the poses still move by over an angular step on average (at SNR 0.05 five
        iterations left them moving by 23 degrees); the classification then goes on, with one
        global search over all classes and then local ones. It comes last because a closed state's
        alignment from scratch fails when ~13% of its particles are open ones (measured). It starts
        at 20 A rather than at a coarser initial low-pass because from a featureless start the
        compact state settles on wrong poses with a self-consistent map (measured on adenylate
        kinase from 35 A: 17% of the closed state's poses within 15 degrees, its map at 13.5 A
        against the truth at FSC 0.5; from 20 A: 5.4 A, accuracy 0.987 -> 1.000).
        """
        if state.one_reference and it <= self.opt.alignment_iterations:
            return "alignment"
        if not self.realigns(state) or state.classes.min() < 0:
            return "classification"
        r = self.opt.realign_iterations
        done = [h for h in state.history if h["stage"] == "class alignment"]
        if done:
            # at least r iterations; more while poses still move by over a step on average, as
            # long as two are left (the global search over all classes and a local one)
            moving = realignment_moving(state.history, self.opt.angular_step_deg) is not None \
                and it <= self.opt.iterations - 2
            return "class alignment" if state.history[-1]["stage"] == "class alignment" and (
                len(done) < r or moving) else "classification"
        if it <= self.anneal_end(state) or it + r > self.opt.iterations:
            return "classification"
        return "class alignment" if (self._settled(state.history, 0.01) or it + r == self.opt.iterations) \
            else "classification"

    def temperature(self, state: MulticlassState) -> float:
        """Class-assignment temperature (deterministic annealing) for the next iteration.

        While annealing, class log-evidences are divided by a temperature that keeps their
        spread across particles at ``anneal_spread`` (from the previous iteration), so that
        assignments stay soft and the class maps grow apart along the data's main
        heterogeneity (EM in its linear regime acts as a power iteration on it) instead of
        locking into an early, noise-driven partition. Afterwards the temperature is 1.
        """
        if state.iteration >= self.anneal_end(state) or state.classes.min() < 0 or self.opt.n_classes < 2:
            return 1.0
        e = state.evidence - state.evidence.mean(1, keepdims=True)
        rms = float(np.sqrt(np.mean(e ** 2)))
        return max(1.0, 2.0 * rms / self.opt.anneal_spread)

    # ------------------------------------------------------------------ E-step pieces
    def _origins(self, centres: torch.Tensor, grid: np.ndarray) -> torch.Tensor:
        g = torch.as_tensor(grid, dtype=self.dtype, device=self.device)
        return centres[..., None, :] + g

    def _shifted(self, x: torch.Tensor, origins: torch.Tensor, coords: torch.Tensor, image_dim: int = 0) -> torch.Tensor:
        """Images (B, M) centred at candidate origins (..., 2), whose dimension ``image_dim`` runs
        over the B images, -> (..., M)."""
        shape = origins.shape[:-1]
        o = origins.reshape(-1, 2)
        ph = shift_phase(coords[:, 0], coords[:, 1], o[:, 0], o[:, 1], self.box).reshape(*shape, -1)
        view = [1] * len(shape) + [-1]
        view[image_dim] = x.shape[0]
        return ph.mul_(x.reshape(view))

    def _coarse_search(self, x, ctf, weight, q, state, rows, coords, m, proj_c, profile, shifts, n_top):
        """Best ``n_top`` (rotation, origin) per image and class on the coarse global grid."""
        b = x.shape[0]
        cand = self._origins(torch.as_tensor(state.origins_px[rows] * 0.0 if state.iteration == 0 else
                                             state.origins_px[rows], dtype=self.dtype, device=self.device),
                             shifts)  # (B, S, 2)
        n_shift = cand.shape[1]
        xs = self._shifted(x[:, :m], cand, coords[:m])
        a = as_real(weighted_images(xs, None if ctf is None else ctf[:, :m], weight[:m]))
        qc = q[:, :m]
        rots, orgs = [], []
        chunk = max(1, COARSE_CHUNK_SCORES // max(1, b * n_shift))
        for pr, pw in proj_c:
            top = TopK(b, n_top, self.device)
            for start in range(0, pr.shape[0], chunk):
                s = scores_shared(a, qc, pr[start:start + chunk], pw[start:start + chunk], profile)  # (B, S, R)
                n_rc = s.shape[2]
                vals, idx = torch.topk(s.reshape(b, -1), min(n_top, s[0].numel()), dim=1)
                # flat candidate index: rotation-major over the whole grid, shift fastest
                top.update(vals, (start + idx % n_rc) * n_shift + idx // n_rc)
            r_idx, s_idx = top.index // n_shift, top.index % n_shift
            rots.append(torch.as_tensor(self.coarse_grid, dtype=self.dtype, device=self.device)[r_idx])
            orgs.append(torch.gather(cand, 1, s_idx[..., None].expand(-1, -1, 2)))
        return torch.stack(rots, 1), torch.stack(orgs, 1)  # (B, K, T, 3, 3), (B, K, T, 2)

    def _batch_size(self, k_cls: int, global_search: bool, m: int, n_top: int) -> int:
        """Images per E-step batch: at most ``batch_size``, and few enough that the fine search's
        per-batch tensors (projections, their power, shifted and weighted images: ~24 bytes per
        candidate and frequency) stay within BATCH_BYTES. Large temporaries are what set the
        peak memory, and the allocator keeps what it once held; smaller batches cost no speed
        once the projections of a batch run to millions of points. On a GPU: ``batch_size``."""
        if self.device.type != "cpu":
            return self.opt.batch_size
        if global_search:
            t, n_rot, n_shift = n_top, len(self.fine_rot), len(self.fine_shift)
        else:
            t, n_rot, n_shift = 1, len(self.local_rot), len(self.local_shift)
        per_image = 24 * k_cls * t * (n_rot + n_shift) * m
        return int(min(self.opt.batch_size, max(8, BATCH_BYTES // max(per_image, 1))))

    def _fine_search(self, x, ctf, weight, q, vol_ft, centres_rot, centres_org, coords, profile, local_prior,
                     log_prior, forced, temperature):
        """Posterior over fine candidates around each centre; returns the per-candidate pieces.

        In a global search whose limit reaches 2 x PREPASS_MIN_SHELLS, every candidate is first
        scored on the frequencies up to half the limit (a quarter of them), and only the rotations
        that :func:`~hetplugin.core.search.significant_rotations` picks there are projected and
        scored on all of them (the others get no posterior), as in RELION's adaptive
        oversampling. Around the few best coarse poses a late iteration's posterior sits on a few
        of the rotations searched (on adenylate kinase, 99.99% of it on 12% of them, picked at
        half the limit); a local search's, within one angular step, is spread over most of them,
        and it has no pre-pass. Nor has the rest of an iteration once a batch's pre-pass kept
        over PREPASS_MAX_KEPT of its rotations (broad posteriors: small particles, low
        resolution, little signal per image)."""
        b, k_cls, t = centres_rot.shape[:3]
        if local_prior:
            d_rot, shifts = self.local_rot, self.local_shift
            sigma = max(self.local_range_deg / 2.0, 1e-3)
            d_ang = angular_distance_deg(d_rot, np.eye(3))
            rot_prior = torch.as_tensor(-0.5 * (d_ang / sigma) ** 2, dtype=self.dtype, device=self.device)
        else:
            d_rot, rot_prior, shifts = self.fine_rot, None, self.fine_shift
        dr = torch.as_tensor(d_rot, dtype=self.dtype, device=self.device)
        n_rot, n_sh = len(d_rot), len(shifts)
        rots = centres_rot[:, :, :, None] @ dr  # (B, K, T, L, 3, 3)
        orgs = self._origins(centres_org, shifts)  # (B, K, T, S, 2)
        # Phase factors are separable: exp(-2 pi i k.(c + d) / D) is the centre's factor times the
        # grid offset's, so the images are shifted to each centre (and weighted: w C / sigma2) and
        # the S offsets' factors applied when scoring (B K T + S phase vectors, not B K T S).
        # Groups run class-major (class, image, centre)
        xw = self._shifted(x, centres_org.transpose(0, 1), coords, image_dim=1)  # (K, B, T, M)
        xw.mul_(weight if ctf is None else (ctf * weight)[None, :, None, :])
        sh = torch.as_tensor(shifts, dtype=self.dtype, device=self.device)
        phase = shift_phase(coords[:, 0], coords[:, 1], sh[:, 0], sh[:, 1], self.box)  # (S, M)
        radius = torch.hypot(coords[:, 0], coords[:, 1])
        r_pre = 0.5 * float(radius.max()) if len(radius) else 0.0
        if profile or local_prior or r_pre < PREPASS_MIN_SHELLS or self._prepass_off:
            s, projs = score_all(xw, phase, q, vol_ft, rots, coords, profile)
            proj_row = torch.arange(projs.shape[0], device=self.device).view(k_cls, b, t, n_rot).permute(1, 0, 2, 3)
        else:
            m_pre = int((radius <= r_pre).sum())  # coords run by radius: the first m_pre
            s_pre, projs = score_all(xw[..., :m_pre], phase[:, :m_pre], q[:, :m_pre], vol_ft, rots,
                                     coords[:m_pre], False)
            del projs
            keep = significant_rotations(s_pre, log_prior, forced, temperature, PREPASS_MASS, PREPASS_PER_CLASS)
            del s_pre
            # where the posterior is broad, the pre-pass costs more than it saves: off for the
            # rest of the iteration
            self._prepass_off = float(keep.float().mean()) > PREPASS_MAX_KEPT
            s, projs, proj_row = score_selected(xw, phase, q, vol_ft, rots, coords, keep)
        del xw
        if rot_prior is not None:
            s = s + rot_prior
        s = s + log_prior[None, :, None, None, None]
        flat = s.reshape(b, k_cls, -1)
        evidence = torch.logsumexp(flat, dim=2)  # (B, K), class prior included
        total = torch.logsumexp(evidence, dim=1)
        class_logp = class_log_posteriors(evidence, forced, temperature)
        # joint posterior = p(class) (annealed) x p(pose, shift | class)
        logits = (flat - evidence[:, :, None] + class_logp[:, :, None]).reshape(b, -1)
        post = torch.exp(logits)
        return dict(post=post, evidence=evidence, total=total, rots=rots, orgs=orgs, projs=projs,
                    proj_row=proj_row, shape=(k_cls, t, n_sh, n_rot))

    # ------------------------------------------------------------------ M-step pieces
    def _accumulate(self, res, x, ctf, weight, coords, rows, bps, new, shells, herm, s2_num, s2_den, cls):
        """Book-keeping per batch: best poses, class posteriors, significant samples into the backprojectors.

        ``cls``: the classes searched (the columns of ``new``'s class arrays that ``res`` fills;
        the others get posterior 0 and log-evidence -inf)."""
        k_cls, t, n_sh, n_rot = res["shape"]
        post = res["post"]
        b = post.shape[0]
        class_post = post.reshape(b, k_cls, -1).sum(2)
        vals, idx = torch.topk(post, min(self.opt.max_significant, post.shape[1]), dim=1)
        cum = torch.cumsum(vals, 1)
        keep = (cum - vals) < 0.999
        vals = vals * keep
        vals = vals / vals.sum(1, keepdim=True)
        j_idx = idx // (t * n_sh * n_rot)
        rem = idx % (t * n_sh * n_rot)
        t_idx = rem // (n_sh * n_rot)
        s_idx = (rem // n_rot) % n_sh
        l_idx = rem % n_rot
        bi = torch.arange(b, device=self.device)[:, None].expand_as(idx)
        rot_sel = res["rots"][bi, j_idx, t_idx, l_idx]          # (B, E, 3, 3)
        org_sel = res["orgs"][bi, j_idx, t_idx, s_idx]          # (B, E, 2)
        best_rot, best_org, best_j = rot_sel[:, 0], org_sel[:, 0], j_idx[:, 0]
        rows_np = np.asarray(rows)
        new["rot"][rows_np] = best_rot.double().cpu().numpy()
        new["org"][rows_np] = best_org.double().cpu().numpy()
        new["cls"][rows_np] = np.asarray(cls)[best_j.cpu().numpy()]
        if len(cls) < new["post"].shape[1]:
            new["post"][rows_np] = 0.0
            new["evid"][rows_np] = -np.inf
        new["post"][np.ix_(rows_np, cls)] = class_post.double().cpu().numpy()
        new["maxp"][rows_np] = vals[:, 0].double().cpu().numpy()
        new["nsig"][rows_np] = keep.sum(1).cpu().numpy()
        new["evid"][np.ix_(rows_np, cls)] = res["evidence"].double().cpu().numpy()
        # full Gaussian log-likelihood (with its normalisation, so that values stay comparable when
        # the noise spectrum is re-estimated): per complex coefficient -|d|^2/s2 - log(pi s2)
        norm = 0.5 * (herm * torch.log(math.pi * herm / weight)).sum()
        ll = res["total"] - 0.5 * ((x.abs() ** 2) * weight).sum(1) - norm
        new["ll"][rows_np] = ll.double().cpu().numpy()
        # residual power at the best pose, for the noise spectrum
        best_proj = res["projs"][res["proj_row"][torch.arange(b), best_j, t_idx[:, 0], l_idx[:, 0]]]  # (B, 2, M)
        best_proj = torch.complex(best_proj[:, 0], best_proj[:, 1])
        xb = self._shifted(x, best_org[:, None, :], coords)[:, 0]
        model = best_proj if ctf is None else best_proj * ctf
        scale = ((xb * model.conj()).real * herm).sum(1) / ((model.abs() ** 2) * herm).sum(1).clamp(min=1e-20)
        resid = (xb - scale[:, None] * model).abs() ** 2
        s2_num.index_add_(0, shells, (resid * herm).sum(0).to(torch.float64))
        s2_den.index_add_(0, shells, (herm * b).to(torch.float64))
        # significant samples into the class / half-set backprojectors; samples of one image that
        # share a class and rotation (differing in shift only) are summed first: one insertion each
        live = vals > 0
        # only the live samples are shifted: (n, M) posterior-weighted
        xs = self._shifted(x[bi[live]], org_sel[live][:, None, :], coords)[:, 0] * vals[live][:, None]
        group_key = (bi * k_cls + j_idx) * (t * n_rot) + t_idx * n_rot + l_idx
        keys, inverse = torch.unique(group_key[live], return_inverse=True)
        summed = torch.zeros((len(keys), xs.shape[1]), dtype=xs.dtype, device=self.device)
        summed.index_add_(0, inverse, xs)
        g_weight = torch.zeros(len(keys), dtype=vals.dtype, device=self.device).index_add_(0, inverse, vals[live])
        first = torch.zeros(len(keys), dtype=torch.long, device=self.device)
        first.scatter_(0, inverse, torch.arange(len(inverse), device=self.device))
        g_image = bi[live][first]
        g_class = j_idx[live][first]
        g_rot = rot_sel[live][first]
        g_half = torch.as_tensor(self.halves[rows_np], device=self.device)[g_image]
        # inserted as (sum_s v_s X_s) / (sum_s v_s) with weight sum_s v_s: data gets the sum, the
        # weight grid sum_s v_s CTF^2
        images = summed / g_weight[:, None]
        for j in range(k_cls):
            for h in (1, 2):
                m_sel = (g_class == j) & (g_half == h)
                if not bool(m_sel.any()):
                    continue
                bps[j][h - 1].insert(images[m_sel], g_rot[m_sel], None if ctf is None else ctf[g_image[m_sel]],
                                     g_weight[m_sel], coords)

    def _maximise(self, state, bps, new, s2_num, s2_den, r_cur, it, t0, stage) -> MulticlassState:
        """M-step. ``bps`` (the E-step's list of per-class half-set accumulators) is consumed: each
        class's accumulators are dropped from it once its maps are made."""
        opt, k_cls = self.opt, len(bps)
        aligning = stage == "alignment"
        # unfiltered half maps: they match the halves' classes and give the FSCs and the class-
        # difference limit, and are dropped before the filtered maps are made
        raw = [[bp.reconstruct(symmetry=self.sym).cpu().numpy() for bp in bps[j]] for j in range(k_cls)]
        if k_cls > 1 and stage != "class alignment":
            # half 1 was scored against half 2's maps and vice versa: bring half 1's classes
            # into half 2's order so that the halves (and the particles' labels) agree
            perm = match_classes([r[0] for r in raw], [r[1] for r in raw], self.fsc_mask)
            bps[:] = [[bps[perm[j]][0], bps[j][1]] for j in range(k_cls)]
            raw = [[raw[perm[j]][0], raw[j][1]] for j in range(k_cls)]
            rows1 = self.halves == 1
            inverse = np.argsort(perm)
            for key in ("post", "evid"):
                new[key][rows1] = new[key][rows1][:, perm]
            new["cls"][rows1] = inverse[new["cls"][rows1]]
        curves = []
        for halves in raw:
            curve = fsc(halves[0], halves[1], self.fsc_mask)
            curve[np.arange(len(curve)) > r_cur] = 0.0
            curves.append(curve)
        difference_shell = None
        if k_cls > 1 and stage == "classification" and opt.classification_frequency_cap:
            difference_shell = self._difference_shell(raw, r_cur)
        del raw
        maps = np.empty((k_cls,) + (self.box,) * 3, dtype=np.float32)
        half_maps = np.empty((2,) + maps.shape, dtype=np.float32)
        res_A, shells_05 = [], []
        for j, curve in enumerate(curves):
            half_snr = fsc_to_snr(curve, full_set=False)
            for h in (0, 1):
                half_maps[h, j] = bps[j][h].reconstruct(half_snr, opt.tau2_fudge, self.sym).cpu().numpy()
                half_maps[h, j] *= self.solvent
            bps[j][0].add(bps[j][1])
            maps[j] = bps[j][0].reconstruct(fsc_to_snr(curve), opt.tau2_fudge, self.sym).cpu().numpy()
            maps[j] *= self.solvent
            bps[j] = None
            res_A.append(resolution_at(curve, 0.143, self.box, self.px))
            # the E-step marches out to where the class maps still carry signal (FSC 0.5) plus a
            # margin: beyond it frequencies add cost, not information, to alignment and assignment
            shells_05.append(self.box * self.px / resolution_at(curve, 0.5, self.box, self.px))
        sigma2 = state.sigma2.copy()
        s2 = (s2_num / s2_den.clamp(min=1)).cpu().numpy()
        upd = s2_den.cpu().numpy() > 0
        sigma2[upd] = s2[upd]
        k_all = opt.n_classes
        if aligning:  # one consensus map stands for every class until the classes are split
            rep = lambda a: np.repeat(np.asarray(a), k_all, axis=0)
            maps, curves, res_A = rep(maps), rep(curves), list(rep(res_A))
            half_maps = np.repeat(half_maps, k_all, axis=1)
            new["post"] = np.full((len(new["cls"]), k_all), 1.0 / k_all)
            new["evid"] = np.zeros((len(new["cls"]), k_all))
            new["cls"] = np.full(len(new["cls"]), -1)
        sizes = new["post"].sum(0)
        prior = np.maximum(sizes / sizes.sum(), 1e-6)
        # while classes are re-aligned from scratch, each at its own pace, the slowest sets the limit
        best_shell = min(shells_05) if stage == "class alignment" else max(shells_05)
        if difference_shell is not None:
            # classification gains nothing from frequencies where the classes do not differ
            # reproducibly: cap the E-step where the half-sets' class-difference maps decorrelate
            best_shell = min(best_shell, difference_shell)
        r_next = float(np.clip(best_shell + 4.0, self.r_initial, self.r_limit))
        changed = float(np.mean(new["cls"] != state.classes)) if min(state.classes.min(), new["cls"].min()) >= 0 \
            else 1.0
        ang = angular_distance_deg(new["rot"], state.rotations)
        entry = dict(iteration=it, stage=stage, class_sizes=sizes.round(2).tolist(), class_prior=prior.tolist(),
                     resolution_A=[round(float(r), 3) for r in res_A], changed_class_fraction=changed,
                     mean_angle_change_deg=float(np.mean(ang)), loglik=float(new["ll"].sum()),
                     temperature=float(new["temperature"]),
                     r_current=r_cur, seconds=round(time.time() - t0, 2))
        self.log(f"iteration {it} ({stage}{', T %.2g' % entry['temperature'] if entry['temperature'] > 1 else ''}): classes {np.round(sizes).astype(int).tolist()}  resolution "
                 f"{[round(float(r), 1) for r in res_A]} A  changed {100 * changed:.1f}%  angle change "
                 f"{entry['mean_angle_change_deg']:.1f} deg  logL {entry['loglik']:.4g}  "
                 f"(limit {self.box * self.px / max(r_cur, 1e-6):.1f} A, {entry['seconds']} s)")
        return MulticlassState(
            iteration=it, maps=maps, half_maps=half_maps,
            class_prior=prior, sigma2=sigma2, r_current=r_next,
            rotations=new["rot"], origins_px=new["org"], classes=new["cls"], posteriors=new["post"],
            max_prob=new["maxp"], loglik=new["ll"], n_significant=new["nsig"], evidence=new["evid"],
            resolution_A=np.array(res_A), fsc_curves=np.stack(curves), one_reference=state.one_reference,
            references=state.references,
            history=state.history + [entry])

    def _into_reference_frame(self, state: MulticlassState) -> MulticlassState:
        """The state with each re-aligned class map (and half maps, and its particles' poses)
        turned into its reference's frame: aligned from a featureless low-passed start, a class
        comes out turned as a whole (by up to ~20 degrees, measured), and maps the user compares
        should not be. Derived from the saved state, so a resumed run turns them alike."""
        maps, half_maps, rotations = state.maps.copy(), state.half_maps.copy(), state.rotations.copy()
        for j in range(len(maps)):
            turn, score = fit_rotation(maps[j], state.references[j % len(state.references)], self.px,
                                       max(float(state.resolution_A[j]), 3 * self.px), mask=self.solvent)
            g = torch.as_tensor(turn[None], dtype=torch.float32)
            maps[j] = rotate_volume(torch.as_tensor(maps[j]), g)[0].numpy() * self.solvent
            for h in (0, 1):
                half_maps[h, j] = rotate_volume(torch.as_tensor(half_maps[h, j]), g)[0].numpy() * self.solvent
            rows = state.classes == j
            rotations[rows] = rotations[rows] @ turn.T
            self.log(f"class {j + 1} turned by {float(angular_distance_deg(turn[None], np.eye(3)[None])[0]):.1f} deg "
                     f"into the reference's frame (correlation {score:.3f})")
        return dataclasses.replace(state, maps=maps, half_maps=half_maps, rotations=rotations)

    def _difference_shell(self, raw: list, r_cur: float) -> float:
        """Shell (index units) where the FSC between the two half-sets' class-deviation maps
        (each class minus the mean of the classes) falls below 0.143, the highest over classes.

        Shells below the initial low-pass (the E-step's lowest limit anyway) do not count: the
        first shells hold a handful of coefficients, and one of them dipping below 0.143 by
        chance (measured: -0.13 at shell 1 with 0.4-0.85 from shell 2 to 13) would send the
        E-step, and the class maps with it, back to the initial resolution. Above them, a shell
        counts as a crossing only when the next one is below 0.143 too, for the same reason."""
        mean = [sum(r[h] for r in raw) / len(raw) for h in (0, 1)]
        floor = int(math.ceil(self.r_initial))
        shell = 0.0
        for r in raw:
            curve = fsc(r[0] - mean[0], r[1] - mean[1], self.fsc_mask)
            curve[np.arange(len(curve)) > r_cur] = 0.0
            curve[:floor] = 1.0
            curve[:-1] = np.maximum(curve[:-1], curve[1:])
            shell = max(shell, self.box * self.px / resolution_at(curve, 0.143, self.box, self.px))
        return shell

    def converged(self, state: MulticlassState) -> bool:
        """Class assignments and orientations stopped changing and the resolution stopped improving
        (after the class re-alignment, where the run has one still to come)."""
        if (self.realigns(state) and all(h["stage"] != "class alignment" for h in state.history)
                and max(state.iteration + 1, self.anneal_end(state) + 1) + self.opt.realign_iterations
                <= self.opt.iterations):
            return False      # the re-alignment is still to come
        finest = self.opt.finest_step_deg if self.opt.local_search_deg > 0 and self.ds.has_alignment else None
        if state.history and refined_step(state.history, self.opt.angular_step_deg, finest, 0.5 * self.px) \
                < state.history[-1].get("angular_step_deg", self.opt.angular_step_deg):
            return False      # settled at this step: a finer one comes next
        return self._settled(state.history)

    def _settled(self, h: list, change_fraction: float | None = None) -> bool:
        """The last two iterations classified at temperature 1 and changed (almost) nothing: at most
        ``change_fraction`` of the particles changed class (default: the stopping criterion)."""
        change_fraction = self.opt.stop_change_fraction if change_fraction is None else change_fraction
        if len(h) < 3:
            return False
        last, prev = h[-1], h[-2]
        return (prev["stage"] == last["stage"] == "classification" and last["temperature"] == 1.0
                and last["changed_class_fraction"] <= change_fraction
                and last["mean_angle_change_deg"] < 0.5 * last.get("angular_step_deg", self.opt.angular_step_deg)
                and max(last["resolution_A"]) >= max(prev["resolution_A"]) - 0.5 * self.px)

