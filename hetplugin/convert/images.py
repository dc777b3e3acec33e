"""Image files that are not MRC -> MRC stacks the core reads.

The core reads MRC only (:mod:`hetplugin.core.mrc`). Scipion sets may point at
SPIDER stacks (``.stk``, Xmipp's extraction), SPIDER images / volumes (``.spi``,
``.vol``, ``.xmp``), EMAN ``.hdf``, IMAGIC ``.img``/``.hed``..., with or without an
index, and may mix several stacks. This module:

* detects the format of a file (:func:`detect_format`), from a Scipion suffix
  (``:mrc``, ``:spi``...), the first bytes and the extension;
* reads and writes SPIDER images, stacks and volumes with numpy alone
  (:class:`SpiderFile`, :func:`write_spider`; both byte orders are read);
* reads everything else with Xmipp's image library (``xmippLib``, shipped by
  ``pyxmipp3`` which scipion-em brings; pwem's ``ImageHandler`` uses the same
  library), when it is importable;
* converts what a particle set needs (:func:`particles_to_mrc`) or one volume
  (:func:`volume_to_mrc`) to MRC, in batches (memory bounded), leaving MRC files
  where they are.

Backends: ``'auto'`` reads SPIDER with xmippLib when it imports, else with the
numpy reader; other non-MRC formats need xmippLib. ``'native'`` forces the numpy
SPIDER reader, ``'xmipp'`` forces xmippLib. Both give the same float32 values
(tested). Errors name the file, the format and what to install.
"""
from __future__ import annotations

import os
import re
import struct
from collections import OrderedDict

import numpy as np

__all__ = ["detect_format", "is_mrc_format", "readability_error", "SpiderFile", "write_spider",
           "read_images", "read_volume_any", "particles_to_mrc", "volume_to_mrc",
           "xmipp_available", "XMIPP_HINT"]

MRC_EXTENSIONS = ('.mrc', '.mrcs', '.map', '.st', '.ali', '.rec')
SPIDER_EXTENSIONS = ('.spi', '.stk', '.vol', '.xmp', '.spider')
#: Scipion / Xmipp format suffixes (``path:suffix``) -> our format names.
_SUFFIX_FORMATS = {'mrc': 'mrc', 'mrcs': 'mrc', 'spi': 'spider', 'stk': 'spider', 'vol': 'spider',
                   'xmp': 'spider', 'hdf': 'hdf5', 'h5': 'hdf5', 'img': 'imagic', 'hed': 'imagic',
                   'tif': 'tiff', 'tiff': 'tiff', 'em': 'em', 'dm3': 'dm3', 'dm4': 'dm4'}
_EXT_FORMATS = {'.hdf': 'hdf5', '.h5': 'hdf5', '.img': 'imagic', '.hed': 'imagic', '.tif': 'tiff',
                '.tiff': 'tiff', '.em': 'em', '.dm3': 'dm3', '.dm4': 'dm4', '.ser': 'ser'}
_FORMAT_HINTS = {
    'hdf5': ("EMAN2 .hdf files are read through EMAN2: install the EMAN2 plugin "
             "('scipion3 installp -p scipion-em-eman2'), or convert them to MRC first "
             "(e.g. 'e2proc2d.py in.hdf out.mrcs')"),
}
_SUFFIX = re.compile(r':([A-Za-z0-9]+)$')
XMIPP_HINT = ("install Xmipp's image library: 'pip install pyxmipp3' (scipion-em brings it) or the "
              "Xmipp plugin ('scipion3 installp -p scipion-em-xmipp'); or convert the images to MRC "
              "first (e.g. Xmipp/RELION 'convert images' or 'relion_image_handler --o x.mrcs')")


def _split(path) -> tuple[str, str | None]:
    """(path without a ``:fmt`` suffix, the suffix or None)."""
    path = os.fspath(path)
    m = _SUFFIX.search(path)
    if m and not re.match(r'^[A-Za-z]:[\\/]?$', path[:m.end()]):
        return path[:m.start()], m.group(1).lower()
    return path, None


# --------------------------------------------------------------------------- xmippLib
def xmipp_available() -> bool:
    """True when Xmipp's image library (xmippLib) imports."""
    try:
        import xmippLib  # noqa: F401
        return True
    except Exception:   # ImportError, or a broken shared library
        return False


