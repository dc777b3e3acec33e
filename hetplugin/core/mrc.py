"""MRC volumes and particle image stacks.

Conventions
-----------
* Volumes are float32 arrays indexed ``(z, y, x)``; the pixel size travels beside them in
  Angstrom (``pixel_size_A``), taken from the header voxel size.
* Image stacks are addressed like RELION: ``(path, index)`` with a 1-based ``index`` along the
  third axis of the MRC file (a 2D single-image ``.mrc`` holds index 1).
* Stacks are read with positional reads, only the requested images (near neighbours in one
  read); they are never loaded whole nor memory-mapped. Open stacks are cached by path
  (``open_stack``) and released by ``close_all``.
* A Scipion-style format suffix (``volume.mrc:mrc``) is accepted on every path.
* Bad input raises ``ValueError`` naming the file and saying what to do.

Only numpy, mrcfile and the standard library are used here (no Scipion).
"""
from __future__ import annotations

import os
import re
import struct
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

import mrcfile
import numpy as np

__all__ = ["MrcHeader", "read_header", "read_volume", "write_volume", "write_stack",
           "open_stack", "close_all", "Stack", "StackReader", "check_images", "strip_format_suffix"]

_SUFFIX = re.compile(r":(mrcs?|map)$", re.IGNORECASE)
_MODE_DTYPES = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16, 12: np.float16}
_CONVERT_HINT = ("the core reads only MRC stacks: convert it first, e.g. "
                 "'relion_image_handler --i <in> --o <out>.mrcs' or Scipion's convert/export")

_LOCK = threading.RLock()
_HANDLES: "OrderedDict[str, Stack]" = OrderedDict()


def strip_format_suffix(path: str | os.PathLike) -> str:
    """Return ``path`` as str without a Scipion format suffix such as ``':mrc'``."""
    return _SUFFIX.sub("", os.fspath(path))


