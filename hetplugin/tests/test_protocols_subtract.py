"""ProtSignalSubtract in a real Scipion test project (no mocks).

Simulated complex (hetplugin.core.simulate_subtract: a kept domain, the rest and a
micelle-like belt projected separately, analytically) -> a Scipion SetOfParticles sqlite
with CTF and alignment (hetplugin.convert.star_to_particle_set) -> ProtImportParticles
(IMPORT_FROM_SCIPION); map and mask with ProtImportVolumes / ProtImportMask ->
ProtSignalSubtract (recentre + re-box) -> the core's reconstruct on outputParticles
(written with convert.write_particles_star): the kept region comes out centred and
matches the truth; then the revert mode, per-class maps from a SetOfVolumes, and the
form's validation on imported objects.

unittest style: ``pytest`` and ``python -m pyworkflow.apps.pw_run_tests
hetplugin.tests.test_protocols_subtract`` both run it.
"""
import os

import numpy as np

from pyworkflow.object import RELATION_TRANSFORM
from pyworkflow.tests import BaseTest, setupTestProject
from pwem.objects import SetOfParticles, SetOfVolumes, Volume, VolumeMask

from hetplugin.core.fourier import recentre_volume
from hetplugin.tests.core.maps import corr, lowpass_sharp
from hetplugin.tests.scipion_imports import ImportHelpers, star_to_sqlite
from hetplugin.convert import write_particles_star
from hetplugin.core.dataset import ParticleDataset
from hetplugin.core.masks import spherical_mask
from hetplugin.core.mrc import StackReader, write_volume
from hetplugin.core.reconstruct import backproject_dataset
from hetplugin.core.simulate_subtract import simulate_subtraction
from hetplugin.core.starfile import read_particles, read_star, write_star
from hetplugin.protocols.protocol_subtract import ProtSignalSubtract

N_PARTICLES, BOX, NEW_BOX, PIXEL = 160, 48, 36, 3.0


def open_set(sqlite):
    """A particle set read back from its sqlite, with its properties (CTF, alignment)."""
    parts = SetOfParticles(filename=sqlite)
    parts.loadAllProperties()
    return parts


