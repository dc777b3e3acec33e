# **************************************************************************
# *
# * hetplugin: heterogeneous reconstruction for Scipion 3
# *
# * This program is free software; you can redistribute it and/or modify
# * it under the terms of the GNU General Public License as published by
# * the Free Software Foundation; either version 3 of the License, or
# * (at your option) any later version.
# *
# **************************************************************************
"""``ProtMulticlassRefine``: multiclass 3D refinement (3D classification).

Runs ``python -m hetplugin.core multiclass`` (see
:mod:`hetplugin.core.multiclass_job`) on the input particles against one or K
references and registers ``outputClasses`` (SetOfClasses3D, representative =
class map), ``outputVolumes`` (SetOfVolumes, one map per class) and
``outputParticles`` (the input particles with their new alignment, class and
per-particle extras ``_hetplugin_maxProb``, ``_hetplugin_logLikelihood``,
``_hetplugin_nrSignificant`` and ``_hetplugin_classPosteriorNNN``).
"""
import enum
import json
import math

import pyworkflow.protocol.params as params
from pyworkflow.object import Boolean, Float, Integer
from pwem.objects import SetOfClasses3D, SetOfParticles, SetOfVolumes, Volume

from hetplugin.core.iterations import default_iterations

from .protocol_base import ProtHetBase


class MulticlassOutputs(enum.Enum):
    outputClasses = SetOfClasses3D
    outputVolumes = SetOfVolumes
    outputParticles = SetOfParticles


#: core STAR label -> Scipion attribute (``_hetplugin_`` is prepended); posteriors added per class.
PARTICLE_EXTRAS = {'rlnMaxValueProbDistribution': 'maxProb',
                   'rlnLogLikeliContribution': 'logLikelihood',
                   'rlnNrOfSignificantSamples': 'nrSignificant'}
#: class_info keys of model.json kept on each class and each class volume.
CLASS_INFO_KEYS = ('size', 'distribution', 'resolution_A', 'below_min_size')


def posteriorLabel(classNumber):
    """STAR column of the class posterior of class ``classNumber`` (1-based)."""
    return 'hetClassPosterior%03d' % classNumber


def posteriorAttribute(classNumber):
    """Scipion attribute suffix of that posterior (``_hetplugin_classPosterior001``)."""
    return 'classPosterior%03d' % classNumber


