"""Scipion SetOfParticles <-> core / RELION 3.1 particle STAR files.

* :func:`write_particles_star`: a Scipion set -> ``particles.star`` for the core
  (images are not copied: ``index@/absolute/stack``), one pass over the set.
* :func:`star_to_particle_set`: any RELION / core particle STAR -> a new Scipion set.
* :func:`update_particles`: input set + core output STAR -> output set keeping
  every input attribute, with the new alignment / class / per-particle extras.

Particles are matched between Scipion and STAR files by their Scipion object id,
written in the column ``rlnImageId`` (RELION's own label, as scipion-em-relion
does); the core carries unknown and extra columns through. Shifts: pixels in
Scipion Transforms, Angstrom in STAR files (see :mod:`.geometry`).
"""
from __future__ import annotations

import os

import numpy as np

from hetplugin.constants import EXTRA_ATTR_PREFIX, OBJID_LABEL
from hetplugin.core.mrc import read_header, strip_format_suffix
from hetplugin.core.starfile import new_particle_table, read_particles, write_particles

from .ctf import relion_to_acquisition
from .geometry import alignments_to_relion, relion_to_alignments

__all__ = ["write_particles_star", "star_to_particle_set", "update_particles",
           "ParticleUpdater", "objects_from_value"]

#: Scipion attribute -> STAR label, optional per-particle values carried to the core.
_OPTIONAL_ATTRS = (("_rlnRandomSubset", "rlnRandomSubset"),)


# ----------------------------------------------------------------------------- helpers
def objects_from_value(value):
    """A pyworkflow scalar (Integer, Float, Boolean, String) holding a Python/numpy value."""
    from pyworkflow.object import Boolean, Float, Integer, String
    if isinstance(value, (bool, np.bool_)):
        return Boolean(bool(value))
    if isinstance(value, (int, np.integer)):
        return Integer(int(value))
    if isinstance(value, (float, np.floating)):
        return Float(float(value))
    return String(str(value))


def _attr_name(name: str) -> str:
    """Scipion attribute name for an extra value: '_hetplugin_x' stays, 'x' -> '_hetplugin_x'."""
    name = str(name)
    if name.startswith('_'):
        return name
    return EXTRA_ATTR_PREFIX + name


def _single_pixel_size(table, star_path) -> float:
    sizes = np.unique(np.round(np.asarray(table.pixel_size_A, dtype=np.float64), 6))
    if len(sizes) != 1:
        raise ValueError("%s: particles have %d pixel sizes %s; a Scipion set has one sampling "
                         "rate" % (star_path, len(sizes), sizes[:5].tolist()))
    return float(sizes[0])


def _alignment_matrices(table, pixel_size_A) -> np.ndarray | None:
    """Scipion ALIGN_PROJ matrices (N, 4, 4) for the table's angles and origins."""
    if not table.has_alignment:
        return None
    return relion_to_alignments(table.rot_deg, table.tilt_deg, table.psi_deg,
                                np.asarray(table.shift_x_A) / pixel_size_A,
                                np.asarray(table.shift_y_A) / pixel_size_A)


