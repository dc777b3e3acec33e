"""Tests of hetplugin.core.starfile: STAR parsing/writing and the particle table."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from hetplugin.core.mrc import check_images, write_stack
from hetplugin.core.starfile import (ParticleTable, new_particle_table, particle_blocks, read_particles,
                                     read_star, write_particles, write_star)

DATA = (Path(__file__).resolve().parents[3] / ".." / "shared" / "data").resolve()
VARIANTS = DATA / "star-variants"
needs_data = pytest.mark.skipif(not VARIANTS.is_dir(), reason=f"shared test data not found at {VARIANTS} "
                                "(real STAR files live beside the project, not in it)")
TYPED = ("image_index", "pixel_size_A", "image_size", "rot_deg", "tilt_deg", "psi_deg", "shift_x_A",
         "shift_y_A", "defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kV", "cs_mm",
         "amplitude_contrast", "phase_shift_deg", "ctf_bfactor_A2", "ctf_scale", "class_number",
         "random_subset")


def assert_same_fields(a: ParticleTable, b: ParticleTable, skip=()) -> None:
    assert len(a) == len(b)
    assert list(a.image_path) == list(b.image_path)
    for name in TYPED:
        if name in skip:
            continue
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9, err_msg=name)


# --------------------------------------------------------------------------- read_star / write_star
def test_read_star_syntax(tmp_path):
    text = """
# a comment
data_general
_rlnFinalResolution    3.5
_rlnName   'a name with spaces'
_rlnCount 7

data_
loop_
_rlnA #1
# comment between labels
_rlnB #2
_rlnC\t#3
_rlnD #4
1\t2.5   "x y"  [0.1,0.2]
2 3 plain [0.3, 0.4]

   # comment inside the data
