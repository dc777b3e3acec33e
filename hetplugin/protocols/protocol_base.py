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
"""``ProtHetBase``: what the hetplugin protocols share (shallow on purpose).

A hetplugin protocol is thin: it declares params, validates, converts its
inputs with :mod:`hetplugin.convert`, runs one command of the core
(``python -m hetplugin.core <command> job.json``) with ``runJob`` and registers
outputs. This base class holds the pieces every such protocol repeats; a new
protocol (e.g. signal subtraction) is written like this::

    class ProtSignalSubtract(ProtHetBase):
        _label = 'signal subtraction'
        _coreCommand = 'subtract'               # python -m hetplugin.core subtract
        _possibleOutputs = SubtractOutputs

        def _defineParams(self, form):
            form.addSection('Input')
            form.addParam('inputParticles', PointerParam, ...)
            self._defineCtfParams(form)         # doCTF, ignoreCTFUntilFirstPeak
            self._defineSeedParam(form)         # randomSeed
            self._defineComputeParams(form)     # useGpu / gpuList / numberOfThreads

        def _filenameTemplates(self):           # extra working files, on top of the base ones
            return {'out_particles': 'subtracted.star'}

        # _insertAllSteps comes from the base: convertInputStep(signature) -> runCoreStep(options)
        # -> createOutputStep, with _inputSignature() and _coreOptions() defined here

        def convertInputStep(self, _signature):
            self._convertParticles(self.inputParticles.get(), use_alignment=True)
            self._volumeToMrc(self.inputVolume.get(), self._getFileName('input_reference', ref=1))

        def runCoreStep(self, _optionsJson):
            self._runCore(self._coreOptions())   # writes job.json, runJob(...), --continue if resumable

What lives here:

* **params**: :meth:`_defineComputeParams` (``useGpu`` / ``gpuList`` hidden
  params, shown by Scipion next to the threads, and the parallel section with
  ``numberOfThreads``; MPI is not offered until the core splits particles over
  ranks), :meth:`_defineSeedParam`, :meth:`_defineCtfParams`;
* **working files**: :meth:`_createFilenameTemplates` builds the templates of
  :meth:`_baseFilenameTemplates` plus the protocol's :meth:`_filenameTemplates`,
  all inside the run's ``extra/`` folder; :meth:`getOutputFile` is the public
  accessor (viewers use it);
* **running the core**: :meth:`_runCore` writes ``job.json`` (paths relative to
  the project folder, where ``runJob`` runs) and calls
  ``self.runJob(Plugin.getPython(), Plugin.getCoreArgs(command, job.json), env=Plugin.getEnviron())``
  so that the core's progress streams into the run log; device from the GPU
  params (``cuda:N`` / ``cpu``), ``--threads`` from ``numberOfThreads``;
  ``--continue`` when a saved state from the same options exists (Scipion's
  *continue* re-runs the unfinished step);
* **validation helpers** (each returns a list of messages): particles not
  empty, with CTF / 3D alignment when needed; boxes and pixel sizes of
  particles, volumes and masks agree; masks in [0, 1]; files that can be read
  (MRC directly; SPIDER with numpy or Xmipp's library; others with Xmipp's
  library); symmetry names;
* **conversion**: :meth:`_convertParticles` (STAR; MRC images not copied, other
  formats converted to MRC stacks in ``extra/converted_particles/``) and
  :meth:`_volumeToMrc` (a link to an MRC file, or the volume converted to MRC).

Nothing here imports torch: the form, validation and the GUI stay light; CUDA
only lives in the core process.
"""
import json
import os
import re
import shutil

import pyworkflow.protocol.params as params
from pyworkflow.protocol.constants import STEPS_SERIAL
from pwem.protocols import EMProtocol

#: File name endings that the core reads as MRC (after removing Scipion's ':mrc' suffix).
MRC_EXTENSIONS = ('.mrc', '.mrcs', '.map', '.st', '.ali', '.rec')
#: Relative tolerance for pixel sizes to be "the same".
PIXEL_SIZE_RTOL = 1e-3
#: Options of a core job that do not change its result (a saved state stays valid).
RUNTIME_OPTIONS = ('device', 'threads')


