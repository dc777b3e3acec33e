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
"""``ProtFocusedRefine``: masked (focused) local refinement of one region.

Runs ``python -m hetplugin.core multiclass`` with one class, the focus mask as the
solvent mask and a local search around the particles' consensus alignment (see
:mod:`hetplugin.core.focused`): poses are estimated against the masked map, the
region taken as rigid while its orientation may differ from the rest's. Registers
``outputVolume`` (the region's map, with its half maps) and ``outputParticles``
(the input particles with the region's alignment and the extras
``_hetplugin_maxProb``, ``_hetplugin_logLikelihood``, ``_hetplugin_nrSignificant``).
Best run on particles whose signal outside the region was subtracted
(``ProtSignalSubtract``); when the subtraction also recentred them on the region (and
re-boxed them), the consensus map and mask are moved into their frame (new files in
``extra/``). Focused classification is ``ProtMulticlassRefine`` with a reference mask
and a local search.
"""
import enum
import json
import os

import pyworkflow.protocol.params as params
from pyworkflow.object import Float
from pwem.objects import SetOfParticles, Volume

from .protocol_base import PIXEL_SIZE_RTOL, ProtHetBase
from .protocol_multiclass import PARTICLE_EXTRAS

#: attributes that mark particles made by a signal subtraction (ours, RELION's)
SUBTRACTED_MARKS = ('_hetplugin_originalImageName', '_rlnImageOriginalName')


class FocusedOutputs(enum.Enum):
    outputVolume = Volume
    outputParticles = SetOfParticles