3 -4e-3 'q' [5]
data_empty
loop_
_rlnX
_rlnY
"""
    path = tmp_path / "syntax.star"
    path.write_text(text)
    blocks = read_star(path)
    assert list(blocks) == ["general", "", "empty"]
    general = blocks["general"]
    assert general["rlnFinalResolution"].dtype == np.float64 and general["rlnFinalResolution"][0] == 3.5
    assert general["rlnName"][0] == "a name with spaces"
    assert general["rlnCount"].dtype == np.int64 and general["rlnCount"].tolist() == [7]
    loop = blocks[""]
    assert loop["rlnA"].dtype == np.int64 and loop["rlnA"].tolist() == [1, 2, 3]
    assert loop["rlnB"].dtype == np.float64 and loop["rlnB"].tolist() == [2.5, 3.0, -4e-3]
    assert loop["rlnC"].dtype == object and loop["rlnC"].tolist() == ["x y", "plain", "q"]
    assert loop["rlnD"].tolist() == ["[0.1,0.2]", "[0.3, 0.4]", "[5]"]
    assert blocks["empty"]["rlnX"].shape == (0,)


def test_write_read_star_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    n = 257
    blocks = {
        "optics": {"rlnOpticsGroup": [1, 2], "rlnOpticsGroupName": ["g1", "g 2"], "rlnVoltage": [300.0, 200.0],
                   "rlnOddZernike": np.array(["[0.1,0.2]", "[1, 2]"], dtype=object)},
        "particles": {"rlnAngleRot": rng.uniform(-180, 180, n), "rlnDefocusU": rng.uniform(5e3, 3e4, n) * np.pi,
                      "rlnTiny": rng.normal(size=n) * 1e-12, "rlnClassNumber": rng.integers(1, 5, n),
                      "rlnImageName": np.array([f"{i + 1:06d}@Extract/stack.mrcs" for i in range(n)], dtype=object),
                      "rlnFloat32": rng.normal(size=n).astype(np.float32), "rlnEmpty": [""] * n,
                      "rlnFlag": rng.integers(0, 2, n).astype(bool)},
    }
    path = tmp_path / "rt.star"
    write_star(path, blocks)
    assert path.read_text().splitlines()[1] == "# version 30001"
    back = read_star(path)
    assert list(back) == ["optics", "particles"]
    assert back["optics"]["rlnOpticsGroupName"].tolist() == ["g1", "g 2"]
    assert back["optics"]["rlnOddZernike"].tolist() == ["[0.1,0.2]", "[1, 2]"]
    assert back["optics"]["rlnVoltage"].dtype == np.float64
    p, q = blocks["particles"], back["particles"]
    for label in ("rlnAngleRot", "rlnDefocusU", "rlnTiny"):
        assert q[label].dtype == np.float64 and np.array_equal(q[label], p[label]), label  # exact
    assert q["rlnClassNumber"].dtype == np.int64 and np.array_equal(q["rlnClassNumber"], p["rlnClassNumber"])
    assert q["rlnImageName"].tolist() == p["rlnImageName"].tolist()
    np.testing.assert_allclose(q["rlnFloat32"], p["rlnFloat32"], rtol=1e-7)
    assert q["rlnEmpty"].tolist() == [""] * n
    assert q["rlnFlag"].tolist() == p["rlnFlag"].astype(int).tolist()


def test_write_star_rejects_ragged_columns(tmp_path):
    with pytest.raises(ValueError, match="different lengths"):
        write_star(tmp_path / "bad.star", {"x": {"rlnA": [1, 2], "rlnB": [1.0]}})
    assert not (tmp_path / "bad.star").exists()


def _synthetic_star(path: Path, n: int, tail: str = "") -> None:
    """A RELION 3.1 particle file written as text (not by write_star), n rows."""
    i = np.arange(n)
    rot = (i * 0.37) % 360 - 180
    rows = "\n".join(f"{k % 500 + 1:06d}@Extract/job007/mic{k // 500:04d}.mrcs {r:.6f} {k % 90}.250000 "
                     f"{(k * 7) % 360 - 180:.4f} {k % 3 + 1} 1 {12000 + k % 1000}.5 {1.5e-1 + k % 2}"
                     for k, r in zip(i.tolist(), rot.tolist()))
    path.write_text("# version 30001\ndata_optics\nloop_\n_rlnOpticsGroup #1\n_rlnImagePixelSize #2\n"
                    "_rlnImageSize #3\n_rlnVoltage #4\n_rlnSphericalAberration #5\n_rlnAmplitudeContrast #6\n"
                    "1 1.5 128 300.0 2.7 0.1\n\n# version 30001\ndata_particles\nloop_\n_rlnImageName #1\n"
                    "_rlnAngleRot #2\n_rlnAngleTilt #3\n_rlnAnglePsi #4\n_rlnClassNumber #5\n_rlnOpticsGroup #6\n"
                    "_rlnDefocusU #7\n_rlnOriginXAngst #8\n" + rows + "\n" + tail)


def test_large_star_is_parsed_vectorised(tmp_path):
    """200k rows go through numpy's C reader (runs in about a second)."""
    path = tmp_path / "big.star"
    n = 200_000
    _synthetic_star(path, n)
    blocks = read_star(path)
    particles = blocks["particles"]
    assert len(particles["rlnImageName"]) == n
    assert particles["rlnClassNumber"].dtype == np.int64
    assert particles["rlnAngleTilt"].dtype == np.float64 and particles["rlnAngleTilt"][3] == 3.25
    table = read_particles(path)
    assert len(table) == n
    assert table.image_index[501] == 2 and table.image_path[501].endswith("Extract/job007/mic0001.mrcs")
    assert len(set(table.image_path.tolist())) == n // 500
    assert np.all(table.pixel_size_A == 1.5) and table.image_size[0] == 128


def test_large_loop_type_corrections(tmp_path):
    """Types guessed from the first row are corrected by later rows, in the fast path too."""
    n = 3000
    a = [str(k) for k in range(n)]
    a[-1] = "1.5"                                  # int column with a float at the end -> float64
    b = [f"{k}.5" for k in range(n)]
    b[2000] = "text"                               # number column with text -> str, values kept
    rows = "\n".join(f"{x} {y} {k}" for k, (x, y) in enumerate(zip(a, b)))
    path = tmp_path / "types.star"
    path.write_text(f"data_t\nloop_\n_a\n_b\n_c\n{rows}\n\n# trailing comment\n\ndata_after\n_key value\n")
    blocks = read_star(path)
    t = blocks["t"]
    assert t["a"].dtype == np.float64 and t["a"][-1] == 1.5 and t["a"][10] == 10.0
    assert t["b"].dtype == object and t["b"][2000] == "text" and t["b"][0] == "0.5"
    assert t["c"].dtype == np.int64 and t["c"][-1] == n - 1
    assert blocks["after"]["key"].tolist() == ["value"]


def test_malformed_rows_name_file_and_line(tmp_path):
    path = tmp_path / "broken.star"
    path.write_text("data_p\nloop_\n_rlnA\n_rlnB\n1 2\n3\n4 5\n")
    with pytest.raises(ValueError, match=r"broken\.star, line 6"):
        read_star(path)
    with pytest.raises(ValueError, match="nothere.star"):
        read_star(tmp_path / "nothere.star")