class ProtMulticlassRefine(ProtHetBase):
    """Multiclass 3D refinement (3D classification): sorts the particles into K
    classes while refining every class map and every particle pose, by
    expectation-maximisation over class x pose x shift in a regularised
    likelihood (Bayesian) framework, as RELION's 3D classification does.
    Particles with an alignment can be refined locally around it (fast);
    without, poses are searched globally.
    """
    _label = 'multiclass refinement (3D classification)'
    _coreCommand = 'multiclass'
    _possibleOutputs = MulticlassOutputs

    # --------------------------- DEFINE param functions ----------------------
    def _defineParams(self, form):
        form.addSection(label='Input')
        form.addParam('inputParticles', params.PointerParam, pointerClass='SetOfParticles',
                      important=True, label='Input particles',
                      help='Particles to classify, with CTF information (for CTF correction) '
                           'and, optionally, a 3D alignment (used as a prior by the local '
                           'search).')
        form.addParam('referenceVolume', params.PointerParam, pointerClass='Volume, SetOfVolumes',
                      important=True, label='Reference volume(s)',
                      help='One map (e.g. a consensus refinement): every class starts from it, '
                           'low-pass filtered, and classes separate from random particle '
                           'subsets. Or a set of K maps, one start per class. The maps must '
                           'have the particles\' box and pixel size.')
        form.addParam('numberOfClasses', params.IntParam, default=2,
                      label='Number of classes (K)',
                      help='How many 3D classes to separate the particles into (at least 2).')
        form.addParam('referenceMask', params.PointerParam, pointerClass='VolumeMask',
                      allowsNull=True, label='Reference mask (optional)',
                      help='Solvent mask applied to the class maps (values in [0, 1], the '
                           'particles\' box and pixel size). Empty: a soft sphere of the '
                           'particle diameter.')
        form.addParam('maskDiameterA', params.FloatParam, default=-1,
                      label='Particle diameter (A)',
                      help='Diameter of the soft spherical mask around the particle, in '
                           'Angstrom. -1: 80% of the box.')
        self._defineSymmetryParam(form, 'every class', ' Classification is usually done in C1.')

        form.addSection(label='CTF')
        self._defineCtfParams(form)

        form.addSection(label='Optimisation')
        form.addParam('numberOfIterations', params.IntParam, default=0,
                      label='Number of iterations',
                      help='Largest number of EM iterations; the run stops earlier when '
                           'classes and poses no longer change. 0 (the default): 25 for two '
                           'classes and 5 more for each further class. From one reference the '
                           'classes separate during an annealed first half, and more classes '
                           'need more iterations (three classes on our tests: 0.73-0.94 '
                           'accuracy in 20 iterations, 0.90-0.995 in 25, 0.92-0.995 in 30). The '
                           'summary says when a run ended with its classes still changing.')
        form.addParam('alignmentIterations', params.IntParam, default=4,
                      expertLevel=params.LEVEL_ADVANCED,
                      label='Consensus alignment iterations',
                      help='With one reference: the first iterations align all particles as one '
                           'class (consensus poses) before the classes are split from random '
                           'subsets. 0: split at once (e.g. when the particles already carry a '
                           'good alignment). Not used with one reference per class.')
        form.addParam('realignIterations', params.IntParam, default=5,
                      expertLevel=params.LEVEL_ADVANCED,
                      label='Class re-alignment iterations',
                      help='With one reference and a global search: once the classification has '
                           'settled (or when only these iterations and one more are left), each '
                           'class is refined again on its own (its particles held in it) with a '
                           'global search from the reference (see the re-alignment low-pass '
                           'filter), for at least this many iterations (more while poses still '
                           'move by over an angular step); '
                           'then one global search over all classes, and classification resumes. '
                           'A state far from the consensus (e.g. a closed conformation among open '
                           'ones) gets wrong consensus poses: it may still sort well, but its map '
                           'is smeared until it is aligned on its own. With C1 symmetry the class '
                           'maps are then turned into the reference\'s frame. Skipped when the run '
                           'has too few iterations left after the annealed half of the '
                           'classification. 0: off.')
        form.addParam('realignLowPassFilterA', params.FloatParam, default=20.0,
                      expertLevel=params.LEVEL_ADVANCED,
                      label='Re-alignment low-pass filter (A)',
                      help='The class re-alignment starts from the reference low-pass filtered to '
                           'this resolution (or to the initial low-pass filter where that is '
                           'finer). From a featureless start, a compact state (e.g. a closed '
                           'conformation) can settle on wrong poses with a self-consistent but '
                           'wrong map; 20 A keeps the domains\' layout without the reference\'s '
                           'detail.')
        form.addParam('initialLowPassFilterA', params.FloatParam, default=30.0,
                      label='Initial low-pass filter (A)',
                      help='The reference(s) are low-pass filtered to this resolution before '
                           'the first iteration, to avoid bias from its high-resolution '
                           'details. 30-60 A is typical.')
        self._defineRegularisationParam(form, ' RELION uses 4 for 3D classification.')
        form.addParam('minClassSize', params.IntParam, default=20,
                      expertLevel=params.LEVEL_ADVANCED,
                      label='Minimum class size (particles)',
                      help='Classes with fewer particles are flagged as unreliable (their maps '
                           'over-fit noise). K times this size must not exceed the number of '
                           'particles.')
        self._defineEStepLimitParam(form, 'assign poses and classes')
        self._defineSeedParam(form)

        form.addSection(label='Sampling')
        form.addParam('angularSamplingDeg', params.FloatParam, default=7.5,
                      label='Angular sampling (deg)',
                      help='Fine angular step of the pose search. The global search first '
                           'uses twice this step, then refines the best poses at this step.')
        self._defineOffsetParams(form)
        form.addParam('doLocalSearch', params.BooleanParam, default=False,
                      label='Local angular search?',
                      help='Search only around the particles\' current alignment (much '
                           'faster). Needs particles with a 3D alignment; without one, the '
                           'search is global.')
        form.addParam('localSearchRangeDeg', params.FloatParam, default=10.0,
                      condition='doLocalSearch',
                      label='Local angular search range (deg)',
                      help='Poses are searched within this many degrees of the input '
                           'alignment.')
        form.addParam('globalIterations', params.IntParam, default=4,
                      expertLevel=params.LEVEL_ADVANCED,
                      label='Global search iterations',
                      help='When the search is global (no local search, or particles without '
                           'alignment): iterations with a global pose search; later iterations '
                           'search locally around the current poses.')

        self._defineBatchParam(form)
        self._defineComputeParams(form)

    # --------------------------- working files --------------------------------
    def _filenameTemplates(self):
        return {'out_particles': 'particles.star',
                'class_map': 'class_%(cls)03d.mrc',
                'model': 'model.json',
                'history': 'history.json'}

    # --------------------------- STEPS functions -----------------------------
    def convertInputStep(self, _signature):
        """Particles -> input_particles.star; references and mask -> MRC links."""
        self._convertParticles(self.inputParticles.get(), use_alignment=self._useAlignment())
        for i, volume in enumerate(self._referenceVolumes(), start=1):
            self._volumeToMrc(volume, self._getFileName('input_reference', ref=i))
        if self.referenceMask.get() is not None:
            self._volumeToMrc(self.referenceMask.get(), self._getFileName('input_mask'))

    def runCoreStep(self, _optionsJson):
        """``python -m hetplugin.core multiclass job.json`` (``--continue`` when resuming)."""
        self._runCore(self._coreOptions())

    def createOutputStep(self):
        from hetplugin.convert import create_volume, fill_classes, update_particles

        model = self._readJson('model')
        if model is None:
            raise ValueError('The core wrote no %s' % self._getFileName('model'))
        particles = self.inputParticles.get()
        sampling = particles.getSamplingRate()
        classes = {int(c['class_number']): c for c in model['classes']}
        maps = {k: self._getFileName('class_map', cls=k) for k in classes}
        info = {k: {key: c[key] for key in CLASS_INFO_KEYS if key in c} for k, c in classes.items()}
        extras = dict(PARTICLE_EXTRAS)
        extras.update({posteriorLabel(k): posteriorAttribute(k) for k in classes})
        outStar = self._getFileName('out_particles')

        outParticles = self._createSetOfParticles()
        n = update_particles(particles, outParticles, outStar, extras)
        if n != particles.getSize():
            self.warning('%d of %d input particles came back from the core'
                         % (n, particles.getSize()))

        outClasses = self._createSetOfClasses3D(self.inputParticles)
        fill_classes(outClasses, outStar, maps, info, extra_labels=extras)

        outVolumes = self._createSetOfVolumes()
        outVolumes.setSamplingRate(sampling)
        for k in sorted(maps):
            volume = create_volume(maps[k], sampling, volume=Volume(), obj_id=k)
            self._setClassInfo(volume, info[k])
            volume.setObjComment('class %d' % k)
            outVolumes.append(volume)

        outputs = {MulticlassOutputs.outputClasses.name: outClasses,
                   MulticlassOutputs.outputVolumes.name: outVolumes,
                   MulticlassOutputs.outputParticles.name: outParticles}
        self._defineOutputs(**outputs)
        for output in outputs.values():
            self._defineSourceRelation(self.inputParticles, output)
            self._defineSourceRelation(self.referenceVolume, output)

    # --------------------------- INFO functions ------------------------------
    def _validate(self):
        errors = []
        particles = self.inputParticles.get()
        reference = self.referenceVolume.get()
        mask = self.referenceMask.get()
        k = self.numberOfClasses.get() or 0
        if k < 2:
            errors.append('The number of classes must be at least 2 (got %d); for a single '
                          'class run a 3D refinement.' % k)
        errors += self._validateParticles(particles, needCtf=self.doCTF.get())
        if particles is None or reference is None:
            return errors + (['No reference volume.'] if reference is None else [])
        n = particles.getSize()
        if k * self.minClassSize.get() > n:
            errors.append('%d classes x minimum class size %d = %d exceeds the %d particles: '
                          'ask for fewer classes or a smaller minimum class size.'
                          % (k, self.minClassSize.get(), k * self.minClassSize.get(), n))
        volumes = self._referenceVolumes()
        if self._referenceIsSet() and len(volumes) != k:
            errors.append('The reference set has %d volumes but %d classes are asked for: give '
                          'one volume or exactly K.' % (len(volumes), k))
        if (len(volumes) == 1 and k >= 2
                and self.alignmentIterations.get() >= self._iterations()):
            errors.append('With one reference the first %d iterations align all particles as one '
                          'class: ask for more than %d iterations (or fewer consensus alignment '
                          'iterations) so that the classes are split.'
                          % (self.alignmentIterations.get(), self.alignmentIterations.get()))
        labelled = [('reference volume %d' % i if len(volumes) > 1 else 'reference volume', v)
                    for i, v in enumerate(volumes, start=1)]
        if mask is not None:
            labelled.append(('mask', mask))
        formatErrors = self._validateFormats(labelled)
        errors += formatErrors
        if n and not formatErrors:
            errors += self._validateDims(particles, labelled)
            errors += self._validateMask(mask)
        if (self._useLocalSearch() and particles.hasAlignment()
                and not particles.hasAlignmentProj()):
            errors.append('The particles have a 2D alignment; the local search needs a 3D '
                          '(projection) alignment. Switch the local search off.')
        errors += self._validateSymmetry(self.symmetryGroup.get())
        if self.numberOfIterations.get() is None or self.numberOfIterations.get() < 0:
            errors.append('The number of iterations cannot be negative (0 gives the default: 25 for '
                          'two classes, 5 more per further class).')
        errors += self._validatePositive((('angularSamplingDeg', 'angular sampling'),
                                          ('initialLowPassFilterA', 'initial low-pass filter'),
                                          ('realignLowPassFilterA', 're-alignment low-pass filter'),
                                          ('regularisationParamT', 'regularisation parameter T')))
        return errors

    def _warnings(self):
        warnings = []
        particles = self.inputParticles.get()
        if particles is None:
            return warnings
        n, k = particles.getSize(), max(self.numberOfClasses.get() or 1, 1)
        if n and n / k < 2 * self.minClassSize.get():
            warnings.append('With %d particles and %d classes, classes average %d particles '
                            '(< 2 x minimum class size %d): expect small, unreliable classes.'
                            % (n, k, n // k, self.minClassSize.get()))
        enough = default_iterations(k)
        if k >= 3 and len(self._referenceVolumes()) == 1 and self._iterations() < enough:
            warnings.append('%d classes from one reference in %d iterations: classes separate during '
                            'the annealed half of the run, and more classes need longer (three classes, '
                            'measured: 0.73-0.94 accuracy in 20 iterations, 0.90-0.995 in 25, 0.92-0.995 '
                            'in 30). Consider %d iterations (the default, 0).'
                            % (k, self._iterations(), enough))
        if self._useLocalSearch() and not particles.hasAlignmentProj():
            warnings.append('Local angular search is asked for but the particles have no 3D '
                            'alignment: the search will be global (slower).')
        needed = self._neededAngularStep()
        if needed and self.angularSamplingDeg.get() > 2 * needed[0]:
            warnings.append('An angular sampling of %.1f deg is coarse for a particle of %.0f A '
                            'at %.1f A resolution (about %.1f deg is needed): poses, hence maps '
                            'and classes, will be blurred.'
                            % (self.angularSamplingDeg.get(), needed[1], needed[2], needed[0]))
        if self.usesGpu() and len(self.getGpuList()) > 1:
            warnings.append('Only the first GPU of the list (%s) is used.' % self.getGpuList()[0])
        return warnings

    def _summary(self):
        model = self._readJson('model')
        if model is None:
            history = self._readJson('history') or []
            if history:
                return ['Running: iteration %d of %d done.'
                        % (history[-1].get('iteration', len(history)), self._iterations())]
            return ['Output classes not ready yet.']
        n = model.get('n_particles') or 0
        lines = ['%d particles into %d classes, %d iterations (%s):'
                 % (n, len(model['classes']), model.get('iterations', 0),
                    'converged' if self._converged(model) else 'stopped at the iteration limit')]
        for c in model['classes']:
            size = c.get('size', 0)
            lines.append('  class %d: %d particles (%.1f%%), resolution %.1f A%s'
                         % (c['class_number'], size, 100.0 * size / max(n, 1),
                            c.get('resolution_A', float('nan')),
                            ' (below the minimum class size)' if c.get('below_min_size') else ''))
        if model.get('classes_unsettled_fraction') is not None:
            lines.append('The classes had not settled: %.1f%% of the particles still changed class in the last '
                         'iteration. Run again with more iterations (e.g. %d): a longer run anneals longer '
                         'and separates classes better than continuing this one.'
                         % (100.0 * model['classes_unsettled_fraction'], model['suggested_iterations']))
        realigned = [h['iteration'] for h in model.get('history') or [] if h.get('stage') == 'class alignment']
        if realigned:
            lines.append('Classes re-aligned on their own in iterations %d-%d (global search from the '
                         'reference)%s.' % (min(realigned), max(realigned),
                                            ', then turned into its frame' if self.symmetryGroup.get() == 'C1'
                                            else ''))
            if model.get('realignment_unfinished_deg') is not None:
                lines.append('The re-alignment was cut short by the iteration limit: poses still changed by '
                             '%.1f deg on average. More iterations (e.g. %d) can give sharper class maps.'
                             % (model['realignment_unfinished_deg'], model.get('iterations', 0) + 5))
        elif (len(self._referenceVolumes()) == 1 and len(model['classes']) > 1 and self.realignIterations.get() > 0
              and not (self._useLocalSearch() and self.inputParticles.get().hasAlignmentProj())):
            lines.append('Classes were not re-aligned on their own: too few iterations for it '
                         '(see Class re-alignment iterations).')
        return lines

    def _methods(self):
        model = self._readJson('model')
        if model is None:
            return []
        classes = model['classes']
        text = ('%d particles were classified into %d classes by multiclass 3D refinement '
                '(hetplugin, expectation-maximisation over class, pose and shift in a regularised '
                'likelihood framework [Scheres2012a][Scheres2012b][Punjani2017]) from %s, low-pass '
                'filtered to %.0f A, with T = %g, %s angular search at %g deg%s, %d iterations. '
                % (model.get('n_particles', 0), len(classes),
                   'one reference' if len(self._referenceVolumes()) == 1 else 'one reference per class',
                   self.initialLowPassFilterA.get(), self.regularisationParamT.get(),
                   'a local' if self._useLocalSearch() and self.inputParticles.get().hasAlignmentProj()
                   else 'a global', self.angularSamplingDeg.get(),
                   ', symmetry %s' % self.symmetryGroup.get() if self.symmetryGroup.get() != 'C1' else '',
                   model.get('iterations', 0)))
        text += 'Class sizes: %s particles; resolutions (FSC 0.143): %s A.' % (
            ', '.join(str(c.get('size')) for c in classes),
            ', '.join('%.1f' % c.get('resolution_A', float('nan')) for c in classes))
        return [text]

    def _citations(self):
        return ['Scheres2012a', 'Scheres2012b', 'Punjani2017']

    # --------------------------- UTILS functions -----------------------------
    def _referenceIsSet(self):
        return isinstance(self.referenceVolume.get(), SetOfVolumes)

    def _referenceVolumes(self):
        """The reference maps as a list of Volume objects (1 or K)."""
        reference = self.referenceVolume.get()
        if reference is None:
            return []
        if not self._referenceIsSet():
            return [reference]
        volumes = []
        for volume in reference.iterItems(orderBy='id'):
            volume = volume.clone()
            if not volume.getSamplingRate():
                volume.setSamplingRate(reference.getSamplingRate())
            volumes.append(volume)
        return volumes

    def _iterations(self):
        """The maximum number of iterations: the form's, or the default for K classes (0)."""
        return self.numberOfIterations.get() or default_iterations(self.numberOfClasses.get() or 2)

    def _useLocalSearch(self):
        return bool(self.doLocalSearch.get()) and (self.localSearchRangeDeg.get() or 0) > 0

    def _useAlignment(self):
        """Write the input alignment (as the local search prior) only when it is used."""
        particles = self.inputParticles.get()
        return self._useLocalSearch() and particles.hasAlignmentProj()

    def _inputSignature(self):
        """What convertInputStep depends on (a change re-runs it when continuing)."""
        mask = self.referenceMask.get()
        return json.dumps({'particles': self.inputParticles.get().getObjId(),
                           'references': [v.getObjId() for v in self._referenceVolumes()],
                           'mask': None if mask is None else mask.getObjId(),
                           'alignment': self._useAlignment()})

    def _coreOptions(self):
        """Options of ``python -m hetplugin.core multiclass`` (CLI names, underscores)."""
        nRefs = len(self._referenceVolumes())
        options = dict(self._refinementOptions(), **{
            'reference': [self._getFileName('input_reference', ref=i) for i in range(1, nRefs + 1)],
            'classes': self.numberOfClasses.get(),
            'iterations': self._iterations(),
            'local_search': self.localSearchRangeDeg.get() if self._useLocalSearch() else 0.0,
            'global_iterations': self.globalIterations.get(),
            'alignment_iterations': self.alignmentIterations.get(),
            'realign_iterations': self.realignIterations.get(),
            'realign_lowpass': self.realignLowPassFilterA.get(),
            'particle_diameter': self._positiveOrNone(self.maskDiameterA.get()),
            'mask': self._getFileName('input_mask') if self.referenceMask.get() is not None else None,
            'min_class_size': self.minClassSize.get(),
        })
        return {key: value for key, value in options.items() if value is not None}

    def _neededAngularStep(self):
        """(needed step in deg, diameter A, target resolution A) or None when unknown.

        A pose error of d/D radians moves the particle's edge by about the target
        resolution d for a particle of diameter D. Target: the E-step limit when
        set, else 3 pixels (about 2/3 of Nyquist)."""
        particles = self.inputParticles.get()
        if particles is None or not particles.getSize():
            return None
        box, pixel = self._dimsOf(particles)
        if not box or not pixel:
            return None
        diameter = self.maskDiameterA.get() if self.maskDiameterA.get() > 0 else 0.8 * box * pixel
        resolution = self.limitResolEStep.get() if self.limitResolEStep.get() > 0 else 3.0 * pixel
        return math.degrees(resolution / diameter), diameter, resolution

    def _converged(self, model):
        """The core's convergence flag when it writes one; else it stopped before the limit."""
        if 'converged' in model:
            return bool(model['converged'])
        limit = (model.get('options') or {}).get('iterations', self._iterations())
        return model.get('iterations', 0) < limit

    @staticmethod
    def _setClassInfo(obj, values):
        for key, value in values.items():
            if isinstance(value, bool):
                scalar = Boolean(value)
            elif isinstance(value, int):
                scalar = Integer(value)
            else:
                scalar = Float(float(value))
            setattr(obj, '_hetplugin_%s' % key, scalar)
