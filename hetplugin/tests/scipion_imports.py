"""Import protocols shared by the Scipion integration tests (no mocks: real import runs).

Mix ``ImportHelpers`` into a ``pyworkflow.tests.BaseTest`` class and set ``pixelSize``; it
also gives ``assertMessage`` for the forms' validation and warning messages.
"""
import os

from pwem.objects import SetOfParticles
from pwem.protocols import ProtImportMask, ProtImportParticles, ProtImportVolumes


def star_to_sqlite(star, sqlite):
    """A core STAR file of particles written as a Scipion SetOfParticles sqlite (with its CTF and
    alignment), for ``ImportHelpers.importParticles``; returns ``sqlite``."""
    from hetplugin.convert import star_to_particle_set
    parts = SetOfParticles(filename=sqlite)
    star_to_particle_set(star, parts)
    parts.write()
    parts.close()
    return sqlite


class ImportHelpers:
    """Class methods that launch Scipion's import protocols in the test project."""
    pixelSize = None

    @classmethod
    def _launchImport(cls, protClass, label, **kwargs):
        prot = cls.newProtocol(protClass, samplingRate=cls.pixelSize, **kwargs)
        prot.setObjLabel(label)
        cls.launchProtocol(prot)
        return prot

    @classmethod
    def importParticles(cls, sqlite, label):
        """A SetOfParticles sqlite with CTF and alignment, imported as it is (IMPORT_FROM_SCIPION)."""
        return cls._launchImport(ProtImportParticles, label, importFrom=ProtImportParticles.IMPORT_FROM_SCIPION,
                                 sqliteFile=sqlite, voltage=300.0, sphericalAberration=2.7,
                                 amplitudeContrast=0.1, magnification=50000)

    @classmethod
    def importVolume(cls, path, label, pattern=False):
        """One volume file, or with ``pattern`` every file matching a glob (a SetOfVolumes)."""
        where = dict(filesPath=os.path.dirname(path), filesPattern=os.path.basename(path)) if pattern \
            else dict(filesPath=path)
        return cls._launchImport(ProtImportVolumes, label, **where)

    @classmethod
    def importMask(cls, path, label):
        return cls._launchImport(ProtImportMask, label, maskPath=path)

    def assertMessage(self, messages, text):
        """One of ``messages`` (e.g. from ``validate()``) contains ``text``."""
        self.assertTrue(any(text in m for m in messages), '%r not in %r' % (text, messages))
