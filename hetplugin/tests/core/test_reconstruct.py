"""Reconstruction end to end through the core's command line (simulate -> reconstruct).

No RELION needed (the peer comparison with relion_reconstruct is in
``hetplugin/tests/test_relion_peer.py``). Every number asserted here was measured
on this kind of machine; the comment next to each threshold gives the value seen.
"""
import json

import mrcfile
import numpy as np
import pytest

from hetplugin.core import cli
from hetplugin.core.masks import spherical_mask
from hetplugin.core.mrc import write_stack, write_volume
from hetplugin.core.simulate import make_class_volumes
from hetplugin.core.starfile import new_particle_table, write_particles


def _run(args, capsys=None):
    """Run ``python -m hetplugin.core ARGS`` in-process; fail with its output on a non-zero exit."""
    code = cli.main([str(a) for a in args])
    if code != 0:
        out = capsys.readouterr() if capsys is not None else None
        pytest.fail(f"hetplugin.core {' '.join(map(str, args))} exited {code}\n{out}")


def _masked_corr(a, b, radius_frac=0.4):
    """Pearson correlation of two cubes inside a soft sphere of radius ``radius_frac * box``."""
    mask = spherical_mask(a.shape[0], radius_frac * a.shape[0], edge_px=3)
    keep = mask > 0
    return float(np.corrcoef((a * mask)[keep], (b * mask)[keep])[0, 1])


def _read(path):
    with mrcfile.open(path, permissive=True) as m:
        return np.asarray(m.data, dtype=np.float64)


def _shells(resolution_A, box, pixel_size_A):
    """Resolution in A -> frequency in shells (index units of the box)."""
    return box * pixel_size_A / resolution_A


def test_noise_free_ctf_free_reconstruction_matches_truth(tmp_path, capsys):
    box, px = 32, 3.0
    sim, rec = tmp_path / "sim", tmp_path / "rec"
    # SNR 1e12: the added noise is ~1e-6 of the signal, i.e. noise-free
    _run(["simulate", "--out", sim, "--particles", 400, "--classes", 1, "--box", box, "--pixel-size", px,
          "--snr", 1e12, "--no-ctf", "--seed", 1])
    _run(["reconstruct", "--particles", sim / "particles.star", "--out", rec, "--no-ctf",
          "--truth", sim / "truth_class_001.mrc"])
    truth, full = _read(sim / "truth_class_001.mrc"), _read(rec / "reconstruction.mrc")
    assert full.shape == (box,) * 3
    with mrcfile.open(rec / "reconstruction.mrc") as m:
        assert float(m.voxel_size.x) == pytest.approx(px)
    corr = _masked_corr(full, truth)
    halves = _masked_corr(_read(rec / "half1.mrc"), _read(rec / "half2.mrc"))
    print(f"noise-free, CTF-free: reconstruction vs truth {corr:.5f}, half maps {halves:.5f}")
    assert corr > 0.99, corr                         # measured 0.994 (half maps 0.9999)
    # the two half maps agree too, and the scale is the truth's (not just the shape)
    assert halves > 0.99, halves
    mask = spherical_mask(box, 0.4 * box, 3)
    scale = float(np.sum(full * truth * mask) / np.sum(truth * truth * mask))
    assert scale == pytest.approx(1.0, abs=0.05), scale
    report = json.loads((rec / "fsc.json").read_text())
    assert report["n_particles"] == 400 and report["box"] == box


def test_half_set_fsc_0143_agrees_with_fsc_against_truth_at_05(tmp_path, capsys):
    """With CTF and noise: the 'gold standard' estimate (half-set FSC = 0.143) lands within two
    shells of the true resolution (FSC of the full map against the truth = 0.5)."""
    box, px = 48, 3.5
    sim, rec = tmp_path / "sim", tmp_path / "rec"
    _run(["simulate", "--out", sim, "--particles", 800, "--classes", 1, "--box", box, "--pixel-size", px,
          "--snr", 0.05, "--seed", 3])
    _run(["reconstruct", "--particles", sim / "particles.star", "--out", rec,
          "--truth", sim / "truth_class_001.mrc"])
    report = json.loads((rec / "fsc.json").read_text())
    half = _shells(report["resolution_0143_A"], box, px)
    truth = _shells(report["resolution_truth_05_A"], box, px)
    corr = _masked_corr(_read(rec / "reconstruction.mrc"), _read(sim / "truth_class_001.mrc"))
    print(f"half-set FSC 0.143 at {half:.2f} shells, FSC vs truth 0.5 at {truth:.2f} shells, "
          f"map vs truth {corr:.4f}")
    # meaningful only when the resolution is set by the noise, well inside Nyquist (24 shells)
    assert 4 < half < box / 2 - 4, half              # measured 16.8
    assert 4 < truth < box / 2 - 4, truth            # measured 17.3
    assert abs(half - truth) <= 2.0, (half, truth)
    # the reconstruction resembles the truth at this SNR
    assert corr > 0.9, corr                          # measured 0.937


