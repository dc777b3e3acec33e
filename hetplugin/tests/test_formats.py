"""Image formats other than MRC: detection, the SPIDER reader/writer, conversion to
MRC, error messages, and protocols run on SPIDER / mixed / single-image inputs.

* unit tests of :mod:`hetplugin.convert.images` (numpy SPIDER reader/writer, bit
  identical to the MRC source, both byte orders; cross-checked with Xmipp's
  library when it imports);
* a real Scipion project: the same simulated particles imported as MRC (.mrcs) and
  as SPIDER (.stk), the map as .vol and the mask as .spi, and a set mixing a SPIDER
  stack, an MRC stack and single-image .spi files; ProtSignalSubtract (deterministic)
  on each gives the same output images;
* real RELION 3.0 particles (``../shared/data/star-variants/empiar_10076_7.*``): the
  core reads them here; their conversion to a Scipion SetOfParticles (pixel size
  from magnification and detector pixel size, CTF per particle) is tested in
  ``test_convert.py::test_real_relion30_star``.
"""
import os

import mrcfile
import numpy as np
import pytest

from pyworkflow.tests import BaseTest, setupTestProject
from pwem.objects import SetOfParticles

from hetplugin.tests.scipion_imports import ImportHelpers
from hetplugin.convert import star_to_particle_set, write_particles_star
from hetplugin.convert.images import (SpiderFile, detect_format, is_mrc_format, particles_to_mrc,
                                      read_images, readability_error, volume_to_mrc, write_spider,
                                      xmipp_available)
from hetplugin.core.mrc import StackReader, read_volume, write_stack, write_volume
from hetplugin.core.simulate_subtract import simulate_subtraction
from hetplugin.core.starfile import read_particles
from hetplugin.protocols.protocol_subtract import ProtSignalSubtract

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.abspath(os.path.join(HERE, '..', '..', '..', 'shared', 'data'))
EMPIAR_STAR = os.path.join(SHARED, 'star-variants', 'empiar_10076_7.star')
needs_xmipp = pytest.mark.skipif(not xmipp_available(), reason="Xmipp's image library (xmippLib) absent")

N_PARTICLES, BOX, PIXEL = 48, 32, 3.0


# --------------------------------------------------------------------------- unit tests
@pytest.fixture
def stack():
    return np.random.default_rng(0).standard_normal((5, 24, 24)).astype(np.float32)


@pytest.mark.parametrize('endian', ['<', '>'])
def test_spider_round_trip_bit_identical(tmp_path, stack, endian):
    write_stack(str(tmp_path / 'a.mrcs'), stack, PIXEL)
    with mrcfile.open(str(tmp_path / 'a.mrcs')) as m:
        source = m.data.copy()
    write_spider(str(tmp_path / 'a.stk'), source, endian=endian)
    spider = SpiderFile(str(tmp_path / 'a.stk'))
    assert spider.is_stack and spider.n_images == 5 and (spider.nx, spider.ny) == (24, 24)
    assert spider.endian == endian
    assert np.array_equal(spider.read([1, 2, 3, 4, 5]), source)
    assert np.array_equal(spider.read([4, 2]), source[[3, 1]])
    with pytest.raises(ValueError, match='out of range'):
        spider.read([6])
    volume = np.random.default_rng(1).standard_normal((12, 12, 12)).astype(np.float32)
    for name in ('v.vol', 'v.spi'):
        write_spider(str(tmp_path / name), volume, stack=False, endian=endian)
        single = SpiderFile(str(tmp_path / name))
        assert not single.is_stack and single.nz == 12
        assert np.array_equal(single.read([1])[0], volume)
        # and to MRC, bit for bit
        volume_to_mrc(str(tmp_path / name), str(tmp_path / (name + '.mrc')), pixel_size=PIXEL,
                      backend='native')
        back, pix = read_volume(str(tmp_path / (name + '.mrc')))
        assert np.array_equal(back, volume) and pix == pytest.approx(PIXEL)


