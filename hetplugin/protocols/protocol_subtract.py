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
"""``ProtSignalSubtract``: signal subtraction, recentring and re-boxing (and its revert).

Subtract mode runs ``python -m hetplugin.core subtract`` (see
:mod:`hetplugin.core.subtract`): from each particle image it removes the
CTF-modulated projection, at the particle's own pose, of the density it should
not hold, X' = X - s . CTF . P(V * (1 - M)) (mask meaning 'region to keep') or
X - s . CTF . P(V * M) ('region to subtract'); V is one map, or each particle's own
class map when the classes / volumes of a multiclass run are given. Output:
``outputParticles`` with new image stacks, the updated alignment, the CTF kept, and
per-particle extras ``_hetplugin_subtractionScale``, ``_hetplugin_originalImageName``
(``index@stack`` of the image before subtraction), ``_hetplugin_recentreShiftX/YAngst``,
``_hetplugin_recentreCentreX/Y/ZAngst`` and ``_hetplugin_originalOriginX/YAngst``.

Revert mode runs ``python -m hetplugin.core revert-subtraction`` on such particles
(directly from this protocol, or after other protocols refined them): the output
particles point at the original images again, with the alignment carried back
to the original box (exactly the original one where it did not change).
"""
import enum
import json

import numpy as np

import pyworkflow.protocol.params as params
from pwem.objects import SetOfClasses3D, SetOfParticles, SetOfVolumes

from hetplugin.constants import EXTRA_ATTR_PREFIX, OBJID_LABEL

from .protocol_base import ProtHetBase, stripSuffix


class SubtractOutputs(enum.Enum):
    outputParticles = SetOfParticles


MODE_SUBTRACT, MODE_REVERT = 0, 1
MEANING_KEEP, MEANING_SUBTRACT = 0, 1
SCALE_CHOICES = ['none', 'per particle', 'per particle and resolution shell']
SCALE_CORE = ['none', 'particle', 'shell']
PRECISIONS = ['float32', 'float16']

#: core STAR label -> Scipion attribute (``_hetplugin_`` is prepended).
PARTICLE_EXTRAS = {
    'hetSubtractionScale': 'subtractionScale',
    'rlnImageOriginalName': 'originalImageName',
    'hetRecentreShiftXAngst': 'recentreShiftXAngst',
    'hetRecentreShiftYAngst': 'recentreShiftYAngst',
    'hetRecentreCentreXAngst': 'recentreCentreXAngst',
    'hetRecentreCentreYAngst': 'recentreCentreYAngst',
    'hetRecentreCentreZAngst': 'recentreCentreZAngst',
    'hetOriginalOriginXAngst': 'originalOriginXAngst',
    'hetOriginalOriginYAngst': 'originalOriginYAngst',
}
#: the kept region should hold at least this fraction of the map's density (else: warning).
MIN_KEPT_FRACTION = 0.15


def shellScaleLabel(band):
    return 'hetSubtractionScaleShell%02d' % band


def shellScaleAttribute(band):
    return 'subtractionScaleShell%02d' % band


