"""ProtFocusedRefine in a real Scipion test project (no mocks), chained after ProtSignalSubtract.

A two-domain particle whose kept domain turns by up to 20 degrees about its centre in
every particle (hetplugin.core.simulate_subtract with ``kept_wobble_deg``) -> a Scipion
SetOfParticles sqlite with CTF and the complex's alignment -> ProtImportParticles; the
consensus map and the kept domain's mask -> ProtImportVolumes / ProtImportMask ->
ProtSignalSubtract (region to keep) -> ProtFocusedRefine on its output. The outputs are
checked (a Volume with half maps, particles with the region's alignment, relations) and
the refined poses against the kept domain's true ones; then the form's validation and
warnings on imported objects.

unittest style: ``pytest`` and ``python -m pyworkflow.apps.pw_run_tests
hetplugin.tests.test_protocols_focused`` both run it.
"""
import os

import numpy as np

from pyworkflow.object import RELATION_SOURCE, RELATION_TRANSFORM
from pyworkflow.tests import BaseTest, setupTestProject
from pwem.protocols import ProtImportParticles

from hetplugin.tests.scipion_imports import ImportHelpers, star_to_sqlite
from hetplugin.core.mrc import read_volume, write_volume
from hetplugin.core.rotations import angular_distance_deg
from hetplugin.core.simulate_subtract import make_flexible, simulate_subtraction
from hetplugin.protocols import ProtFocusedRefine, ProtSignalSubtract

N_PARTICLES, BOX, NEW_BOX, PIXEL = 400, 40, 32, 3.2
THREADS = max(1, min(2, os.cpu_count() or 1))


def rotations_of(particles):
    """(ids, rotations (N, 3, 3)) of a particle set's projection alignment, in id order."""
    ids, rots = [], []
    for p in particles.iterItems(orderBy='id'):
        ids.append(p.getObjId())
        rots.append(np.linalg.inv(p.getTransform().getMatrix()[:3, :3]))
    return np.array(ids), np.array(rots)


