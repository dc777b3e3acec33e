"""ProtMulticlassRefine in real Scipion test projects (no mocks).

Data are simulated on the fly with ``hetplugin.core.simulate`` (two classes, one
with a domain removed), turned into a Scipion SetOfParticles sqlite with CTF and
alignment by ``hetplugin.convert.star_to_particle_set``, and imported with
``ProtImportParticles`` (IMPORT_FROM_SCIPION); the consensus map with
``ProtImportVolumes``. Then the protocol is launched (a separate process, as in
Scipion) and its outputs are checked: counts, sizes, sampling, extras,
relations, class accuracy against the simulator's truth; a chained second round
on one output class; and the form validation without launching.

unittest style, so both ``pytest`` and Scipion's runner
(``python -m pyworkflow.apps.pw_run_tests hetplugin.tests.test_protocols_multiclass``,
in an environment set by ``hetplugin.scipion_env``) run it.
"""
import json
import os
import time
import unittest

import mrcfile
import numpy as np

from pyworkflow.object import Pointer
from pyworkflow.tests import BaseTest, setupTestProject
from pwem.protocols import (ProtImportMask, ProtImportParticles,
                            ProtSubSet)

from hetplugin.tests.scipion_imports import ImportHelpers, star_to_sqlite
from hetplugin.core.simulate import simulate
from hetplugin.core.starfile import read_particles
from hetplugin.protocols import ProtMulticlassRefine

try:
    import pytest
    slow = pytest.mark.slow
except ImportError:          # Scipion's runner without pytest: run everything
    def slow(func):
        return func

N_PARTICLES, BOX, PIXEL = 360, 36, 4.5
THREADS = max(1, min(4, os.cpu_count() or 1))


def _quiet(*_args, **_kwargs):
    pass


def simulate_set(folder, n_particles, seed, with_alignment=True, box=BOX):
    """Simulate particles into ``folder`` and write them as a Scipion sqlite
    (CTF, and alignment unless ``with_alignment`` is False). Returns
    (sqlite path, truth labels 1..K in particle-id order, simulator summary)."""
    summary = simulate(folder, n_particles=n_particles, n_classes=2, box=box, pixel_size_A=PIXEL,
                       snr=1.0, seed=seed, heterogeneity='removal',
                       with_alignment=with_alignment, log=_quiet)
    sqlite = star_to_sqlite(os.path.join(folder, 'particles.star'), os.path.join(folder, 'particles.sqlite'))
    truth = np.asarray(read_particles(os.path.join(folder, 'truth_particles.star')).class_number)
    return sqlite, truth, summary