class ProtSignalSubtract(ProtHetBase):
    """Signal subtraction: removes from each particle image the projection of the
    density outside (or inside) a mask, modulated by the particle's CTF and placed
    at its pose, so that later steps see only the region of interest (focused
    classification / refinement of part of a complex, removing a detergent
    micelle). Optionally fits a per-particle amplitude, recentres the images on
    the kept region and windows them to a smaller box. A second mode reverts
    subtracted particles to their original images.
    """
    _label = 'signal subtraction'
    _coreCommand = 'subtract'
    _possibleOutputs = SubtractOutputs

    # --------------------------- DEFINE param functions ----------------------
    def _defineParams(self, form):
        form.addSection(label='Input')
        form.addParam('operation', params.EnumParam, default=MODE_SUBTRACT,
                      choices=['subtract signal', 'revert to original images'],
                      display=params.EnumParam.DISPLAY_HLIST, label='Mode',
                      help='Subtract: make new particle images without the unwanted density. '
                           'Revert: turn particles made by a subtraction (possibly refined or '
                           'classified since) back into the original images, with their '
                           'alignment carried over to the original box.')
        form.addParam('inputParticles', params.PointerParam, pointerClass='SetOfParticles',
                      important=True, label='Input particles',
                      help='Subtract: particles with a 3D (projection) alignment and CTF '
                           'information, e.g. from a consensus refinement or a multiclass '
                           'refinement. Revert: particles that come from a subtraction (they '
                           'carry the location of their original image).')
        form.addParam('inputVolume', params.PointerParam,
                      pointerClass='Volume, SetOfVolumes, SetOfClasses3D',
                      condition='operation == %d' % MODE_SUBTRACT, label='Map(s) to subtract from',
                      help='The map whose masked part is projected and subtracted: a Volume '
                           '(e.g. the consensus map), or the output volumes / classes of a '
                           'multiclass refinement: then each particle is subtracted with the '
                           'map of its own class (the particles must carry class ids, e.g. '
                           'the multiclass run\'s output particles). Same box and pixel size '
                           'as the particles.')
        form.addParam('inputMask', params.PointerParam, pointerClass='VolumeMask',
                      condition='operation == %d' % MODE_SUBTRACT, label='Mask',
                      help='Soft mask with values in [0, 1] (soft edges of a few pixels avoid '
                           'artefacts), same box and pixel size as the particles. Its meaning '
                           'is chosen below.')
        form.addParam('maskMeaning', params.EnumParam, default=MEANING_KEEP,
                      choices=['region to keep', 'region to subtract'],
                      condition='operation == %d' % MODE_SUBTRACT,
                      display=params.EnumParam.DISPLAY_HLIST, label='The mask marks the',
                      help='Region to keep: the density INSIDE the mask stays in the images and '
                           'the map times (1 - mask) is subtracted (RELION\'s convention). '
                           'Region to subtract: the density inside the mask is removed (e.g. a '
                           'micelle mask) and the map times the mask is subtracted.')
        form.addParam('ignoreClass', params.BooleanParam, default=False,
                      condition='operation == %d' % MODE_SUBTRACT, expertLevel=params.LEVEL_ADVANCED,
                      label='Use the first map for every particle?',
                      help='With several maps (classes), ignore the particles\' class ids and '
                           'subtract the first map from all of them.')

        form.addSection(label='Subtraction', )
        form.addParam('lowPassA', params.FloatParam, default=-1,
                      condition='operation == %d' % MODE_SUBTRACT, label='Low-pass filter (A)',
                      help='Low-pass filter the masked map to this resolution before '
                           'subtracting: nothing finer is removed from the images (use the '
                           'map\'s resolution to avoid subtracting its noise). -1: no filter.')
        form.addParam('scaleMode', params.EnumParam, default=0, choices=SCALE_CHOICES,
                      condition='operation == %d' % MODE_SUBTRACT, label='Per-particle scale',
                      help='None: subtract the projection as it is. Per particle: scale it by '
                           'the least-squares amplitude of the map\'s projection in the image '
                           '(corrects per-particle contrast differences; noisy at very low SNR). '
                           'Per particle and resolution shell: one amplitude per resolution band, '
                           'shrunk towards the particle\'s overall value where the band is noisy. '
                           'The scale is stored on each output particle.')
        form.addParam('scaleShells', params.IntParam, default=4,
                      condition='operation == %d and scaleMode == 2' % MODE_SUBTRACT,
                      expertLevel=params.LEVEL_ADVANCED, label='Resolution bands',
                      help='Number of resolution bands of equal width for the per-shell scale.')

        form.addSection(label='Output')
        form.addParam('doRecentre', params.BooleanParam, default=True,
                      condition='operation == %d' % MODE_SUBTRACT, label='Recentre on the kept region?',
                      help='Shift each image (by whole pixels, without interpolation) so that '
                           'the centre of mass of the kept region is at the box centre; the '
                           'sub-pixel remainder stays in the alignment. Reconstructing the '
                           'output gives the kept region centred in the box.')
        form.addParam('useExplicitCentre', params.BooleanParam, default=False,
                      condition='operation == %d and doRecentre' % MODE_SUBTRACT,
                      expertLevel=params.LEVEL_ADVANCED, label='Give the centre explicitly?',
                      help='Recentre on a 3D point of your choice instead of the centre of mass '
                           'of the kept density.')
        form.addParam('centreA', params.NumericListParam, default='0 0 0',
                      condition='operation == %d and doRecentre and useExplicitCentre' % MODE_SUBTRACT,
                      expertLevel=params.LEVEL_ADVANCED, label='Centre X Y Z (A)',
                      help='The 3D point (x y z, Angstrom from the map\'s box centre) that is '
                           'moved to the centre of the output images.')
        form.addParam('newBoxSize', params.IntParam, default=-1,
                      condition='operation == %d' % MODE_SUBTRACT, label='New box size (px)',
                      help='Window the output images to this box (even, at most the input box), '
                           'centred on the (recentred) image centre. A box about 1.5-2 times the '
                           'kept region\'s diameter saves memory and time later. -1: keep the box.')
        form.addParam('outputPrecision', params.EnumParam, default=0, choices=PRECISIONS,
                      condition='operation == %d' % MODE_SUBTRACT, expertLevel=params.LEVEL_ADVANCED,
                      label='Output precision',
                      help='float32, or float16 to halve the disk space of the new stacks '
                           '(about 3 significant digits, enough for noisy particle images).')

        form.addSection(label='Compute')
        form.addParam('batchSize', params.IntParam, default=256, expertLevel=params.LEVEL_ADVANCED,
                      label='Particles per batch',
                      help='Particles read, subtracted and written together: bounds the memory '
                           'used whatever the number of particles.')
        self._defineComputeParams(form, threads=4)

    # --------------------------- working files --------------------------------
    def _filenameTemplates(self):
        return {'out_particles': 'particles_subtracted.star',
                'summary': 'subtract.json',
                'reverted_particles': 'particles_reverted.star'}

    # --------------------------- STEPS functions -----------------------------
    def convertInputStep(self, _signature):
        """Particles -> input_particles.star; maps and mask -> MRC links (subtract mode);
        the subtraction's extras -> STAR columns (revert mode)."""
        particles = self.inputParticles.get()
        if self._isRevert():
            self._convertParticles(particles, use_alignment=particles.hasAlignmentProj(),
                                   use_ctf=particles.hasCTF())
            self._addSubtractionColumns(particles, self._getFileName('input_particles'))
            return
        self._convertParticles(particles, use_alignment=True, use_ctf=True)
        volumes = self._mapsByClass()
        for i, volume in enumerate(volumes, start=1):
            self._volumeToMrc(volume, self._getFileName('input_reference', ref=i))
        self._volumeToMrc(self.inputMask.get(), self._getFileName('input_mask'))

    def runCoreStep(self, _optionsJson):
        command = 'revert-subtraction' if self._isRevert() else 'subtract'
        self._runCore(self._coreOptions(), command=command, resumable=False)

    def createOutputStep(self):
        from hetplugin.convert import ParticleUpdater, update_particles
        particles = self.inputParticles.get()
        outParticles = self._createSetOfParticles()
        if self._isRevert():
            updater = ParticleUpdater(self._getFileName('reverted_particles'), update_locations=True)
            outParticles.copyInfo(particles)
            if updater.has_alignment:
                outParticles.setAlignmentProj()
            subtraction = [EXTRA_ATTR_PREFIX + a for a in self._extraAttributes(particles)]

            def callback(particle, _row=None):
                updater.callback(particle)
                for name in subtraction:
                    if hasattr(particle, name):
                        delattr(particle, name)
            outParticles.copyItems(particles, updateItemCallback=callback)
            n = updater.n_matched
        else:
            extras = dict(PARTICLE_EXTRAS)
            if self.scaleMode.get() == 2:
                extras.update({shellScaleLabel(b): shellScaleAttribute(b)
                               for b in range(1, self.scaleShells.get() + 1)})
            n = update_particles(particles, outParticles, self._getFileName('out_particles'), extras,
                                 update_locations=True)
        if n != particles.getSize():
            self.warning('%d of %d input particles came back from the core' % (n, particles.getSize()))
        self._defineOutputs(**{SubtractOutputs.outputParticles.name: outParticles})
        self._defineTransformRelation(self.inputParticles, outParticles)
        if not self._isRevert():
            self._defineSourceRelation(self.inputVolume, outParticles)
            self._defineSourceRelation(self.inputMask, outParticles)

    # --------------------------- INFO functions ------------------------------
    def _validate(self):
        particles = self.inputParticles.get()
        if self._isRevert():
            errors = self._validateParticles(particles)
            if not errors and not self._extraAttributes(particles):
                errors.append('The input particles do not come from a signal subtraction: they carry '
                              'no original image location (_hetplugin_originalImageName).')
            return errors
        errors = self._validateParticles(particles, needAlignment=True)
        if particles is not None and particles.getSize() and not particles.hasCTF():
            errors.append('The input particles have no CTF information: subtraction modulates each '
                          'projection by the particle\'s CTF. Estimate and assign CTFs first.')
        mask = self.inputMask.get()
        if self.inputVolume.get() is None:
            errors.append('No map to subtract from.')
        if mask is None:
            errors.append('No mask.')
        if errors:
            return errors
        volumes = self._mapsByClass()
        labelled = [('map of class %d' % i if len(volumes) > 1 else 'map', v)
                    for i, v in enumerate(volumes, start=1) if v is not None]
        labelled.append(('mask', mask))
        formatErrors = self._validateFormats(labelled)
        errors += formatErrors
        if not formatErrors:
            errors += self._validateDims(particles, labelled)
            errors += self._validateMask(mask)
            if not errors:
                errors += self._validateMaskNotEverything(mask)
        if self._byClass():
            errors += self._validateClasses(particles)
        box = self._dimsOf(particles)[0] if particles.getSize() else None
        newBox = self.newBoxSize.get()
        if newBox is not None and newBox > 0:
            if newBox % 2:
                errors.append('The new box size (%d) must be even.' % newBox)
            if box and newBox > box:
                errors.append('The new box size (%d) is larger than the particles\' box (%d): it can '
                              'only shrink.' % (newBox, box))
        if self.lowPassA.get() is not None and 0 <= self.lowPassA.get() < 1e-6:
            errors.append('The low-pass filter must be a resolution in A, or -1 for none.')
        if self.doRecentre.get() and self.useExplicitCentre.get() and len(self._explicitCentre() or []) != 3:
            errors.append('The centre needs three numbers: X Y Z in Angstrom.')
        return errors

    def _warnings(self):
        warnings = []
        if self._isRevert():
            return warnings
        volumes = [v for v in self._mapsByClass() if v is not None] if self.inputVolume.get() else []
        mask = self.inputMask.get()
        if volumes and mask is not None:
            try:
                fraction = self._keptFraction(volumes[0], mask)
            except Exception:      # unreadable: _validate reports it
                fraction = None
            if fraction is not None and fraction < MIN_KEPT_FRACTION:
                warnings.append('The kept region holds only %.0f%% of the map\'s density: the subtracted '
                                'particles may run out of signal for alignment (below roughly 100 kDa, '
                                'refining them is unreliable); consider keeping a larger region.'
                                % (100 * fraction))
        newBox = self.newBoxSize.get() or -1
        if newBox > 0 and not self.doRecentre.get():
            warnings.append('The images are windowed without recentring: the kept region may lie '
                            'partly outside the new box.')
        if self.usesGpu() and len(self.getGpuList()) > 1:
            warnings.append('Only the first GPU of the list (%s) is used.' % self.getGpuList()[0])
        return warnings

    def _summary(self):
        if self._isRevert():
            out = getattr(self, SubtractOutputs.outputParticles.name, None)
            if out is None:
                return ['Reverted particles not ready yet.']
            return ['%d particles reverted to their original images (box %s).'
                    % (out.getSize(), out.getXDim())]
        info = self._readJson('summary')
        if info is None:
            return ['Subtracted particles not ready yet.']
        opt = info.get('options', {})
        lines = ['%d particles subtracted (%s map%s, mask = %s), box %d -> %d, %s.'
                 % (info['n_particles'], 'one' if info['n_maps'] == 1 else 'per-class',
                    '' if info['n_maps'] == 1 else 's', 'region to ' + opt.get('mask_meaning', 'keep'),
                    info['box'], info['new_box'], opt.get('precision', 'float32'))]
        if opt.get('recentre'):
            lines.append('Recentred on (%.1f, %.1f, %.1f) A from the box centre.' % tuple(info['centre_A']))
        if opt.get('scale', 'none') != 'none':
            lines.append('Per-particle scale (%s): mean %.3f, s.d. %.3f.'
                         % (opt['scale'], info['scale_mean'], info['scale_sd']))
        lines.append('%.0f images/s.' % info.get('images_per_second', 0))
        return lines

    def _methods(self):
        if self._isRevert():
            return ['Subtracted particles were reverted to their original images with their alignment '
                    'carried over (hetplugin).']
        info = self._readJson('summary')
        if info is None:
            return []
        opt = info.get('options', {})
        text = ('From %d particles, the CTF-modulated projection of the %s, at each particle\'s pose, '
                'was subtracted [Bai2015][Scheres2012b] (hetplugin)' %
                (info['n_particles'], 'density outside the mask' if opt.get('mask_meaning') == 'keep'
                 else 'density inside the mask'))
        text += ', using each particle\'s class map' if info.get('by_class') else ''
        if opt.get('lowpass_A'):
            text += ', low-pass filtered to %.1f A' % opt['lowpass_A']
        if opt.get('scale', 'none') != 'none':
            text += ', scaled per particle by least squares'
        if opt.get('recentre'):
            text += '; the images were recentred on the kept region'
        text += ' and windowed to %d pixels.' % info['new_box'] if info['new_box'] != info['box'] else '.'
        return [text]

    def _citations(self):
        return ['Bai2015', 'Scheres2012b']

    # --------------------------- UTILS functions -----------------------------
    def _isRevert(self):
        return self.operation.get() == MODE_REVERT

    def _byClass(self):
        return len(self._mapsByClass()) > 1 and not self.ignoreClass.get()

    def _mapsByClass(self):
        """Volumes indexed by class number - 1 (a single map: one entry).

        From a SetOfVolumes or SetOfClasses3D the volume / class id is the class number
        (as multiclass writes them); ids that are missing are filled with the first map
        (never used, since no particle has that class)."""
        source = self.inputVolume.get()
        if source is None:
            return []
        if isinstance(source, SetOfClasses3D):
            byId = {}
            for cls in source.iterItems(orderBy='id'):
                rep = cls.getRepresentative()
                if rep is not None:
                    rep = rep.clone()
                    if not rep.getSamplingRate():
                        rep.setSamplingRate(source.getSamplingRate())
                    byId[cls.getObjId()] = rep
        elif isinstance(source, SetOfVolumes):
            byId = {}
            for vol in source.iterItems(orderBy='id'):
                vol = vol.clone()
                if not vol.getSamplingRate():
                    vol.setSamplingRate(source.getSamplingRate())
                byId[vol.getObjId()] = vol
        else:
            return [source]
        if not byId:
            return []
        if self.ignoreClass.get():
            return [byId[min(byId)]]
        first = byId[min(byId)]
        return [byId.get(k, first) for k in range(1, max(byId) + 1)]

    def _classIds(self):
        source = self.inputVolume.get()
        if isinstance(source, (SetOfClasses3D, SetOfVolumes)):
            return {item.getObjId() for item in source.iterItems()}
        return {1}

    def _validateClasses(self, particles):
        found = particles.aggregate(['count'], '_objId', ['_classId']) if particles.getSize() else []
        classes = {row['_classId'] for row in found}
        if not classes or None in classes or classes == {0}:
            return ['Per-class subtraction needs particles with class ids (e.g. the output particles of '
                    'the multiclass run whose classes / volumes are given), or use the first map for all '
                    '(advanced).']
        missing = sorted(c for c in classes if c not in self._classIds())
        if missing:
            return ['The particles belong to class(es) %s that have no map in the given set.'
                    % ', '.join(map(str, missing))]
        return []

    def _validateMaskNotEverything(self, mask):
        try:
            low, _high = self._maskRange(mask.getFileName())
        except Exception:
            return []
        if low >= 1.0:
            return ['The mask %s is one everywhere: it selects the whole box, so nothing would be '
                    'subtracted (or everything).' % mask.getFileName()]
        if self.maskMeaning.get() == MEANING_SUBTRACT and low >= 1.0 - 1e-6:
            return ['With "region to subtract", this mask would remove everything.']
        return []

    def _keptFraction(self, volume, mask):
        """Share of the map's positive density inside the kept region."""
        import mrcfile
        with mrcfile.mmap(stripSuffix(volume.getFileName()), mode='r', permissive=True) as v, \
                mrcfile.mmap(stripSuffix(mask.getFileName()), mode='r', permissive=True) as m:
            density = np.maximum(np.asarray(v.data, dtype=np.float32), 0)
            keep = np.asarray(m.data, dtype=np.float32)
            if self.maskMeaning.get() == MEANING_SUBTRACT:
                keep = 1.0 - keep
            total = float(density.sum())
            return float((density * keep).sum()) / total if total > 0 else None

    def _explicitCentre(self):
        text = self.centreA.get() or ''
        try:
            return [float(v) for v in text.replace(',', ' ').split()]
        except ValueError:
            return None

    @staticmethod
    def _extraAttributes(particles):
        """Subtraction attribute names (without the prefix) present on the particles."""
        first = particles.getFirstItem() if particles is not None and particles.getSize() else None
        if first is None or not hasattr(first, EXTRA_ATTR_PREFIX + PARTICLE_EXTRAS['rlnImageOriginalName']):
            return []
        names = list(PARTICLE_EXTRAS.values())
        names += [a[len(EXTRA_ATTR_PREFIX):] for a, _v in first.getAttributes()
                  if a.startswith(EXTRA_ATTR_PREFIX + 'subtractionScaleShell')]
        return [n for n in names if hasattr(first, EXTRA_ATTR_PREFIX + n)]

    def _addSubtractionColumns(self, particles, starPath):
        """Put the subtraction's extras (original image, recentring) back as STAR columns."""
        from hetplugin.core.starfile import read_star, write_star
        labels = {attr: label for label, attr in PARTICLE_EXTRAS.items()}
        attrs = self._extraAttributes(particles)
        values = {attr: {} for attr in attrs}
        for p in particles.iterItems():
            for attr in attrs:
                values[attr][p.getObjId()] = getattr(p, EXTRA_ATTR_PREFIX + attr).get()
        blocks = read_star(starPath)
        ids = np.asarray(blocks['particles'][OBJID_LABEL], dtype=np.int64).tolist()
        for attr in attrs:
            label = labels.get(attr, 'het' + attr[0].upper() + attr[1:])
            column = [values[attr][i] for i in ids]
            blocks['particles'][label] = np.array(column, dtype=object if attr == 'originalImageName'
                                                  else np.float64)
        write_star(starPath, blocks)

    def _inputSignature(self):
        """What convertInputStep depends on (a change re-runs it when continuing)."""
        mask = self.inputMask.get()
        return json.dumps({'particles': self.inputParticles.get().getObjId(),
                           'mode': self.operation.get(),
                           'maps': [v.getObjId() for v in self._mapsByClass()] if not self._isRevert() else [],
                           'mask': None if mask is None or self._isRevert() else mask.getObjId()})

    def _coreOptions(self):
        """Options of ``python -m hetplugin.core subtract`` / ``revert-subtraction``."""
        if self._isRevert():
            return {'particles': self._getFileName('input_particles'), 'out': self._getExtraPath()}
        nMaps = len(self._mapsByClass())
        centre = self._explicitCentre() if self.doRecentre.get() and self.useExplicitCentre.get() else None
        options = {
            'particles': self._getFileName('input_particles'),
            'map': [self._getFileName('input_reference', ref=i) for i in range(1, nMaps + 1)],
            'mask': self._getFileName('input_mask'),
            'mask_meaning': 'keep' if self.maskMeaning.get() == MEANING_KEEP else 'subtract',
            'out': self._getExtraPath(),
            'lowpass': self.lowPassA.get() if (self.lowPassA.get() or -1) > 0 else 0.0,
            'scale': SCALE_CORE[self.scaleMode.get()],
            'scale_shells': self.scaleShells.get(),
            'recentre': bool(self.doRecentre.get()),
            'centre': centre,
            'new_box': self.newBoxSize.get() if (self.newBoxSize.get() or -1) > 0 else 0,
            'precision': PRECISIONS[self.outputPrecision.get()],
            'ignore_class': bool(self.ignoreClass.get()),
            'batch_size': self.batchSize.get(),
        }
        return {key: value for key, value in options.items() if value is not None}
