"""The only place where Scipion objects meet the core's files.

Scipion side: SetOfParticles, Particle (location, CTFModel, Acquisition,
ALIGN_PROJ Transform), Volume, SetOfClasses3D. Core side: RELION 3.1 particle
STAR files (images stay in their own MRC stacks) and MRC maps, read and written
with ``hetplugin.core.starfile`` / ``hetplugin.core.mrc``.

Conventions (details in :mod:`.geometry`):

* Scipion ALIGN_PROJ matrix ``M = inv([[A, -s], [0, 1]]) = [[A.T, A.T s], [0, 1]]``
  with ``A`` RELION's ZYZ rotation for (rot, tilt, psi) and ``s`` RELION's
  origin in PIXELS; STAR files hold the origin in Angstrom (``rlnOriginX/YAngst``).
* Defocus U/V in Angstrom, angles in degrees, on both sides.
* Particles are matched by Scipion object id, written as ``rlnImageId``.

``pwem`` is imported lazily inside functions that build Scipion objects, so the
geometry and CTF helpers are importable without a Scipion environment.
"""
from .geometry import (alignment_to_relion, relion_to_alignment,
                       alignments_to_relion, relion_to_alignments)
from .ctf import (ctf_to_relion, relion_to_ctf, acquisition_to_relion,
                  relion_to_acquisition)
from .particles import (write_particles_star, star_to_particle_set, update_particles,
                        ParticleUpdater)
from .classes import create_volume, fill_volume_set, fill_classes, class_attribute
from .images import (detect_format, is_mrc_format, readability_error, particles_to_mrc,
                     volume_to_mrc, read_volume_any, SpiderFile, write_spider)

__all__ = ["alignment_to_relion", "relion_to_alignment", "alignments_to_relion",
           "relion_to_alignments", "ctf_to_relion", "relion_to_ctf",
           "acquisition_to_relion", "relion_to_acquisition", "write_particles_star",
           "star_to_particle_set", "update_particles", "ParticleUpdater",
           "create_volume", "fill_volume_set", "fill_classes", "class_attribute",
           "detect_format", "is_mrc_format", "readability_error", "particles_to_mrc",
           "volume_to_mrc", "read_volume_any", "SpiderFile", "write_spider"]