def label_accuracy(truth, predicted):
    """Fraction of agreement, best over the two labellings (classes have no order)."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    return max(np.mean(truth == predicted), np.mean(truth == 3 - predicted))


def compact_ranges(ids):
    """'1-3,7,9-10' for [1, 2, 3, 7, 9, 10] (pwem's ProtSubSet range syntax)."""
    ids, parts, start = sorted(ids), [], None
    for i, value in enumerate(ids):
        if start is None:
            start = value
        if i + 1 == len(ids) or ids[i + 1] != value + 1:
            parts.append(str(start) if start == value else '%d-%d' % (start, value))
            start = None
    return ','.join(parts)


class _ProjectTest(ImportHelpers, BaseTest):
    """A test project per class; the working directory is restored afterwards."""
    pixelSize = PIXEL

    @classmethod
    def setUpClass(cls):
        cls._cwd = os.getcwd()
        setupTestProject(cls)
        cls.dataDir = cls.proj.getPath('sim')

    @classmethod
    def tearDownClass(cls):
        os.chdir(cls._cwd)

    @classmethod
    def newMulticlass(cls, particlesProt, volumeProt, particlesName='outputParticles',
                      volumeName='outputVolume', **kwargs):
        values = dict(numberOfClasses=2, numberOfIterations=4, alignmentIterations=0,
                      angularSamplingDeg=5.0, doLocalSearch=True, localSearchRangeDeg=10.0, randomSeed=1,
                      numberOfThreads=THREADS, useGpu=False)
        values.update(kwargs)
        prot = cls.newProtocol(ProtMulticlassRefine, **values)
        prot.inputParticles.set(particlesProt)
        prot.inputParticles.setExtended(particlesName)
        prot.referenceVolume.set(volumeProt)
        prot.referenceVolume.setExtended(volumeName)
        return prot


class TestMulticlassRefine(_ProjectTest):
    """Simulated data with alignment -> ProtMulticlassRefine (local search) -> outputs."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        sqlite, cls.truth, cls.summary = simulate_set(cls.dataDir, N_PARTICLES, seed=3)
        cls.protParticles = cls.importParticles(sqlite, 'simulated particles')
        cls.protVolume = cls.importVolume(os.path.join(cls.dataDir, 'consensus.mrc'), 'consensus map')
        cls.protRefine = None

    @classmethod
    def refined(cls):
        """The multiclass run (launched once, shared by the tests of this class)."""
        if cls.protRefine is None:
            prot = cls.newMulticlass(cls.protParticles, cls.protVolume)
            prot.setObjLabel('multiclass K=2')
            cls.launchProtocol(prot)
            cls.protRefine = prot
        return cls.protRefine

    def test_1_outputs(self):
        particles = self.protParticles.outputParticles
        self.assertEqual(particles.getSize(), N_PARTICLES)
        self.assertTrue(particles.hasCTF() and particles.hasAlignmentProj())
        # ids survive the import: truth row i <-> particle id i + 1
        self.assertEqual([p.getObjId() for p in particles], list(range(1, N_PARTICLES + 1)))

        prot = self.refined()
        classes = prot.outputClasses
        volumes = prot.outputVolumes
        outParts = prot.outputParticles

        # classes: 2, sizes add up, representative = class map with the right box / sampling
        self.assertSetSize(classes, 2)
        sizes = {}
        for cls3D in classes.iterItems():
            rep = cls3D.getRepresentative()
            self.assertTrue(os.path.exists(rep.getFileName()), rep.getFileName())
            self.assertAlmostEqual(rep.getSamplingRate(), PIXEL, places=4)
            self.assertEqual(rep.getDim(), (BOX, BOX, BOX))
            self.assertEqual(cls3D._hetplugin_size.get(), cls3D.getSize())
            self.assertGreater(cls3D._hetplugin_resolution_A.get(), 0)
            self.assertTrue(0 < cls3D._hetplugin_distribution.get() < 1)
            sizes[cls3D.getObjId()] = cls3D.getSize()
        self.assertEqual(sum(sizes.values()), N_PARTICLES)

        # volumes: one per class
        self.assertSetSize(volumes, 2)
        self.assertAlmostEqual(volumes.getSamplingRate(), PIXEL, places=4)
        for vol in volumes:
            self.assertEqual(vol.getDim(), (BOX, BOX, BOX))
            self.assertEqual(vol._hetplugin_size.get(), sizes[vol.getObjId()])

        # particles: all of them, aligned, with class and extras
        self.assertSetSize(outParts, N_PARTICLES)
        self.assertTrue(outParts.hasAlignmentProj() and outParts.hasCTF())
        self.assertAlmostEqual(outParts.getSamplingRate(), PIXEL, places=4)
        predicted = np.zeros(N_PARTICLES, dtype=int)
        for p in outParts:
            self.assertIn(p.getClassId(), (1, 2))
            predicted[p.getObjId() - 1] = p.getClassId()
            posteriors = [p._hetplugin_classPosterior001.get(), p._hetplugin_classPosterior002.get()]
            self.assertAlmostEqual(sum(posteriors), 1.0, places=3)
            self.assertTrue(0 <= p._hetplugin_maxProb.get() <= 1 + 1e-6)
            self.assertTrue(np.isfinite(p._hetplugin_logLikelihood.get()))
            self.assertGreaterEqual(p._hetplugin_nrSignificant.get(), 1)
            self.assertIsNotNone(p.getTransform())
            self.assertIsNotNone(p.getCTF())
        self.assertEqual(np.bincount(predicted, minlength=3)[1:].tolist(), [sizes[1], sizes[2]])

        # accuracy against the simulator's truth (matched by object id)
        accuracy = label_accuracy(self.truth, predicted)
        print('multiclass test: class sizes %s, accuracy %.3f' % (sizes, accuracy))
        self.assertGreaterEqual(accuracy, 0.9)

        # provenance: every output comes from the particles and the reference
        graph = self.proj.getSourceGraph(refresh=True)
        for outName in ('outputClasses', 'outputVolumes', 'outputParticles'):
            outId = Pointer(prot, extended=outName).getUniqueId()
            for source, name in ((self.protParticles, 'outputParticles'),
                                 (self.protVolume, 'outputVolume')):
                node = graph.getNode(Pointer(source, extended=name).getUniqueId())
                self.assertIsNotNone(node)
                self.assertIn(outId, [c.getName() for c in node.getChildren()],
                              '%s is not derived from %s' % (outName, name))

        # info: summary, methods, citations
        summary = '\n'.join(prot.summary())
        self.assertIn('class 1', summary)
        self.assertIn('particles', summary)
        self.assertNotIn('re-aligned', summary)      # local searches around the given alignment
        self.assertTrue(prot.methods())
        self.assertEqual(sorted(prot._citations()), ['Punjani2017', 'Scheres2012a', 'Scheres2012b'])

        # the core's job file: local search, CPU, threads
        with open(prot.getOutputFile('job')) as f:
            job = json.load(f)
        self.assertEqual(job['local_search'], 10.0)
        self.assertEqual(job['device'], 'cpu')
        self.assertEqual(job['classes'], 2)

    def test_2_plots(self):
        from hetplugin.viewers import render_multiclass_plots, render_protocol_plots
        prot = self.refined()
        png = render_protocol_plots(prot)
        self.assertGreater(os.path.getsize(png), 10000)
        with open(png, 'rb') as f:
            self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n')
        # the Scipion viewer builds its views (plots, classes, maps) without showing them
        from hetplugin.viewers import MulticlassViewer
        viewer = MulticlassViewer(project=self.proj, protocol=prot)
        viewer.setProtocol(prot)
        for name, function in viewer._getVisualizeDict().items():
            views = function(name)
            self.assertTrue(views, name)
            self.assertFalse(any(v.__class__.__name__ == 'MessageView' for v in views), name)
        plot = viewer._plotAll()[0]
        self.assertEqual(len(plot.getFigure().axes), 6)
        # missing data give empty panels, not errors
        empty = render_multiclass_plots([], {}, os.path.join(self.proj.getTmpPath(), 'empty.png'))
        self.assertTrue(os.path.exists(empty))
        # a history with consensus-alignment and class re-alignment stages, as dicts (no files)
        history = [dict(iteration=i, stage={1: 'alignment', 2: 'alignment', 4: 'class alignment'}.get(i, 'classification'),
                        class_sizes=[50.0, 50.0], resolution_A=[20.0 - i, 21.0 - i],
                        changed_class_fraction=1.0 / i, mean_angle_change_deg=10.0 / i,
                        loglik=-1000.0 * i) for i in (1, 2, 3, 4, 5)]
        model = dict(pixel_size_A=PIXEL, classes=[
            dict(class_number=1, resolution_A=12.0, fsc=np.linspace(1, 0, BOX // 2 + 1).tolist()),
            dict(class_number=2, resolution_A=float('inf'), fsc=[])])
        staged = render_multiclass_plots(history, model,
                                         os.path.join(self.proj.getTmpPath(), 'staged.png'))
        self.assertGreater(os.path.getsize(staged), 10000)

    def test_3_chained_round(self):
        """Particles of one output class (pwem's subset protocol) and the output
        class maps (a SetOfVolumes, one per class) go into a second round."""
        prot = self.refined()
        classId = max(prot.outputClasses.iterItems(), key=lambda c: c.getSize()).getObjId()
        ids = [p.getObjId() for p in prot.outputClasses[classId].iterItems()]
        subset = self.newProtocol(ProtSubSet, selectIds=True, range=compact_ranges(ids))
        subset.inputFullSet.set(prot)
        subset.inputFullSet.setExtended('outputParticles')
        subset.setObjLabel('class %d particles' % classId)
        self.launchProtocol(subset)
        subParticles = subset.outputParticles
        self.assertEqual(subParticles.getSize(), len(ids))
        self.assertTrue(subParticles.hasAlignmentProj())

        second = self.newMulticlass(subset, prot, volumeName='outputVolumes',
                                    numberOfIterations=1, minClassSize=5)
        second.setObjLabel('second round')
        self.assertEqual(second.validate(), [])
        wrongK = self.newMulticlass(subset, prot, volumeName='outputVolumes', numberOfClasses=3)
        self.assertTrue(any('has 2 volumes but 3 classes' in e for e in wrongK.validate()),
                        wrongK.validate())
        self.launchProtocol(second)
        self.assertSetSize(second.outputParticles, len(ids))
        self.assertEqual(sum(c.getSize() for c in second.outputClasses.iterItems()), len(ids))
        self.assertSetSize(second.outputVolumes, 2)
        # the second round wrote two input references (one per class)
        with open(second.getOutputFile('job')) as f:
            self.assertEqual(len(json.load(f)['reference']), 2)

        # continuing: the saved state of the same options is resumed; other options restart
        second._createFilenameTemplates()
        with open(second.getOutputFile('job')) as f:
            options = json.load(f)
        self.assertTrue(second._canResume(options))
        options['tau2_fudge'] = 2.0
        self.assertFalse(second._canResume(options))
        self.assertFalse(os.path.exists(second.getOutputFile('state')))


class TestMulticlassValidation(_ProjectTest):
    """The form's _validate / _warnings on real imported objects, without launching."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        sqlite, _truth, _summary = simulate_set(cls.dataDir, 60, seed=5)
        cls.protParticles = cls.importParticles(sqlite, 'particles')
        cls.protVolume = cls.importVolume(os.path.join(cls.dataDir, 'consensus.mrc'), 'map')
        # particles without CTF nor alignment: plain import of the MRC stack
        cls.protNoCtf = cls.newProtocol(ProtImportParticles,
                                        importFrom=ProtImportParticles.IMPORT_FROM_FILES,
                                        filesPath=cls.dataDir, filesPattern='particles_001.mrcs',
                                        samplingRate=PIXEL, voltage=300.0)
        cls.launchProtocol(cls.protNoCtf)
        # a map of another box, and a mask with values outside [0, 1]
        other = os.path.join(cls.dataDir, 'box40.mrc')
        badMask = os.path.join(cls.dataDir, 'bad_mask.mrc')
        for path, box, value in ((other, 40, 1.0), (badMask, BOX, 2.0)):
            with mrcfile.new(path, overwrite=True) as m:
                m.set_data(np.full((box,) * 3, value, np.float32))
                m.voxel_size = PIXEL
        cls.protOtherBox = cls.importVolume(other, 'box 40')
        cls.protBadMask = cls.newProtocol(ProtImportMask, maskPath=badMask, samplingRate=PIXEL)
        cls.launchProtocol(cls.protBadMask)

    def test_valid(self):
        prot = self.newMulticlass(self.protParticles, self.protVolume, minClassSize=10)
        self.assertEqual(prot.validate(), [])
        self.assertEqual(prot._warnings(), [])

    def test_box_mismatch(self):
        prot = self.newMulticlass(self.protParticles, self.protOtherBox, minClassSize=10)
        self.assertMessage(prot.validate(), 'box of 40 voxels but the particles are %d pixels' % BOX)

    def test_classes_times_min_size(self):
        prot = self.newMulticlass(self.protParticles, self.protVolume, numberOfClasses=3,
                                  minClassSize=25)
        self.assertMessage(prot.validate(), '3 classes x minimum class size 25 = 75 exceeds the 60 particles')
        prot = self.newMulticlass(self.protParticles, self.protVolume, numberOfClasses=1,
                                  minClassSize=10)
        self.assertMessage(prot.validate(), 'number of classes must be at least 2')
        prot = self.newMulticlass(self.protParticles, self.protVolume, minClassSize=10,
                                  numberOfIterations=3, alignmentIterations=3)
        self.assertMessage(prot.validate(), 'ask for more than 3 iterations')

    def test_missing_ctf(self):
        prot = self.newMulticlass(self.protNoCtf, self.protVolume, minClassSize=10)
        self.assertMessage(prot.validate(), 'have no CTF information, but CTF correction is asked')
        self.assertMessage(prot._warnings(), 'particles have no 3D alignment')
        prot = self.newMulticlass(self.protNoCtf, self.protVolume, minClassSize=10, doCTF=False)
        self.assertEqual(prot.validate(), [])

    def test_mask_values(self):
        prot = self.newMulticlass(self.protParticles, self.protVolume, minClassSize=10)
        prot.referenceMask.set(self.protBadMask)
        prot.referenceMask.setExtended('outputMask')
        self.assertMessage(prot.validate(), 'values must lie in [0, 1]')

    def test_non_mrc_volume_accepted_missing_refused(self):
        """A readable SPIDER map is accepted (it is converted); a missing one is refused by name."""
        import numpy as np
        from pwem.objects import Volume
        from hetplugin.convert.images import write_spider
        from hetplugin.protocols.protocol_base import isMrcPath
        self.assertTrue(isMrcPath('a/b.mrc:mrc') and isMrcPath('b.map') and isMrcPath('1@s.mrcs'))
        self.assertFalse(isMrcPath('b.spi') or isMrcPath('b.vol:spi'))
        prot = self.newMulticlass(self.protParticles, self.protVolume)
        missing = os.path.join(self.dataDir, 'missing_map.spi')
        self.assertIn('does not exist', prot._formatError(Volume(location=missing), 'reference volume'))
        readable = os.path.join(self.dataDir, 'map_ok.spi')
        write_spider(readable, np.zeros((8, 8, 8), np.float32))
        self.assertIsNone(prot._formatError(Volume(location=readable), 'reference volume'))

    def test_form(self):
        """Every param has a label and help; conditions evaluate; expert params exist."""
        prot = self.newMulticlass(self.protParticles, self.protVolume)
        advanced = []
        for name, param in prot._definition.iterAllParams():
            if not param.label.get() or param.__class__.__name__ in ('Line', 'Group'):
                continue
            self.assertTrue(param.help.get(), 'param %s has no help' % name)
            prot.evalParamCondition(name)   # raises on a broken condition
            if param.expertLevel.get():
                advanced.append(name)
        for name in ('minClassSize', 'limitResolEStep', 'randomSeed', 'batchSize',
                     'alignmentIterations'):
            self.assertIn(name, advanced)

    def test_warnings(self):
        prot = self.newMulticlass(self.protParticles, self.protVolume, minClassSize=20,
                                  angularSamplingDeg=30.0)
        warnings = prot._warnings()
        self.assertMessage(warnings, 'expect small, unreliable classes')
        self.assertMessage(warnings, 'angular sampling of 30.0 deg is coarse')
        # three classes from one reference need a longer run than two: the default (0) gives it
        prot = self.newMulticlass(self.protParticles, self.protVolume, minClassSize=5, numberOfClasses=3,
                                  numberOfIterations=25)
        self.assertMessage(prot._warnings(), 'Consider 30 iterations')
        for iterations, expected in ((0, 30), (30, 30)):
            prot = self.newMulticlass(self.protParticles, self.protVolume, minClassSize=5, numberOfClasses=3,
                                      numberOfIterations=iterations)
            self.assertFalse(any('iterations' in w for w in prot._warnings()), prot._warnings())
            self.assertEqual(prot._iterations(), expected)
        prot = self.newMulticlass(self.protParticles, self.protVolume, minClassSize=5, numberOfIterations=0)
        self.assertEqual(prot._iterations(), 25)
        prot = self.newMulticlass(self.protParticles, self.protVolume, minClassSize=5, numberOfIterations=-2)
        self.assertMessage(prot.validate(), 'number of iterations cannot be negative')

    def test_summary_of_a_run_whose_classes_had_not_settled(self):
        import json
        prot = self.newMulticlass(self.protParticles, self.protVolume, minClassSize=10)
        self.proj.saveProtocol(prot)
        path = os.path.join(self.proj.getPath(), prot.getOutputFile('model'))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        classes = [dict(class_number=j, size=30, resolution_A=8.0) for j in (1, 2)]
        with open(path, 'w') as f:
            json.dump(dict(n_particles=60, iterations=25, converged=False, classes=classes, history=[],
                           classes_unsettled_fraction=0.069, suggested_iterations=30), f)
        summary = '\n'.join(prot._summary())
        self.assertIn('stopped at the iteration limit', summary)
        self.assertIn('6.9% of the particles still changed class', summary)
        self.assertIn('Run again with more iterations (e.g. 30)', summary)


class TestMulticlassContinue(_ProjectTest):
    """Scipion's *continue* after a stop: the core resumes from its saved iteration."""

    @slow
    def test_stop_and_continue(self):
        sqlite, _truth, _summary = simulate_set(self.dataDir, 240, seed=7)
        particles = self.importParticles(sqlite, 'particles')
        volume = self.importVolume(os.path.join(self.dataDir, 'consensus.mrc'), 'map')
        prot = self.newMulticlass(particles, volume, numberOfIterations=8, minClassSize=10)
        self.proj.launchProtocol(prot, wait=False)
        latest = os.path.join(self.proj.getPath(), prot.getOutputFile('state_latest'))
        deadline = time.time() + 300
        while time.time() < deadline:
            prot = self.proj.getProtocol(prot.getObjId())
            if os.path.exists(latest) or not prot.isActive():
                break
            time.sleep(0.5)
        self.assertTrue(os.path.exists(latest), 'no iteration finished (status %s)' % prot.getStatus())
        self.proj.stopProtocol(prot)
        prot = self.proj.getProtocol(prot.getObjId())
        self.assertTrue(prot.isAborted(), prot.getStatus())
        with open(latest) as f:
            stoppedAt = json.load(f)['iteration']

        self.launchProtocol(prot)          # continue mode (runMode RESUME, as in the GUI)
        prot = self.proj.getProtocol(prot.getObjId())
        with open(prot.getStdoutLog()) as f:
            log = f.read()
        self.assertIn('job.json --continue', log)
        self.assertIn('continuing after iteration %d' % stoppedAt, log)
        self.assertSetSize(prot.outputParticles, 240)
        self.assertSetSize(prot.outputClasses, 2)


if __name__ == '__main__':
    unittest.main()