class ProtFocusedRefine(ProtHetBase):
    """Focused refinement: refines the poses of one region of the particles (a domain,
    a subunit) against the consensus map inside a mask, by a local search around the
    particles' consensus alignment, and reconstructs the region. The region is taken
    as rigid; its orientation may differ from the rest's. Run it on particles whose
    signal outside the region was subtracted (signal subtraction), so that images and
    masked reference hold the same density.
    """
    _label = 'focused refinement'
    _coreCommand = 'multiclass'
    _possibleOutputs = FocusedOutputs

    # --------------------------- DEFINE param functions ----------------------
    def _defineParams(self, form):
        form.addSection(label='Input')
        form.addParam('inputParticles', params.PointerParam, pointerClass='SetOfParticles',
                      important=True, label='Input particles',
                      help='Particles with a 3D alignment (e.g. from a consensus refinement) and '
                           'CTF information; best with the signal outside the focus region '
                           'subtracted (signal subtraction with this mask as the region to keep).')
        form.addParam('referenceVolume', params.PointerParam, pointerClass='Volume',
                      important=True, label='Consensus map',
                      help='The map the particles were aligned to (the particles\' box and pixel '
                           'size). It is masked with the focus mask and low-pass filtered to the '
                           'initial resolution before the first iteration.')
        form.addParam('focusMask', params.PointerParam, pointerClass='VolumeMask',
                      important=True, label='Focus mask',
                      help='Soft mask (values in [0, 1], the particles\' box and pixel size) around '
                           'the region to refine. Poses are estimated against the map inside it. '
                           'Give the mask a soft edge of a few pixels and a margin around the '
                           'density: the region may move a little.')
        self._defineSymmetryParam(form, 'the region')

        form.addSection(label='CTF')
        self._defineCtfParams(form)

        form.addSection(label='Optimisation')
        form.addParam('numberOfIterations', params.IntParam, default=10,
                      label='Number of iterations',
                      help='Largest number of iterations; the run stops earlier once poses move '
                           'by less than half the angular sampling and the resolution stops '
                           'improving.')
        form.addParam('initialLowPassFilterA', params.FloatParam, default=15.0,
                      label='Initial low-pass filter (A)',
                      help='The masked consensus map is low-pass filtered to this resolution '
                           'before the first iteration; the frequencies used then march out with '
                           'the resolution. The particles\' poses are already close: start where '
                           'the region has shape enough to orient it (10-20 A). Too coarse a start '
                           'lets poses wander in the first iterations.')
        self._defineRegularisationParam(form)
        self._defineEStepLimitParam(form, 'estimate poses')
        self._defineSeedParam(form)

        form.addSection(label='Sampling')
        form.addParam('angularSamplingDeg', params.FloatParam, default=3.0,
                      label='Angular sampling (deg)',
                      help='Step of the local angular search.')
        form.addParam('localSearchRangeDeg', params.FloatParam, default=12.0,
                      label='Local angular search range (deg)',
                      help='Poses are searched within this many degrees of the current pose '
                           '(the input alignment at first), with a Gaussian prior of half this '
                           'width. It must cover how far the region turns relative to the rest; '
                           'the cost grows with its cube over the sampling\'s.')
        form.addParam('finestSamplingDeg', params.FloatParam, default=-1,
                      expertLevel=params.LEVEL_ADVANCED,
                      label='Finest angular sampling (deg)',
                      help='If positive: each time poses settle (they move by less than a step and the '
                           'resolution stops improving), the angular step is halved, and the search range '
                           'with it (the same cost per iteration), down to this step, as RELION\'s '
                           'auto-refine does. Worth it when the resolution asks for finer poses than the '
                           'sampling (a pose error of resolution / region radius, in radians, is what the '
                           'map can tell). -1: keep the angular sampling. On a 20 kDa test domain at 5 A, '
                           'refining 3 -> 0.75 deg improved the median pose error by 0.3 deg for twice the '
                           'time.')
        self._defineOffsetParams(form)
        self._defineBatchParam(form)
        self._defineComputeParams(form)

    # --------------------------- working files --------------------------------
    def _filenameTemplates(self):
        return {'out_particles': 'particles.star',
                'map': 'class_001.mrc',
                'half_map': 'class_001_half%(half)d.mrc',
                'model': 'model.json',
                'history': 'history.json'}

    # --------------------------- STEPS functions -----------------------------
    def convertInputStep(self, _signature):
        """Particles -> input_particles.star; consensus map and mask -> MRC links; the focus
        region's report (and its warnings) into the log."""
        self._convertParticles(self.inputParticles.get(), use_alignment=True)
        reference, mask = self.referenceVolume.get(), self.focusMask.get()
        paths = (self._getFileName('input_reference', ref=1), self._getFileName('input_mask'))
        if self._recentreCentreA() is None:
            self._volumeToMrc(reference, paths[0])
            self._volumeToMrc(mask, paths[1])
        else:
            # particles recentred (and maybe re-boxed) by a signal subtraction: the map and mask
            # go into their frame (new files: the inputs stay as they are)
            from hetplugin.core.mrc import write_volume
            ref, msk = self._focusVolumes()
            for path, data in zip(paths, (ref, msk)):
                if os.path.lexists(path):
                    os.remove(path)
                write_volume(path, data, reference.getSamplingRate())
            self.info('The particles were recentred on %s A (box %d): consensus map and mask moved to that '
                      'frame.' % (', '.join('%.1f' % c for c in self._recentreCentreA()), ref.shape[0]))
        report, warnings = self._focusAdvice()
        if report is not None:
            self.info('Focus region: about %.0f kDa of density, %.0f%% of the map\'s signal, centre %.0f A '
                      'from the box centre.' % (report['mass_kDa'], 100 * report['signal_fraction'],
                                                report['centre_offset_A']))
        for warning in warnings:
            self.warning(warning)

    def runCoreStep(self, _optionsJson):
        """``python -m hetplugin.core multiclass job.json`` with one class (``--continue`` when resuming)."""
        self._runCore(self._coreOptions())

    def createOutputStep(self):
        from hetplugin.convert import create_volume, update_particles

        model = self._readJson('model')
        if model is None:
            raise ValueError('The core wrote no %s' % self._getFileName('model'))
        particles = self.inputParticles.get()
        sampling = particles.getSamplingRate()
        outParticles = self._createSetOfParticles()
        n = update_particles(particles, outParticles, self._getFileName('out_particles'), dict(PARTICLE_EXTRAS))
        if n != particles.getSize():
            self.warning('%d of %d input particles came back from the core' % (n, particles.getSize()))

        volume = create_volume(self._getFileName('map'), sampling, volume=Volume())
        volume.setHalfMaps([self._getFileName('half_map', half=h) for h in (1, 2)])
        volume._hetplugin_resolution_A = Float(float(model['classes'][0]['resolution_A']))

        self._defineOutputs(**{FocusedOutputs.outputVolume.name: volume,
                               FocusedOutputs.outputParticles.name: outParticles})
        for source in (self.inputParticles, self.referenceVolume, self.focusMask):
            self._defineSourceRelation(source, volume)
        self._defineTransformRelation(self.inputParticles, outParticles)

    # --------------------------- INFO functions ------------------------------
    def _validate(self):
        particles = self.inputParticles.get()
        reference = self.referenceVolume.get()
        mask = self.focusMask.get()
        errors = self._validateParticles(particles, needCtf=self.doCTF.get(), needAlignment=True)
        if reference is None:
            errors.append('No consensus map.')
        if mask is None:
            errors.append('No focus mask: a focused refinement needs the mask of its region.')
        if particles is None or reference is None or mask is None:
            return errors
        labelled = [('consensus map', reference), ('focus mask', mask)]
        formatErrors = self._validateFormats(labelled)
        errors += formatErrors
        if particles.getSize() and not formatErrors:
            if self._recentreCentreA() is None:
                errors += self._validateDims(particles, labelled)
            else:
                errors += self._validateRecentredDims(particles, labelled)
            errors += self._validateMask(mask, 'focus mask')
        errors += self._validateSymmetry(self.symmetryGroup.get())
        if not self.numberOfIterations.get() or self.numberOfIterations.get() < 1:
            errors.append('The number of iterations must be at least 1.')
        errors += self._validatePositive((('angularSamplingDeg', 'angular sampling'),
                                          ('localSearchRangeDeg', 'local angular search range'),
                                          ('initialLowPassFilterA', 'initial low-pass filter'),
                                          ('regularisationParamT', 'regularisation parameter T')))
        if (self.localSearchRangeDeg.get() or 0) > 0 and (self.angularSamplingDeg.get() or 0) > 0 \
                and self.localSearchRangeDeg.get() < self.angularSamplingDeg.get():
            errors.append('The local search range (%g deg) is smaller than the angular sampling (%g deg): '
                          'nothing but the input pose would be searched.'
                          % (self.localSearchRangeDeg.get(), self.angularSamplingDeg.get()))
        finest = self.finestSamplingDeg.get() or -1
        if 0 < (self.angularSamplingDeg.get() or 0) <= finest:
            errors.append('The finest angular sampling (%g deg) must be finer than the angular sampling (%g deg), '
                          'or -1 to keep the sampling.' % (finest, self.angularSamplingDeg.get()))
        return errors

    def _warnings(self):
        try:
            return self._focusAdvice()[1]
        except Exception as exc:   # unreadable maps are _validate's to report
            return ['The focus region could not be measured: %s' % exc]

    def _summary(self):
        model = self._readJson('model')
        if model is None:
            history = self._readJson('history') or []
            if history:
                return ['Running: iteration %d of %d done.'
                        % (history[-1].get('iteration', len(history)), self.numberOfIterations.get())]
            return ['Output map not ready yet.']
        history = model.get('history') or []
        lines = ['%d particles, focused refinement: resolution %.1f A (FSC 0.143 of the half maps in a '
                 'sphere of the box, at the best poses on all frequencies), %d iterations (%s).'
                 % (model.get('n_particles', 0), model['classes'][0].get('resolution_A', float('nan')),
                    model.get('iterations', 0), 'converged' if model.get('converged') else
                    'stopped at the iteration limit')]
        if history:
            lines.append('Poses moved by %.1f deg on average in the last iteration (%.1f deg in the first).'
                         % (history[-1].get('mean_angle_change_deg', float('nan')),
                            history[0].get('mean_angle_change_deg', float('nan'))))
        return lines

    def _methods(self):
        model = self._readJson('model')
        if model is None:
            return []
        return ['The poses of %d particles were refined against the consensus map inside a focus mask '
                '(hetplugin focused refinement: regularised likelihood optimisation [Scheres2012a][Scheres2012b] '
                'of one masked class, after [Bai2015]) by a local search of %g deg at %g deg steps around their '
                'consensus alignment, from the masked map low-pass filtered to %.0f A, with T = %g, %d iterations; '
                'the region reached %.1f A (FSC 0.143).'
                % (model.get('n_particles', 0), self.localSearchRangeDeg.get(), self.angularSamplingDeg.get(),
                   self.initialLowPassFilterA.get(), self.regularisationParamT.get(), model.get('iterations', 0),
                   model['classes'][0].get('resolution_A', float('nan')))]

    def _citations(self):
        return ['Scheres2012a', 'Scheres2012b', 'Bai2015']

    # --------------------------- UTILS functions -----------------------------
    def _firstParticle(self):
        """The input set's first particle (None for no set or an empty one): it carries what a
        signal subtraction recorded on every particle."""
        particles = self.inputParticles.get()
        return particles.getFirstItem() if particles is not None and particles.getSize() else None

    def _isSubtracted(self):
        """Whether the particles come from a signal subtraction (None when there are none)."""
        first = self._firstParticle()
        if first is None:
            return None
        return any(hasattr(first, mark) for mark in SUBTRACTED_MARKS)

    def _recentreCentreA(self):
        """(x, y, z) A: the centre a signal subtraction recentred the particles on (None if it did not)."""
        first = self._firstParticle()
        names = ['_hetplugin_recentreCentre%sAngst' % axis for axis in 'XYZ']
        if first is None or not all(hasattr(first, name) for name in names):
            return None
        return [float(getattr(first, name).get()) for name in names]

    def _focusVolumes(self):
        """(consensus map, focus mask) as arrays in the particles' frame: moved to the recentring centre
        and windowed to the particles' box when a signal subtraction recentred them."""
        from hetplugin.convert.images import read_volume_any
        from hetplugin.core.fourier import recentre_volume
        reference, mask = self.referenceVolume.get(), self.focusMask.get()
        ref, msk = read_volume_any(reference.getFileName()), read_volume_any(mask.getFileName())
        centre = self._recentreCentreA()
        if centre is not None:
            box = self._dimsOf(self.inputParticles.get())[0]
            centre_px = [c / reference.getSamplingRate() for c in centre]
            ref = recentre_volume(ref, centre_px, box)
            msk = recentre_volume(msk, centre_px, box).clip(0.0, 1.0)
        return ref, msk

    def _validateRecentredDims(self, particles, labelled):
        """Recentred particles: the same pixel size, and a box at least the particles'."""
        errors = []
        box, pixel = self._dimsOf(particles)
        for label, obj in labelled:
            vBox, vPix = self._dimsOf(obj)
            if not vPix or not pixel or abs(vPix - pixel) > PIXEL_SIZE_RTOL * pixel:
                errors.append('The %s has a pixel size of %s A but the particles have %s A: they must be the '
                              'same.' % (label, vPix, pixel))
            elif vBox is None or box is None or vBox < box:
                errors.append('The particles were recentred by a signal subtraction into a box of %s pixels; the '
                              '%s (box %s) must be at least as large, to be moved into their frame.'
                              % (box, label, vBox))
        return errors

    def _focusAdvice(self):
        """(focus report or None, warnings) from the consensus map and the mask, in the particles' frame."""
        from hetplugin.core.focused import focus_report, focus_warnings   # numpy only
        reference, mask = self.referenceVolume.get(), self.focusMask.get()
        if reference is None or mask is None or self._formatError(reference, 'map') \
                or self._formatError(mask, 'mask'):
            return None, []
        ref, msk = self._focusVolumes()
        if ref.shape != msk.shape:
            return None, []
        report = focus_report(ref, msk, reference.getSamplingRate())
        return report, focus_warnings(report, self._isSubtracted())

    def _inputSignature(self):
        """What convertInputStep depends on (a change re-runs it when continuing)."""
        return json.dumps({'particles': self.inputParticles.get().getObjId(),
                           'reference': self.referenceVolume.get().getObjId(),
                           'mask': self.focusMask.get().getObjId()})

    def _coreOptions(self):
        """Options of ``python -m hetplugin.core multiclass`` for one masked class, local search."""
        options = dict(self._refinementOptions(), **{
            'reference': [self._getFileName('input_reference', ref=1)],
            'mask': self._getFileName('input_mask'),
            'classes': 1,
            'iterations': self.numberOfIterations.get(),
            'local_search': self.localSearchRangeDeg.get(),
            'finest_step': self._positiveOrNone(self.finestSamplingDeg.get()),
            'global_iterations': 0,
            'alignment_iterations': 0,
            'realign_iterations': 0,
            'min_class_size': 1,
            'final_reconstruction': True,
        })
        return {key: value for key, value in options.items() if value is not None}