class TestSignalSubtract(ImportHelpers, BaseTest):
    pixelSize = PIXEL

    @classmethod
    def setUpClass(cls):
        cls._cwd = os.getcwd()
        setupTestProject(cls)
        folder = cls.proj.getPath('sim')
        cls.truth = simulate_subtraction(folder, n_particles=N_PARTICLES, box=BOX, pixel_size_A=PIXEL, snr=None,
                                         seed=21, n_states=2, closed_fraction=0.3, write_class_numbers=True)
        cls.protParticles = cls.importParticles(star_to_sqlite(cls.truth.star, os.path.join(folder, 'p.sqlite')),
                                                'simulated particles')
        weights = np.bincount(cls.truth.states, minlength=2) / N_PARTICLES
        write_volume(os.path.join(folder, 'consensus_exact.mrc'), np.tensordot(weights, cls.truth.maps, 1), PIXEL)
        cls.protMap = cls.importVolume(os.path.join(folder, 'consensus_exact.mrc'), 'consensus map')
        cls.protMask = cls.importMask(str(cls.truth.paths['mask']), 'keep mask')
        cls.protSubtract = None

    @classmethod
    def tearDownClass(cls):
        os.chdir(cls._cwd)

    # ---------------------------------------------------------------- helpers
    @classmethod
    def newSubtract(cls, particles=None, volume=None, volumeName='outputVolume', mask=None, **kwargs):
        values = dict(maskMeaning=0, doRecentre=True, newBoxSize=NEW_BOX, numberOfThreads=1, useGpu=False)
        values.update(kwargs)
        prot = cls.newProtocol(ProtSignalSubtract, **values)
        prot.inputParticles.set(particles or cls.protParticles)
        prot.inputParticles.setExtended('outputParticles')
        prot.inputVolume.set(volume or cls.protMap)
        prot.inputVolume.setExtended(volumeName)
        prot.inputMask.set(mask or cls.protMask)
        prot.inputMask.setExtended('outputMask')
        return prot

    @classmethod
    def subtracted(cls):
        if cls.protSubtract is None:
            prot = cls.newSubtract()
            prot.setObjLabel('subtract, recentre, box %d' % NEW_BOX)
            cls.launchProtocol(prot)
            cls.protSubtract = prot
        return cls.protSubtract

    # ---------------------------------------------------------------- tests
    def test_1_subtract_recentre_reconstruct(self):
        prot = self.subtracted()
        out = prot.outputParticles
        inp = self.protParticles.outputParticles
        self.assertSetSize(out, N_PARTICLES)
        self.assertTrue(out.hasCTF() and out.hasAlignmentProj())
        self.assertEqual(out.getDim(), (NEW_BOX, NEW_BOX, 1))
        self.assertAlmostEqual(out.getSamplingRate(), PIXEL, places=4)
        originals = {p.getObjId(): p.getLocation() for p in inp}
        for p in out:
            self.assertEqual(p._hetplugin_subtractionScale.get(), 1.0)
            index, path = originals[p.getObjId()]
            name = p._hetplugin_originalImageName.get()
            self.assertEqual(int(name.split('@')[0]), index)
            self.assertEqual(os.path.abspath(name.split('@', 1)[1]), os.path.abspath(path))
            self.assertNotEqual(os.path.abspath(p.getFileName()), os.path.abspath(path))
            self.assertIsNotNone(p.getCTF())
        relations = self.proj.mapper.getRelationsByCreator(prot)
        self.assertTrue(any(r['name'] == RELATION_TRANSFORM for r in relations), relations)

        # the core's reconstruct on the output particles: the kept region, centred
        star = self.proj.getPath('subtracted_out.star')
        write_particles_star(out, star)
        ds = ParticleDataset(read_particles(star))
        r_max = 10.0
        rec = backproject_dataset(ds, np.arange(len(ds)), r_max=r_max).reconstruct().numpy()
        ds.close()
        info = prot._readJson('summary')
        centre_px = np.asarray(info['centre_A']) / PIXEL
        self.assertGreater(np.linalg.norm(centre_px), 5)
        low = lowpass_sharp(rec, r_max)
        c = corr(low, lowpass_sharp(recentre_volume(self.truth.kept_map, centre_px, NEW_BOX), r_max))
        # where the kept region lies: parabolic peak of the correlation over +-1 px shifts per axis
        offset = []
        for axis in range(3):
            step = np.eye(3)[axis]
            cc = [corr(low, lowpass_sharp(recentre_volume(self.truth.kept_map, centre_px + d * step, NEW_BOX), r_max))
                  for d in (-1, 0, 1)]
            offset.append(0.5 * (cc[0] - cc[2]) / (cc[0] - 2 * cc[1] + cc[2]))
        print('\nScipion subtract -> reconstruct: correlation with the centred kept truth %.4f; the kept region '
              'sits %s px from the box centre' % (c, np.round(offset, 3)))
        self.assertGreater(c, 0.95)
        self.assertLess(np.abs(offset).max(), 0.25)
        self.assertTrue(prot._summary()[0].startswith('%d particles subtracted' % N_PARTICLES))
        self.assertTrue(prot._methods())

    def test_2_revert(self):
        sub = self.subtracted()
        prot = self.newProtocol(ProtSignalSubtract, operation=1, numberOfThreads=1, useGpu=False)
        prot.inputParticles.set(sub)
        prot.inputParticles.setExtended('outputParticles')
        self.assertEqual(prot.validate(), [])
        prot.setObjLabel('revert')
        self.launchProtocol(prot)
        out = prot.outputParticles
        inp = self.protParticles.outputParticles
        self.assertSetSize(out, N_PARTICLES)
        self.assertEqual(out.getDim(), (BOX, BOX, 1))
        before = {p.getObjId(): (p.getLocation(), p.getTransform().getMatrix().copy()) for p in inp}
        for p in out:
            location, matrix = before[p.getObjId()]
            self.assertEqual(p.getIndex(), location[0])
            self.assertEqual(os.path.abspath(p.getFileName()), os.path.abspath(location[1]))
            self.assertTrue(np.allclose(p.getTransform().getMatrix(), matrix, atol=1e-9))
            self.assertFalse(hasattr(p, '_hetplugin_originalImageName'))
        # the same pixels as the imported particles
        star = self.proj.getPath('reverted_out.star')
        write_particles_star(out, star)
        t = read_particles(star)
        with StackReader(t.image_path, t.image_index) as reader:
            reverted = reader.read(np.arange(len(t)))
        original = read_particles(self.truth.star)
        with StackReader(original.image_path, original.image_index) as reader:
            self.assertTrue(np.array_equal(reverted, reader.read(np.arange(len(original)))))
        # subtract-mode validation refuses particles that were not subtracted
        bad = self.newProtocol(ProtSignalSubtract, operation=1)
        bad.inputParticles.set(self.protParticles)
        bad.inputParticles.setExtended('outputParticles')
        self.assertMessage(bad.validate(), 'do not come from a signal subtraction')

    def test_3_per_class_maps(self):
        folder = self.proj.getPath('sim')
        protMaps = self.importVolume(os.path.join(folder, 'map_state_*.mrc'), 'state maps', pattern=True)
        self.assertEqual(protMaps.outputVolumes.getSize(), 2)
        prot = self.newSubtract(volume=protMaps, volumeName='outputVolumes', doRecentre=False, newBoxSize=-1)
        self.assertEqual(prot.validate(), [])
        prot.setObjLabel('per-class subtraction')
        self.launchProtocol(prot)
        star = self.proj.getPath('per_class.star')
        write_particles_star(prot.outputParticles, star)
        t = read_particles(star)
        order = np.argsort(np.asarray(t.columns['rlnImageId']))
        with StackReader(t.image_path, t.image_index) as reader:
            x = reader.read(order)
        ideal = self.truth.kept + self.truth.noise
        residual = np.linalg.norm(x - ideal) / np.linalg.norm(self.truth.kept)
        print("\nScipion: ||X' - ideal|| / ||kept|| with each particle's own class map: %.4f" % residual)
        self.assertLess(residual, 0.05)
        self.assertTrue(prot._readJson('summary')['by_class'])

    def test_4_validate(self):
        """The form's checks on objects made here (not imported: validation only reads them)."""
        folder = self.proj.getPath('sim')
        self.assertEqual(self.newSubtract().validate(), [])
        self.assertMessage(self.newSubtract(newBoxSize=35).validate(), 'must be even')
        self.assertMessage(self.newSubtract(newBoxSize=BOX + 8).validate(), 'larger than the particles')
        write_volume(os.path.join(folder, 'small_map.mrc'), np.zeros((40,) * 3, np.float32), PIXEL)
        small = Volume(location=os.path.join(folder, 'small_map.mrc'))
        small.setSamplingRate(PIXEL)
        prot = self.newSubtract()
        prot.inputVolume.set(small)
        self.assertMessage(prot.validate(), 'box of 40 voxels')
        coarse = Volume(location=str(self.truth.paths['consensus']))
        coarse.setSamplingRate(2 * PIXEL)
        prot.inputVolume.set(coarse)
        self.assertMessage(prot.validate(), 'pixel size')
        masks = {'bad': self.truth.mask * 2.0, 'ones': np.ones((BOX,) * 3, np.float32),
                 'zeros': np.zeros((BOX,) * 3, np.float32), 'tiny': spherical_mask(BOX, 3.0, 2.0)}
        checks = {'bad': 'must lie in [0, 1]', 'ones': 'one everywhere', 'zeros': 'is empty'}
        for name, data in masks.items():
            path = os.path.join(folder, 'mask_%s.mrc' % name)
            write_volume(path, data, PIXEL)
            mask = VolumeMask(location=path)
            mask.setSamplingRate(PIXEL)
            prot = self.newSubtract()
            prot.inputMask.set(mask)
            if name in checks:
                self.assertMessage(prot.validate(), checks[name])
            else:
                self.assertEqual(prot.validate(), [])
                self.assertMessage(prot._warnings(), 'run out of signal')
        # particles without CTF are refused
        blocks = read_star(self.truth.star)
        for label in ('rlnDefocusU', 'rlnDefocusV', 'rlnDefocusAngle', 'rlnCtfBfactor', 'rlnCtfScalefactor',
                      'rlnPhaseShift'):
            blocks['particles'].pop(label, None)
        write_star(os.path.join(folder, 'no_ctf.star'), blocks)
        noCtf = open_set(star_to_sqlite(os.path.join(folder, 'no_ctf.star'), os.path.join(folder, 'no_ctf.sqlite')))
        self.assertTrue(noCtf.hasAlignmentProj() and not noCtf.hasCTF())
        prot = self.newSubtract()
        prot.inputParticles.set(noCtf)
        self.assertMessage(prot.validate(), 'no CTF information')
        # per-class maps need particles with class ids
        maps = SetOfVolumes(filename=os.path.join(folder, 'state_maps.sqlite'))
        maps.setSamplingRate(PIXEL)
        for k in (1, 2):
            volume = Volume(location=str(self.truth.paths['state_%d' % k]))
            volume.setSamplingRate(PIXEL)
            volume.setObjId(k)
            maps.append(volume)
        maps.write()
        prot = self.newSubtract()
        prot.inputVolume.set(maps)
        self.assertEqual(prot.validate(), [])
        blocks = read_star(self.truth.star)
        del blocks['particles']['rlnClassNumber']
        write_star(os.path.join(folder, 'no_class.star'), blocks)
        noClass = open_set(star_to_sqlite(os.path.join(folder, 'no_class.star'), os.path.join(folder, 'no_class.sqlite')))
        self.assertTrue(noClass.hasCTF() and noClass.hasAlignmentProj())
        prot.inputParticles.set(noClass)
        self.assertMessage(prot.validate(), 'needs particles with class ids')