def _xmipp_read(path: str, index: int | None):
    import xmippLib
    name = path if not index else '%d@%s' % (index, path)
    return np.asarray(xmippLib.Image(name).getData(), dtype=np.float32)


def _xmipp_dims(path: str) -> tuple[int, int, int, int]:
    """(x, y, z, n) as pwem's ImageHandler gives them."""
    from pwem.emlib.image import ImageHandler
    dims = ImageHandler().getDimensions(path)
    if not dims or dims[0] is None:
        raise ValueError('no dimensions')
    return tuple(int(d) for d in dims)


# --------------------------------------------------------------------------- SPIDER
class SpiderFile:
    """A SPIDER image, volume or stack, read with numpy (memory-mapped).

    Header (float32 words, 1-based as in SPIDER's documentation): NZ (1), NY (2),
    IFORM (5: 1 image, 3 volume), NX (12), LABREC (13), LABBYT (22), LENBYT (23),
    ISTACK (24: > 0 in the overall header of a stack), MAXIM (26: images in the
    stack). In a stack, image k (1-based) has its own LABBYT header and starts at
    ``LABBYT + (k - 1) * (LABBYT + NX*NY*NZ*4) + LABBYT``. Both byte orders are tried.
    """

    def __init__(self, path):
        self.path = _split(path)[0]
        try:
            with open(self.path, 'rb') as f:
                head = f.read(1024)
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            raise ValueError('image file not found: %s' % self.path) from None
        parsed = self.parse_header(head)
        if parsed is None:
            raise ValueError('%s is not a SPIDER file (its header is not a valid SPIDER header)'
                             % self.path)
        (self.endian, self.nx, self.ny, self.nz, self.iform, self.labbyt, self.istack,
         self.n_images) = parsed
        self.image_bytes = self.nx * self.ny * self.nz * 4
        needed = self.offset(self.n_images) + self.image_bytes
        if size < needed:
            raise ValueError('%s is a truncated SPIDER file: %d bytes but its header needs %d'
                             % (self.path, size, needed))

    @staticmethod
    def parse_header(head: bytes):
        """(endian, nx, ny, nz, iform, labbyt, istack, n_images), or None when not SPIDER."""
        if len(head) < 26 * 4:
            return None
        for endian in ('<', '>'):
            w = struct.unpack(endian + '26f', head[:26 * 4])
            values = [w[0], w[1], w[4], w[11], w[12], w[21], w[22], w[23], w[25]]
            if not all(np.isfinite(v) and float(v).is_integer() for v in values):
                continue
            nz, ny, iform, nx, labrec, labbyt, lenbyt, istack, maxim = (int(v) for v in values)
            if not (0 < nx < 1 << 16 and 0 < ny < 1 << 16 and 0 < nz < 1 << 16):
                continue
            if iform not in (1, 3) or labbyt <= 0 or labbyt % 4 or labbyt != labrec * lenbyt:
                continue
            if iform == 1 and nz != 1:
                continue
            n_images = maxim if istack > 0 else 1
            if n_images < 1:
                continue
            return endian, nx, ny, nz, iform, labbyt, istack, n_images
        return None

    @property
    def is_stack(self) -> bool:
        return self.istack > 0

    def offset(self, index: int) -> int:
        """Byte offset of the data of image ``index`` (1-based; 0/None for a single image)."""
        if not self.is_stack:
            return self.labbyt
        index = index or 1
        return self.labbyt + (index - 1) * (self.labbyt + self.image_bytes) + self.labbyt

    def _check(self, index):
        if self.is_stack and not (1 <= (index or 1) <= self.n_images):
            raise ValueError('%s: image %s out of range (the stack holds %d)'
                             % (self.path, index, self.n_images))
        if not self.is_stack and index not in (None, 0, 1):
            raise ValueError('%s: image %d asked for, but it holds one image' % (self.path, index))

    def read(self, indices) -> np.ndarray:
        """Images ``indices`` (1-based) as float32 (n, ny, nx) (or (n, nz, ny, nx) for volumes)."""
        indices = [int(i or 1) for i in indices]
        for i in indices:
            self._check(i)
        shape = (self.ny, self.nx) if self.nz == 1 else (self.nz, self.ny, self.nx)
        out = np.empty((len(indices),) + shape, dtype=np.float32)
        dtype = np.dtype(self.endian + 'f4')
        mm = np.memmap(self.path, dtype=np.uint8, mode='r')
        try:
            for k, i in enumerate(indices):
                start = self.offset(i)
                out[k] = np.frombuffer(mm[start:start + self.image_bytes], dtype=dtype).reshape(shape)
        finally:
            del mm
        return out