def gpuVisible():
    """True when this machine shows an NVIDIA driver (sets the default of ``useGpu``).

    Cheap and torch-free: the form must not import CUDA libraries."""
    return os.path.exists('/proc/driver/nvidia/version') or shutil.which('nvidia-smi') is not None


def isMrcPath(path):
    """True when ``path`` (optionally with a ``:mrc``/``:mrcs`` suffix) names an MRC file."""
    if not path:
        return False
    if re.search(r':mrcs?$', str(path)):
        return True
    return os.path.splitext(str(path))[1].lower() in MRC_EXTENSIONS


def stripSuffix(path):
    """``path`` without a Scipion format suffix (``:mrc``, ``:mrcs``, ``:spi``...)."""
    return re.sub(r':[a-zA-Z0-9]+$', '', str(path))


class ProtHetBase(EMProtocol):
    """Shared machinery of the hetplugin protocols (not shown in the GUI: no ``_label``)."""
    _coreCommand = None      # the core command a subclass runs, e.g. 'multiclass'
    stepsExecutionMode = STEPS_SERIAL

    # --------------------------- DEFINE param functions ----------------------
    def _defineComputeParams(self, form, threads=4):
        """GPU params (hidden: Scipion shows them in the run header) and the
        parallel section with ``numberOfThreads`` (no MPI yet)."""
        form.addHidden(params.USE_GPU, params.BooleanParam, default=gpuVisible(),
                       label='Use GPU?',
                       help='Compute on an NVIDIA GPU (CUDA build of torch needed in the '
                            'interpreter that runs the core, see HETPLUGIN_PYTHON). '
                            'No: compute on the CPU with the given threads. The default is '
                            'Yes when this machine has an NVIDIA driver.')
        form.addHidden(params.GPU_LIST, params.StringParam, default='0',
                       label='GPU id',
                       help='GPU to use (as numbered by nvidia-smi; with a queue system, '
                            'as assigned by the queue). The core uses one GPU: with a list, '
                            'only the first one is used.')
        form.addParallelSection(threads=threads, mpi=0)

    def _defineSeedParam(self, form):
        form.addParam('randomSeed', params.IntParam, default=0,
                      expertLevel=params.LEVEL_ADVANCED,
                      label='Random seed',
                      help='Seed of every random choice (half sets, initial class seeds). '
                           'The same seed, inputs, number of threads and device give the same '
                           'result. Another number of threads, or a GPU, adds numbers up in '
                           'another order: the maps differ in their last digits, and over a '
                           'long run a few particles may end in another class or pose.')

    def _defineCtfParams(self, form):
        form.addParam('doCTF', params.BooleanParam, default=True,
                      label='Do CTF correction?',
                      help='Model the contrast transfer function of every particle '
                           '(needs particles with CTF information).')
        form.addParam('ignoreCTFUntilFirstPeak', params.BooleanParam, default=False,
                      condition='doCTF', expertLevel=params.LEVEL_ADVANCED,
                      label='Ignore CTFs until first peak?',
                      help='Leave the CTF at its first maximum for lower frequencies. '
                           'Only for data with very low defocus or strong low-resolution '
                           'artefacts; usually No.')

    # the refinement protocols' (multiclass, focused) shared params and core options
    def _defineSymmetryParam(self, form, what, advice=''):
        form.addParam('symmetryGroup', params.StringParam, default='C1',
                      label='Symmetry',
                      help='Point group of %s: C1 (none), Cn, Dn, T, O or I (RELION conventions).%s'
                           % (what, advice))

    def _defineRegularisationParam(self, form, advice=''):
        form.addParam('regularisationParamT', params.FloatParam, default=4.0,
                      label='Regularisation parameter T',
                      help='Weight of the data relative to the smoothness prior (tau2 fudge): '
                           'higher values trust the data more and give sharper, noisier maps.%s' % advice)

    def _defineEStepLimitParam(self, form, what):
        form.addParam('limitResolEStep', params.FloatParam, default=-1,
                      expertLevel=params.LEVEL_ADVANCED,
                      label='Limit resolution E-step to (A)',
                      help='Never use frequencies beyond this resolution to %s (avoids over-fitting '
                           'noise). -1: no limit.' % what)

    def _defineOffsetParams(self, form):
        form.addParam('offsetSearchRangeA', params.FloatParam, default=-1,
                      label='Offset search range (A)',
                      help='Translations are searched within this range (Angstrom) around the '
                           'current origin. -1: 5 pixels.')
        form.addParam('offsetSearchStepA', params.FloatParam, default=-1,
                      label='Offset search step (A)',
                      help='Step of the translation search, in Angstrom. -1: one pixel.')

    def _defineBatchParam(self, form):
        form.addParam('batchSize', params.IntParam, default=64,
                      expertLevel=params.LEVEL_ADVANCED,
                      label='Particles per batch',
                      help='At most this many particles are scored together in the E-step. On '
                           'the CPU batches are made smaller where the pose search is large, so '
                           'that memory stays bounded; on a GPU this is the batch (lower it if '
                           'the GPU runs out of memory).')

    def _refinementOptions(self):
        """The core ``multiclass`` options that both refinement protocols set from the same params."""
        return {
            'particles': self._getFileName('input_particles'),
            'out': self._getExtraPath(),
            'initial_lowpass': self.initialLowPassFilterA.get(),
            'tau2_fudge': self.regularisationParamT.get(),
            'angular_step': self.angularSamplingDeg.get(),
            'offset_range': self._positiveOrNone(self.offsetSearchRangeA.get()),
            'offset_step': self._positiveOrNone(self.offsetSearchStepA.get()),
            'symmetry': self.symmetryGroup.get(),
            'resolution_limit': self._positiveOrNone(self.limitResolEStep.get()),
            'no_ctf': not self.doCTF.get(),
            'ctf_intact_first_peak': bool(self.doCTF.get() and self.ignoreCTFUntilFirstPeak.get()),
            'seed': self.randomSeed.get(),
            'batch_size': self.batchSize.get(),
        }

    def _validatePositive(self, named):
        """'The <label> must be positive.' for each (param name, label) whose value is not."""
        return ['The %s must be positive.' % label for name, label in named
                if not getattr(self, name).get() or getattr(self, name).get() <= 0]

    # --------------------------- working files --------------------------------
    def _baseFilenameTemplates(self):
        """Files every hetplugin protocol has, in ``extra/``."""
        return {
            'input_particles': 'input_particles.star',
            'input_reference': 'input_reference_%(ref)03d.mrc',
            'input_mask': 'input_mask.mrc',
            'job': 'job.json',
            'state': 'state',
            'state_latest': os.path.join('state', 'latest.json'),
        }

    def _filenameTemplates(self):
        """Protocol-specific templates (names inside ``extra/``); override."""
        return {}

    def _createFilenameTemplates(self):
        """Templates of every working file (relative to the project folder)."""
        names = dict(self._baseFilenameTemplates())
        names.update(self._filenameTemplates())
        self._updateFilenamesDict({key: self._getExtraPath(name) for key, name in names.items()})

    def getOutputFile(self, key, **kwargs):
        """Path of a working file by template key (``'model'``, ``'class_map'``, ...)."""
        self._createFilenameTemplates()
        return self._getFileName(key, **kwargs)

    # --------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self):
        """convertInputStep -> runCoreStep -> createOutputStep. The steps' arguments are the
        input signature and the core options, so a continued run redoes a step whose inputs or
        options changed."""
        self._createFilenameTemplates()
        self._insertFunctionStep(self.convertInputStep, self._inputSignature(), needsGPU=False)
        self._insertFunctionStep(self.runCoreStep, json.dumps(self._coreOptions(), sort_keys=True))
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    # --------------------------- running the core -----------------------------
    def _getDevice(self):
        """'cuda:N' (first GPU of the list) when the GPU is used, else 'cpu'."""
        if not (self.allowsGpu() and self.usesGpu()):
            return 'cpu'
        gpus = []
        executor = getattr(self, '_stepsExecutor', None)
        if executor is not None and executor.getGpuList():
            gpus = list(executor.getGpuList())   # queue systems renumber GPUs
        if not gpus:
            gpus = self.getGpuList()
        return 'cuda:%s' % gpus[0] if gpus else 'cuda'

    def _getThreads(self):
        threads = self.numberOfThreads.get() if hasattr(self, 'numberOfThreads') else 0
        return max(int(threads or 0), 0)

    def _runtimeOptions(self):
        """Options that do not change the result: device and threads."""
        return {'device': self._getDevice(), 'threads': self._getThreads()}

    def _canResume(self, options):
        """True when ``state/`` holds a run of the same (result-changing) options.

        Scipion's *continue* re-runs the step that did not finish: the core then
        resumes from its last saved iteration. A state made with other options
        (the user changed params) is removed so that the core starts afresh."""
        latest, jobFile = self._getFileName('state_latest'), self._getFileName('job')
        if not os.path.exists(latest):
            return False
        try:
            with open(jobFile) as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = None

        def science(opts):
            return {k: v for k, v in (opts or {}).items() if k not in RUNTIME_OPTIONS}

        if previous is not None and science(previous) == science(options):
            return True
        self.info('The saved state in %s was made with other options: starting again.'
                  % self._getFileName('state'))
        shutil.rmtree(self._getFileName('state'), ignore_errors=True)
        return False

    def _writeJob(self, options):
        with open(self._getFileName('job'), 'w') as f:
            json.dump(options, f, indent=1, sort_keys=True)

    def _runCore(self, options, command=None, resumable=True):
        """Run ``python -m hetplugin.core <command> job.json [--continue]`` with runJob.

        ``options`` are the command's options (CLI names with underscores; None
        values are left out). Device and threads are added here."""
        from hetplugin import Plugin
        self._createFilenameTemplates()
        command = command or self._coreCommand
        if not command:
            raise ValueError('%s: no core command (set _coreCommand)' % self.getClassName())
        options = {k: v for k, v in options.items() if v is not None}
        options.update(self._runtimeOptions())
        args = [self._getFileName('job')]
        if resumable and self._canResume(options):
            args.append('--continue')
            self.info('Continuing the core run from its saved state.')
        self._writeJob(options)
        self.info('Core job %s: %s' % (self._getFileName('job'), json.dumps(options, sort_keys=True)))
        self.runJob(Plugin.getPython(), Plugin.getCoreArgs(command, *args),
                    env=Plugin.getEnviron(), numberOfMpi=1,
                    numberOfThreads=max(self._getThreads(), 1))

    # --------------------------- conversion ----------------------------------
    def _convertParticles(self, particles, starKey='input_particles', use_alignment=True,
                          use_ctf=True):
        """Write ``particles`` as the core's STAR file.

        MRC stacks are used where they are (not copied). Images in other formats
        (SPIDER .stk/.spi, EMAN .hdf, ... single-image files, mixed stacks) are
        converted to MRC stacks in ``extra/converted_particles/`` and the STAR
        points at those; the input set is not modified, so outputs built from it
        keep the original locations."""
        from hetplugin.convert import write_particles_star
        from hetplugin.convert.images import particles_to_mrc
        locations = None
        if not self._allMrc(particles):
            outDir = self._getExtraPath('converted_particles')
            locations = particles_to_mrc(particles, outDir, log=self.info)
            converted = sum(1 for k, v in locations.items() if k != v)
            self.info('%d particle images converted to MRC in %s; %d used in place.'
                      % (converted, outDir, len(locations) - converted))
        info = write_particles_star(particles, self._getFileName(starKey),
                                    use_alignment=use_alignment, use_ctf=use_ctf,
                                    locations=locations)
        self.info('Wrote %(n_particles)d particles (box %(image_size)d, %(pixel_size_A).4f A/px, '
                  'alignment: %(has_alignment)s, CTF: %(has_ctf)s) to %(star_path)s' % info)
        return info

    @staticmethod
    def _particleFiles(particles, limit=None):
        """Distinct image files of a particle set (at most ``limit``), in id order."""
        files = []
        try:
            values = particles.getUniqueValues('_filename')
        except Exception:       # not a mapped set: iterate
            values = None
        if values is not None:
            files = [f for f in values if f]
        else:
            seen = set()
            for p in particles.iterItems():
                f = p.getFileName()
                if f not in seen:
                    seen.add(f)
                    files.append(f)
                    if limit and len(files) >= limit:
                        break
        return files[:limit] if limit else files

    def _allMrc(self, particles):
        from hetplugin.convert.images import is_mrc_format
        return all(is_mrc_format(f) for f in self._particleFiles(particles))

    def _volumeToMrc(self, volume, linkPath):
        """An MRC path for ``volume``: a link at ``linkPath`` to its MRC file, or,
        for other formats (SPIDER .vol/.spi, .hdf, a volume inside a stack), the
        volume converted to the MRC file ``linkPath``."""
        from hetplugin.convert.images import is_mrc_format, readability_error, volume_to_mrc
        path = volume.getFileName()
        index = volume.getIndex() if hasattr(volume, 'getIndex') else None
        if (not isMrcPath(path) and not is_mrc_format(path)) or (index and index > 1):
            error = readability_error(path)
            if error:
                raise ValueError('The volume %s cannot be read: %s' % (path, error))
            if os.path.lexists(linkPath):
                os.remove(linkPath)
            self.info('Converting %s (volume %s) to MRC: %s' % (path, index or 1, linkPath))
            volume_to_mrc(path, linkPath, pixel_size=volume.getSamplingRate(), index=index)
            return linkPath
        error = self._formatError(volume, 'volume')
        if error:
            raise ValueError(error)
        source = os.path.abspath(stripSuffix(path))
        if os.path.lexists(linkPath):
            os.remove(linkPath)
        try:
            os.symlink(source, linkPath)
        except OSError:
            return source       # no links on this file system: the original is read in place
        return linkPath

    # --------------------------- validation helpers ---------------------------
    def _validateParticles(self, particles, needCtf=False, needAlignment=False, label='particles'):
        """Empty set, images not in MRC stacks, missing CTF (when needed), missing /
        2D alignment (when needed)."""
        errors = []
        if particles is None:
            return ['No input %s.' % label]
        if not particles.getSize():
            errors.append('The input %s set is empty.' % label)
        else:
            # Non-MRC images are converted in convertInputStep; refuse only what cannot be read
            # (a few distinct files are checked: headers only).
            from hetplugin.convert.images import is_mrc_format, readability_error
            for path in self._particleFiles(particles, limit=20):
                if is_mrc_format(path):
                    continue
                error = readability_error(path)
                if error:
                    errors.append('The input %s cannot be read: %s' % (label, error))
                    break
        if needCtf and not particles.hasCTF():
            errors.append('The input %s have no CTF information, but CTF correction is '
                          'asked for: estimate and assign CTFs first, or set '
                          '"Do CTF correction?" to No.' % label)
        if needAlignment and not particles.hasAlignmentProj():
            errors.append('The input %s have no 3D (projection) alignment; it is needed here.'
                          % label)
        return errors

    @staticmethod
    def _dimsOf(obj):
        """(box, pixel size) of a particle set, volume or mask (None when unknown)."""
        dim = obj.getDim()
        return (None if not dim else int(dim[0])), obj.getSamplingRate()

    def _validateDims(self, particles, others):
        """Boxes and pixel sizes of ``others`` ([(label, volume-like), ...]) agree with the particles."""
        errors = []
        pBox, pPix = self._dimsOf(particles)
        if pBox is None:
            return ['Cannot read the size of the input particles (first image unreadable?).']
        for label, obj in others:
            if obj is None:
                continue
            dim = obj.getDim()
            if not dim:
                errors.append('Cannot read the size of the %s (%s).' % (label, obj.getFileName()))
                continue
            if len(set(int(d) for d in dim)) != 1:
                errors.append('The %s is not a cube: %s voxels.' % (label, ' x '.join(map(str, dim))))
            elif int(dim[0]) != pBox:
                errors.append('The %s has a box of %d voxels but the particles are %d pixels: '
                              'resize one of them (e.g. with "crop/resize volumes").'
                              % (label, int(dim[0]), pBox))
            vPix = obj.getSamplingRate()
            if not vPix or not pPix or abs(vPix - pPix) > PIXEL_SIZE_RTOL * pPix:
                errors.append('The %s has a pixel size of %s A but the particles have %s A: '
                              'they must be the same.' % (label, vPix, pPix))
        return errors

    def _formatError(self, volume, label):
        """Message when ``volume``'s file cannot be read (None when it can).

        MRC files are read in place; other formats (SPIDER, ...) and volumes inside
        stacks are converted to MRC in convertInputStep when readable."""
        from hetplugin.convert.images import is_mrc_format, readability_error
        path = volume.getFileName()
        if not path:
            return 'The %s has no file.' % label
        if not os.path.exists(stripSuffix(path)):
            return 'The %s file %s does not exist.' % (label, path)
        if isMrcPath(path) or is_mrc_format(path):
            return None
        error = readability_error(path)
        if error:
            return 'The %s cannot be read: %s' % (label, error)
        return None

    def _validateFormats(self, labelled):
        """Formats the core reads, for [(label, volume-like), ...]."""
        return [e for e in (self._formatError(obj, label) for label, obj in labelled if obj is not None)
                if e]

    @staticmethod
    def _maskRange(path):
        """(min, max) of a mask: MRC read with mrcfile (memory-mapped), other formats
        with :func:`hetplugin.convert.images.read_volume_any`."""
        from hetplugin.convert.images import is_mrc_format, read_volume_any
        if isMrcPath(path) or is_mrc_format(path):
            import mrcfile
            with mrcfile.mmap(stripSuffix(path), mode='r', permissive=True) as m:
                return float(m.data.min()), float(m.data.max())
        data = read_volume_any(path)
        return float(data.min()), float(data.max())

    def _validateMask(self, mask, label='mask'):
        """Mask values in [0, 1] and not empty."""
        if mask is None or self._formatError(mask, label):
            return []
        try:
            low, high = self._maskRange(mask.getFileName())
        except Exception as exc:  # unreadable file: say so instead of failing later
            return ['Cannot read the %s %s: %s' % (label, mask.getFileName(), exc)]
        if low < -1e-3 or high > 1 + 1e-3:
            return ['The %s values must lie in [0, 1]; %s has [%.3g, %.3g]. Use a soft binary '
                    'mask (e.g. from a "create 3D mask" protocol).'
                    % (label, mask.getFileName(), low, high)]
        if high <= 0:
            return ['The %s %s is empty (all zero).' % (label, mask.getFileName())]
        return []

    @staticmethod
    def _validateSymmetry(symmetry):
        from hetplugin.core.symmetry import symmetry_group   # numpy only
        try:
            symmetry_group(symmetry or '')
        except ValueError as exc:
            return [str(exc)]
        return []

    @staticmethod
    def _positiveOrNone(value):
        """A form value for a core option whose default is "not given" (-1 or 0 on the form)."""
        return value if value is not None and value > 0 else None

    # --------------------------- INFO helpers --------------------------------
    def _readJson(self, key):
        """A JSON working file by template key, or None when absent/unreadable."""
        path = self.getOutputFile(key)
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None
