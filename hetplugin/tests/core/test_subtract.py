"""Signal subtraction on simulated data with the truth known (hetplugin.core.subtract).

The simulator (hetplugin.core.simulate_subtract) projects the kept domain and the rest
ANALYTICALLY (Gaussian atoms), so the truth does not share the engine's Fourier projector.
"""
from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from hetplugin.core.fourier import recentre_volume
from hetplugin.tests.core.maps import corr, crop_volume, lowpass_sharp
from hetplugin.core import cli
from hetplugin.core.dataset import ParticleDataset
from hetplugin.core.mrc import StackReader, read_header, read_volume, write_volume
from hetplugin.core.projection import frequency_mask, prepare_volume, project_ft
from hetplugin.core.fourier import half_plane_coords
from hetplugin.core.reconstruct import backproject_dataset
from hetplugin.core.rotations import random_rotations
from hetplugin.core.simulate_subtract import simulate_subtraction
from hetplugin.core.starfile import read_particles, read_star, write_star
from hetplugin.core import subtract as subtract_module
from hetplugin.core.subtract import (CENTRE, ORIGINAL_NAME, SCALE, SHIFT, SubtractOptions, _sample, revert_particles,
                                     shell_scale_label, subtract_particles)
from hetplugin.core.projection import slice_grid

PX = 2.0


def quiet(_msg: str) -> None:
    pass


def images_of(star) -> tuple[np.ndarray, object]:
    t = read_particles(star)
    with StackReader(t.image_path, t.image_index) as reader:
        return reader.read(np.arange(len(t))), t


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """One state, SNR 0.1, unit contrast."""
    return simulate_subtraction(tmp_path_factory.mktemp("noisy"), n_particles=300, snr=0.1, seed=11)


@pytest.fixture(scope="module")
def contrast(tmp_path_factory):
    """One state, no noise, per-particle contrast c_i ~ 1 + N(0, 0.25)."""
    return simulate_subtraction(tmp_path_factory.mktemp("contrast"), n_particles=200, snr=None, seed=12,
                                contrast_sd=0.25)


@pytest.fixture(scope="module")
def two_state(tmp_path_factory):
    """The mobile domain (outside the mask) closes in 30% of the particles; SNR 0.1; true classes written."""
    return simulate_subtraction(tmp_path_factory.mktemp("two_state"), n_particles=300, snr=0.1, seed=13,
                                n_states=2, closed_fraction=0.3, write_class_numbers=True)


@pytest.fixture(scope="module")
def noisy_subtracted(noisy, tmp_path_factory):
    out = tmp_path_factory.mktemp("noisy_out")
    summary = subtract_particles(read_particles(noisy.star), noisy.maps, noisy.mask, out, SubtractOptions(), log=quiet)
    return out, summary


# ------------------------------------------------------------------ accuracy
def test_sampler_matches_project_ft():
    box, pad = 32, 2
    vol = torch.randn(box, box, box)
    grid_ft = prepare_volume(vol, pad)
    k = torch.as_tensor(half_plane_coords(box), dtype=torch.float32)[torch.as_tensor(frequency_mask(box))]
    rot = torch.as_tensor(random_rotations(200, np.random.default_rng(0)), dtype=torch.float32)
    ref = project_ft(grid_ft, rot, k, pad)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 3):           # 3: the points are split over threads (200 x 400 > 65536)
            torch.set_num_threads(n_threads)
            ours = _sample(torch.cat([slice_grid(grid_ft), 2 * slice_grid(grid_ft)], 1), rot, k, pad)
            assert torch.allclose(ours[0], ref, atol=1e-5 * float(ref.abs().max()))
            assert torch.allclose(ours[1], 2 * ref, atol=2e-5 * float(ref.abs().max()))
    finally:
        torch.set_num_threads(threads)


def test_noise_free_map_leaves_kept_signal_plus_noise(noisy, noisy_subtracted):
    out, summary = noisy_subtracted
    x, table = images_of(out / "particles_subtracted.star")
    residual = np.linalg.norm(x - (noisy.kept + noisy.noise)) / np.linalg.norm(noisy.rest)
    print(f"\nresidual ||X' - (kept + noise)|| / ||truth subtracted|| = {residual:.4f}")
    assert residual < 0.02
    # the noise is untouched: what is left minus the kept truth is the original noise
    left = x - noisy.kept
    assert np.corrcoef(left.ravel(), noisy.noise.ravel())[0, 1] > 0.999
    assert table.has_ctf and np.allclose(table.defocus_u_A, read_particles(noisy.star).defocus_u_A)
    assert np.array_equal(table.columns["rlnImageId"], np.arange(1, len(table) + 1))
    assert np.all(table.columns[SCALE] == 1.0)
    assert summary["n_particles"] == 300