def _spider_header(nx, ny, nz, iform, istack=0, maxim=0, imgnum=0, pixel_size=0.0, endian='<'):
    lenbyt = nx * 4
    labrec = 256 // nx + (1 if 256 % nx else 0)
    labbyt = labrec * lenbyt
    w = np.zeros(labbyt // 4, dtype=endian + 'f4')
    w[0], w[1], w[2], w[4] = nz, ny, nz * ny + labrec, iform
    w[11], w[12], w[21], w[22], w[23] = nx, labrec, labbyt, lenbyt, istack
    w[20] = 1.0                               # SCALE
    w[24] = 1 if (istack or imgnum) else 0    # INUSE
    w[25], w[26] = maxim, imgnum
    w[37] = pixel_size
    return w.tobytes(), labbyt


def write_spider(path, data, stack: bool | None = None, pixel_size: float = 0.0,
                 endian: str = '<') -> None:
    """Write float32 ``data`` as SPIDER: (ny, nx) image, (nz, ny, nx) volume (``stack=False``)
    or (n, ny, nx) image stack (``stack=True``, the default for 3D data with a
    ``.stk`` extension)."""
    data = np.asarray(data, dtype=np.float32)
    path = _split(path)[0]
    if stack is None:
        stack = data.ndim == 3 and os.path.splitext(path)[1].lower() == '.stk'
    if stack:
        n, ny, nx = data.shape
        head, _ = _spider_header(nx, ny, 1, 1, istack=2, maxim=n, pixel_size=pixel_size, endian=endian)
        with open(path, 'wb') as f:
            f.write(head)
            for k in range(n):
                f.write(_spider_header(nx, ny, 1, 1, imgnum=k + 1, pixel_size=pixel_size,
                                       endian=endian)[0])
                f.write(data[k].astype(endian + 'f4').tobytes())
        return
    if data.ndim == 2:
        data = data[None]
    nz, ny, nx = data.shape
    # MAXIM = 1 in a single image / volume, as Xmipp writes it (its readers count images from it)
    head, _ = _spider_header(nx, ny, nz, 1 if nz == 1 else 3, maxim=1, pixel_size=pixel_size,
                             endian=endian)
    with open(path, 'wb') as f:
        f.write(head)
        f.write(data.astype(endian + 'f4').tobytes())


# --------------------------------------------------------------------------- detection
def detect_format(path) -> str:
    """'mrc', 'spider', 'hdf5', 'imagic', 'tiff', ... or 'unknown (<ext>)'.

    A Scipion suffix (``x.dat:mrc``) wins; then SPIDER / MRC / HDF5 / TIFF from the
    first bytes; then the extension. Raises ValueError when the file is missing."""
    clean, suffix = _split(path)
    if suffix in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[suffix]
    try:
        with open(clean, 'rb') as f:
            head = f.read(1024)
    except FileNotFoundError:
        raise ValueError('image file not found: %s' % clean) from None
    ext = os.path.splitext(clean)[1].lower()
    if len(head) >= 212 and head[208:211] == b'MAP':
        return 'mrc'
    if head.startswith(b'\x89HDF'):
        return 'hdf5'
    if head[:4] in (b'II*\x00', b'MM\x00*'):
        return 'tiff'
    if SpiderFile.parse_header(head) is not None:
        return 'spider'
    if ext in MRC_EXTENSIONS:
        return 'mrc'
    if ext in _EXT_FORMATS:
        return _EXT_FORMATS[ext]
    return 'unknown (%s)' % (ext or 'no extension')


def is_mrc_format(path) -> bool:
    """True when the core reads ``path`` as it is (an MRC file by suffix, content or extension)."""
    clean, suffix = _split(path)
    if suffix in ('mrc', 'mrcs'):
        return True
    if suffix is not None and suffix in _SUFFIX_FORMATS:
        return False
    if os.path.splitext(clean)[1].lower() in MRC_EXTENSIONS:
        return True
    try:
        return detect_format(clean) == 'mrc'
    except ValueError:
        return False


def _use_xmipp(fmt: str, backend: str) -> bool:
    if backend == 'xmipp':
        return True
    if backend == 'native':
        return False
    return fmt != 'spider' or xmipp_available()


def readability_error(path, backend: str = 'auto') -> str | None:
    """Why ``path`` cannot be read (None when it can): missing file, unknown or
    unsupported format, no reader installed. Reads headers only."""
    clean, _suffix = _split(path)
    if not os.path.exists(clean):
        return 'The file %s does not exist.' % clean
    fmt = detect_format(path)
    if fmt == 'mrc':
        from hetplugin.core.mrc import read_header
        try:
            read_header(clean)
        except ValueError as exc:
            return str(exc)
        return None
    if fmt == 'spider' and not _use_xmipp(fmt, backend):
        try:
            SpiderFile(clean)
        except ValueError as exc:
            return str(exc)
        return None
    if not xmipp_available():
        return ('Cannot read %s (%s format): hetplugin reads MRC and SPIDER itself; for %s files %s.'
                % (clean, fmt, fmt, XMIPP_HINT))
    try:
        _xmipp_dims(path)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0].lstrip('> ') if str(exc).strip() else type(exc).__name__
        return ('Cannot read %s (%s format) with pwem\'s ImageHandler / Xmipp\'s image library (%s): %s.'
                % (clean, fmt, reason, _FORMAT_HINTS.get(fmt, 'convert it to MRC first')))
    return None