# ----------------------------------------------------------------------------- Scipion -> STAR
def write_particles_star(partSet, star_path, use_alignment: bool = True,
                         use_ctf: bool = True, locations: dict | None = None) -> dict:
    """Write a Scipion ``SetOfParticles`` as a RELION 3.1 particle STAR file for the core.

    One optics group from the set (sampling rate, box, voltage, Cs, amplitude
    contrast). Per particle: ``rlnImageName`` = ``index@/absolute/stack`` (the
    stacks are used where they are; a ``:mrc``/``:mrcs`` suffix is dropped; index 0
    (single-image file) becomes 1), ``rlnImageId`` = Scipion id, CTF (defocus U/V,
    angle, phase shift when the set has one, CTF max resolution / figure of merit
    when set), ALIGN_PROJ alignment as rlnAngleRot/Tilt/Psi + rlnOriginX/YAngst
    (when ``use_alignment`` and the set has it), ``rlnClassNumber`` when the
    particles carry class ids, ``rlnRandomSubset`` when they carry
    ``_rlnRandomSubset``. Disabled particles are left out.

    ``locations`` (optional, e.g. from :func:`.images.particles_to_mrc`) maps
    ``(filename, index)`` as ``Particle.getLocation()`` gives them to the
    ``(path, index)`` written instead (converted MRC stacks); locations not in
    it are written as they are. The set itself is not modified.

    Returns ``{'star_path', 'n_particles', 'pixel_size_A', 'image_size',
    'has_alignment', 'has_ctf', 'has_classes'}``.
    Raises ValueError for an empty set, a set without sampling rate or acquisition
    (when CTFs are written), 2D/3D alignments, or particles lacking a CTF/transform.
    """
    pixel_size = partSet.getSamplingRate()
    if not pixel_size or pixel_size <= 0:
        raise ValueError("write_particles_star: the particle set has no sampling rate")
    align = partSet.getAlignment()
    with_alignment = bool(use_alignment) and partSet.hasAlignment()
    if with_alignment and not partSet.hasAlignmentProj():
        raise ValueError("write_particles_star: the particles have a %s alignment; only projection "
                         "alignment (ALIGN_PROJ, 3D angles) can be used. Ignore it with "
                         "use_alignment=False." % align)
    with_ctf = bool(use_ctf) and partSet.hasCTF()

    ids, indices, files, matrices = [], [], [], []
    ctf_rows, phase, ctf_res, ctf_fom = [], [], [], []
    classes = []
    optional = {label: [] for _attr, label in _OPTIONAL_ATTRS}
    for p in partSet.iterItems(orderBy='id', direction='ASC'):
        if not p.isEnabled():
            continue
        obj_id = p.getObjId()
        ids.append(obj_id)
        index, filename = p.getLocation()
        if locations is not None:
            filename, index = locations.get((filename, index), (filename, index))
        indices.append(index or 1)
        files.append(filename)
        if with_ctf:
            ctf = p.getCTF()
            if ctf is None:
                raise ValueError("write_particles_star: particle %s has no CTF but the set says it "
                                 "has; use use_ctf=False to ignore CTFs" % obj_id)
            ctf_rows.append(ctf.getDefocus())
            phase.append(ctf.getPhaseShift())
            ctf_res.append(ctf.getResolution())
            ctf_fom.append(ctf.getFitQuality())
        if with_alignment:
            transform = p.getTransform()
            if transform is None:
                raise ValueError("write_particles_star: particle %s has no alignment; use "
                                 "use_alignment=False to ignore alignments" % obj_id)
            matrices.append(transform.getMatrix())
        classes.append(p.getClassId())
        for attr, label in _OPTIONAL_ATTRS:
            value = getattr(p, attr, None)
            optional[label].append(None if value is None else value.get())
    n = len(ids)
    if n == 0:
        raise ValueError("write_particles_star: the particle set has no (enabled) particles")

    # Normalise image paths once per distinct stack (not per particle).
    unique_files = {f: os.path.abspath(strip_format_suffix(f)) for f in set(files)}
    paths = np.array([unique_files[f] for f in files] + [''], dtype=object)[:-1]
    header = read_header(paths[0])
    if header.nx != header.ny:
        raise ValueError("write_particles_star: images of %dx%d pixels are not square (%s)"
                         % (header.nx, header.ny, paths[0]))

    kwargs = {}
    extra = {OBJID_LABEL: np.asarray(ids, dtype=np.int64)}
    if with_alignment:
        rot, tilt, psi, sx, sy = alignments_to_relion(np.asarray(matrices, dtype=np.float64))
        kwargs.update(rot_deg=rot, tilt_deg=tilt, psi_deg=psi,
                      shift_x_A=sx * pixel_size, shift_y_A=sy * pixel_size)
    if with_ctf:
        acq = partSet.getAcquisition()
        if acq is None or acq.getVoltage() is None or acq.getSphericalAberration() is None:
            raise ValueError("write_particles_star: the set has CTFs but its acquisition lacks "
                             "voltage or spherical aberration")
        defocus = np.asarray(ctf_rows, dtype=np.float64)
        if not np.all(np.isfinite(defocus)):
            raise ValueError("write_particles_star: some particles have incomplete CTF values")
        amp = acq.getAmplitudeContrast()
        kwargs.update(defocus_u_A=defocus[:, 0], defocus_v_A=defocus[:, 1],
                      defocus_angle_deg=defocus[:, 2], voltage_kV=float(acq.getVoltage()),
                      cs_mm=float(acq.getSphericalAberration()),
                      amplitude_contrast=0.1 if amp is None else float(amp))
        if any(v is not None for v in phase):
            kwargs['phase_shift_deg'] = np.array([0.0 if v is None else v for v in phase])
        for label, values in (('rlnCtfMaxResolution', ctf_res), ('rlnCtfFigureOfMerit', ctf_fom)):
            if any(v is not None for v in values):
                extra[label] = np.array([0.0 if v is None else v for v in values], dtype=np.float64)
    has_classes = all(c is not None for c in classes) and any(classes)
    if has_classes:
        kwargs['class_number'] = np.asarray(classes, dtype=np.int64)
    for label, values in optional.items():
        if all(v is not None for v in values):
            if label == 'rlnRandomSubset':
                kwargs['random_subset'] = np.asarray(values, dtype=np.int64)
            else:
                extra[label] = np.asarray(values)

    table = new_particle_table(paths, np.asarray(indices, dtype=np.int64), pixel_size, header.nx,
                               extra_columns=extra, star_path=star_path, **kwargs)
    if with_ctf and 'phase_shift_deg' not in kwargs:
        # No phase plate: leave rlnPhaseShift out rather than writing zeros (readers default to 0).
        table.phase_shift_deg = None
        table.columns.pop('rlnPhaseShift', None)
    if not with_ctf and table.optics is not None:
        # RELION 3.1 programs need voltage and Cs in data_optics even without CTFs.
        acq = partSet.getAcquisition()
        n_groups = len(table.optics['rlnOpticsGroup'])
        for label, value in (('rlnVoltage', acq and acq.getVoltage()),
                             ('rlnSphericalAberration', acq and acq.getSphericalAberration()),
                             ('rlnAmplitudeContrast', acq and acq.getAmplitudeContrast())):
            if value is not None:
                table.optics.setdefault(label, np.full(n_groups, float(value)))
    write_particles(star_path, table)
    return {'star_path': os.path.abspath(star_path), 'n_particles': n,
            'pixel_size_A': float(pixel_size), 'image_size': int(header.nx),
            'has_alignment': with_alignment, 'has_ctf': with_ctf, 'has_classes': bool(has_classes)}