@needs_xmipp
def test_spider_agrees_with_xmipp(tmp_path, stack):
    """Our SPIDER files read by xmippLib, and Xmipp's (pwem ImageHandler) files read by us."""
    import xmippLib
    from pwem.emlib.image import ImageHandler
    write_spider(str(tmp_path / 'ours.stk'), stack)
    write_spider(str(tmp_path / 'ours_be.stk'), stack, endian='>')
    for name in ('ours.stk', 'ours_be.stk'):
        for k in range(5):
            assert np.array_equal(xmippLib.Image('%d@%s' % (k + 1, tmp_path / name)).getData(), stack[k])
    write_stack(str(tmp_path / 'a.mrcs'), stack, PIXEL)
    ImageHandler().convertStack(str(tmp_path / 'a.mrcs'), str(tmp_path / 'xmipp.stk'))
    assert np.array_equal(SpiderFile(str(tmp_path / 'xmipp.stk')).read(range(1, 6)), stack)
    assert np.array_equal(read_images(str(tmp_path / 'xmipp.stk'), [2, 5], backend='xmipp'),
                          read_images(str(tmp_path / 'xmipp.stk'), [2, 5], backend='native'))


def test_detect_format(tmp_path, stack):
    write_stack(str(tmp_path / 'a.mrcs'), stack, PIXEL)
    write_spider(str(tmp_path / 'a.stk'), stack)
    os.symlink(str(tmp_path / 'a.mrcs'), str(tmp_path / 'a.dat'))
    (tmp_path / 'e.hdf').write_bytes(b'\x89HDF\r\n\x1a\n' + bytes(200))
    (tmp_path / 'junk.xyz').write_bytes(bytes(2048))
    assert detect_format(str(tmp_path / 'a.mrcs')) == 'mrc'
    assert detect_format(str(tmp_path / 'a.dat')) == 'mrc'          # by content
    assert detect_format(str(tmp_path / 'a.dat') + ':mrc') == 'mrc'  # by Scipion suffix
    assert detect_format(str(tmp_path / 'a.stk')) == 'spider'
    assert detect_format(str(tmp_path / 'e.hdf')) == 'hdf5'
    assert detect_format(str(tmp_path / 'junk.xyz')).startswith('unknown')
    assert is_mrc_format(str(tmp_path / 'a.dat') + ':mrcs')
    assert not is_mrc_format(str(tmp_path / 'a.stk'))
    assert readability_error(str(tmp_path / 'a.stk'), backend='native') is None
    assert readability_error(str(tmp_path / 'a.mrcs')) is None


def test_error_messages(tmp_path):
    (tmp_path / 'e.hdf').write_bytes(b'\x89HDF\r\n\x1a\n' + bytes(200))
    missing = readability_error(str(tmp_path / 'none.stk'))
    assert 'none.stk' in missing and 'does not exist' in missing
    error = readability_error(str(tmp_path / 'e.hdf'))
    assert 'e.hdf' in error and 'hdf5' in error
    assert ('eman2' in error.lower()) if xmipp_available() else ('pyxmipp3' in error)
    write_spider(str(tmp_path / 'cut.stk'), np.zeros((4, 16, 16), np.float32))
    with open(str(tmp_path / 'cut.stk'), 'r+b') as f:
        f.truncate(3000)
    with pytest.raises(ValueError, match='truncated SPIDER'):
        SpiderFile(str(tmp_path / 'cut.stk'))
    with pytest.raises(ValueError, match='e.hdf'):
        volume_to_mrc(str(tmp_path / 'e.hdf'), str(tmp_path / 'x.mrc'))


@pytest.mark.skipif(not os.path.exists(EMPIAR_STAR), reason='shared test data (%s) absent' % EMPIAR_STAR)
def test_real_relion30_particles_read_by_core():
    """RELION 3.0 STAR (no optics table) + its MRC stack, read by the core. The Scipion
    side (7 particles, 1.31 A/px from magnification / detector pixel size, CTF per
    particle) is test_convert.py::test_real_relion30_star."""
    table = read_particles(EMPIAR_STAR)
    assert len(table) == 7
    assert np.allclose(table.pixel_size_A, 1.31, atol=1e-3)
    with StackReader(table.image_path, table.image_index) as reader:
        images = reader.read(np.arange(7))
    assert images.shape == (7, 320, 320) and np.all(np.isfinite(images)) and images.std() > 0