def test_mask_meanings_are_complementary(noisy, noisy_subtracted, tmp_path):
    subtract_particles(read_particles(noisy.star), noisy.maps, 1.0 - noisy.mask, tmp_path,
                       SubtractOptions(mask_meaning="subtract"), log=quiet)
    a, _ = images_of(noisy_subtracted[0] / "particles_subtracted.star")
    b, _ = images_of(tmp_path / "particles_subtracted.star")
    assert np.allclose(a, b, atol=1e-4 * np.abs(a).max())


def test_lowpass_map_still_subtracts(noisy, noisy_subtracted, tmp_path):
    subtract_particles(read_particles(noisy.star), noisy.maps, noisy.mask, tmp_path,
                       SubtractOptions(lowpass_A=12.0), log=quiet)
    x, _ = images_of(tmp_path / "particles_subtracted.star")
    y, _ = images_of(noisy_subtracted[0] / "particles_subtracted.star")
    ideal = noisy.kept + noisy.noise
    residual = np.linalg.norm(x - ideal) / np.linalg.norm(noisy.rest)
    unfiltered = np.linalg.norm(y - ideal) / np.linalg.norm(noisy.rest)
    assert unfiltered < residual < 0.5        # the rest's fine detail stays, its bulk is gone


def test_scale_recovers_contrast_factor(contrast, tmp_path):
    table = read_particles(contrast.star)
    subtract_particles(table, contrast.maps, contrast.mask, tmp_path / "p", SubtractOptions(scale="particle"), log=quiet)
    x, out = images_of(tmp_path / "p" / "particles_subtracted.star")
    s = out.columns[SCALE]
    rel = np.abs(s - contrast.contrast) / contrast.contrast
    print(f"\nper-particle scale vs true contrast: max rel. error {rel.max():.4f}, median {np.median(rel):.5f}, "
          f"contrast range {contrast.contrast.min():.2f}..{contrast.contrast.max():.2f}")
    assert rel.max() < 0.02
    fitted = np.linalg.norm(x - contrast.kept) / np.linalg.norm(contrast.rest)
    subtract_particles(table, contrast.maps, contrast.mask, tmp_path / "n", SubtractOptions(), log=quiet)
    y, _ = images_of(tmp_path / "n" / "particles_subtracted.star")
    plain = np.linalg.norm(y - contrast.kept) / np.linalg.norm(contrast.rest)
    print(f"residual with scale fitting {fitted:.4f}, without {plain:.4f}")
    assert fitted < 0.02 < plain
    # per resolution band: every band recovers the particle's factor
    subtract_particles(table, contrast.maps, contrast.mask, tmp_path / "s",
                       SubtractOptions(scale="shell", scale_shells=3), log=quiet)
    _, shells = images_of(tmp_path / "s" / "particles_subtracted.star")
    for band in (1, 2):
        rel = np.abs(shells.columns[shell_scale_label(band)] - contrast.contrast) / contrast.contrast
        assert np.median(rel) < 0.03, band


def test_scale_with_noise_is_unbiased(noisy, tmp_path):
    subtract_particles(read_particles(noisy.star), noisy.maps, noisy.mask, tmp_path, SubtractOptions(scale="particle"),
                       log=quiet)
    s = read_particles(tmp_path / "particles_subtracted.star").columns[SCALE]
    assert abs(np.mean(s) - 1.0) < 0.03 and np.std(s) < 0.2


def test_class_maps_go_below_the_consensus_floor(two_state, tmp_path):
    table = read_particles(two_state.star)
    weights = np.bincount(two_state.states, minlength=2) / len(two_state.states)
    consensus = np.tensordot(weights, two_state.maps, 1)
    ideal = two_state.kept + two_state.noise
    kept_norm = np.linalg.norm(two_state.kept)
    subtract_particles(table, consensus, two_state.mask, tmp_path / "c", SubtractOptions(), log=quiet)
    x, _ = images_of(tmp_path / "c" / "particles_subtracted.star")
    floor = np.linalg.norm(x - ideal) / kept_norm
    summary = subtract_particles(table, two_state.maps, two_state.mask, tmp_path / "k", SubtractOptions(), log=quiet)
    y, _ = images_of(tmp_path / "k" / "particles_subtracted.star")
    per_class = np.linalg.norm(y - ideal) / kept_norm
    print(f"\n||X' - ideal|| / ||kept||: exact consensus map {floor:.3f}, own class map {per_class:.4f}")
    assert summary["by_class"]
    assert floor > 0.2
    assert per_class < 0.25 * floor and per_class < 0.05
    few = table.subset(np.arange(10))
    with pytest.raises(ValueError, match="no rlnClassNumber"):
        subtract_particles(dataclasses.replace(few, class_number=None), two_state.maps, two_state.mask,
                           tmp_path / "bad", SubtractOptions(), log=quiet)
    with pytest.raises(ValueError, match="outside 1..2"):
        subtract_particles(dataclasses.replace(few, class_number=np.full(10, 3)), two_state.maps, two_state.mask,
                           tmp_path / "bad", SubtractOptions(), log=quiet)


