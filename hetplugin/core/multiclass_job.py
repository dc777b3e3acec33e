"""The ``multiclass`` command: run a multiclass refinement on a STAR file, with resume, and write its results.

Outputs in ``--out``: ``class_NNN.mrc`` (one map per class; ``class_NNN_half1/2.mrc`` its
half maps; with ``--final-reconstruction`` both made again to Nyquist at the best poses), ``particles.star``
(RELION labels: new alignment, rlnClassNumber, rlnMaxValueProbDistribution,
rlnLogLikeliContribution, rlnNrOfSignificantSamples, and one posterior column
per class), ``model.json`` (per-class size, distribution, resolution, FSC) and
``history.json`` (per iteration). ``state/`` holds the last finished iteration so
that ``--continue`` resumes a killed run with the same result.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from .dataset import ParticleDataset
from .device import resolve_device, set_threads
from .focused import focus_report, focus_warnings
from .fsc import resolution_at
from .iterations import classes_unsettled, realignment_moving, suggested_iterations
from .masks import check_mask
from .mrc import read_volume, write_volume
from .multiclass import MulticlassOptions, MulticlassRefiner, MulticlassState
from .reconstruct import gold_standard_map
from .rotations import matrix_to_euler
from .starfile import read_particles, write_particles


def add_arguments(p: argparse.ArgumentParser) -> None:
    o = MulticlassOptions()
    p.add_argument("--particles", required=True, help="RELION STAR file of particles (with or without alignment)")
    p.add_argument("--reference", required=True, nargs="+",
                   help="one reference map (classes are seeded from random particle subsets) or K maps")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--classes", type=int, default=o.n_classes, help="number of classes K")
    p.add_argument("--iterations", type=int, default=0,
                   help="maximum number of iterations (default 0: 25 for two classes, 5 more per further class)")
    p.add_argument("--initial-lowpass", type=float, default=o.initial_lowpass_A,
                   help="low-pass filter (A) applied to the reference(s) before the first iteration")
    p.add_argument("--tau2-fudge", type=float, default=o.tau2_fudge,
                   help="regularisation parameter T: higher values trust the data more (RELION's Class3D uses 4)")
    p.add_argument("--angular-step", type=float, default=o.angular_step_deg,
                   help="fine angular sampling (deg); the global coarse search uses twice this step")
    p.add_argument("--offset-range", type=float, default=None, help="origin search range (A; default 10%% of the box)")
    p.add_argument("--offset-step", type=float, default=None, help="origin search step (A; default one pixel)")
    p.add_argument("--local-search", type=float, default=o.local_search_deg,
                   help="if > 0 and the particles have alignment: search only within this many degrees of it")
    p.add_argument("--finest-step", type=float, default=None,
                   help="with --local-search on particles with alignment (a refinement): halve the angular step, "
                        "and the search range with it, each time poses settle, down to this step (deg); "
                        "default: keep --angular-step")
    p.add_argument("--final-reconstruction", action="store_true",
                   help="after the last iteration, reconstruct every class map again from its particles at their "
                        "best poses on all frequencies, to Nyquist, with half-set FSC (as RELION's auto-refine ends): "
                        "the iterations' maps stop at the frequencies the E-step used. Half maps come out unfiltered")
    p.add_argument("--alignment-iterations", type=int, default=o.alignment_iterations,
                   help="from one reference: iterations that align all particles as one class before the "
                        "classes are split (0: split at once)")
    p.add_argument("--realign-iterations", type=int, default=o.realign_iterations,
                   help="from one reference, with a global search: once the classification has settled, at "
                        "least this many iterations align each class again on its own (particles held in their "
                        "class) from the low-passed reference, so that a state the consensus misaligned gets its "
                        "own poses; more while poses still move by over an angular step (0: off)")
    p.add_argument("--realign-lowpass", type=float, default=o.realign_lowpass_A,
                   help="resolution (A) the reference is low-passed to for the class re-alignment, or the initial "
                        "low-pass where that is finer: a featureless start lets a compact state align to wrong poses")
    p.add_argument("--global-iterations", type=int, default=o.global_iterations,
                   help="iterations with a global search before searching locally around the current poses")
    p.add_argument("--symmetry", default=o.symmetry, help="point group (C1, Cn, Dn, T, O, I)")
    p.add_argument("--particle-diameter", type=float, default=None,
                   help="particle diameter (A) for the spherical solvent mask (default 80%% of the box)")
    p.add_argument("--mask", default=None, help="solvent mask (MRC, values in [0, 1]) instead of the sphere")
    p.add_argument("--resolution-limit", type=float, default=None, help="never use frequencies beyond this (A) in the E-step")
    p.add_argument("--min-class-size", type=int, default=o.min_class_size,
                   help="smallest class (particles) considered reliable; smaller ones are flagged")
    p.add_argument("--no-ctf", action="store_true", help="do not correct for the CTF")
    p.add_argument("--ctf-intact-first-peak", action="store_true", help="ignore the CTF until its first peak")
    p.add_argument("--seed", type=int, default=o.seed, help="random seed (the same seed, inputs, --threads and --device give the same result)")
    p.add_argument("--continue", dest="resume", action="store_true",
                   help="resume from the last finished iteration saved in OUT/state")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or auto (default: $HETPLUGIN_DEVICE, else auto)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--batch-size", type=int, default=o.batch_size, help="at most this many particles per E-step batch; on the CPU fewer where the search is large, to bound memory")
    p.add_argument("--root", default=None, help="folder that relative image paths are relative to")


def options_from_args(a: argparse.Namespace) -> MulticlassOptions:
    return MulticlassOptions(
        n_classes=a.classes, iterations=a.iterations, initial_lowpass_A=a.initial_lowpass, tau2_fudge=a.tau2_fudge,
        angular_step_deg=a.angular_step, offset_range_A=a.offset_range, offset_step_A=a.offset_step,
        local_search_deg=a.local_search, global_iterations=a.global_iterations,
        alignment_iterations=a.alignment_iterations, realign_iterations=a.realign_iterations,
        realign_lowpass_A=a.realign_lowpass, symmetry=a.symmetry,
        particle_diameter_A=a.particle_diameter, resolution_limit_A=a.resolution_limit,
        min_class_size=a.min_class_size, seed=a.seed, batch_size=a.batch_size, finest_step_deg=a.finest_step)


def run(a: argparse.Namespace, log=print) -> MulticlassState:
    set_threads(a.threads)
    device = resolve_device(a.device)
    opt = options_from_args(a)
    table = read_particles(a.particles, root=a.root)
    ds = ParticleDataset(table, device, use_ctf=not a.no_ctf, intact_first_peak=a.ctf_intact_first_peak)
    refs = []
    for path in a.reference:
        vol, _ = read_volume(path)
        if vol.shape[0] != ds.box:
            raise ValueError(f"{path}: reference box {vol.shape[0]} differs from the particles' box {ds.box}; "
                             "resample the reference to the particles' box and pixel size")
        refs.append(vol)
    if len(refs) not in (1, opt.n_classes):
        raise ValueError(f"give one reference or {opt.n_classes} (one per class), not {len(refs)}")
    mask = None
    if a.mask:
        mask, _ = read_volume(a.mask)
        check_mask(mask, a.mask)
        if mask.shape[0] != ds.box:
            raise ValueError(f"{a.mask}: mask box {mask.shape[0]} differs from the particles' box {ds.box}")
        report = focus_report(refs[0], mask, ds.pixel_size_A)
        log(f"mask: a region of about {report['mass_kDa']:.0f} kDa of density, {100 * report['signal_fraction']:.0f}% "
            f"of the reference's signal, centre {report['centre_offset_A']:.0f} A from the box centre")
        for warning in focus_warnings(report):
            log(f"WARNING: {warning}")
    out = Path(a.out)
    (out / "state").mkdir(parents=True, exist_ok=True)
    refiner = MulticlassRefiner(ds, opt, mask, log)
    key = _options_key(opt, a)
    state = _load_state(out, key) if a.resume else None
    if state is None:
        state = refiner.initial_state(np.stack(refs))
        log(f"multiclass: {len(ds)} particles, box {ds.box}, {ds.pixel_size_A:.3f} A/px, K={opt.n_classes}, "
            f"{'local' if opt.local_search_deg > 0 and ds.has_alignment else 'global'} search, device {device}")
    else:
        log(f"multiclass: continuing after iteration {state.iteration}")
    while state.iteration < opt.iterations and not (state.iteration and refiner.converged(state)):
        state = refiner.iterate(state)
        _save_state(out, state, key)
    if refiner.converged(state):
        log(f"multiclass: converged after iteration {state.iteration}")
    if a.final_reconstruction:
        state = final_reconstruction(table, state, refiner, device, not a.no_ctf, a.ctf_intact_first_peak, log)
    write_results(out, table, state, ds.pixel_size_A, opt, refiner.converged(state), log)
    ds.close()
    return state


def final_reconstruction(table, state: MulticlassState, refiner: MulticlassRefiner, device, use_ctf: bool,
                         intact_first_peak: bool, log=print) -> MulticlassState:
    """``state`` with every class map, its half maps (unfiltered), FSC and resolution made again from the
    class's particles at their best poses on all frequencies (the refinement's half sets; maps in the
    solvent mask). A class whose particles all lie in one half set keeps its maps."""
    px = refiner.px
    rot, tilt, psi = matrix_to_euler(state.rotations)
    posed = dataclasses.replace(table, rot_deg=rot, tilt_deg=tilt, psi_deg=psi,
                                shift_x_A=state.origins_px[:, 0] * px, shift_y_A=state.origins_px[:, 1] * px)
    ds = ParticleDataset(posed, device, use_ctf=use_ctf, intact_first_peak=intact_first_peak)
    maps, half_maps = state.maps.copy(), state.half_maps.copy()
    curves, res = state.fsc_curves.copy(), np.array(state.resolution_A, dtype=float)
    for j in range(len(maps)):
        rows = np.flatnonzero(state.classes == j)
        if len(np.unique(refiner.halves[rows])) < 2:
            continue
        full, halves, curves[j] = gold_standard_map(ds, refiner.halves, rows, refiner.fsc_mask,
                                                    refiner.opt.tau2_fudge, refiner.sym)
        maps[j] = full * refiner.solvent
        for h in (0, 1):
            half_maps[h, j] = halves[h] * refiner.solvent
        res[j] = resolution_at(curves[j], 0.143, ds.box, px)
        log(f"final reconstruction, class {j + 1}: {len(rows)} particles at their best poses, all frequencies: "
            f"resolution {res[j]:.2f} A (E-step maps {state.resolution_A[j]:.2f} A)")
    ds.close()
    return dataclasses.replace(state, maps=maps, half_maps=half_maps, fsc_curves=curves, resolution_A=res)


def _options_key(opt: MulticlassOptions, a: argparse.Namespace) -> str:
    # the number of iterations may grow between a run and its continuation
    options = {k: v for k, v in dataclasses.asdict(opt).items() if k != "iterations"}
    payload = json.dumps([options, str(Path(a.particles).resolve()), list(a.reference), a.no_ctf],
                         sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()


def _save_state(out: Path, state: MulticlassState, key: str) -> None:
    arrays = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name not in ("history",)}
    tmp = out / "state" / f"iter_{state.iteration:03d}.tmp.npz"
    np.savez(tmp, **arrays)
    tmp.replace(out / "state" / f"iter_{state.iteration:03d}.npz")
    (out / "state" / "latest.json").write_text(json.dumps(dict(iteration=state.iteration, key=key,
                                                               history=state.history)))
    for old in (out / "state").glob("iter_*.npz"):
        if old.name != f"iter_{state.iteration:03d}.npz":
            old.unlink()
    (out / "history.json").write_text(json.dumps(state.history, indent=1))


def _load_state(out: Path, key: str) -> MulticlassState | None:
    latest = out / "state" / "latest.json"
    if not latest.exists():
        return None
    meta = json.loads(latest.read_text())
    if meta["key"] != key:
        raise ValueError(f"{out}: the saved state was made with other inputs or options; "
                         "use a new output folder or run without --continue")
    data = np.load(out / "state" / f"iter_{meta['iteration']:03d}.npz")
    fields = {k: data[k] for k in data.files}
    fields["iteration"] = int(fields["iteration"])
    fields["r_current"] = float(fields["r_current"])
    fields["one_reference"] = bool(fields["one_reference"])
    return MulticlassState(**fields, history=meta["history"])


def write_results(out: Path, table, state: MulticlassState, pixel_size_A: float, opt: MulticlassOptions,
                  converged: bool = False, log=print) -> None:
    k = opt.n_classes
    for j in range(k):
        write_volume(out / f"class_{j + 1:03d}.mrc", state.maps[j], pixel_size_A)
        for h in (0, 1):
            write_volume(out / f"class_{j + 1:03d}_half{h + 1}.mrc", state.half_maps[h][j], pixel_size_A)
    rot, tilt, psi = matrix_to_euler(state.rotations)
    updates = {"rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": psi,
               "rlnOriginXAngst": state.origins_px[:, 0] * pixel_size_A,
               "rlnOriginYAngst": state.origins_px[:, 1] * pixel_size_A,
               "rlnClassNumber": state.classes + 1, "rlnMaxValueProbDistribution": state.max_prob,
               "rlnLogLikeliContribution": state.loglik, "rlnNrOfSignificantSamples": state.n_significant}
    for j in range(k):
        updates[f"hetClassPosterior{j + 1:03d}"] = state.posteriors[:, j]
    write_particles(out / "particles.star", table, updates)
    sizes = np.bincount(state.classes, minlength=k)
    classes = []
    for j in range(k):
        small = bool(sizes[j] < opt.min_class_size)
        classes.append(dict(class_number=j + 1, map=f"class_{j + 1:03d}.mrc", size=int(sizes[j]),
                            soft_size=float(state.posteriors[:, j].sum()),
                            distribution=float(state.class_prior[j]), resolution_A=float(state.resolution_A[j]),
                            fsc=state.fsc_curves[j].tolist(), below_min_size=small))
        if small:
            log(f"WARNING: class {j + 1} holds {sizes[j]} particles, below the minimum class size "
                f"{opt.min_class_size}: its map over-fits noise; merge it or use fewer classes")
    # the re-alignment goes on while poses move by over a step until the iteration limit stops it;
    # the user is told when they still moved by over twice the step
    unfinished = realignment_moving(state.history, 2 * opt.angular_step_deg)
    if unfinished is not None:
        log(f"WARNING: the class re-alignment ended at the iteration limit with poses still changing by "
            f"{unfinished:.1f} deg on average (over twice the {opt.angular_step_deg:g} deg step): the class "
            f"maps can get sharper with more iterations (e.g. --iterations {opt.iterations + 5})")
    unsettled = classes_unsettled(state.history, converged)
    suggested = None if unsettled is None else suggested_iterations(opt.iterations, opt.n_classes)
    if unsettled is not None:
        log(f"WARNING: the run ended at the iteration limit with {100 * unsettled:.1f}% of the particles still "
            f"changing class in its last iteration: the classes have not settled (at low SNR or with more "
            f"classes they take longer). Run again with more iterations (e.g. --iterations {suggested}): the "
            f"annealed classification takes half of them, and a longer run separates classes that continuing "
            f"this one may leave mixed")
    model = dict(n_particles=len(table), iterations=state.iteration, converged=bool(converged),
                 pixel_size_A=pixel_size_A, realignment_unfinished_deg=unfinished,
                 classes_unsettled_fraction=unsettled,
                 suggested_iterations=suggested,
                 options=dataclasses.asdict(opt), classes=classes, history=state.history)
    (out / "model.json").write_text(json.dumps(model, indent=1))
    (out / "history.json").write_text(json.dumps(state.history, indent=1))
    for c in classes:
        log(f"class {c['class_number']}: {c['size']} particles ({100 * c['distribution']:.1f}%), "
            f"resolution {c['resolution_A']:.1f} A -> {out / c['map']}")
    log(f"multiclass: wrote {out / 'particles.star'} and {out / 'model.json'}")