# --------------------------------------------------------------------------- Scipion
def _relocated(source_sqlite, sqlite, relocate):
    """A copy of a particle set sqlite with locations ``relocate(id, index, path)``."""
    src = SetOfParticles(filename=source_sqlite)
    src.loadAllProperties()
    dst = SetOfParticles(filename=sqlite)
    dst.copyInfo(src)
    for p in src.iterItems(orderBy='id', direction='ASC'):
        q = p.clone()
        q.setLocation(*relocate(p.getObjId(), *p.getLocation()))
        dst.append(q)
    dst.write()
    dst.close()
    src.close()
    return sqlite


def _images_by_id(particles, star):
    write_particles_star(particles, star)
    t = read_particles(star)
    order = np.argsort(np.asarray(t.columns['rlnImageId']))
    with StackReader(t.image_path, t.image_index) as reader:
        return np.asarray(t.columns['rlnImageId'])[order], reader.read(order)


class TestFormatsInProtocols(ImportHelpers, BaseTest):
    """The same particles / map / mask in MRC, SPIDER and mixed layouts -> the same subtraction."""
    pixelSize = PIXEL

    @classmethod
    def setUpClass(cls):
        cls._cwd = os.getcwd()
        setupTestProject(cls)
        folder = cls.folder = cls.proj.getPath('sim')
        cls.truth = simulate_subtraction(folder, n_particles=N_PARTICLES, box=BOX, pixel_size_A=PIXEL,
                                         snr=2.0, seed=5, stack_size=1000)
        mrcSqlite = os.path.join(folder, 'mrc.sqlite')
        parts = SetOfParticles(filename=mrcSqlite)
        star_to_particle_set(cls.truth.star, parts)
        parts.write()
        parts.close()
        table = read_particles(cls.truth.star)
        with StackReader(table.image_path, table.image_index) as reader:
            cls.images = reader.read(np.arange(len(table)))        # particle id k+1 <-> row k
        # the same images as one SPIDER stack (.stk)
        stk = os.path.join(folder, 'particles.stk')
        write_spider(stk, cls.images)
        spiderSqlite = _relocated(mrcSqlite, os.path.join(folder, 'spider.sqlite'),
                                  lambda i, _index, _path: (i, stk))
        # mixed: ids 1-20 in a SPIDER stack (reversed order), 21-40 in an MRC stack,
        # 41-48 as single-image .spi files (index 0)
        write_spider(os.path.join(folder, 'mixA.stk'), cls.images[19::-1])
        write_stack(os.path.join(folder, 'mixB.mrcs'), cls.images[20:40], PIXEL)
        for i in range(41, N_PARTICLES + 1):
            write_spider(os.path.join(folder, 'single_%03d.spi' % i), cls.images[i - 1])

        def mixed(i, _index, _path):
            if i <= 20:
                return 21 - i, os.path.join(folder, 'mixA.stk')
            if i <= 40:
                return i - 20, os.path.join(folder, 'mixB.mrcs')
            return 0, os.path.join(folder, 'single_%03d.spi' % i)
        mixedSqlite = _relocated(mrcSqlite, os.path.join(folder, 'mixed.sqlite'), mixed)
        cls.protMrc = cls.importParticles(mrcSqlite, 'particles .mrcs')
        cls.protSpider = cls.importParticles(spiderSqlite, 'particles .stk')
        cls.protMixed = cls.importParticles(mixedSqlite, 'particles mixed + single images')
        # map: .mrc and .vol; mask: .mrc and .spi
        consensus, _ = read_volume(str(cls.truth.paths['consensus']))
        mask, _ = read_volume(str(cls.truth.paths['mask']))
        write_volume(os.path.join(folder, 'map.mrc'), consensus, PIXEL)
        write_spider(os.path.join(folder, 'map.vol'), consensus, stack=False)
        write_spider(os.path.join(folder, 'mask.spi'), mask, stack=False)
        cls.protMapMrc = cls.importVolume(os.path.join(folder, 'map.mrc'), 'map .mrc')
        cls.protMapVol = cls.importVolume(os.path.join(folder, 'map.vol'), 'map .vol')
        cls.protMaskMrc = cls.importMask(str(cls.truth.paths['mask']), 'mask .mrc')
        cls.protMaskSpi = cls.importMask(os.path.join(folder, 'mask.spi'), 'mask .spi')

    @classmethod
    def tearDownClass(cls):
        os.chdir(cls._cwd)

    def subtract(self, particles, volume, mask, label):
        prot = self.newProtocol(ProtSignalSubtract, maskMeaning=0, doRecentre=False, newBoxSize=-1,
                                numberOfThreads=1, useGpu=False)
        prot.inputParticles.set(particles)
        prot.inputParticles.setExtended('outputParticles')
        prot.inputVolume.set(volume)
        prot.inputVolume.setExtended('outputVolume')
        prot.inputMask.set(mask)
        prot.inputMask.setExtended('outputMask')
        self.assertEqual(prot.validate(), [])
        prot.setObjLabel(label)
        self.launchProtocol(prot)
        return prot

    def checkOutput(self, prot, inputProt):
        inp = inputProt.outputParticles
        out = prot.outputParticles
        self.assertSetSize(out, N_PARTICLES)
        self.assertTrue(out.hasCTF() and out.hasAlignmentProj())
        before = {p.getObjId(): (p.getLocation(), p.getCTF().getDefocus()) for p in inp}
        for p in out:
            self.assertTrue(os.path.exists(p.getFileName()), p.getFileName())
            location, defocus = before[p.getObjId()]
            self.assertEqual(p.getCTF().getDefocus(), defocus)
            # the image the subtraction started from (an MRC file the core can read, for revert)
            self.assertTrue(os.path.exists(p._hetplugin_originalImageName.get().split('@', 1)[1]))
        # the input set is untouched
        self.assertEqual({p.getObjId(): p.getLocation() for p in inputProt.outputParticles},
                         {k: v[0] for k, v in before.items()})
        ids, images = _images_by_id(out, self.proj.getPath('%s.star' % prot.getObjId()))
        self.assertEqual(ids.tolist(), list(range(1, N_PARTICLES + 1)))
        return images

    def test_same_result_mrc_spider_mixed(self):
        ref = self.subtract(self.protMrc, self.protMapMrc, self.protMaskMrc, 'subtract, MRC inputs')
        self.assertFalse(os.path.exists(ref._getExtraPath('converted_particles')))
        self.assertTrue(os.path.islink(ref._getExtraPath('input_reference_001.mrc')))
        refImages = self.checkOutput(ref, self.protMrc)

        spi = self.subtract(self.protSpider, self.protMapVol, self.protMaskSpi,
                            'subtract, .stk particles, .vol map, .spi mask')
        converted = spi._getExtraPath('converted_particles')
        self.assertEqual(len(os.listdir(converted)), 1)
        self.assertFalse(os.path.islink(spi._getExtraPath('input_reference_001.mrc')))
        spiImages = self.checkOutput(spi, self.protSpider)
        diff = float(np.abs(spiImages - refImages).max())
        print('\n.stk/.vol/.spi vs .mrcs/.mrc: max |difference| of the subtracted images %.3g '
              '(scale %.3g)' % (diff, float(np.abs(refImages).max())))
        self.assertTrue(np.allclose(spiImages, refImages, rtol=0, atol=1e-5 * np.abs(refImages).max()))

        mix = self.subtract(self.protMixed, self.protMapMrc, self.protMaskMrc,
                            'subtract, mixed stacks + single images')
        # the SPIDER stack and the single images converted; the MRC stack used in place
        self.assertEqual(sorted(os.listdir(mix._getExtraPath('converted_particles'))),
                         ['001_mixA.mrcs', 'single_images.mrcs'])
        mixImages = self.checkOutput(mix, self.protMixed)
        self.assertTrue(np.allclose(mixImages, refImages, rtol=0, atol=1e-5 * np.abs(refImages).max()))

    def test_particles_to_mrc_mapping(self):
        for backend in (('native', 'xmipp') if xmipp_available() else ('native',)):
            self.checkMapping(backend)

    def checkMapping(self, backend):
        parts = self.protMixed.outputParticles
        out = self.proj.getPath('conv_test_%s' % backend)
        messages = []
        mapping = particles_to_mrc(parts, out, log=messages.append, batch=7, backend=backend)
        self.assertEqual(len(mapping), N_PARTICLES)
        self.assertTrue(any('7/20' in m for m in messages), messages)
        for p in parts:
            path, index = mapping[(p.getFileName(), p.getIndex())]
            if p.getFileName().endswith('.mrcs'):
                self.assertEqual((path, index), (p.getFileName(), p.getIndex()))
            with mrcfile.mmap(path, mode='r') as m:
                image = m.data[index - 1]
            self.assertTrue(np.array_equal(image, self.images[p.getObjId() - 1]))