# --------------------------------------------------------------------------- real files
@needs_data
@pytest.mark.parametrize("name", sorted(p.name for p in VARIANTS.glob("*.star")) if VARIANTS.is_dir() else [])
def test_every_variant_reads_and_round_trips(name, tmp_path, recwarn):
    table = read_particles(VARIANTS / name)
    assert len(table) > 0 and table.has_ctf
    assert np.all(table.pixel_size_A > 0) and np.all(np.isfinite(table.defocus_u_A))
    assert all(os.path.isabs(p) for p in table.image_path)
    out = tmp_path / "out.star"
    write_particles(out, table)
    back = read_particles(out)
    assert_same_fields(table, back)
    assert back.optics is not None and "rlnImagePixelSize" in back.optics
    blocks = read_star(out)
    assert "rlnOriginX" not in blocks["particles"] and "rlnMagnification" not in blocks["particles"]
    for label in table.columns:        # unknown labels are carried through
        if label not in ("rlnOriginX", "rlnOriginY", "rlnMagnification", "rlnDetectorPixelSize", "rlnVoltage",
                         "rlnSphericalAberration", "rlnAmplitudeContrast"):
            assert label in back.columns, label


@needs_data
def test_relion30_empiar_pixel_size_from_magnification():
    table = read_particles(VARIANTS / "empiar_10076_7.star")
    assert len(table) == 7 and table.optics is None
    np.testing.assert_allclose(table.pixel_size_A, 5 * 1e4 / 38168)
    assert abs(table.pixel_size_A[0] - 1.31) < 1e-3
    assert table.image_size.tolist() == [320] * 7          # read from the MRC header
    assert table.image_index.tolist() == list(range(1, 8))
    assert table.image_path[0] == str(VARIANTS / "empiar_10076_7.mrc")
    assert not table.has_alignment
    assert table.defocus_u_A[0] == 15301.1 and table.defocus_v_A[6] == 14792.7
    assert table.defocus_angle_deg[0] == 5.28 and table.voltage_kV[0] == 300 and table.cs_mm[0] == 2.7
    assert table.amplitude_contrast[0] == 0.07 and table.ctf_scale[0] == 1 and table.phase_shift_deg[0] == 0
    assert check_images(table.image_path, table.image_index) == (320, 320)


@needs_data
def test_relion30_table_becomes_valid_relion31(tmp_path):
    table = read_particles(VARIANTS / "empiar_10076_7.star")
    blocks = particle_blocks(table)
    optics, parts = blocks["optics"], blocks["particles"]
    assert optics["rlnOpticsGroup"].tolist() == [1] and optics["rlnImageDimensionality"].tolist() == [2]
    np.testing.assert_allclose(optics["rlnImagePixelSize"], 5e4 / 38168)
    assert optics["rlnImageSize"].tolist() == [320] and optics["rlnVoltage"].tolist() == [300.0]
    assert optics["rlnSphericalAberration"].tolist() == [2.7] and optics["rlnAmplitudeContrast"].tolist() == [0.07]
    assert parts["rlnOpticsGroup"].tolist() == [1] * 7
    for label in ("rlnVoltage", "rlnMagnification", "rlnDetectorPixelSize", "rlnAmplitudeContrast"):
        assert label not in parts
    assert parts["rlnImageName"][2] == "000003@" + str(VARIANTS / "empiar_10076_7.mrc")
    write_star(tmp_path / "p31.star", blocks)
    back = read_particles(tmp_path / "p31.star")
    assert_same_fields(table, back)
    assert back.optics["rlnOpticsGroupName"].tolist() == ["opticsGroup1"]


@needs_data
def test_six_optics_groups_joined_per_particle():
    table = read_particles(VARIANTS / "relion31.6opticsgroups.star")
    assert len(table) == 139
    assert np.bincount(table.optics_group).tolist() == [0, 48, 29, 5, 7, 26, 24]
    by_group = {int(g): i for i, g in reversed(list(enumerate(table.optics_group)))}
    expected = {1: (1.25, 2.7), 2: (1.24, 2.7), 3: (1.25, 2.7), 4: (1.25, 2.6), 5: (1.24, 2.7), 6: (1.25, 2.7)}
    for group, (pixel, cs) in expected.items():
        i = by_group[group]
        assert table.pixel_size_A[i] == pixel and table.cs_mm[i] == cs, group
    assert np.all(table.voltage_kV == 200.0) and np.all(table.amplitude_contrast == 0.1)
    assert np.all(table.image_size == 196)
    assert table.image_index[0] == 3 and table.optics_group[0] == 6
    assert table.image_path[0].endswith("Polish/job520/Micrographs/0003_shiny.mrcs")
    assert table.rot_deg[0] == -128.10516 and table.shift_x_A[0] == 13.284554 and table.shift_y_A[0] == -3.21701
    assert table.defocus_u_A[0] == 10352.805929
    assert table.optics["rlnOddZernike"][0].startswith("[1.70554063513,")