# --------------------------------------------------------------------------- headers
@dataclass(frozen=True)
class MrcHeader:
    """What the core needs from an MRC header (read without touching the data)."""
    path: str
    nx: int
    ny: int
    nz: int
    mode: int
    dtype: np.dtype
    data_offset: int
    voxel_size_A: float | None

    @property
    def n_images(self) -> int:
        """Number of images when the file is read as a stack (third axis)."""
        return self.nz

    @property
    def image_shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of one image."""
        return self.ny, self.nx


def _describe_format(head: bytes, path: str) -> str:
    """Guess a file format from its first bytes, for error messages."""
    for magic, name in ((b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x89HDF", "HDF5"),
                        (b"\x89PNG", "PNG"), (b"\xff\xd8", "JPEG"), (b"GIF8", "GIF")):
        if head.startswith(magic):
            return name
    ext = os.path.splitext(path)[1] or "no extension"
    return f"unknown format ({ext}, {len(head)} header bytes)"


def read_header(path: str | os.PathLike) -> MrcHeader:
    """Read the 1024-byte MRC header of ``path``.

    Raises ValueError when the file is missing, is not MRC, uses an unsupported mode, or is
    shorter than its header says.
    """
    path = strip_format_suffix(path)
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise ValueError(f"image file not found: {path}. Check the path (or the STAR file's "
                         "image names and the project directory/--root).") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if len(head) < 1024:
        raise ValueError(f"{path} is not an MRC file ({_describe_format(head, path)}, "
                         f"only {len(head)} bytes); {_CONVERT_HINT}")
    stamp = head[212]
    orders = {0x44: "<", 0x41: "<", 0x11: ">"}.get(stamp)
    candidates = [orders] if orders else ["<", ">"]
    for endian in candidates:
        nx, ny, nz, mode = struct.unpack(endian + "4i", head[:16])
        if 0 < nx < 1 << 20 and 0 < ny < 1 << 20 and 0 < nz < 1 << 28 and 0 <= mode < 1 << 16:
            break
    else:
        raise ValueError(f"{path} is not an MRC file ({_describe_format(head, path)}); "
                         f"{_CONVERT_HINT}")
    has_map_id = head[208:211] == b"MAP"
    if mode not in _MODE_DTYPES:
        what = "MRC file with unsupported mode %d" % mode if has_map_id else \
            f"not an MRC file ({_describe_format(head, path)})"
        raise ValueError(f"{path}: {what}; {_CONVERT_HINT} (float32 or float16 stacks work)")
    mx, nsymbt = struct.unpack(endian + "i", head[28:32])[0], struct.unpack(endian + "i", head[92:96])[0]
    cella_x = struct.unpack(endian + "f", head[40:44])[0]
    dtype = np.dtype(_MODE_DTYPES[mode]).newbyteorder(endian)
    offset = 1024 + max(nsymbt, 0)
    needed = offset + nx * ny * nz * dtype.itemsize
    if size < needed:
        what = "is truncated" if has_map_id else f"is not an MRC file ({_describe_format(head, path)})"
        raise ValueError(f"{path} {what}: {size} bytes but the header needs {needed}; "
                         f"re-create or re-copy it ({_CONVERT_HINT})")
    voxel = float(cella_x) / mx if mx > 0 and np.isfinite(cella_x) and cella_x > 0 else None
    return MrcHeader(path, nx, ny, nz, mode, dtype, offset, voxel)


# --------------------------------------------------------------------------- volumes
def _open_any(path: str):
    """mrcfile.open with a permissive fallback for slightly malformed headers."""
    try:
        return mrcfile.open(path, mode="r")
    except ValueError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle = mrcfile.open(path, mode="r", permissive=True)
        if handle.data is None:
            handle.close()
            raise ValueError(f"{path} is not a readable MRC file; {_CONVERT_HINT}") from None
        return handle


def _zyx(handle) -> np.ndarray:
    """Data of an open mrcfile handle in (z, y, x) order, honouring mapc/mapr/maps."""
    data = np.asarray(handle.data)
    axes = (int(handle.header.mapc), int(handle.header.mapr), int(handle.header.maps))
    if data.ndim == 3 and sorted(axes) == [1, 2, 3] and axes != (1, 2, 3):
        # array axis 2 holds label mapc, axis 1 mapr, axis 0 maps; want axes labelled 3,2,1
        label_of_axis = {2: axes[0], 1: axes[1], 0: axes[2]}
        order = [next(a for a, lab in label_of_axis.items() if lab == want) for want in (3, 2, 1)]
        data = data.transpose(order)
    return data


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, float | None]:
    """Read a cubic MRC volume ('.mrc', '.map', '.mrcs', optional ':mrc' suffix).

    Returns ``(volume, pixel_size_A)``: a float32 (z, y, x) copy, and the header voxel size in
    Angstrom (None when the header holds 0). Non-3D or non-cubic data raise ValueError.
    """
    path = strip_format_suffix(path)
    if not os.path.isfile(path):
        raise ValueError(f"volume file not found: {path}. Check the path.")
    with _open_any(path) as handle:
        data = _zyx(handle)
        voxel = float(handle.voxel_size.x)
        volume = np.array(data, dtype=np.float32, order="C")
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"{path} holds data of shape {volume.shape}; the core needs a cubic "
                         "3D volume: pad or resize it (e.g. 'relion_image_handler --new_box' or "
                         "Scipion's crop/resize volumes)")
    return volume, (voxel if np.isfinite(voxel) and voxel > 0 else None)


def _check_pixel_size(pixel_size_A: float, path: str) -> float:
    value = float(pixel_size_A)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"cannot write {path}: pixel_size_A must be a positive number, got {pixel_size_A!r}")
    return value


def write_volume(path: str | os.PathLike, volume: np.ndarray, pixel_size_A: float) -> None:
    """Write a 3D (z, y, x) volume as float32 MRC with voxel size ``pixel_size_A`` and origin 0."""
    path = strip_format_suffix(path)
    data = np.ascontiguousarray(np.asarray(volume, dtype=np.float32))
    if data.ndim != 3:
        raise ValueError(f"cannot write {path}: a volume must be 3D (z, y, x), got shape {data.shape}")
    pixel = _check_pixel_size(pixel_size_A, path)
    with mrcfile.new(path, overwrite=True) as handle:
        handle.set_data(data)
        handle.set_volume()
        handle.voxel_size = pixel
        handle.header.origin = (0.0, 0.0, 0.0)
        handle.header.nxstart, handle.header.nystart, handle.header.nzstart = 0, 0, 0


def write_stack(path: str | os.PathLike, images: np.ndarray, pixel_size_A: float,
                dtype: type | np.dtype = np.float32) -> None:
    """Write images (n, y, x) (or one (y, x) image) as an MRC image stack (float32 or float16)."""
    path = strip_format_suffix(path)
    if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"cannot write {path}: dtype must be float32 or float16, got {dtype}")
    data = np.asarray(images)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ValueError(f"cannot write {path}: images must be (n, y, x), got shape {data.shape}")
    pixel = _check_pixel_size(pixel_size_A, path)
    with mrcfile.new(path, overwrite=True) as handle:
        handle.set_data(np.ascontiguousarray(data.astype(dtype, copy=False)))
        handle.set_image_stack()
        handle.voxel_size = pixel


# --------------------------------------------------------------------------- stacks
def _max_open_handles() -> int:
    """How many stacks may stay open at once (each holds a descriptor)."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft > 0:
            return max(16, min(1024, soft // 4))
    except (ImportError, ValueError, OSError):
        pass
    return 256


# images at most this many apart in a stack are read with one positional read (the ones between
# are skipped in memory); one read spans at most _SPAN_BYTES
_GAP_IMAGES = 4
_SPAN_BYTES = 64 << 20


class Stack:
    """An open MRC image stack: its header and a read-only descriptor.

    Images are read with positional reads into the caller's array, not memory-mapped: pages
    a mapping has touched count towards the process's resident memory until it is closed,
    which for a data set larger than memory is all of it. Read pages stay in the system's
    file cache instead, shared and reclaimable.
    """

    def __init__(self, path: str):
        self.path = path
        self.header = read_header(path)
        self._fd = os.open(path, os.O_RDONLY)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def read(self, index0: np.ndarray, out: np.ndarray) -> None:
        """Images at 0-based positions ``index0`` (ascending) into ``out`` (len(index0), ny, nx)."""
        h = self.header
        frame = h.nx * h.ny * h.dtype.itemsize
        index0 = np.asarray(index0, dtype=np.int64)
        per_span = max(1, _SPAN_BYTES // frame)
        start = 0
        while start < len(index0):
            first = int(index0[start])
            # the run of images that one read covers: gaps of at most _GAP_IMAGES, within one span
            gaps = np.diff(index0[start:start + per_span])
            breaks = np.flatnonzero((gaps > _GAP_IMAGES) | (index0[start + 1:start + per_span] - first >= per_span))
            stop = start + (int(breaks[0]) + 1 if breaks.size else len(gaps) + 1)
            count = int(index0[stop - 1]) - first + 1
            buf = os.pread(self._fd, count * frame, h.data_offset + first * frame)
            if len(buf) != count * frame:
                raise ValueError(f"{self.path} ended while reading images {first + 1}..{first + count}; "
                                 f"re-create or re-copy it ({_CONVERT_HINT})")
            block = np.frombuffer(buf, dtype=h.dtype).reshape(count, h.ny, h.nx)
            out[start:stop] = block[index0[start:stop] - first]
            start = stop

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def open_stack(path: str | os.PathLike) -> Stack:
    """The open :class:`Stack` of ``path``, cached by absolute path.

    Least recently used stacks are closed beyond a limit derived from the open-file limit.
    Release everything with ``close_all()``.
    """
    key = os.path.abspath(strip_format_suffix(path))
    with _LOCK:
        stack = _HANDLES.get(key)
        if stack is not None:
            _HANDLES.move_to_end(key)
            return stack
        if not os.path.isfile(key):
            raise ValueError(f"image stack not found: {key}. Check the STAR file's image paths "
                             "or the project directory (--root).")
        stack = Stack(key)
        _HANDLES[key] = stack
        limit = _max_open_handles()
        while len(_HANDLES) > limit:
            _HANDLES.popitem(last=False)[1].close()
        return stack


def close_stack(path: str | os.PathLike) -> None:
    """Close the cached handle of one stack, if open."""
    key = os.path.abspath(strip_format_suffix(path))
    with _LOCK:
        stack = _HANDLES.pop(key, None)
    if stack is not None:
        stack.close()


def close_all() -> None:
    """Close every cached stack handle."""
    with _LOCK:
        stacks = list(_HANDLES.values())
        _HANDLES.clear()
    for stack in stacks:
        stack.close()


def _factorize(paths: Iterable[str]) -> tuple[list[str], np.ndarray]:
    """Unique paths (first-seen order) and each row's code into them."""
    seen: dict[str, int] = {}
    codes = [seen.setdefault(p, len(seen)) for p in paths]
    return list(seen), np.asarray(codes, dtype=np.int64)


def _address_arrays(paths, indices) -> tuple[list[str], np.ndarray, np.ndarray]:
    path_list = [strip_format_suffix(p) for p in np.asarray(paths, dtype=object).ravel().tolist()]
    index = np.asarray(indices).ravel()
    if len(path_list) != len(index):
        raise ValueError(f"{len(path_list)} image paths but {len(index)} indices: they must match")
    if index.size and not np.issubdtype(index.dtype, np.integer):
        if not np.all(np.isfinite(index)) or not np.all(index == np.round(index)):
            raise ValueError("image indices must be integers (1-based positions in the stacks)")
    files, codes = _factorize(path_list)
    return files, codes, index.astype(np.int64)


class StackReader:
    """Reads images addressed by (path, 1-based index), returning them in the requested order.

    Each file is opened once (through ``open_stack``) and read per call in ascending image
    order, so only the requested images (and small gaps between them) are read.
    """

    def __init__(self, paths: np.ndarray, indices: np.ndarray):
        """``paths`` (N,) stack paths and ``indices`` (N,) 1-based image indices of the data set."""
        self._files, self._codes, index = _address_arrays(paths, indices)
        self._index0 = index - 1
        self._shape: tuple[int, int] | None = None
        self._opened: set[str] = set()

    def __len__(self) -> int:
        return len(self._codes)

    def __enter__(self) -> "StackReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def image_shape(self) -> tuple[int, int]:
        """``(y, x)`` of the images (from the first file's header)."""
        if self._shape is None:
            if not self._files:
                raise ValueError("StackReader has no images")
            self._shape = read_header(self._files[0]).image_shape
        return self._shape

    def _stack(self, code: int) -> Stack:
        path = self._files[code]
        stack = open_stack(path)
        self._opened.add(path)
        return stack

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Images of particle ``rows`` (0-based rows of the data set) as (len(rows), y, x) float32."""
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise ValueError(f"particle rows must lie in [0, {len(self)}), got "
                             f"{rows.min()}..{rows.max()}")
        ny, nx = self.image_shape()
        out = np.empty((len(rows), ny, nx), dtype=np.float32)
        if not rows.size:
            return out
        codes = self._codes[rows]
        order = np.argsort(codes, kind="stable")
        sorted_codes = codes[order]
        cuts = np.flatnonzero(np.diff(sorted_codes)) + 1
        for start, stop in zip(np.r_[0, cuts], np.r_[cuts, len(rows)]):
            code = int(sorted_codes[start])
            targets = order[start:stop]
            index0 = self._index0[rows[targets]]
            stack = self._stack(code)
            h = stack.header
            if (h.ny, h.nx) != (ny, nx):
                raise ValueError(f"{self._files[code]} holds {h.nx}x{h.ny} images, "
                                 f"others {nx}x{ny}: all particles need the same box (re-extract)")
            if index0.min() < 0 or index0.max() >= h.n_images:
                bad = int(index0.max() + 1 if index0.max() >= h.n_images else index0.min() + 1)
                raise ValueError(f"image index {bad} is out of range for {self._files[code]} "
                                 f"({h.n_images} images); check the STAR file's image names")
            sort = np.argsort(index0, kind="stable")  # sequential access inside the file
            block = np.empty((len(sort), ny, nx), dtype=np.float32)
            stack.read(index0[sort], block)
            out[targets[sort]] = block
        return out

    def close(self) -> None:
        """Close the stacks this reader opened."""
        for path in self._opened:
            close_stack(path)
        self._opened.clear()


def _list_files(files: list[str], counts: np.ndarray, positions: Iterable[int], limit: int = 5) -> str:
    positions = list(positions)
    text = "; ".join(f"{files[i]} ({counts[i]} particle(s))" for i in positions[:limit])
    return text + (f"; and {len(positions) - limit} more file(s)" if len(positions) > limit else "")


def check_images(paths, indices, require_square_even: bool = True) -> tuple[int, int]:
    """Validate image addresses before any work, reading headers only.

    Checks that every file exists and is MRC, every 1-based index lies in
    ``[1, n_images_in_file]``, all boxes are equal and (when ``require_square_even``) square and
    even. Raises ValueError naming the offending file(s) and what to do. Returns ``(box_y, box_x)``.
    """
    files, codes, index = _address_arrays(paths, indices)
    if not files:
        raise ValueError("no particle images to check (empty particle set)")
    counts = np.bincount(codes, minlength=len(files))
    missing = [i for i, path in enumerate(files) if not os.path.isfile(path)]
    if missing:
        raise ValueError(f"{len(missing)} image file(s) not found: {_list_files(files, counts, missing)}. "
                         "Check the image paths in the STAR file (rlnImageName 'index@path', relative "
                         "to the RELION project directory) or pass the project directory as --root.")
    headers = [read_header(path) for path in files]
    n_images = np.array([h.n_images for h in headers], dtype=np.int64)
    bad = (index < 1) | (index > n_images[codes])
    if bad.any():
        code = int(codes[np.flatnonzero(bad)[0]])
        in_file = bad & (codes == code)
        worst = index[in_file]
        example = int(worst.max() if worst.max() > n_images[code] else worst.min())
        raise ValueError(f"image index {example} is out of range for {files[code]}, which holds "
                         f"{n_images[code]} image(s) (indices are 1-based); {int(bad.sum())} "
                         "particle(s) in total have bad indices. Check the STAR file's image names "
                         "or re-extract the particles.")
    shapes: dict[tuple[int, int], list[int]] = {}
    for i, header in enumerate(headers):
        shapes.setdefault(header.image_shape, []).append(i)
    if len(shapes) > 1:
        parts = [f"{nx}x{ny} in {_list_files(files, counts, where, 2)}"
                 for (ny, nx), where in shapes.items()]
        raise ValueError("particle images have different boxes: " + " | ".join(parts) +
                         ". Re-extract all particles with one box size (RELION Extract) or re-window "
                         "them with 'relion_image_handler --new_box'.")
    (box_y, box_x), where = next(iter(shapes.items()))
    if require_square_even:
        example = files[where[0]]
        if box_y != box_x:
            raise ValueError(f"images in {example} are {box_x}x{box_y} pixels, not square; "
                             "re-extract with a square box (RELION Extract) or re-window with "
                             "'relion_image_handler --new_box'.")
        if box_x % 2:
            raise ValueError(f"images in {example} have an odd box ({box_x} pixels); the core needs "
                             f"an even box: re-window, e.g. 'relion_image_handler --i <stack> "
                             f"--new_box {box_x + 1} --o <new>.mrcs', or re-extract with an even box.")
    return box_y, box_x