def _raise_unreadable(path, backend='auto'):
    error = readability_error(path, backend)
    if error:
        raise ValueError(error)


def read_images(path, indices, backend: str = 'auto') -> np.ndarray:
    """Images ``indices`` (1-based; 0/None: the file's only image) of a non-MRC file,
    as float32 (n, ny, nx)."""
    clean, _suffix = _split(path)
    fmt = detect_format(path)
    if fmt == 'mrc':
        from hetplugin.core.mrc import StackReader
        idx = np.array([int(i or 1) for i in indices], dtype=np.int64)
        with StackReader(np.array([clean] * len(idx), dtype=object), idx) as reader:
            return np.asarray(reader.read(np.arange(len(idx))), dtype=np.float32)
    if not _use_xmipp(fmt, backend):
        if fmt != 'spider':
            _raise_unreadable(path, backend)
        return SpiderFile(clean).read(indices)
    _raise_unreadable(path, 'xmipp')
    images = [_xmipp_read(clean, int(i) if i else None) for i in indices]
    return np.stack(images).astype(np.float32, copy=False) if images else \
        np.empty((0, 0, 0), np.float32)


def read_volume_any(path, index: int | None = None, backend: str = 'auto') -> np.ndarray:
    """A volume (nz, ny, nx) float32 from an MRC, SPIDER or (with xmippLib) any file."""
    clean, _suffix = _split(path)
    fmt = detect_format(path)
    if fmt == 'mrc':
        if index and index > 1:
            raise ValueError('%s: volume %d inside an MRC stack is not supported; extract it first'
                             % (clean, index))
        from hetplugin.core.mrc import read_volume
        return np.asarray(read_volume(clean)[0], dtype=np.float32)
    if not _use_xmipp(fmt, backend):
        if fmt != 'spider':
            _raise_unreadable(path, backend)
        spider = SpiderFile(clean)
        data = spider.read([index or 1])[0]
        return data if data.ndim == 3 else data[None]
    _raise_unreadable(path, 'xmipp')
    data = _xmipp_read(clean, index if index else None)
    return data if data.ndim == 3 else data[None]


# --------------------------------------------------------------------------- conversion
def volume_to_mrc(path, out_path, pixel_size: float | None = None, index: int | None = None,
                  backend: str = 'auto') -> str:
    """Write the volume at ``path`` (any readable format, ``index`` inside a stack) as
    the MRC file ``out_path``; returns ``out_path``."""
    from hetplugin.core.mrc import write_volume
    volume = read_volume_any(path, index=index, backend=backend)
    write_volume(out_path, volume, float(pixel_size) if pixel_size else 1.0)
    return out_path


def _locations(partSet):
    """Enabled particles' (filename, index) in id order."""
    for p in partSet.iterItems(orderBy='id', direction='ASC'):
        if p.isEnabled():
            index, filename = p.getLocation()
            yield filename, index