@needs_data
def test_relion31_variants_agree_and_images_check():
    a = read_particles(VARIANTS / "relion31.star")
    b = read_particles(VARIANTS / "relion31.v2.star")
    assert_same_fields(a, b)
    assert len(a) == 5 and np.all(a.pixel_size_A == 2.806) and np.all(a.image_size == 256)
    assert a.voltage_kV[0] == 300 and a.cs_mm[0] == 0.01 and a.amplitude_contrast[0] == 0.1
    assert a.shift_x_A[0] == 0.019324 and a.shift_y_A[0] == -0.64686
    assert a.ctf_bfactor_A2[0] == 0 and a.ctf_scale[0] == 1.0
    assert a.class_number.tolist() == [1] * 5 and a.random_subset.tolist() == [1] * 5
    assert a.image_path[0] == str(VARIANTS / "relion31.mrcs")
    assert check_images(a.image_path, a.image_index) == (256, 256)


@needs_data
def test_relion5_bracketed_arrays():
    blocks = read_star(VARIANTS / "relion5.star")
    optics = blocks["optics"]
    assert optics["rlnOddZernike"].dtype == object
    assert optics["rlnOddZernike"][0] == "[0.0680480107376,0.0982451014894,-1.79877045848,0,0,-1.36333410593]"
    assert optics["rlnMagMat01"][0] == -7.04404e-04 and optics["rlnCtfDataAreCtfPremultiplied"][0] == 0
    table = read_particles(VARIANTS / "relion5.star")
    assert len(table) == 17 and np.all(table.pixel_size_A == 0.89) and np.all(table.image_size == 448)
    assert np.all(table.voltage_kV == 100.0) and np.all(table.cs_mm == 1.6)
    assert np.bincount(table.random_subset).tolist() == [0, 11, 6]
    assert table.image_path[1].endswith("toy_images_b.mrcs") and table.image_index[1] == 2


@needs_data
def test_cryosparc_export_origins_in_pixels():
    with pytest.warns(UserWarning, match="rlnAmplitudeContrast"):
        table = read_particles(VARIANTS / "FinalRefinement-OriginalParticles-PfCRT.star")
    assert len(table) == 5 and np.all(table.pixel_size_A == 1.035)
    np.testing.assert_allclose(table.shift_x_A[0], -0.14063 * 1.035)
    np.testing.assert_allclose(table.shift_y_A[4], 0.203125 * 1.035)
    assert table.psi_deg[0] == 98.22569 and table.cs_mm[0] == 0.001 and table.amplitude_contrast[0] == 0.1
    assert table.random_subset.tolist() == [2, 1, 2, 2, 2]
    assert table.image_size.tolist() == [0] * 5          # stack absent: box unknown
    assert table.image_path[0].endswith("Extract/job012/FinalRefinement-OriginalParticles-PfCRT.mrcs")


# --------------------------------------------------------------------------- built tables, paths, errors
def _simulated(tmp_path: Path, n: int = 6) -> ParticleTable:
    stack = tmp_path / "stack.mrcs"
    write_stack(stack, np.zeros((n, 8, 8), np.float32), 1.5)
    return new_particle_table(str(stack), np.arange(1, n + 1), pixel_size_A=[1.5] * (n - 2) + [2.0] * 2,
                              image_size=8, rot_deg=np.linspace(-170, 170, n), tilt_deg=np.linspace(1, 179, n),
                              defocus_u_A=np.linspace(1e4, 2e4, n), voltage_kV=300.0, cs_mm=2.7,
                              amplitude_contrast=0.1, class_number=np.arange(n) % 2 + 1)


