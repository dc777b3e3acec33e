"""Multiclass refinement on tiny synthetic data with ground truth (box 32)."""
import json
from pathlib import Path

import numpy as np
import pytest

from hetplugin.core.cli import main
from hetplugin.core.simulate import simulate
from hetplugin.core.starfile import read_particles


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (Hubert and Arabie)."""
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    comb = lambda x: x * (x - 1) / 2.0
    index = comb(table).sum()
    rows, cols = comb(table.sum(1)).sum(), comb(table.sum(0)).sum()
    expected = rows * cols / comb(len(a))
    return float((index - expected) / (0.5 * (rows + cols) - expected))


def best_accuracy(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Fraction of agreeing labels under the best relabelling of ``found``."""
    import itertools
    return max(float(np.mean(np.asarray(p)[found - 1] + 1 == truth)) for p in itertools.permutations(range(k)))


@pytest.fixture(scope="module")
def two_state(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_state")
    simulate(out, n_particles=600, n_classes=2, box=32, pixel_size_A=4.0, snr=1.0, seed=4,
             heterogeneity="removal", with_alignment=False, log=lambda m: None)
    return out


def run_multiclass(sim: Path, out: Path, *extra: str) -> int:
    return main(["multiclass", "--particles", str(sim / "particles.star"), "--reference", str(sim / "consensus.mrc"),
                 "--out", str(out), "--classes", "2", "--initial-lowpass", "30", "--min-class-size", "5",
                 "--threads", "2", *extra])


def test_two_classes_from_one_reference_without_alignment(two_state, tmp_path):
    assert run_multiclass(two_state, tmp_path / "mc", "--iterations", "14") == 0
    out = tmp_path / "mc"
    found = read_particles(out / "particles.star")
    truth = read_particles(two_state / "truth_particles.star")
    acc = best_accuracy(found.class_number, truth.class_number, 2)
    ari = adjusted_rand_index(found.class_number, truth.class_number)
    assert acc >= 0.95, acc
    assert ari >= 0.8, ari
    model = json.loads((out / "model.json").read_text())
    assert sum(c["size"] for c in model["classes"]) == 600
    assert all((out / c["map"]).exists() for c in model["classes"])
    assert all(c["resolution_A"] < 20 for c in model["classes"])
    for label in ("rlnMaxValueProbDistribution", "rlnLogLikeliContribution", "hetClassPosterior001",
                  "rlnNrOfSignificantSamples"):
        assert label in found.columns
    post = np.stack([found.columns["hetClassPosterior001"], found.columns["hetClassPosterior002"]], 1)
    assert np.allclose(post.sum(1), 1.0, atol=1e-4)
    history = json.loads((out / "history.json").read_text())
    assert 5 <= len(history) <= 14 and history[0]["stage"] == "alignment"
    assert model["converged"] or len(history) == 14
    assert model["realignment_unfinished_deg"] is None  # no re-alignment in 14 iterations, nothing cut short
    assert (model["classes_unsettled_fraction"] is None) == (model["suggested_iterations"] is None)


@pytest.mark.slow
def test_same_seed_same_answer_and_resume_after_kill(two_state, tmp_path):
    import subprocess
    import sys
    import time
    args = ["--iterations", "5", "--alignment-iterations", "2", "--seed", "3", "--batch-size", "32"]
    assert run_multiclass(two_state, tmp_path / "a", *args) == 0
    assert run_multiclass(two_state, tmp_path / "b", *args) == 0
    a = read_particles(tmp_path / "a" / "particles.star")
    b = read_particles(tmp_path / "b" / "particles.star")
    assert np.array_equal(a.class_number, b.class_number)
    assert np.allclose(a.rot_deg, b.rot_deg) and np.allclose(a.shift_x_A, b.shift_x_A)
    # kill a run after its third iteration, continue it: same result as the uninterrupted run
    cmd = [sys.executable, "-m", "hetplugin.core", "multiclass", "--particles", str(two_state / "particles.star"),
           "--reference", str(two_state / "consensus.mrc"), "--out", str(tmp_path / "c"), "--classes", "2",
           "--initial-lowpass", "30", "--min-class-size", "5", "--threads", "2", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "c" / "state" / "latest.json"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and json.loads(latest.read_text())["iteration"] >= 3:
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    assert json.loads(latest.read_text())["iteration"] < 5, "the run finished before it could be killed"
    assert run_multiclass(two_state, tmp_path / "c", *args, "--continue") == 0
    c = read_particles(tmp_path / "c" / "particles.star")
    assert np.array_equal(a.class_number, c.class_number)
    assert np.allclose(a.rot_deg, c.rot_deg, atol=1e-4)


def test_k_references_seed_the_classes_in_their_order(two_state, tmp_path):
    """K references (e.g. the class maps of an earlier round) classify from the first E-step:
    class j is the particles closest to reference j, not a random split of them."""
    refs = [str(two_state / f"truth_class_{j:03d}.mrc") for j in (2, 1)]
    assert main(["multiclass", "--particles", str(two_state / "truth_particles.star"), "--reference", *refs,
                 "--out", str(tmp_path / "mc"), "--classes", "2", "--initial-lowpass", "12", "--min-class-size", "5",
                 "--iterations", "1", "--local-search", "10", "--threads", "2"]) == 0
    found = read_particles(tmp_path / "mc" / "particles.star")
    truth = read_particles(two_state / "truth_particles.star")
    assert float(np.mean(found.class_number == 3 - truth.class_number)) >= 0.95


def test_bad_input_is_refused_before_work(two_state, tmp_path, capsys):
    assert main(["multiclass", "--particles", str(two_state / "particles.star"), "--reference",
                 str(two_state / "consensus.mrc"), "--out", str(tmp_path / "x"), "--classes", "400"]) == 2
    assert "exceeds the 600 particles" in capsys.readouterr().err
    from hetplugin.core.mrc import write_volume
    write_volume(tmp_path / "small.mrc", np.zeros((16, 16, 16), np.float32), 8.0)
    assert main(["multiclass", "--particles", str(two_state / "particles.star"), "--reference",
                 str(tmp_path / "small.mrc"), "--out", str(tmp_path / "y")]) == 2
    assert "differs from the particles' box" in capsys.readouterr().err


def test_three_classes(tmp_path):
    """K=3 from one reference: three conformations (two domain motions), box 40.

    Measured accuracy 0.896 here (seeds 6, 7, 8 of this set: 0.896, 0.731, 0.937, ARI 0.71,
    0.49, 0.82; with the class re-alignment from the initial 30 A instead of 20 A: 0.903,
    0.749, 0.944; box 48, 1500 particles, SNR 0.3: 0.96-0.97 before that change). On the
    box-32 'removal' sets the consensus poses come out near random (median error ~120 degrees
    after alignment) and K=3 reaches only ~0.65-0.85: there the limit is alignment, not
    classification (with the true poses the classes separate completely)."""
    sim = tmp_path / "sim"
    simulate(sim, n_particles=900, n_classes=3, box=40, pixel_size_A=3.0, snr=0.5, seed=6,
             heterogeneity="motion", with_alignment=False, log=lambda m: None)
    assert main(["multiclass", "--particles", str(sim / "particles.star"), "--reference", str(sim / "consensus.mrc"),
                 "--out", str(tmp_path / "mc"), "--classes", "3", "--initial-lowpass", "30", "--min-class-size", "5",
                 "--iterations", "20", "--particle-diameter", "72", "--threads", "2"]) == 0
    found = read_particles(tmp_path / "mc" / "particles.star")
    truth = read_particles(sim / "truth_particles.star")
    assert best_accuracy(found.class_number, truth.class_number, 3) >= 0.85
    assert adjusted_rand_index(found.class_number, truth.class_number) >= 0.6
    assert np.bincount(found.class_number, minlength=4)[1:].min() >= 200


def test_log_likelihood_does_not_decrease_within_a_stage(tmp_path):
    """At a fixed frequency limit EM never lowers the log-likelihood; it only drops where the
    classes are split (a random split with a fresh noise estimate)."""
    sim = tmp_path / "sim"
    simulate(sim, n_particles=300, n_classes=2, box=32, pixel_size_A=4.0, snr=1.0, seed=4,
             heterogeneity="removal", with_alignment=False, log=lambda m: None)
    assert main(["multiclass", "--particles", str(sim / "particles.star"), "--reference", str(sim / "consensus.mrc"),
                 "--out", str(tmp_path / "mc"), "--classes", "2", "--initial-lowpass", "16",
                 "--resolution-limit", "16", "--iterations", "10", "--min-class-size", "5", "--threads", "2"]) == 0
    history = json.loads((tmp_path / "mc" / "history.json").read_text())
    align = [h["loglik"] for h in history if h["stage"] == "alignment"][1:]
    classify = [h["loglik"] for h in history if h["stage"] == "classification"][1:]
    assert len(align) >= 2 and len(classify) >= 3
    for values in (align, classify):
        steps = np.diff(values) / np.abs(values[:-1])
        assert np.all(steps > -1e-4), values
    assert classify[-1] > align[-1]


def test_class_difference_cap_ignores_the_noisy_first_shells():
    """The E-step cap is where the half-sets' class-difference maps stop agreeing; a chance
    disagreement in the first shells (a handful of coefficients) or in one shell must not reset
    it to the initial resolution (it did in the README demo: 28.7 A final maps)."""
    import torch
    from hetplugin.core.fourier import fftn_centered, ifftn_centered, radius
    from hetplugin.core.masks import spherical_mask
    from hetplugin.core.multiclass import MulticlassRefiner

    box, px = 32, 4.0
    rng = np.random.default_rng(0)
    blob = np.real(ifftn_centered(torch.as_tensor(rng.normal(size=(box,) * 3) + 0j), (-3, -2, -1)).numpy())
    deviation = blob * spherical_mask(box, 10, edge_px=3)
    dev_ft = fftn_centered(torch.as_tensor(deviation + 0j), (-3, -2, -1)).numpy()
    shell = np.rint(radius((box,) * 3)).astype(np.int64)
    flipped = np.where((shell <= 1) | (shell == 6), -dev_ft, dev_ft)     # halves disagree at shells 0, 1 and 6
    other = np.real(ifftn_centered(torch.as_tensor(flipped), (-3, -2, -1)).numpy())
    raw = [[deviation, other], [-deviation, -other]]

    refiner = MulticlassRefiner.__new__(MulticlassRefiner)
    refiner.box, refiner.px, refiner.r_limit = box, px, box / 2 - 1
    refiner.r_initial = box * px / 30.0          # an initial low-pass of 30 A: shell 4.3
    refiner.fsc_mask = np.ones((box,) * 3, np.float32)
    assert refiner._difference_shell(raw, r_cur=12.0) >= 10.0


def test_class_realignment_comes_once_the_classification_has_settled():
    from types import SimpleNamespace
    from hetplugin.core.iterations import realignment_moving
    from hetplugin.core.multiclass import MulticlassOptions, MulticlassRefiner

    refiner = MulticlassRefiner.__new__(MulticlassRefiner)
    refiner.opt, refiner.px = MulticlassOptions(iterations=25, alignment_iterations=4, realign_iterations=5), 2.0
    refiner.ds = SimpleNamespace(has_alignment=False)
    entry = lambda it, stage, changed=0.0: dict(iteration=it, stage=stage, temperature=1.0, resolution_A=[6.0, 6.0],
                                                changed_class_fraction=changed, mean_angle_change_deg=0.1)
    state = SimpleNamespace(one_reference=True, history=[], iteration=0, classes=np.zeros(10, int))
    assert refiner.stage(4, state) == "alignment" and refiner.stage(5, state) == "classification"
    # annealing ends at 4 + (25 - 4) // 2 = 14; then the re-alignment waits for <= 1% changing class
    state.history = [entry(it, "classification", 0.05) for it in range(10, 16)] + [entry(16, "classification", 0.03)]
    state.iteration = 16
    assert refiner.stage(17, state) == "classification"
    assert not refiner.converged(state)
    state.history[-1] = entry(16, "classification", 0.008)
    assert refiner.stage(17, state) == "class alignment"
    state.history += [entry(it, "class alignment") for it in range(17, 21)]
    assert refiner.stage(21, state) == "class alignment"
    state.history.append(entry(21, "class alignment"))
    assert refiner.stage(22, state) == "classification"
    # longer while poses still move by over a step on average, leaving two iterations
    state.history[-1]["mean_angle_change_deg"] = 20.0
    assert refiner.stage(22, state) == "class alignment"
    state.history += [dict(entry(it, "class alignment"), mean_angle_change_deg=20.0) for it in (22, 23)]
    assert refiner.stage(24, state) == "classification"
    # ... and the run says that the limit cut it short (not when the poses had settled)
    assert realignment_moving(state.history + [entry(24, "classification")], 7.5) == 20.0
    state.history[-1]["mean_angle_change_deg"] = 5.0
    assert realignment_moving(state.history, 7.5) is None and realignment_moving([], 7.5) is None
    # never settled: it starts when only it and one more iteration are left
    state.history = [entry(it, "classification", 0.05) for it in range(15, 19)]
    assert refiner.stage(19, state) == "classification" and refiner.stage(20, state) == "class alignment"
    # settled, but no room left / off / one reference per class: no re-alignment, the run may stop
    for opt in (MulticlassOptions(iterations=14), MulticlassOptions(realign_iterations=0)):
        refiner.opt = opt
        state.history, state.iteration = [entry(it, "classification") for it in range(10, 14)], 13
        assert refiner.stage(14, state) == "classification" and refiner.converged(state)
    refiner.opt = MulticlassOptions()
    assert refiner.stage(20, SimpleNamespace(one_reference=False, history=state.history, classes=state.classes)) \
        == "classification"
    # particles searched locally around their own alignment: no global re-alignment
    refiner.opt, refiner.ds.has_alignment = MulticlassOptions(local_search_deg=10), True
    state.history, state.iteration = [entry(it, "classification") for it in range(13, 19)], 18
    assert refiner.stage(19, state) == "classification" and refiner.converged(state)


def test_a_run_ending_with_classes_still_changing_says_so():
    from hetplugin.core.iterations import classes_unsettled

    entry = lambda stage, changed: dict(stage=stage, changed_class_fraction=changed)
    # measured at SNR 0.05: 6.9-9.3% still changed class in the last of 25 iterations
    history = [entry("alignment", 1.0), entry("classification", 1.0), entry("classification", 0.3),
               entry("class alignment", 0.0), entry("classification", 0.093)]
    assert classes_unsettled(history, converged=False) == pytest.approx(0.093)
    assert classes_unsettled(history, converged=True) is None
    history[-1]["changed_class_fraction"] = 0.011      # a few particles at the border: settled enough
    assert classes_unsettled(history, converged=False) is None
    # the first classification (every particle's first class) and a re-alignment are not judged here
    assert classes_unsettled(history[:2], converged=False) is None
    assert classes_unsettled(history[:4], converged=False) is None
    # what the warning suggests: a new run, 5 iterations longer per class beyond the first
    from hetplugin.core.iterations import suggested_iterations
    assert suggested_iterations(25, 2) == 30
    assert suggested_iterations(20, 3) == 30


def test_default_iterations_grow_with_the_classes():
    """Without --iterations (0), a run gets 25 iterations for two classes and 5 more per further class;
    an explicit number is kept."""
    import argparse
    from hetplugin.core.multiclass import MulticlassOptions
    from hetplugin.core.multiclass_job import add_arguments, options_from_args

    assert [MulticlassOptions(n_classes=k).iterations for k in (1, 2, 3, 5)] == [25, 25, 30, 40]
    assert MulticlassOptions(n_classes=3, iterations=12).iterations == 12
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = ["--particles", "p.star", "--reference", "r.mrc", "--out", "o"]
    assert options_from_args(p.parse_args(args + ["--classes", "4"])).iterations == 35
    assert options_from_args(p.parse_args(args + ["--classes", "4", "--iterations", "20"])).iterations == 20
    with pytest.raises(ValueError, match="iterations must be positive"):
        MulticlassOptions(iterations=-1).check(100)


def test_class_realignment_recovers_a_class_with_wrong_poses(tmp_path):
    """A class whose particles carry wrong poses (as a state far from the consensus gets them)
    is aligned again on its own: its particles stay in it, their poses come out right, in the
    reference's frame, and so does its map."""
    from hetplugin.core.dataset import ParticleDataset
    from hetplugin.core.mrc import read_volume
    from hetplugin.core.multiclass import MulticlassOptions, MulticlassRefiner
    from hetplugin.core.rotations import angular_distance_deg, euler_to_matrix, random_rotations

    sim = tmp_path / "sim"
    simulate(sim, n_particles=400, n_classes=2, box=32, pixel_size_A=4.0, snr=1.0, seed=7,
             heterogeneity="motion", with_alignment=False, log=lambda m: None)
    truth = read_particles(sim / "truth_particles.star")
    classes = np.asarray(truth.class_number) - 1
    r_true = euler_to_matrix(truth.rot_deg, truth.tilt_deg, truth.psi_deg)
    opt = MulticlassOptions(n_classes=2, iterations=20, alignment_iterations=4, realign_iterations=5,
                            particle_diameter_A=100, min_class_size=5, seed=1)
    refiner = MulticlassRefiner(ParticleDataset(read_particles(sim / "particles.star")), opt, log=lambda m: None)
    state = refiner.initial_state(read_volume(sim / "consensus.mrc")[0])
    wrong = classes == 1
    state.rotations = r_true.copy()
    state.rotations[wrong] = random_rotations(int(wrong.sum()), np.random.default_rng(0))
    state.origins_px[:] = 0.0
    state.classes = classes.copy()
    state.iteration = refiner.anneal_end(state) + 2
    state.history = [dict(iteration=it, stage="classification", temperature=1.0, resolution_A=[8.0, 8.0],
                          changed_class_fraction=0.0, mean_angle_change_deg=0.1)
                     for it in range(state.iteration - 2, state.iteration + 1)]
    true_map = read_volume(sim / "truth_class_002.mrc")[0]
    cc = lambda m: float(np.corrcoef(m.ravel(), true_map.ravel())[0, 1])
    for _ in range(opt.realign_iterations):
        state = refiner.iterate(state)
        assert state.history[-1]["stage"] == "class alignment"
        assert np.array_equal(state.classes, classes)
        if len(state.history) == 4:
            # it starts from the reference at 20 A (the default re-alignment low-pass), finer than
            # the 30 A initial low-pass: frequencies up to 32 px * 4 A/px / 20 A = 6.4 shells
            assert state.history[-1]["r_current"] == pytest.approx(6.4)
    while state.history[-1]["stage"] == "class alignment":
        state = refiner.iterate(state)
    # the first iteration after it turns the maps into the reference's frame and searches globally
    assert best_accuracy(state.classes + 1, classes + 1, 2) >= 0.85
    err = angular_distance_deg(state.rotations, r_true)
    # from ~120 degrees (random); the step is 7.5 degrees at 4 A/px
    assert np.median(err[wrong]) < 15.0, np.median(err[wrong])
    assert np.median(err[~wrong]) < 15.0, np.median(err[~wrong])
    assert cc(state.maps[1]) > 0.9, cc(state.maps[1])


def test_match_classes_finds_the_permutation_of_noisy_half_maps():
    """The halves' classes are matched by their deviations from the mean map (within the mask),
    not by the shared consensus: the classes here differ by 3% of the maps' norm."""
    from hetplugin.core.masks import spherical_mask
    from hetplugin.core.fit import match_classes

    rng = np.random.default_rng(5)
    box = 24
    mask = spherical_mask(box, 9, edge_px=2)
    common = rng.normal(size=(box,) * 3).astype(np.float32)
    classes = [common + 0.03 * rng.normal(size=common.shape).astype(np.float32) for _ in range(4)]
    noisy = lambda v: v + 0.01 * rng.normal(size=v.shape).astype(np.float32)
    for order in ([2, 0, 3, 1], [0, 1, 2, 3], [3, 2, 1, 0]):
        first = [noisy(classes[o]) for o in order]
        second = [noisy(c) for c in classes]
        perm = match_classes(first, second, mask)
        assert [order[p] for p in perm] == [0, 1, 2, 3]


def _refiner_on(sim: Path, **options):
    from hetplugin.core.dataset import ParticleDataset
    from hetplugin.core.multiclass import MulticlassOptions, MulticlassRefiner
    opt = MulticlassOptions(n_classes=2, particle_diameter_A=100, min_class_size=5, seed=1, **options)
    return MulticlassRefiner(ParticleDataset(read_particles(sim / "particles.star")), opt, log=lambda m: None)


def test_selected_candidates_score_as_in_the_full_search():
    """The fine search's second pass (a product vector per kept candidate, one GEMM against the
    shift offsets' phases) gives each kept candidate the score the full search gives it, -inf to
    the others, and the row of its own projection."""
    import torch
    from hetplugin.core.fourier import half_plane_coords, shift_phase
    from hetplugin.core.projection import frequency_mask, prepare_volume, slice_grid
    from hetplugin.core.rotations import random_rotations
    from hetplugin.core.search import score_all, score_selected

    gen = torch.Generator().manual_seed(0)
    box, k_cls, b, t, n_rot = 32, 2, 3, 2, 5
    coords = torch.as_tensor(half_plane_coords(box)[frequency_mask(box, 12)], dtype=torch.float32)
    m = len(coords)
    vol_ft = [slice_grid(prepare_volume(torch.randn((box,) * 3, generator=gen), 2, 2 * 28, half=True))
              for _ in range(k_cls)]
    rots = torch.as_tensor(random_rotations(b * k_cls * t * n_rot, np.random.default_rng(1)),
                           dtype=torch.float32).view(b, k_cls, t, n_rot, 3, 3)
    xw = torch.complex(torch.randn(k_cls, b, t, m, generator=gen), torch.randn(k_cls, b, t, m, generator=gen))
    shifts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.5, 0.5]])
    phase = shift_phase(coords[:, 0], coords[:, 1], shifts[:, 0], shifts[:, 1], box)
    q = torch.rand(b, m, generator=gen)
    full, full_projs = score_all(xw, phase, q, vol_ft, rots, coords, False)
    keep = torch.rand(b, k_cls, t, n_rot, generator=gen) < 0.4
    keep[0, 0, 0, 0] = True
    part, projs, rows = score_selected(xw, phase, q, vol_ft, rots, coords, keep)
    kept = keep[:, :, :, None, :].expand_as(full)
    assert torch.allclose(part[kept], full[kept], rtol=1e-4, atol=1e-3 * float(full.abs().max()))
    assert torch.isneginf(part[~kept]).all()
    full_rows = torch.arange(len(full_projs)).view(k_cls, b, t, n_rot).permute(1, 0, 2, 3)
    assert torch.equal(rows[~keep], torch.full_like(rows[~keep], -1))
    assert torch.allclose(projs[rows[keep]], full_projs[full_rows[keep]], atol=1e-5)