# ----------------------------------------------------------------------------- STAR -> Scipion
def _acquisition_values(table) -> dict:
    """Voltage, Cs, amplitude contrast and magnification from the table (first particle)."""
    def first_of(field, label):
        value = getattr(table, field, None) if field else None
        if value is not None:
            return float(np.asarray(value)[0])
        for block in (table.columns, table.optics or {}):
            if label in block:
                try:
                    return float(np.asarray(block[label], dtype=np.float64)[0])
                except (TypeError, ValueError):
                    return None
        return None
    return {'voltage_kV': first_of('voltage_kV', 'rlnVoltage'),
            'cs_mm': first_of('cs_mm', 'rlnSphericalAberration'),
            'amplitude_contrast': first_of('amplitude_contrast', 'rlnAmplitudeContrast'),
            'magnification': first_of(None, 'rlnMagnification')}


def _object_ids(table) -> np.ndarray:
    """Scipion ids: rlnImageId when present, positive and unique, else 1..N."""
    n = len(table)
    column = table.columns.get(OBJID_LABEL)
    if column is not None:
        try:
            ids = np.asarray(column, dtype=np.int64)
            if len(np.unique(ids)) == n and (n == 0 or ids.min() > 0):
                return ids
        except (TypeError, ValueError):
            pass
    return np.arange(1, n + 1, dtype=np.int64)