def test_new_particle_table_round_trip_and_updates(tmp_path):
    table = _simulated(tmp_path)
    assert table.optics["rlnOpticsGroup"].tolist() == [1, 2]
    assert table.optics_group.tolist() == [1, 1, 1, 1, 2, 2]
    assert table.psi_deg.tolist() == [0.0] * 6 and table.defocus_v_A[2] == table.defocus_u_A[2]
    posterior = np.linspace(0, 1, 6)
    write_particles(tmp_path / "p.star", table, updates={"rlnClassNumber": np.full(6, 3), "_rlnHetPosterior": posterior})
    back = read_particles(tmp_path / "p.star")
    assert_same_fields(table, back, skip=("class_number",))
    assert back.class_number.tolist() == [3] * 6
    assert np.array_equal(back.columns["rlnHetPosterior"], posterior)
    assert np.array_equal(back.optics_group, table.optics_group)
    sub = table.subset(table.class_number == 2)
    assert len(sub) == 3 and sub.image_index.tolist() == [2, 4, 6]
    assert sub.columns["rlnImageName"].tolist() == table.columns["rlnImageName"][1::2].tolist()
    write_particles(tmp_path / "sub.star", sub)
    assert_same_fields(sub, read_particles(tmp_path / "sub.star"))
    with pytest.raises(ValueError, match="shape"):
        particle_blocks(table, {"rlnX": np.zeros(5)})


def test_modified_optics_values_survive_writing(tmp_path):
    table = _simulated(tmp_path)
    table.pixel_size_A = table.pixel_size_A.copy()
    table.pixel_size_A[0] = 1.6               # differs from its optics group: kept per particle
    write_particles(tmp_path / "m.star", table)
    back = read_particles(tmp_path / "m.star")
    assert back.pixel_size_A.tolist() == table.pixel_size_A.tolist()


def test_relative_paths_resolved_from_project_directory(tmp_path):
    project = tmp_path / "project"
    (project / "Extract" / "job003").mkdir(parents=True)
    (project / "Refine3D" / "job010").mkdir(parents=True)
    write_stack(project / "Extract" / "job003" / "mic1.mrcs", np.zeros((2, 4, 4), np.float32), 2.0)
    star = project / "Refine3D" / "job010" / "run_data.star"
    star.write_text("data_\nloop_\n_rlnImageName\n_rlnImagePixelSize\n2@Extract/job003/mic1.mrcs:mrcs 2.0\n"
                    "1@Extract/job003/mic1.mrcs 2.0\nsingle.mrc 2.0\n")
    table = read_particles(star)
    expected = str(project / "Extract" / "job003" / "mic1.mrcs")
    assert table.image_path.tolist()[:2] == [expected, expected] and table.image_index.tolist() == [2, 1, 1]
    assert table.image_path[2] == str(star.parent / "single.mrc")      # missing: relative to the STAR file
    assert table.image_size.tolist() == [4, 4, 4] and table.rot_deg is None and table.defocus_u_A is None
    rooted = read_particles(star, root=tmp_path / "elsewhere")
    assert rooted.image_path[0] == str(tmp_path / "elsewhere" / "Extract" / "job003" / "mic1.mrcs")


def test_particle_file_errors_name_the_file(tmp_path):
    no_pixel = tmp_path / "nopixel.star"
    no_pixel.write_text("data_\nloop_\n_rlnImageName\n_rlnDefocusU\n1@a.mrcs 10000\n")
    with pytest.raises(ValueError, match=r"nopixel\.star.*rlnImagePixelSize.*rlnMagnification"):
        read_particles(no_pixel)
    no_images = tmp_path / "mics.star"
    no_images.write_text("data_\nloop_\n_rlnMicrographName\na.mrc\n")
    with pytest.raises(ValueError, match=r"mics\.star.*rlnImageName"):
        read_particles(no_images)
    bad_group = tmp_path / "group.star"
    bad_group.write_text("data_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n1 1.0\n2 1.1\n"
                         "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n1@a.mrcs 3\n")
    with pytest.raises(ValueError, match=r"group\.star.*optics group"):
        read_particles(bad_group)


def test_pixel_origins_without_3d_angles_are_kept_in_angstrom(tmp_path):
    star = tmp_path / "class2d.star"
    star.write_text("data_images\nloop_\n_rlnImageName\n_rlnPixelSize\n_rlnAnglePsi\n_rlnOriginX\n_rlnOriginY\n"
                    "1@s.mrcs 2.0 45.0 1.5 -2.0\n2@s.mrcs 2.0 90.0 0.0 3.0\n")
    table = read_particles(star)
    assert not table.has_alignment and table.shift_x_A is None and table.pixel_size_A.tolist() == [2.0, 2.0]
    write_particles(tmp_path / "out.star", table)
    back = read_star(tmp_path / "out.star")
    particles = back["particles"]
    assert particles["rlnOriginXAngst"].tolist() == [3.0, 0.0] and particles["rlnOriginYAngst"].tolist() == [-4.0, 6.0]
    assert particles["rlnAnglePsi"].tolist() == [45.0, 90.0] and "rlnPixelSize" not in particles
    assert back["optics"]["rlnImagePixelSize"].tolist() == [2.0]
