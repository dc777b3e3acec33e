"""Focused refinement on simulated data with the truth known (hetplugin.core.focused and the
multiclass engine with one masked class and a local search).

The particle has two domains; the kept one turns in every particle by up to 20 degrees about
its own centre relative to the other (``kept_wobble_deg``), so the particles' consensus poses
are wrong for it by ~10 degrees (median). After subtracting the other domain, a focused
refinement from the consensus poses must find the kept domain's own poses and a sharper map.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hetplugin.core import cli
from hetplugin.core.focused import SMALL_REGION_KDA, focus_report, focus_warnings
from hetplugin.core.fsc import fsc
from hetplugin.core.iterations import refined_step
from hetplugin.core.mrc import read_volume
from hetplugin.core.rotations import angular_distance_deg, euler_to_matrix
from hetplugin.core.simulate_subtract import complex_maps, kept_mask, make_flexible, simulate_subtraction
from hetplugin.core.starfile import read_particles

BOX, PX = 40, 3.2
DA_PER_ATOM = 110.0     # the phantom's pseudo-atoms stand for residues


def pose_errors(star, truth) -> tuple[np.ndarray, np.ndarray]:
    """Per particle: angle (deg) between the STAR's rotation and the kept domain's true one, and
    the origin error (px)."""
    t = read_particles(star)
    rot = euler_to_matrix(t.rot_deg, t.tilt_deg, t.psi_deg)
    org = np.stack([t.shift_x_A, t.shift_y_A], 1) / PX
    return angular_distance_deg(rot, truth.kept_rotations), np.linalg.norm(org - truth.kept_origins_px, axis=1)


def masked_fsc(volume, truth) -> np.ndarray:
    return np.asarray(fsc(torch.as_tensor(volume * truth.mask), torch.as_tensor(truth.kept_map * truth.mask)))


def test_focus_report_measures_the_region():
    model = make_flexible(BOX, seed=2, atoms_per_domain=300)
    kept, _, full = complex_maps(model)
    report = focus_report(full[0], kept_mask(model), PX)
    expected_kDa = len(model.kept.radii) * DA_PER_ATOM / 1000
    assert 0.7 * expected_kDa < report["mass_kDa"] < 1.5 * expected_kDa
    # the kept domain is about half the particle
    assert 0.3 < report["signal_fraction"] < 0.7
    centre_A = np.asarray(model.kept.centres).mean(0) * PX
    assert np.linalg.norm(np.asarray(report["centre_A"]) - centre_A) < 2 * PX
    assert abs(report["centre_offset_A"] - np.linalg.norm(centre_A)) < 2 * PX
    # an empty mask holds nothing
    assert focus_report(full[0], np.zeros_like(full[0]), PX)["mass_kDa"] == 0.0


def test_focus_warnings_say_what_is_wrong():
    region = dict(mass_kDa=200.0, signal_fraction=0.4, centre_offset_A=5.0, box_A=200.0)
    assert focus_warnings(region, subtracted=True) == []
    small = focus_warnings(dict(region, mass_kDa=SMALL_REGION_KDA / 2), subtracted=True)
    assert len(small) == 1 and "too little signal" in small[0]
    not_subtracted = focus_warnings(region, subtracted=False)
    assert len(not_subtracted) == 1 and "Subtract" in not_subtracted[0]
    weak = focus_warnings(dict(region, signal_fraction=0.05), subtracted=None)
    assert len(weak) == 1 and "5% of the map's signal" in weak[0]
    off = focus_warnings(dict(region, centre_offset_A=60.0), subtracted=True)
    assert len(off) == 1 and "Recentre" in off[0]


def test_the_wobble_turns_the_kept_domain_about_its_centre(tmp_path):
    """The kept domain's true poses: its atoms land where the turned domain's do."""
    t = simulate_subtraction(tmp_path, n_particles=20, box=BOX, pixel_size_A=PX, snr=None, seed=4,
                             kept_wobble_deg=20.0, model=make_flexible(BOX, seed=2, atoms_per_domain=300))
    turned = angular_distance_deg(t.kept_rotations, t.rotations)
    assert turned.max() <= 20.0 + 1e-6 and np.median(turned) > 5.0
    # the domain's centre is where the complex's pose puts it (it turns about its centre)
    g = t.model.kept.centres.mean(0)
    at_complex = np.einsum("nij,j->ni", t.rotations, g)[:, :2] - t.origins_px
    at_domain = np.einsum("nij,j->ni", t.kept_rotations, g)[:, :2] - t.kept_origins_px
    np.testing.assert_allclose(at_domain, at_complex, atol=1e-9)
    # and without a wobble the poses are the particles'
    t0 = simulate_subtraction(tmp_path / "still", n_particles=5, box=BOX, pixel_size_A=PX, snr=None, seed=4,
                              model=make_flexible(BOX, seed=2, atoms_per_domain=300))
    np.testing.assert_array_equal(t0.kept_rotations, t0.rotations)


def test_refined_step_halves_once_poses_settle():
    entry = lambda change, res, step=None: dict(mean_angle_change_deg=change, resolution_A=[res],
                                                **({} if step is None else {"angular_step_deg": step}))
    moving = [entry(5.0, 10.0, 4.0), entry(3.0, 8.0, 4.0)]
    assert refined_step(moving, 4.0, 1.0, 0.5) == 4.0            # resolution still improving
    settled = [entry(3.0, 8.0, 4.0), entry(2.0, 7.9, 4.0)]
    assert refined_step(settled, 4.0, 1.0, 0.5) == 2.0
    assert refined_step(settled, 4.0, None, 0.5) == 4.0          # off
    at_finest = [entry(1.0, 7.0, 1.0), entry(0.2, 7.0, 1.0)]
    assert refined_step(at_finest, 4.0, 1.0, 0.5) == 1.0
    assert refined_step([entry(2.0, 7.9, 2.0), entry(2.5, 7.9, 2.0)], 4.0, 1.0, 0.5) == 2.0   # still moving


@pytest.fixture(scope="module")
def focused_run(tmp_path_factory):
    """Simulate (600 particles, SNR 5, wobble 20 deg), subtract the other domain with the consensus
    map, reconstruct at the consensus poses, and run the focused refinement."""
    root = tmp_path_factory.mktemp("focused")
    truth = simulate_subtraction(root / "sim", n_particles=600, box=BOX, pixel_size_A=PX, snr=5.0, seed=2,
                                 kept_wobble_deg=20.0, model=make_flexible(BOX, seed=2, atoms_per_domain=300))
    sub = root / "sub"
    assert cli.main(["subtract", "--particles", str(truth.star), "--map", str(truth.paths["consensus"]),
                     "--mask", str(truth.paths["mask"]), "--mask-meaning", "keep", "--out", str(sub),
                     "--threads", "2"]) == 0
    star = sub / "particles_subtracted.star"
    assert cli.main(["reconstruct", "--particles", str(star), "--out", str(root / "consensus"),
                     "--threads", "2"]) == 0
    out = root / "focused"
    assert cli.main(["multiclass", "--particles", str(star), "--reference", str(truth.paths["consensus"]),
                     "--mask", str(truth.paths["mask"]), "--classes", "1", "--local-search", "20",
                     "--angular-step", "4", "--initial-lowpass", "15", "--iterations", "6", "--min-class-size", "1",
                     "--final-reconstruction", "--out", str(out), "--threads", "2"]) == 0
    return truth, star, root / "consensus" / "reconstruction.mrc", out


def test_focused_refinement_finds_the_domain_poses(focused_run):
    truth, star, _, out = focused_run
    before, _ = pose_errors(star, truth)
    after, shift_after = pose_errors(out / "particles.star", truth)
    # the region's own poses, not the complex's: measured median 9.8 -> 6.7 deg (the precision a
    # 33 kDa domain allows at 6.7 A)
    assert np.median(before) > 8.0
    assert np.median(after) < 0.8 * np.median(before)
    assert np.median(shift_after) < 1.0
    model = json.loads((out / "model.json").read_text())
    assert model["classes"][0]["size"] == 600 and len(model["history"]) >= 3


def test_focused_refinement_sharpens_the_region(focused_run):
    truth, _, consensus_map, out = focused_run
    at_consensus = masked_fsc(read_volume(consensus_map)[0], truth)
    focused = masked_fsc(read_volume(out / "class_001.mrc")[0], truth)
    # the band where the wobble blurs the consensus reconstruction, 10 A to 7 A: measured mean FSC
    # against the truth 0.67 -> 0.80
    shells = np.arange(len(focused))
    band = (shells >= BOX * PX / 10.0) & (shells <= BOX * PX / 7.0)
    assert focused[band].mean() > at_consensus[band].mean() + 0.08
    # half maps come with the map, masked like it
    for h in (1, 2):
        half, _ = read_volume(out / f"class_001_half{h}.mrc")
        assert half.shape == (BOX,) * 3 and float(np.abs(half[truth.mask == 0]).max()) == 0.0



def test_final_reconstruction_keeps_the_frequencies_beyond_the_e_step(focused_run, tmp_path):
    """With the E-step held to 12 A, the iterations' map stops there; the final reconstruction at
    the best poses carries the data's information on to Nyquist, and reports its resolution."""
    truth, star, _, _ = focused_run
    runs = {}
    for name, extra in (("plain", []), ("final", ["--final-reconstruction"])):
        out = tmp_path / name
        assert cli.main(["multiclass", "--particles", str(star), "--reference", str(truth.paths["consensus"]),
                         "--mask", str(truth.paths["mask"]), "--classes", "1", "--local-search", "8",
                         "--angular-step", "4", "--initial-lowpass", "15", "--iterations", "2",
                         "--resolution-limit", "12", "--min-class-size", "1", "--out", str(out),
                         "--threads", "2"] + extra) == 0
        runs[name] = (masked_fsc(read_volume(out / "class_001.mrc")[0], truth),
                      json.loads((out / "model.json").read_text())["classes"][0]["resolution_A"])
    shells = np.arange(len(runs["plain"][0]))
    beyond = (shells > BOX * PX / 12.0 + 2) & (shells <= BOX * PX / 8.0)
    # (the mask spreads a little of the lower shells into these: not exactly zero)
    assert np.abs(runs["plain"][0][beyond]).max() < 0.2
    assert runs["final"][0][beyond].mean() > 0.5
    assert runs["final"][1] < runs["plain"][1] - 1.0