# ------------------------------------------------------------------ recentring, windowing, revert
def test_recentred_particles_reconstruct_the_kept_region_centred(contrast, tmp_path):
    new_box = 48
    summary = subtract_particles(read_particles(contrast.star), contrast.maps, contrast.mask, tmp_path,
                                 SubtractOptions(recentre=True, new_box=new_box), log=quiet)
    centre_px = np.asarray(summary["centre_A"]) / PX
    assert np.linalg.norm(centre_px) > 8          # the kept domain sits well off the box centre
    table = read_particles(tmp_path / "particles_subtracted.star")
    assert read_header(table.image_path[0]).nx == new_box and np.all(table.image_size == new_box)
    shift = np.stack([table.columns[SHIFT[0]], table.columns[SHIFT[1]]], 1) / PX
    assert np.allclose(shift, np.round(shift)) and np.abs(table.shift_x_A).max() <= PX / 2 + 1e-9
    ds = ParticleDataset(table)
    r_max = 14.0
    rec = backproject_dataset(ds, np.arange(len(ds)), r_max=r_max).reconstruct()
    truth = recentre_volume(contrast.kept_map, centre_px, new_box)
    c = corr(lowpass_sharp(rec, r_max), lowpass_sharp(truth, r_max))
    off_centre = corr(lowpass_sharp(rec, r_max),
                      lowpass_sharp(crop_volume(torch.as_tensor(contrast.kept_map), new_box), r_max))
    density = np.maximum(rec.numpy(), 0)
    ax = np.arange(new_box) - new_box // 2
    com = [float((density.sum(axis=tuple(a for a in range(3) if a != d)) * ax).sum() / density.sum())
           for d in (2, 1, 0)]
    print(f"\nrecentred reconstruction: correlation with the shifted truth {c:.4f} (unshifted truth {off_centre:.3f}); "
          f"centre of mass {np.round(com, 3)} px")
    assert c > 0.95 and off_centre < 0.5
    assert np.abs(com).max() < 0.5
    ds.close()


def test_revert_restores_original_images_and_alignment(contrast, tmp_path):
    original = read_particles(contrast.star)
    subtract_particles(original, contrast.maps, contrast.mask, tmp_path / "sub",
                       SubtractOptions(recentre=True, new_box=48, precision="float16"), log=quiet)
    subtracted = read_particles(tmp_path / "sub" / "particles_subtracted.star")
    assert ORIGINAL_NAME in subtracted.columns and all(lab in subtracted.columns for lab in CENTRE)
    back = revert_particles(subtracted, tmp_path / "rev" / "particles_reverted.star", log=quiet)
    reread = read_particles(tmp_path / "rev" / "particles_reverted.star")
    for t in (back, reread):
        assert np.array_equal(t.image_path, original.image_path) and np.array_equal(t.image_index, original.image_index)
        for field in ("rot_deg", "tilt_deg", "psi_deg", "shift_x_A", "shift_y_A", "defocus_u_A", "defocus_v_A",
                      "defocus_angle_deg"):
            assert np.array_equal(getattr(t, field), getattr(original, field)), field
        assert np.all(t.image_size == 64)
        assert ORIGINAL_NAME not in t.columns and SCALE not in t.columns
    a, _ = images_of(contrast.star)
    b, _ = images_of(tmp_path / "rev" / "particles_reverted.star")
    assert np.array_equal(a, b)
    blocks = read_star(tmp_path / "rev" / "particles_reverted.star")
    assert list(blocks["optics"]["rlnImageSize"]) == [64]


def test_revert_carries_a_changed_alignment(contrast, tmp_path):
    original = read_particles(contrast.star)
    subtract_particles(original, contrast.maps, contrast.mask, tmp_path / "sub", SubtractOptions(recentre=True),
                       log=quiet)
    blocks = read_star(tmp_path / "sub" / "particles_subtracted.star")
    delta = np.linspace(-1.5, 1.5, len(original))
    blocks["particles"]["rlnOriginXAngst"] = blocks["particles"]["rlnOriginXAngst"] + delta   # a "refinement"
    write_star(tmp_path / "refined.star", blocks)
    back = revert_particles(read_particles(tmp_path / "refined.star"), tmp_path / "rev.star", log=quiet)
    assert np.allclose(back.shift_x_A, original.shift_x_A + delta, atol=1e-9)
    assert np.allclose(back.shift_y_A, original.shift_y_A, atol=1e-9)
    assert np.array_equal(back.image_path, original.image_path)