class TestFocusedRefine(ImportHelpers, BaseTest):
    pixelSize = PIXEL

    @classmethod
    def setUpClass(cls):
        cls._cwd = os.getcwd()
        setupTestProject(cls)
        folder = cls.proj.getPath('sim')
        cls.truth = simulate_subtraction(folder, n_particles=N_PARTICLES, box=BOX, pixel_size_A=PIXEL, snr=5.0,
                                         seed=2, kept_wobble_deg=20.0,
                                         model=make_flexible(BOX, seed=2, atoms_per_domain=300))
        cls.protParticles = cls.importParticles(star_to_sqlite(cls.truth.star, os.path.join(folder, 'p.sqlite')),
                                                'simulated particles')
        cls.protMap = cls.importVolume(str(cls.truth.paths['consensus']), 'consensus map')
        cls.protMask = cls.importMask(str(cls.truth.paths['mask']), 'domain mask')
        # recentred on the domain and re-boxed: the focused refinement moves map and mask into that frame
        cls.protSubtract = cls.newProtocol(ProtSignalSubtract, maskMeaning=0, doRecentre=True, newBoxSize=NEW_BOX,
                                           numberOfThreads=1, useGpu=False)
        cls.protSubtract.inputParticles.set(cls.protParticles)
        cls.protSubtract.inputParticles.setExtended('outputParticles')
        cls.protSubtract.inputVolume.set(cls.protMap)
        cls.protSubtract.inputVolume.setExtended('outputVolume')
        cls.protSubtract.inputMask.set(cls.protMask)
        cls.protSubtract.inputMask.setExtended('outputMask')
        cls.launchProtocol(cls.protSubtract)
        cls.protFocused = None

    @classmethod
    def tearDownClass(cls):
        os.chdir(cls._cwd)

    @classmethod
    def newFocused(cls, particles=None, particlesName='outputParticles', mask=None, **kwargs):
        values = dict(numberOfIterations=4, angularSamplingDeg=4.0, localSearchRangeDeg=20.0,
                      initialLowPassFilterA=15.0, numberOfThreads=THREADS, useGpu=False)
        values.update(kwargs)
        prot = cls.newProtocol(ProtFocusedRefine, **values)
        prot.inputParticles.set(particles or cls.protSubtract)
        prot.inputParticles.setExtended(particlesName)
        prot.referenceVolume.set(cls.protMap)
        prot.referenceVolume.setExtended('outputVolume')
        prot.focusMask.set(mask or cls.protMask)
        prot.focusMask.setExtended('outputMask')
        return prot

    @classmethod
    def refined(cls):
        if cls.protFocused is None:
            prot = cls.newFocused()
            prot.setObjLabel('focused refinement')
            cls.launchProtocol(prot)
            cls.protFocused = prot
        return cls.protFocused

    # ---------------------------------------------------------------- tests
    def test_1_outputs(self):
        prot = self.refined()
        volume = prot.outputVolume
        self.assertEqual(volume.getDim(), (NEW_BOX, NEW_BOX, NEW_BOX))
        # the recentred particles got the map and mask moved into their frame, in new files
        for key in ('input_reference', 'input_mask'):
            path = prot.getOutputFile(key, ref=1)
            self.assertFalse(os.path.islink(path), path)
            self.assertEqual(read_volume(path)[0].shape, (NEW_BOX,) * 3)
        np.testing.assert_array_equal(read_volume(str(self.truth.paths['mask']))[0], self.truth.mask)
        self.assertAlmostEqual(volume.getSamplingRate(), PIXEL, places=4)
        halves = volume.getHalfMaps().split(',')
        self.assertEqual(len(halves), 2)
        for half in halves:
            self.assertTrue(os.path.exists(half), half)
        self.assertGreater(volume._hetplugin_resolution_A.get(), 2 * PIXEL)
        particles = prot.outputParticles
        self.assertSetSize(particles, N_PARTICLES)
        self.assertTrue(particles.hasAlignmentProj() and particles.hasCTF())
        for p in particles:
            self.assertTrue(0.0 < p._hetplugin_maxProb.get() <= 1.0)
            # the subtracted images are kept (the refinement does not write images)
            self.assertTrue(p._hetplugin_originalImageName.get())
        relations = self.proj.mapper.getRelationsByCreator(prot)
        names = {r['name'] for r in relations}
        self.assertIn(RELATION_SOURCE, names)
        self.assertIn(RELATION_TRANSFORM, names)
        self.assertTrue(any('resolution' in line for line in prot.summary()), prot.summary())
        self.assertTrue(prot.methods())

    def test_2_the_region_gets_its_own_poses(self):
        prot = self.refined()
        ids_in, before = rotations_of(self.protSubtract.outputParticles)
        ids_out, after = rotations_of(prot.outputParticles)
        np.testing.assert_array_equal(ids_in, ids_out)
        truth = self.truth.kept_rotations[ids_out - 1]
        err_before = np.median(angular_distance_deg(before, truth))
        err_after = np.median(angular_distance_deg(after, truth))
        # the consensus poses are the complex's (the domain turns by up to 20 deg)
        self.assertGreater(err_before, 8.0)
        self.assertLess(err_after, 0.8 * err_before)

    def test_2b_viewer(self):
        from hetplugin.viewers import FocusedViewer, render_protocol_plots
        prot = self.refined()
        png = render_protocol_plots(prot)
        with open(png, 'rb') as f:
            self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n')
        # the Scipion viewer builds its views (map, plots) without showing them
        viewer = FocusedViewer(project=self.proj, protocol=prot)
        viewer.setProtocol(prot)
        views = viewer._getVisualizeDict()
        self.assertIn('showVolume', views)
        self.assertNotIn('showClasses3D', views)
        for name, function in views.items():
            shown = function(name)
            self.assertTrue(shown, name)
            self.assertFalse(any(v.__class__.__name__ == 'MessageView' for v in shown), name)

    def test_3_validation(self):
        valid = self.newFocused()
        self.assertEqual(valid.validate(), [])
        # no alignment: an import from files has none
        noAlign = self.newProtocol(ProtImportParticles, importFrom=ProtImportParticles.IMPORT_FROM_FILES,
                                   filesPath=os.path.dirname(str(self.truth.star)), filesPattern='particles_001.mrcs',
                                   samplingRate=PIXEL, voltage=300.0, sphericalAberration=2.7,
                                   amplitudeContrast=0.1, magnification=50000, haveDataBeenPhaseFlipped=False)
        self.launchProtocol(noAlign)
        errors = self.newFocused(particles=noAlign, doCTF=False).validate()
        self.assertMessage(errors, 'no 3D (projection) alignment')
        # a mask out of [0, 1]
        folder = self.proj.getPath('sim')
        bad = os.path.join(folder, 'mask_bad.mrc')
        write_volume(bad, 2.0 * self.truth.mask, PIXEL)
        badMask = self.importMask(bad, 'mask out of range')
        self.assertMessage(self.newFocused(mask=badMask).validate(), 'must lie in [0, 1]')
        # a mask of another box: refused for the original particles; for the recentred ones a box at
        # least theirs is moved into their frame, a smaller one refused
        small = os.path.join(folder, 'mask_small.mrc')
        write_volume(small, self.truth.mask[8:-8, 8:-8, 8:-8], PIXEL)
        smallMask = self.importMask(small, 'mask of another box')
        self.assertMessage(self.newFocused(particles=self.protParticles, mask=smallMask).validate(),
                           'box of 24 voxels')
        self.assertMessage(self.newFocused(mask=smallMask).validate(), 'must be at least as large')
        # a search range below the step searches nothing
        self.assertMessage(self.newFocused(localSearchRangeDeg=2.0).validate(), 'smaller than the angular sampling')
        self.assertMessage(self.newFocused(finestSamplingDeg=4.0).validate(), 'must be finer than the angular')
        job = self.newFocused(finestSamplingDeg=1.0)
        job._createFilenameTemplates()
        self.assertEqual(job._coreOptions()['finest_step'], 1.0)
        self.assertEqual(job._coreOptions()['classes'], 1)

    def test_4_warnings(self):
        # subtracted particles of a region of ~35 kDa: only the small-region warning
        warnings = self.newFocused()._warnings()
        self.assertEqual(len(warnings), 1, warnings)
        self.assertMessage(warnings, 'too little signal')
        # the original particles still hold the other domain
        original = self.newFocused(particles=self.protParticles)._warnings()
        self.assertMessage(original, 'Subtract it first')