def _rotate90_z(volume):
    """Rotate a (z, y, x) cube by 90 degrees about the z axis through the centre voxel (box // 2)."""
    box = volume.shape[-1]
    minus = (box - np.arange(box)) % box            # index of -y about the centre box // 2
    return volume.transpose(0, 2, 1)[:, minus, :]   # new(x, y) = old(-y, x)


def test_symmetry_c4_beats_c1_on_a_c4_phantom(tmp_path, capsys):
    box, px = 32, 3.0
    base = make_class_volumes(box, 1, seed=4)[0].astype(np.float64)
    sym = base.copy()
    turned = base
    for _ in range(3):
        turned = _rotate90_z(turned)
        sym += turned
    sym /= 4.0
    np.testing.assert_allclose(_rotate90_z(sym), sym, atol=1e-6 * np.abs(sym).max())
    truth_path = tmp_path / "c4.mrc"
    write_volume(truth_path, sym.astype(np.float32), px)
    sim = tmp_path / "sim"
    # few particles: C1 leaves gaps in Fourier space and averages little noise; C4 has 4x the views
    _run(["simulate", "--out", sim, "--volumes", truth_path, "--particles", 12, "--box", box,
          "--pixel-size", px, "--snr", 0.5, "--seed", 2])
    corr, shells = {}, {}
    for group in ("C1", "C4"):
        out = tmp_path / group
        _run(["reconstruct", "--particles", sim / "particles.star", "--out", out, "--symmetry", group,
              "--truth", truth_path])
        corr[group] = _masked_corr(_read(out / "reconstruction.mrc"), sym)
        shells[group] = _shells(json.loads((out / "fsc.json").read_text())["resolution_truth_05_A"], box, px)
    print(f"C4 phantom, 12 particles: correlation with truth {corr}, FSC 0.5 vs truth (shells) {shells}")
    assert corr["C4"] > corr["C1"] + 0.01, corr      # measured C1 0.905, C4 0.957
    assert shells["C4"] > shells["C1"] + 0.5, shells  # FSC vs truth = 0.5: measured C1 4.5, C4 5.6 shells
    # the C4 map is itself symmetric about z (the operators act about the axis the data has)
    c4 = _read(tmp_path / "C4" / "reconstruction.mrc")
    assert _masked_corr(_rotate90_z(c4), c4) > 0.999


# --------------------------------------------------------------------------- bad input
def _star(path, stack, indices, box, px=2.0):
    n = len(indices)
    table = new_particle_table(np.array([str(stack)] * n, dtype=object), np.asarray(indices), px, box,
                               rot_deg=np.linspace(0, 90, n), tilt_deg=np.linspace(10, 80, n),
                               psi_deg=np.zeros(n), shift_x_A=np.zeros(n), shift_y_A=np.zeros(n))
    write_particles(path, table)
    return path


def _images(n, box):
    return np.random.default_rng(0).normal(size=(n, box, box)).astype(np.float32)


def _bad_missing_stack(tmp_path):
    stack = tmp_path / "nowhere" / "missing.mrcs"
    return _star(tmp_path / "p.star", stack, [1, 2], 16), "missing.mrcs"


def _bad_index(tmp_path):
    stack = tmp_path / "three.mrcs"
    write_stack(stack, _images(3, 16), 2.0)
    return _star(tmp_path / "p.star", stack, [1, 2, 5], 16), "three.mrcs"


def _bad_not_mrc(tmp_path):
    stack = tmp_path / "notes.mrcs"
    stack.write_text("these are not images\n" * 100)
    return _star(tmp_path / "p.star", stack, [1, 2], 16), "notes.mrcs"


def _bad_odd_box(tmp_path):
    stack = tmp_path / "odd.mrcs"
    write_stack(stack, _images(4, 15), 2.0)
    return _star(tmp_path / "p.star", stack, [1, 2, 3, 4], 15), "odd.mrcs"


@pytest.mark.parametrize("make_bad", [_bad_missing_stack, _bad_index, _bad_not_mrc, _bad_odd_box],
                         ids=["missing-stack", "index-out-of-range", "not-mrc", "odd-box"])
def test_reconstruct_bad_input_exits_2_naming_the_file(tmp_path, capsys, make_bad):
    star, name = make_bad(tmp_path)
    capsys.readouterr()
    code = cli.main(["reconstruct", "--particles", str(star), "--out", str(tmp_path / "rec"), "--no-ctf"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("ERROR: "), err
    assert name in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "rec" / "reconstruction.mrc").exists()