def particles_to_mrc(partSet, out_dir, log=None, batch: int = 512, backend: str = 'auto') -> dict:
    """MRC locations for every enabled particle of ``partSet``.

    Returns ``{(filename, index): (mrc path, new index)}`` with ``filename`` and
    ``index`` as ``Particle.getLocation()`` gives them. MRC files map to
    themselves (nothing is copied). Each non-MRC stack becomes one
    ``out_dir/NNN_<name>.mrcs`` holding only the images the set uses (in index
    order); non-MRC single-image files (index 0/None, or 1 in a file of one image)
    are gathered in ``out_dir/single_images.mrcs``. Images are read and written
    ``batch`` at a time. ``log(msg)`` gets progress. The set is not modified.
    Raises ValueError (file, format, what to install) for what cannot be read.
    """
    import mrcfile
    log = log or (lambda _msg: None)
    pixel = float(partSet.getSamplingRate() or 1.0)
    by_file = OrderedDict()
    mapping = {}
    for filename, index in _locations(partSet):
        if (filename, index) in mapping:
            continue
        if filename not in by_file:
            by_file[filename] = None if is_mrc_format(filename) else []
        if by_file[filename] is None:
            mapping[(filename, index)] = (filename, index)
        else:
            by_file[filename].append(index)
            mapping[(filename, index)] = None
    todo = [(f, idx) for f, idx in by_file.items() if idx is not None]
    if not todo:
        return mapping
    os.makedirs(out_dir, exist_ok=True)
    stacks, singles = [], []
    for filename, indices in todo:
        _raise_unreadable(filename, backend)
        fmt = detect_format(filename)
        single = all(not i or i == 1 for i in indices) and _n_images(filename, fmt, backend) == 1
        (singles if single else stacks).append((filename, sorted(set(indices), key=lambda i: i or 0), fmt))
    log('Converting to MRC: %d stack(s) and %d single-image file(s) that are not MRC, into %s'
        % (len(stacks), len(singles), out_dir))

    def write(out_path, sources, label):
        """sources: [(filename, index)] in output order."""
        first = read_images(sources[0][0], [sources[0][1]], backend)[0]
        ny, nx = first.shape[-2:]
        n = len(sources)
        with mrcfile.new_mmap(out_path, shape=(n, ny, nx), mrc_mode=2, overwrite=True) as m:
            m.voxel_size = pixel
            m.header.ispg = 0
            for start in range(0, n, batch):
                chunk = sources[start:start + batch]
                for filename in OrderedDict.fromkeys(f for f, _ in chunk):
                    rows = [k for k, (f, _i) in enumerate(chunk) if f == filename]
                    data = read_images(filename, [chunk[k][1] for k in rows], backend)
                    if data.shape[-2:] != (ny, nx):
                        raise ValueError('%s: images of %s pixels, but %s has %dx%d; a set has one '
                                         'box size' % (filename, 'x'.join(map(str, data.shape[-1:-3:-1])),
                                                       sources[0][0], nx, ny))
                    m.data[start + np.asarray(rows)] = data
                log('  %s: %d/%d images' % (label, min(start + batch, n), n))
            m.update_header_stats()
        for k, (filename, index) in enumerate(sources):
            mapping[(filename, index)] = (out_path, k + 1)

    for k, (filename, indices, fmt) in enumerate(stacks, start=1):
        name = os.path.splitext(os.path.basename(_split(filename)[0]))[0]
        out_path = os.path.join(out_dir, '%03d_%s.mrcs' % (k, name))
        write(out_path, [(filename, i) for i in indices], '%s (%s) -> %s' % (filename, fmt, out_path))
    if singles:
        out_path = os.path.join(out_dir, 'single_images.mrcs')
        write(out_path, [(f, idx[0]) for f, idx, _fmt in singles],
              '%d single-image files -> %s' % (len(singles), out_path))
    missing = [key for key, value in mapping.items() if value is None]
    if missing:     # cannot happen: every location was written above
        raise RuntimeError('particles_to_mrc: %d locations not converted, e.g. %s' % (len(missing), missing[0]))
    return mapping


def _n_images(filename, fmt, backend) -> int:
    clean = _split(filename)[0]
    if fmt == 'spider' and not _use_xmipp(fmt, backend):
        return SpiderFile(clean).n_images
    return _xmipp_dims(filename)[3]