def test_float16_and_windowing(noisy, noisy_subtracted, tmp_path):
    full, _ = images_of(noisy_subtracted[0] / "particles_subtracted.star")
    subtract_particles(read_particles(noisy.star), noisy.maps, noisy.mask, tmp_path / "h",
                       SubtractOptions(precision="float16", new_box=40, stack_size=128), log=quiet)
    x, t = images_of(tmp_path / "h" / "particles_subtracted.star")
    header = read_header(t.image_path[0])
    assert header.mode == 12 and header.nx == 40
    assert len(set(t.image_path.tolist())) == 3                   # 300 images in stacks of 128
    window = full[:, 32 - 20:32 + 20, 32 - 20:32 + 20]
    assert np.abs(x - window).max() < 2e-3 * np.abs(window).max()  # float16 rounding only
    size16 = sum(read_header(p).nx ** 2 * read_header(p).nz * 2 for p in set(t.image_path.tolist()))
    assert size16 == 300 * 40 * 40 * 2
    assert np.allclose(t.shift_x_A, read_particles(noisy.star).shift_x_A)   # windowing keeps the origins


# ------------------------------------------------------------------ worker processes
def test_worker_processes_give_the_one_process_result(noisy, tmp_path):
    """Two forked workers (ranges of whole batches, crossing stack boundaries) write what one process writes."""
    table = read_particles(noisy.star)
    opts = dict(scale="shell", scale_shells=3, recentre=True, new_box=48, batch_size=50, stack_size=128)
    logs = {1: [], 2: []}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)            # as in each worker (and fast on a loaded machine)
        subtract_particles(table, noisy.maps, noisy.mask, tmp_path / "1", SubtractOptions(workers=1, **opts),
                           log=logs[1].append)
    finally:
        torch.set_num_threads(threads)
    subtract_particles(table, noisy.maps, noisy.mask, tmp_path / "2", SubtractOptions(workers=2, **opts),
                       log=logs[2].append)
    text = {w: "\n".join(lines) for w, lines in logs.items()}
    assert "2 worker processes" in text[2] and "worker processes" not in text[1]
    assert "subtract: 300/300 particles (100%)" in text[2]
    (x, one), (y, two) = (images_of(tmp_path / str(w) / "particles_subtracted.star") for w in (1, 2))
    assert np.array_equal(x, y)                                    # the same batches, each on one thread
    assert np.array_equal(one.image_index, two.image_index)
    assert [os.path.basename(p) for p in one.image_path] == [os.path.basename(p) for p in two.image_path]
    for label in (SCALE, shell_scale_label(1), shell_scale_label(3), SHIFT[0], "rlnOriginXAngst", ORIGINAL_NAME):
        assert np.array_equal(one.columns[label], two.columns[label]), label
    assert np.ptp(one.columns[shell_scale_label(1)]) > 0          # scales were fitted, per particle
    stacks = sorted(set(one.image_path.tolist())), sorted(set(two.image_path.tolist()))
    assert len(stacks[0]) == 3                                     # 300 images in stacks of 128
    for a, b in zip(*stacks):
        ha, hb = read_header(a), read_header(b)
        assert (ha.nx, ha.nz) == (hb.nx, hb.nz)
        with open(a, "rb") as fa, open(b, "rb") as fb:                # dmin, dmax, dmean (bytes 76-88), rms (216)
            head_a, head_b = np.frombuffer(fa.read(1024), np.float32), np.frombuffer(fb.read(1024), np.float32)
        assert np.allclose(head_a[[19, 20, 21, 54]], head_b[[19, 20, 21, 54]], rtol=1e-5)
        data = x[[i for i, p in enumerate(one.image_path) if p == a]]
        assert np.isclose(head_a[21], data.mean(), rtol=1e-4, atol=1e-6)
        assert np.isclose(head_a[54], data.std(), rtol=1e-4)