def star_to_particle_set(star_path, outputSet, root=None) -> int:
    """Fill an empty Scipion ``SetOfParticles`` from a RELION (3.0 to 5) or core particle STAR.

    The set gets the sampling rate (one pixel size for all particles), an
    Acquisition (voltage, Cs, amplitude contrast, magnification; 10000 when the
    file has none), ``hasCTF`` and ALIGN_PROJ when the file has angles. Every
    particle gets its location ``(index, absolute stack path)``, an Acquisition,
    a CTFModel (standardised: U >= V), a Transform and its class id where the file
    has them; ids come from ``rlnImageId`` when it is a valid id column.
    Relative image paths are resolved as ``hetplugin.core.starfile.read_particles``
    does (``root`` first when given). Returns the number of particles added.
    """
    from pwem.constants import ALIGN_NONE
    from pwem.objects import Acquisition, CTFModel, Particle, Transform

    table = read_particles(star_path, root=root)
    n = len(table)
    if n == 0:
        raise ValueError("%s: no particles" % star_path)
    pixel_size = _single_pixel_size(table, star_path)
    outputSet.setSamplingRate(pixel_size)

    acq_values = _acquisition_values(table)
    acquisition = Acquisition()
    if None not in (acq_values['voltage_kV'], acq_values['cs_mm']):
        if acq_values['amplitude_contrast'] is None:
            acq_values['amplitude_contrast'] = 0.1
        relion_to_acquisition(acq_values, acquisition)
    outputSet.setAcquisition(acquisition)
    outputSet.setHasCTF(table.has_ctf)
    matrices = _alignment_matrices(table, pixel_size)
    if matrices is not None:
        outputSet.setAlignmentProj()
    else:
        outputSet.setAlignment(ALIGN_NONE)

    ids = _object_ids(table).tolist()
    indices = table.image_index.tolist()
    paths = table.image_path.tolist()
    classes = None if table.class_number is None else table.class_number.tolist()
    has_phase = table.has_ctf and 'rlnPhaseShift' in table.columns
    if table.has_ctf:
        ctf_u = np.asarray(table.defocus_u_A, dtype=np.float64).tolist()
        ctf_v = np.asarray(table.defocus_v_A, dtype=np.float64).tolist()
        ctf_a = np.asarray(table.defocus_angle_deg, dtype=np.float64).tolist()
        ctf_p = np.asarray(table.phase_shift_deg, dtype=np.float64).tolist() if has_phase else None
        ctf_res = _float_column(table, 'rlnCtfMaxResolution')
        ctf_fom = _float_column(table, 'rlnCtfFigureOfMerit')
    subsets = None if table.random_subset is None else table.random_subset.tolist()

    particle = Particle()
    particle.setAcquisition(acquisition)
    ctf = CTFModel() if table.has_ctf else None
    transform = Transform() if matrices is not None else None
    for i in range(n):
        particle.setObjId(ids[i])
        particle.setLocation(int(indices[i]), paths[i])
        if ctf is not None:
            ctf.setDefocusU(ctf_u[i])
            ctf.setDefocusV(ctf_v[i])
            ctf.setDefocusAngle(ctf_a[i])
            if ctf_p is not None:
                ctf.setPhaseShift(ctf_p[i])
            if ctf_res is not None:
                ctf.setResolution(ctf_res[i])
            if ctf_fom is not None:
                ctf.setFitQuality(ctf_fom[i])
            ctf.standardize()
            particle.setCTF(ctf)
        if transform is not None:
            transform.setMatrix(matrices[i])
            particle.setTransform(transform)
        if classes is not None:
            particle.setClassId(int(classes[i]))
        if subsets is not None:
            particle._rlnRandomSubset = objects_from_value(int(subsets[i]))
        outputSet.append(particle)
    return n


