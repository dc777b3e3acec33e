"""Scipion objects <-> core files (hetplugin.convert): conventions and round trips.

Sets are built in pytest's tmp_path from small MRC stacks written with mrcfile;
no project, no protocol run.
"""
import os
import shutil
import subprocess
import sys

import mrcfile
import numpy as np
import pytest

from hetplugin.convert import (alignment_to_relion, alignments_to_relion, ctf_to_relion,
                               fill_classes, fill_volume_set, relion_to_alignment,
                               relion_to_alignments, relion_to_ctf, star_to_particle_set,
                               update_particles, write_particles_star)
from hetplugin.core.rotations import euler_to_matrix
from hetplugin.core.starfile import read_particles, read_star, write_particles

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', '..', 'shared', 'data'))
EMPIAR_STAR = os.path.join(SHARED, 'star-variants', 'empiar_10076_7.star')


# --------------------------------------------------------------------------- geometry
def _relion_euler_matrix(rot, tilt, psi):
    """RELION's Euler_angles2matrix (src/euler.cpp), written out by hand."""
    a, b, g = np.deg2rad([rot, tilt, psi])
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array([[cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
                     [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
                     [sc, ss, cb]])


def test_documented_convention_hand_computed():
    """Scipion stores inv([[A, -s], [0, 1]]): A = RELION's matrix, s = origin in pixels."""
    rot, tilt, psi, sx, sy = 30.0, 40.0, 50.0, 2.5, -1.5
    forward = np.eye(4)
    forward[:3, :3] = _relion_euler_matrix(rot, tilt, psi)
    forward[:3, 3] = [-sx, -sy, 0.0]
    expected = np.linalg.inv(forward)
    m = relion_to_alignment(rot, tilt, psi, sx, sy)
    np.testing.assert_allclose(m, expected, atol=1e-12)
    # A few entries by hand: M[:3, :3] = A^T, M[:3, 3] = A^T s
    a = _relion_euler_matrix(rot, tilt, psi)
    np.testing.assert_allclose(m[:3, :3], a.T, atol=1e-12)
    np.testing.assert_allclose(m[:3, 3], a.T @ [sx, sy, 0.0], atol=1e-12)
    np.testing.assert_allclose(m[3], [0, 0, 0, 1])
    np.testing.assert_allclose(alignment_to_relion(m), (rot, tilt, psi, sx, sy), atol=1e-9)


def test_convention_matches_pwem_szyz():
    """Same matrices as pwem.convert.transformations with negated angles, axes 'szyz'
    (how scipion-em-relion / scipion-em-xmipp build ALIGN_PROJ transforms)."""
    from pwem.convert import transformations as tfs
    rng = np.random.default_rng(3)
    for _ in range(20):
        rot, psi = rng.uniform(-180, 180, 2)
        tilt = rng.uniform(0, 180)
        shifts = np.array([*rng.uniform(-10, 10, 2), 0.0])
        m = tfs.euler_matrix(*(-np.deg2rad([rot, tilt, psi])), axes='szyz')
        m[:3, 3] = -shifts
        expected = np.linalg.inv(m)
        np.testing.assert_allclose(relion_to_alignment(rot, tilt, psi, *shifts[:2]), expected,
                                   atol=1e-12)
        # and the way back agrees with pwem's euler_from_matrix on the inverse
        back = alignment_to_relion(expected)
        inv = np.linalg.inv(expected)
        pw_angles = -np.rad2deg(tfs.euler_from_matrix(inv, axes='szyz'))
        np.testing.assert_allclose(back[:3], pw_angles, atol=1e-7)
        np.testing.assert_allclose(back[3:], -tfs.translation_from_matrix(inv)[:2], atol=1e-9)


@pytest.mark.parametrize('tilts', [
    'random', [0.0, 1e-7, 1e-3, 0.5], [180.0, 179.9999999, 179.999, 179.5]])
def test_angle_round_trip(tilts):
    rng = np.random.default_rng(7)
    n = 200 if tilts == 'random' else 4
    rot = rng.uniform(-180, 180, n)
    psi = rng.uniform(-180, 180, n)
    tilt = rng.uniform(0, 180, n) if tilts == 'random' else np.array(tilts)
    sx, sy = rng.uniform(-20, 20, (2, n))
    m = relion_to_alignments(rot, tilt, psi, sx, sy)
    rot2, tilt2, psi2, sx2, sy2 = alignments_to_relion(m)
    np.testing.assert_allclose(sx2, sx, atol=1e-9)
    np.testing.assert_allclose(sy2, sy, atol=1e-9)
    # the same rotation (angles may differ at the poles, where rot and psi mix)
    np.testing.assert_allclose(euler_to_matrix(rot2, tilt2, psi2), euler_to_matrix(rot, tilt, psi),
                               atol=1e-6)
    np.testing.assert_allclose(relion_to_alignments(rot2, tilt2, psi2, sx2, sy2), m, atol=1e-6)
    assert np.all((tilt2 >= 0) & (tilt2 <= 180))
    regular = (tilt > 0.01) & (tilt < 179.99)
    for a, b in ((rot, rot2), (tilt, tilt2), (psi, psi2)):
        diff = (a[regular] - b[regular] + 180) % 360 - 180
        np.testing.assert_allclose(diff, 0, atol=1e-6)
    # scalar and vectorised forms agree
    for i in range(min(n, 5)):
        np.testing.assert_allclose(relion_to_alignment(rot[i], tilt[i], psi[i], sx[i], sy[i]), m[i])
        np.testing.assert_allclose(alignment_to_relion(m[i]),
                                   (rot2[i], tilt2[i], psi2[i], sx2[i], sy2[i]))


def test_non_rotation_matrices_rejected():
    m = relion_to_alignment(10, 20, 30, 1, 2)
    mirrored = m.copy()
    mirrored[:3, 0] *= -1
    with pytest.raises(ValueError, match='not rotations'):
        alignment_to_relion(mirrored)
    with pytest.raises(ValueError, match='not rotations'):
        alignment_to_relion(np.diag([2.0, 2.0, 2.0, 1.0]))
    with pytest.raises(ValueError):
        alignment_to_relion(np.eye(3))


# --------------------------------------------------------------------------- CTF
@pytest.mark.parametrize('phase', [None, 45.0])
def test_ctf_round_trip(phase):
    from pwem.objects import CTFModel
    ctf = CTFModel()
    ctf.setStandardDefocus(21000.5, 19800.25, 33.0)
    if phase is not None:
        ctf.setPhaseShift(phase)
    ctf.setResolution(3.7)
    values = ctf_to_relion(ctf)
    assert values['defocus_u_A'] == 21000.5 and values['defocus_v_A'] == 19800.25
    assert values['defocus_angle_deg'] == 33.0 and values['phase_shift_deg'] == phase
    back = relion_to_ctf(values)
    assert back.getDefocus() == ctf.getDefocus()
    assert back.getPhaseShift() == ctf.getPhaseShift()
    assert back.getResolution() == 3.7
    assert back.getDefocusRatio() == pytest.approx(21000.5 / 19800.25)
    # RELION values with V > U are standardised as Scipion does on import
    swapped = relion_to_ctf({'defocus_u_A': 1.0e4, 'defocus_v_A': 1.2e4, 'defocus_angle_deg': 10.0})
    assert swapped.getDefocus() == (1.2e4, 1.0e4, 100.0)


# --------------------------------------------------------------------------- sets
BOX = 16
PIXEL = 1.5


def _write_stack(path, n, seed):
    data = np.random.default_rng(seed).standard_normal((n, BOX, BOX)).astype(np.float32)
    with mrcfile.new(str(path), overwrite=True) as m:
        m.set_data(data)
        m.voxel_size = PIXEL
    return data


def _particle_values(n, seed=0):
    rng = np.random.default_rng(seed)
    return dict(rot=rng.uniform(-180, 180, n), tilt=rng.uniform(1, 179, n), psi=rng.uniform(-180, 180, n),
                sx=rng.uniform(-4, 4, n), sy=rng.uniform(-4, 4, n),
                du=rng.uniform(15000, 25000, n), ddv=rng.uniform(0, 800, n), dang=rng.uniform(0, 179, n),
                cls=rng.integers(1, 3, n), subset=rng.integers(1, 3, n))


def _build_set(folder, phase=None, with_alignment=True):
    """A SetOfParticles over two stacks (one given with ':mrcs' and a relative path)."""
    from pwem.objects import Acquisition, CTFModel, Particle, SetOfParticles, Transform
    from pyworkflow.object import Float, Integer
    folder.mkdir(exist_ok=True)
    _write_stack(folder / 'a.mrcs', 3, 1)
    _write_stack(folder / 'b.mrc', 2, 2)
    locations = [(1, str(folder / 'a.mrcs')), (2, os.path.relpath(folder / 'a.mrcs') + ':mrcs'),
                 (3, str(folder / 'a.mrcs')), (1, str(folder / 'b.mrc')), (2, str(folder / 'b.mrc'))]
    ids = [3, 5, 8, 9, 12]
    v = _particle_values(len(ids))
    parts = SetOfParticles(filename=str(folder / 'particles.sqlite'))
    parts.setSamplingRate(PIXEL)
    acq = Acquisition(magnification=50000, voltage=300.0, sphericalAberration=2.7,
                      amplitudeContrast=0.07)
    parts.setAcquisition(acq)
    parts.setHasCTF(True)
    if with_alignment:
        parts.setAlignmentProj()
    for i, (obj_id, loc) in enumerate(zip(ids, locations)):
        p = Particle(location=loc)
        p.setObjId(obj_id)
        p.setAcquisition(acq)
        ctf = CTFModel()
        ctf.setStandardDefocus(v['du'][i], v['du'][i] - v['ddv'][i], v['dang'][i])
        if phase is not None:
            ctf.setPhaseShift(phase + i)
        ctf.setResolution(4.0 + i)
        ctf.setFitQuality(0.5)
        p.setCTF(ctf)
        if with_alignment:
            p.setTransform(Transform(relion_to_alignment(v['rot'][i], v['tilt'][i], v['psi'][i],
                                                         v['sx'][i], v['sy'][i])))
        p.setClassId(int(v['cls'][i]))
        p._rlnRandomSubset = Integer(int(v['subset'][i]))
        p._otherPluginScore = Float(0.25 * i)      # something another plugin put there
        parts.append(p)
    parts.write()
    return parts, ids, locations, v


def _reopen(path):
    from pwem.objects import SetOfParticles
    s = SetOfParticles(filename=str(path))
    s.loadAllProperties()
    return s


def _assert_same_particle(a, b, check_transform=True):
    assert a.getObjId() == b.getObjId()
    ia, fa = a.getLocation()
    ib, fb = b.getLocation()
    assert ia == ib
    assert os.path.abspath(fa.split(':')[0]) == os.path.abspath(fb.split(':')[0])
    assert a.getCTF().getDefocus() == pytest.approx(b.getCTF().getDefocus(), abs=1e-9)
    assert a.getCTF().getPhaseShift() == b.getCTF().getPhaseShift()
    assert a.getCTF().getResolution() == pytest.approx(b.getCTF().getResolution())
    assert a.getCTF().getFitQuality() == pytest.approx(b.getCTF().getFitQuality())
    assert a.getClassId() == b.getClassId()
    assert a._rlnRandomSubset.get() == b._rlnRandomSubset.get()
    for x, y in ((a.getAcquisition(), b.getAcquisition()),):
        assert x.getVoltage() == y.getVoltage()
        assert x.getSphericalAberration() == y.getSphericalAberration()
        assert x.getAmplitudeContrast() == y.getAmplitudeContrast()
    if check_transform:
        np.testing.assert_allclose(a.getTransform().getMatrix(), b.getTransform().getMatrix(),
                                   atol=1e-9)


@pytest.mark.parametrize('phase', [None, 30.0])
def test_particle_set_star_round_trip(tmp_path, monkeypatch, phase):
    from pwem.objects import SetOfParticles
    monkeypatch.chdir(tmp_path)
    parts, ids, locations, v = _build_set(tmp_path / 'in', phase=phase)
    star = tmp_path / 'particles.star'
    info = write_particles_star(parts, str(star))
    assert info['n_particles'] == 5 and info['image_size'] == BOX
    assert info['has_alignment'] and info['has_ctf'] and info['has_classes']
    assert info['pixel_size_A'] == PIXEL

    blocks = read_star(star)
    optics, rows = blocks['optics'], blocks['particles']
    assert optics['rlnImagePixelSize'].tolist() == [PIXEL] and optics['rlnImageSize'].tolist() == [BOX]
    assert optics['rlnVoltage'].tolist() == [300.0]
    assert optics['rlnSphericalAberration'].tolist() == [2.7]
    assert optics['rlnAmplitudeContrast'].tolist() == [0.07]
    assert rows['rlnImageId'].tolist() == ids
    stack_a = str(tmp_path / 'in' / 'a.mrcs')
    assert rows['rlnImageName'][1] == '000002@' + stack_a       # relative + ':mrcs' -> absolute
    assert ('rlnPhaseShift' in rows) == (phase is not None)
    np.testing.assert_allclose(rows['rlnOriginXAngst'], v['sx'] * PIXEL, atol=1e-9)
    np.testing.assert_allclose(rows['rlnOriginYAngst'], v['sy'] * PIXEL, atol=1e-9)
    np.testing.assert_allclose(rows['rlnAngleTilt'], v['tilt'], atol=1e-9)
    assert rows['rlnClassNumber'].tolist() == v['cls'].tolist()

    # the core reads it, images included
    table = read_particles(star)
    assert table.has_alignment and table.has_ctf and len(table) == 5

    out = SetOfParticles(filename=str(tmp_path / 'back.sqlite'))
    assert star_to_particle_set(str(star), out) == 5
    out.write()
    out.close()
    back = _reopen(tmp_path / 'back.sqlite')
    original = _reopen(tmp_path / 'in' / 'particles.sqlite')
    assert back.getSize() == 5 and back.getSamplingRate() == PIXEL
    assert back.hasCTF() and back.hasAlignmentProj()
    assert back.getAcquisition().getVoltage() == 300.0
    assert back.getAcquisition().getAmplitudeContrast() == 0.07
    for a, b in zip(original, back):
        _assert_same_particle(a, b)
    assert [p.getObjId() for p in back] == ids


def test_write_without_alignment_and_disabled_items(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parts, ids, _loc, _v = _build_set(tmp_path / 'in', with_alignment=False)
    parts.close()
    parts = _reopen(tmp_path / 'in' / 'particles.sqlite')
    parts.enableAppend()
    item = parts[ids[0]]
    item.setEnabled(False)
    parts.update(item)
    parts.write()
    star = tmp_path / 'p.star'
    info = write_particles_star(parts, str(star))
    assert not info['has_alignment'] and info['n_particles'] == 4
    rows = read_star(star)['particles']
    assert 'rlnAngleRot' not in rows and rows['rlnImageId'].tolist() == ids[1:]


def test_update_particles_and_fill_classes(tmp_path, monkeypatch):
    """A fake core output (new angles, classes, a max-probability column, one particle
    dropped) comes back onto the input particles; then classes from it."""
    from pwem.objects import SetOfClasses3D, SetOfParticles, SetOfVolumes
    monkeypatch.chdir(tmp_path)
    parts, ids, _loc, v = _build_set(tmp_path / 'in')
    star_in = tmp_path / 'in.star'
    write_particles_star(parts, str(star_in))

    table = read_particles(star_in).subset([0, 1, 3, 4])       # the core dropped id 8
    new = _particle_values(4, seed=11)
    table.rot_deg, table.tilt_deg, table.psi_deg = new['rot'], new['tilt'], new['psi']
    table.shift_x_A, table.shift_y_A = new['sx'] * PIXEL, new['sy'] * PIXEL
    table.class_number = np.array([2, 1, 2, 2])
    star_out = tmp_path / 'particles_out.star'
    write_particles(star_out, table, updates={'rlnMaxValueProbDistribution': np.array([.9, .8, .7, .6]),
                                              'rlnLogLikeliContribution': np.array([1., 2., 3., 4.])})

    out = SetOfParticles(filename=str(tmp_path / 'out.sqlite'))
    n = update_particles(parts, out, str(star_out),
                         {'rlnMaxValueProbDistribution': 'maxProb',
                          'rlnLogLikeliContribution': '_hetplugin_logLikelihood'})
    assert n == 4
    out.write()
    out.close()
    out = _reopen(tmp_path / 'out.sqlite')
    assert out.getSize() == 4 and out.hasAlignmentProj() and out.hasCTF()
    assert out.getSamplingRate() == PIXEL
    original = {p.getObjId(): p.clone() for p in _reopen(tmp_path / 'in' / 'particles.sqlite')}
    kept = [i for i in ids if i != 8]
    for k, p in enumerate(out):
        assert p.getObjId() == kept[k]
        src = original[p.getObjId()]
        assert p.getLocation() == src.getLocation()
        assert p.getCTF().getDefocus() == src.getCTF().getDefocus()
        assert p._otherPluginScore.get() == src._otherPluginScore.get()
        assert p.getClassId() == [2, 1, 2, 2][k]
        assert p._hetplugin_maxProb.get() == pytest.approx([.9, .8, .7, .6][k])
        assert p._hetplugin_logLikelihood.get() == pytest.approx([1., 2., 3., 4.][k])
        np.testing.assert_allclose(
            p.getTransform().getMatrix(),
            relion_to_alignment(new['rot'][k], new['tilt'][k], new['psi'][k], new['sx'][k], new['sy'][k]),
            atol=1e-9)

    with pytest.raises(ValueError, match='rlnNoSuchLabel'):
        update_particles(parts, SetOfParticles(filename=str(tmp_path / 'x.sqlite')),
                         str(star_out), {'rlnNoSuchLabel': 'x'})

    # class maps and classes, once from the STAR and once from the updated set
    maps = []
    for c in (1, 2):
        path = tmp_path / ('class_%03d.mrc' % c)
        with mrcfile.new(str(path), overwrite=True) as m:
            m.set_data(np.full((BOX, BOX, BOX), c, np.float32))
        maps.append(os.path.relpath(path))
    info = {1: {'distribution': 0.25, 'resolution_A': 9.5, 'size': 1},
            2: {'distribution': 0.75, 'resolution_A': 8.0, 'size': 3}}
    for source, name, images in ((str(star_out), 'classes_star.sqlite', parts),
                                 (out, 'classes_set.sqlite', parts),
                                 (out, 'classes_same.sqlite', out)):
        classes = SetOfClasses3D(filename=str(tmp_path / name))
        classes.setImages(images)
        fill_classes(classes, source, maps, info,
                     extra_labels={'rlnMaxValueProbDistribution': 'maxProb'})
        classes.write()
        assert classes.getSize() == 2
        sizes = {}
        for cls in classes.iterItems():
            cid = cls.getObjId()
            rep = cls.getRepresentative()
            assert rep.getFileName() == maps[cid - 1] and rep.getSamplingRate() == PIXEL
            assert rep.getOrigin().getShifts() == pytest.approx((-BOX / 2 * PIXEL,) * 3)
            assert cls.hasAlignmentProj()
            assert cls._hetplugin_distribution.get() == info[cid]['distribution']
            assert cls._hetplugin_resolution_A.get() == info[cid]['resolution_A']
            assert cls._hetplugin_size.get() == info[cid]['size']
            members = list(cls.iterItems())
            sizes[cid] = len(members)
            for p in members:
                assert p.getClassId() == cid
                assert p.hasTransform() and p._hetplugin_maxProb.get() > 0.5
        assert sizes == {1: 1, 2: 3}
        classes.close()

    vols = fill_volume_set(SetOfVolumes(filename=str(tmp_path / 'volumes.sqlite')), maps, PIXEL)
    vols.write()
    assert vols.getSize() == 2 and vols.getSamplingRate() == PIXEL
    assert [v.getObjId() for v in vols] == [1, 2]


# --------------------------------------------------------------------------- real files
@pytest.mark.skipif(not os.path.exists(EMPIAR_STAR), reason='shared test data (%s) absent' % EMPIAR_STAR)
def test_real_relion30_star(tmp_path):
    from pwem.objects import SetOfParticles
    out = SetOfParticles(filename=str(tmp_path / 'empiar.sqlite'))
    assert star_to_particle_set(EMPIAR_STAR, out) == 7
    out.write()
    assert out.getSize() == 7
    assert out.getSamplingRate() == pytest.approx(1.31, abs=1e-3)
    assert out.hasCTF()
    acq = out.getAcquisition()
    assert acq.getVoltage() > 0 and acq.getSphericalAberration() is not None
    table = read_particles(EMPIAR_STAR)
    for k, p in enumerate(out):
        index, path = p.getLocation()
        assert index == table.image_index[k] and os.path.exists(path)
        u, v, _a = p.getCTF().getDefocus()
        assert u >= v > 0
        assert [u, v] == pytest.approx(sorted([table.defocus_u_A[k], table.defocus_v_A[k]], reverse=True))
    # and back to a STAR the core reads, pointing at the same images
    star = tmp_path / 'again.star'
    info = write_particles_star(out, str(star))
    assert info['image_size'] == 320 and info['pixel_size_A'] == pytest.approx(1.31, abs=1e-3)
    again = read_particles(star)
    assert again.image_path.tolist() == table.image_path.tolist()


def _peaks(image, count):
    """(x, y) positions, from the image centre, of the ``count`` strongest separated maxima."""
    n = image.shape[0]
    found = []
    for flat in np.argsort(image.ravel())[::-1]:
        y, x = divmod(int(flat), image.shape[1])
        if all(abs(x - n // 2 - fx) + abs(y - n // 2 - fy) > 3 for fx, fy in found):
            found.append((x - n // 2, y - n // 2))
        if len(found) == count:
            return found
    return found


@pytest.mark.skipif(shutil.which('relion_project') is None,
                    reason='RELION (relion_project) not installed; `make relion` installs it as root')
def test_convention_against_relion_project(tmp_path):
    """RELION's own projector puts volume point r at (A r)[:2] - origin, with A and the
    origin read from the Scipion matrix by alignment_to_relion: the meaning of a
    Scipion ALIGN_PROJ transform as the relion/xmipp plugins define it."""
    from pwem.objects import Acquisition, Particle, SetOfParticles, Transform
    n, pixel = 32, 2.0
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    points = np.array([[5, 0, 0], [0, 8, 0], [0, 0, -6]])
    weights = [1.0, 0.7, 0.45]
    vol = sum(w * np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / 2.0)
              for p, w in zip(points, weights)).astype(np.float32)
    with mrcfile.new(str(tmp_path / 'vol.mrc')) as m:
        m.set_data(vol)
        m.voxel_size = pixel
    _write_stack(tmp_path / 'dummy.mrcs', 4, 0)
    poses = [(0, 0, 0, 3.0, 0.0), (90, 0, 0, 0.0, -2.0), (20, 60, -35, 1.0, 2.0), (-120, 130, 75, -2.0, 1.0)]
    parts = SetOfParticles(filename=str(tmp_path / 'p.sqlite'))
    parts.setSamplingRate(pixel)
    parts.setAlignmentProj()
    parts.setAcquisition(Acquisition(magnification=10000, voltage=300.0, sphericalAberration=2.7,
                                     amplitudeContrast=0.1))    # RELION needs them in data_optics
    for i, pose in enumerate(poses, start=1):
        p = Particle(location=(i, str(tmp_path / 'dummy.mrcs')))
        p.setTransform(Transform(relion_to_alignment(*pose)))
        parts.append(p)
    parts.write()
    star = tmp_path / 'angles.star'
    write_particles_star(parts, str(star))
    run = subprocess.run(['relion_project', '--i', str(tmp_path / 'vol.mrc'), '--o', str(tmp_path / 'proj'),
                          '--ang', str(star), '--angpix', str(pixel)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    projections = mrcfile.read(str(tmp_path / 'proj.mrcs'))
    for k, p in enumerate(parts):
        m = p.getTransform().getMatrix()
        # prediction from the Scipion matrix alone: image point = M^-1 applied to r
        inv = np.linalg.inv(m)
        predicted = [(inv[:3, :3] @ r + inv[:3, 3])[:2] for r in points]
        found = _peaks(projections[k], len(points))
        for q in predicted:
            assert any(abs(q[0] - f[0]) <= 1 and abs(q[1] - f[1]) <= 1 for f in found), \
                (poses[k], predicted, found)


def test_convert_import_is_light():
    """hetplugin.convert (imported by protocols in the GUI) must not import torch."""
    code = "import sys, hetplugin.convert\nassert 'torch' not in sys.modules, 'torch imported'\n"
    subprocess.run([sys.executable, '-c', code], check=True)
