"""Scipion volumes and 3D classes from core outputs (MRC maps + particle STAR).

:func:`fill_classes` is the one classes filler for every protocol that makes
classes; :func:`create_volume` / :func:`fill_volume_set` turn MRC paths into
Scipion volumes with their sampling rate and a centred origin.
"""
from __future__ import annotations

import os

from hetplugin.constants import EXTRA_ATTR_PREFIX
from hetplugin.core.mrc import read_header, strip_format_suffix

from .particles import ParticleUpdater, objects_from_value

__all__ = ["create_volume", "fill_volume_set", "fill_classes", "class_attribute"]


def class_attribute(key: str) -> str:
    """Scipion attribute that holds ``class_info[...][key]`` on a class: ``_hetplugin_<key>``."""
    key = str(key)
    return key if key.startswith('_') else EXTRA_ATTR_PREFIX + key


def _centred_origin(path, sampling_rate):
    """Transform with shifts (-nx/2, -ny/2, -nz/2) * sampling: Scipion's default volume origin."""
    from pwem.objects import Transform
    header = read_header(path)
    origin = Transform()
    origin.setShifts(-header.nx / 2. * sampling_rate, -header.ny / 2. * sampling_rate,
                     -header.nz / 2. * sampling_rate)
    return origin


def create_volume(path, sampling_rate: float, volume=None, obj_id: int | None = None):
    """A Scipion ``Volume`` (or fill ``volume``, e.g. a class representative) for an MRC map.

    The location is ``path`` as given (relative paths stay relative to the
    protocol's working folder; a ``:mrc`` suffix is dropped), with the sampling
    rate and the default centred origin read from the map's header.
    """
    if not sampling_rate or sampling_rate <= 0:
        raise ValueError("create_volume: sampling rate must be positive, got %r" % (sampling_rate,))
    path = strip_format_suffix(path)
    if not os.path.exists(path):
        raise ValueError("create_volume: no such map %s" % path)
    if volume is None:
        from pwem.objects import Volume
        volume = Volume()
    volume.setLocation(path)
    volume.setSamplingRate(float(sampling_rate))
    volume.setOrigin(_centred_origin(path, float(sampling_rate)))
    if obj_id is not None:
        volume.setObjId(int(obj_id))
    return volume


def _as_id_dict(paths) -> dict:
    """{class id: path} from a dict, or from a list/tuple (ids 1..K)."""
    if isinstance(paths, dict):
        return {int(k): v for k, v in paths.items()}
    return {i: p for i, p in enumerate(paths, start=1)}


def fill_volume_set(volSet, paths, sampling_rate: float):
    """Append one Volume per map to ``volSet`` (``paths``: list -> ids 1..K, or
    ``{id: path}``) and set the set's sampling rate. Returns ``volSet``."""
    volSet.setSamplingRate(float(sampling_rate))
    for obj_id, path in sorted(_as_id_dict(paths).items()):
        volume = create_volume(path, sampling_rate, obj_id=obj_id)
        volSet.append(volume)
    return volSet


def _same_set(a, b) -> bool:
    """True when two Scipion sets are one object or live in one sqlite file."""
    if a is b:
        return True
    fa, fb = a.getFileName(), b.getFileName()
    return bool(fa) and bool(fb) and os.path.abspath(fa) == os.path.abspath(fb)


class _SetMatcher:
    """Find particles of a Scipion set by id while both are walked in increasing id order."""

    def __init__(self, partSet):
        self._items = partSet.iterItems(orderBy='id', direction='ASC')
        self._current = next(self._items, None)

    def get(self, obj_id):
        while self._current is not None and self._current.getObjId() < obj_id:
            self._current = next(self._items, None)
        if self._current is not None and self._current.getObjId() == obj_id:
            return self._current
        return None


def fill_classes(classes3D, particles, class_volume_paths, class_info: dict | None = None,
                 extra_labels: dict | None = None):
    """Fill ``classes3D`` (a SetOfClasses3D whose images are the input particles).

    ``particles`` says where each particle goes, matched by Scipion id:

    * a core output STAR path: class (``rlnClassNumber``), alignment and
      ``extra_labels`` (``{star_label: attribute}``) come from it, as in
      :func:`hetplugin.convert.update_particles`;
    * or a SetOfParticles already updated (e.g. ``outputParticles``): class id,
      transform and every ``_hetplugin_*`` attribute are taken from it (when it
      is the classes' own images set, its particles are used as they are).

    Particles absent from ``particles`` or with class 0 are left out. Each class
    gets ALIGN_PROJ, its representative = the class map from
    ``class_volume_paths`` (list -> classes 1..K, or ``{class: path}``) with the
    particles' sampling rate, and ``class_info[class]`` items as attributes
    ``_hetplugin_<key>`` (e.g. ``{'distribution': 0.4, 'resolution_A': 8.5,
    'size': 120}``). Classes that receive no particle are not created (their
    maps still belong in ``outputVolumes``, see :func:`fill_volume_set`).
    """
    images = classes3D.getImages()
    if images is None:
        raise ValueError("fill_classes: the classes set has no images; create it with "
                         "protocol._createSetOfClasses3D(inputParticlesPointer)")
    sampling = images.getSamplingRate()
    volumes = _as_id_dict(class_volume_paths)
    info = {int(k): dict(v) for k, v in (class_info or {}).items()}

    if isinstance(particles, (str, os.PathLike)):
        updater = ParticleUpdater(particles, extra_labels)
        if updater.classes is None:
            raise ValueError("fill_classes: %s has no _rlnClassNumber column" % particles)
        update_item = updater.callback
    elif _same_set(particles, images):
        # The classes are made of the updated particles themselves: nothing to look up.
        def update_item(item, _row=None):
            item._appendItem = bool(item.getClassId())
    else:
        matcher = _SetMatcher(particles)

        def update_item(item, _row=None):
            source = matcher.get(item.getObjId())
            item._appendItem = source is not None and bool(source.getClassId())
            if not item._appendItem:
                return
            item.setClassId(source.getClassId())
            if source.hasTransform():
                item.setTransform(source.getTransform().clone())
            for name, value in source.getAttributes():
                if name.startswith(EXTRA_ATTR_PREFIX):
                    setattr(item, name, value.clone())

    def update_class(class_item):
        class_id = class_item.getObjId()
        class_item.setAlignmentProj()
        path = volumes.get(class_id)
        if path is None:
            raise ValueError("fill_classes: no map given for class %d (maps for %s)"
                             % (class_id, sorted(volumes)))
        create_volume(path, sampling, volume=class_item.getRepresentative())
        for key, value in info.get(class_id, {}).items():
            setattr(class_item, class_attribute(key), objects_from_value(value))

    classes3D.classifyItems(updateItemCallback=update_item, updateClassCallback=update_class,
                            doClone=False)
    return classes3D