def _float_column(table, label):
    column = table.columns.get(label)
    if column is None:
        return None
    try:
        return np.asarray(column, dtype=np.float64).tolist()
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- core output -> Scipion
class ParticleUpdater:
    """Per-particle values of a core output STAR, applied to Scipion particles by id.

    ``extra_labels`` maps STAR labels (without '_') to Scipion attribute names
    (``'maxProb'`` or ``'_hetplugin_maxProb'`` both give ``_hetplugin_maxProb``).
    ``update(particle)`` sets the alignment (ALIGN_PROJ Transform, shifts in
    pixels of the STAR's pixel size), the class id and the extras, and returns
    False when the particle is not in the STAR. With ``update_locations`` the
    image location is also replaced (e.g. subtracted images).
    """

    def __init__(self, star_path, extra_labels: dict | None = None,
                 update_locations: bool = False, root=None):
        table = read_particles(star_path, root=root)
        if OBJID_LABEL not in table.columns:
            raise ValueError("%s: no _%s column: cannot match the particles to the Scipion set "
                             "(the core must carry the input's _%s through)"
                             % (star_path, OBJID_LABEL, OBJID_LABEL))
        ids = np.asarray(table.columns[OBJID_LABEL], dtype=np.int64)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("%s: _%s values are not unique" % (star_path, OBJID_LABEL))
        self.star_path = star_path
        self.table = table
        self.pixel_size_A = _single_pixel_size(table, star_path) if len(table) else None
        self._row = dict(zip(ids.tolist(), range(len(ids))))
        self.matrices = _alignment_matrices(table, self.pixel_size_A) if len(table) else None
        self.classes = None if table.class_number is None else table.class_number.tolist()
        self.update_locations = update_locations
        self._locations = (table.image_index.tolist(), table.image_path.tolist())
        self.extras = []
        for label, attr in (extra_labels or {}).items():
            label = str(label).lstrip('_')
            if label not in table.columns:
                raise ValueError("%s: no _%s column (asked for as Scipion attribute %s); columns: %s"
                                 % (star_path, label, attr, ', '.join(sorted(table.columns))))
            self.extras.append((_attr_name(attr), np.asarray(table.columns[label]).tolist()))
        self.n_matched = 0

    @property
    def has_alignment(self) -> bool:
        return self.matrices is not None

    def __len__(self):
        return len(self._row)

    def update(self, particle) -> bool:
        from pwem.objects import Transform
        k = self._row.get(particle.getObjId())
        if k is None:
            return False
        if self.matrices is not None:
            particle.setTransform(Transform(self.matrices[k].copy()))
        if self.classes is not None:
            particle.setClassId(int(self.classes[k]))
        for attr, values in self.extras:
            setattr(particle, attr, objects_from_value(values[k]))
        if self.update_locations:
            particle.setLocation(int(self._locations[0][k]), self._locations[1][k])
        self.n_matched += 1
        return True

    def callback(self, particle, _row=None):
        """``copyItems`` / ``classifyItems`` callback: update, or drop the particle.

        Sets ``_appendItem`` both ways: with ``doClone=False`` the set iterator hands
        out one reused object, so a False must not stick to the next particle."""
        particle._appendItem = self.update(particle)


def update_particles(inputSet, outputSet, star_path, extra_labels: dict | None = None,
                     update_locations: bool = False) -> int:
    """Copy ``inputSet`` into ``outputSet`` with the results of a core output STAR.

    Every input particle found in the STAR (by ``rlnImageId`` = Scipion id) is
    copied whole (id, location, CTF, acquisition, coordinates, attributes set by
    other plugins) and gets the STAR's alignment (the output set becomes
    ALIGN_PROJ when the STAR has angles), class id and ``extra_labels``
    (``{star_label: attribute}``, e.g. ``{'rlnMaxValueProbDistribution':
    'maxProb'}`` -> ``_hetplugin_maxProb``). Particles missing from the STAR are
    dropped. With ``update_locations`` the image locations come from the STAR
    too (new images, e.g. after subtraction). Returns the number of particles written.
    """
    updater = ParticleUpdater(star_path, extra_labels, update_locations=update_locations)
    if updater.pixel_size_A is not None and inputSet.getSamplingRate() and not np.isclose(
            updater.pixel_size_A, inputSet.getSamplingRate(), rtol=1e-4):
        raise ValueError("%s: pixel size %.4f A differs from the input particles' %.4f A"
                         % (star_path, updater.pixel_size_A, inputSet.getSamplingRate()))
    outputSet.copyInfo(inputSet)
    if updater.has_alignment:
        outputSet.setAlignmentProj()
    outputSet.copyItems(inputSet, updateItemCallback=updater.callback, doClone=False)
    return updater.n_matched