def test_a_failing_worker_fails_the_subtraction(noisy, tmp_path, monkeypatch):
    """An error or a killed worker process stops the others and the run: no STAR file is written,
    the half-written stacks are removed, and a former run's results in the folder go too."""
    table = read_particles(noisy.star)
    former = subtract_particles(table.subset(np.arange(20)), noisy.maps, noisy.mask, tmp_path / "bad_value",
                                SubtractOptions(batch_size=50), log=quiet)
    assert Path(former["particles_star"]).exists()
    batch = subtract_module._subtract_batch

    def bad_value():
        raise ValueError("particle 151 is bad")

    def bug():
        return 1 / 0

    def killed():
        os.kill(os.getpid(), signal.SIGKILL)

    cases = [(bad_value, ValueError, "particle 151 is bad"), (bug, RuntimeError, "ZeroDivisionError"),
             (killed, RuntimeError, r"particles 151\.\.300\) ended without a result \(killed by SIGKILL")]
    for fail, error, message in cases:
        def failing_batch(plan, rows):
            if rows[0] >= 150:              # the second worker's range
                fail()
            return batch(plan, rows)
        monkeypatch.setattr(subtract_module, "_subtract_batch", failing_batch)
        with pytest.raises(error, match=message):
            subtract_particles(table, noisy.maps, noisy.mask, tmp_path / fail.__name__,
                               SubtractOptions(workers=2, batch_size=50), log=quiet)
        assert not (tmp_path / fail.__name__ / "particles_subtracted.star").exists()
        assert not (tmp_path / fail.__name__ / "subtract.json").exists()
        assert not list((tmp_path / fail.__name__ / "Particles").glob("*.mrcs"))


# ------------------------------------------------------------------ bad input
def test_bad_inputs_are_refused(noisy, tmp_path):
    table = read_particles(noisy.star).subset(np.arange(8))
    m, v = noisy.mask, noisy.maps
    bad = [
        (dict(mask=m * 1.5), "lie in"),
        (dict(mask=np.zeros_like(m)), "empty"),
        (dict(mask=np.ones_like(m)), "one everywhere"),
        (dict(options=SubtractOptions(new_box=47)), "even"),
        (dict(options=SubtractOptions(new_box=80)), "larger"),
        (dict(maps=v[:, :48, :48, :48]), "resample"),
        (dict(mask=m[:48, :48, :48]), "resample"),
        (dict(options=SubtractOptions(mask_meaning="inside")), "mask meaning"),
        (dict(map_pixels=[3.0]), "A/px"),
    ]
    for change, message in bad:
        args = dict(table=table, maps=v, mask=m, out_dir=tmp_path / "x", options=SubtractOptions(), log=quiet)
        args.update(change)
        with pytest.raises(ValueError, match=message):
            subtract_particles(**args)
    blocks = read_star(noisy.star)
    for labels, message in ((("rlnDefocusU",), "no CTF"), (("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"), "no alignment")):
        stripped = {k: dict(b) for k, b in blocks.items()}
        for label in labels:
            stripped["particles"].pop(label)
        write_star(tmp_path / "stripped.star", stripped)
        with pytest.raises(ValueError, match=message):
            subtract_particles(read_particles(tmp_path / "stripped.star"), v, m, tmp_path / "y", log=quiet)


def test_command_line_subtract_and_revert(noisy, tmp_path, capsys):
    write_volume(tmp_path / "map.mrc", noisy.maps[0], PX)
    write_volume(tmp_path / "mask.mrc", noisy.mask, PX)
    rc = cli.main(["subtract", "--particles", str(noisy.star), "--map", str(tmp_path / "map.mrc"),
                   "--mask", str(tmp_path / "mask.mrc"), "--mask-meaning", "keep", "--out", str(tmp_path / "s"),
                   "--recentre", "--new-box", "48", "--batch-size", "100", "--threads", "1"])
    assert rc == 0
    log = capsys.readouterr().out
    assert "300/300 particles (100%)" in log and "recentring on" in log
    rc = cli.main(["revert-subtraction", "--particles", str(tmp_path / "s" / "particles_subtracted.star"),
                   "--out", str(tmp_path / "r")])
    assert rc == 0
    a, _ = images_of(noisy.star)
    b, t = images_of(tmp_path / "r" / "particles_reverted.star")
    assert np.array_equal(a, b) and np.array_equal(t.shift_x_A, read_particles(noisy.star).shift_x_A)
    write_volume(tmp_path / "mask_bad.mrc", noisy.mask * 2, PX)
    rc = cli.main(["subtract", "--particles", str(noisy.star), "--map", str(tmp_path / "map.mrc"),
                   "--mask", str(tmp_path / "mask_bad.mrc"), "--mask-meaning", "keep", "--out", str(tmp_path / "b")])
    assert rc == 2
    assert "[0, 1]" in capsys.readouterr().err
    vol, px = read_volume(tmp_path / "map.mrc")
    assert px == PX