def test_two_pass_fine_search_keeps_the_posterior_of_the_full_search(two_state, monkeypatch):
    """One global classification iteration from the true maps and classes (limit 15 shells, the
    noise estimated by a first iteration), with the pre-pass (on 7.5 shells) and without: the
    rotations it leaves out carry almost no posterior, so particles keep their class, pose and
    class posteriors, and the maps are the same; and it scores a fraction of the rotations (19%,
    measured) on all frequencies."""
    import hetplugin.core.multiclass as mc
    from hetplugin.core.mrc import read_volume
    from hetplugin.core.rotations import angular_distance_deg

    truth = read_particles(two_state / "truth_particles.star")
    refiner = _refiner_on(two_state, iterations=20, alignment_iterations=0, realign_iterations=0)
    maps = np.stack([refiner._lowpassed(read_volume(two_state / f"truth_class_00{j + 1}.mrc")[0], 8.0)
                     for j in (0, 1)])
    def true_state(iteration):
        state = refiner.initial_state(maps)
        state.classes = np.asarray(truth.class_number) - 1
        state.iteration, state.r_current = iteration, 15.0
        return state

    monkeypatch.setattr(mc, "PREPASS_MIN_SHELLS", np.inf)
    sigma2 = refiner.iterate(true_state(1)).sigma2
    results, kept = {}, []
    original = mc.significant_rotations

    def counting(*args):
        keep = original(*args)
        kept.append(float(keep.float().mean()))
        return keep

    monkeypatch.setattr(mc, "significant_rotations", counting)
    for label, min_shells in (("one pass", np.inf), ("two passes", 4.0)):
        monkeypatch.setattr(mc, "PREPASS_MIN_SHELLS", min_shells)
        state = true_state(2)
        state.sigma2 = sigma2
        results[label] = refiner.iterate(state)
        assert results[label].history[-1]["r_current"] == 15.0
    assert refiner.opt.global_iterations >= 3  # so that iteration 3 searched globally
    one, two = results["one pass"], results["two passes"]
    assert kept and max(kept) < 0.35, kept
    assert np.mean(one.classes == two.classes) >= 0.995
    assert np.abs(one.posteriors - two.posteriors).max() < 0.02
    # the best of near-identical candidates (where neighbouring coarse poses' fine grids meet, a
    # few hundredths of a degree apart) may differ with the order of summation
    agree = angular_distance_deg(one.rotations, two.rotations) < 0.5
    assert np.mean(agree) >= 0.99, np.mean(agree)
    for j in (0, 1):
        assert np.corrcoef(one.maps[j].ravel(), two.maps[j].ravel())[0, 1] > 0.999
