"""STAR files (RELION 3.0 to 5, cryoSPARC exports) and the particle table.

``read_star``/``write_star`` map a STAR file to ``{block: {label: column}}`` (block names without
``data_``, labels without the leading ``_``). Columns are numpy arrays: int64 when every value is
an integer literal, float64 when every value is a number, otherwise object arrays of str.
Large loops are parsed column-wise by numpy's C reader (a million rows in seconds), never as a
dict per row.

``read_particles`` turns a particle STAR file into a ``ParticleTable`` (per-particle arrays with
units in their names, optics joined per particle); ``particle_blocks``/``write_particles`` write
it back RELION 3.1 style with absolute image paths, carrying unknown labels through.

Only numpy and the standard library are used here (no Scipion).
"""
from __future__ import annotations

import dataclasses
import io
import itertools
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .mrc import read_header, strip_format_suffix

__all__ = ["read_star", "write_star", "ParticleTable", "read_particles", "particle_blocks",
           "write_particles", "new_particle_table"]

Blocks = dict[str, dict[str, np.ndarray]]

_STRUCTURE = re.compile(rb"\n[ \t\r]*(?:data_|loop_|_|global_|save_)")
_TOKEN = re.compile(r"""\[[^\]\n]*\]|"[^"\n]*"(?=\s|$)|'[^'\n]*'(?=\s|$)|#[^\n]*|\S+""")
_QUOTE = re.compile(r"""^$|^["'#_$;]|^(?:data_|loop_|global_|save_)|\s""")
_QUOTE_START = re.compile(r"""\x01(?:["'#_$;\x01]|data_|loop_|global_|save_)|\x01$""")
_INT = re.compile(r"[+-]?\d+")
_NUMPY_COLUMN = re.compile(r"column (\d+)")
_LOADTXT_MIN_LINES = 1000   # smaller loops are parsed in Python (no file re-open)
_WRITE_CHUNK = 50_000
DEFAULT_AMPLITUDE_CONTRAST = 0.1   # when a CTF file lacks rlnAmplitudeContrast (cryoSPARC/Scipion default)


# --------------------------------------------------------------------------- reading
def _tokens(text: str) -> list[str]:
    """Split STAR text into values: quoted strings and [bracketed, arrays] are one token,
    '#' comments (at a token start) are dropped, quotes are stripped."""
    out = []
    for tok in _TOKEN.findall(text):
        if tok[0] == "#":
            continue
        if len(tok) >= 2 and tok[0] in "\"'" and tok[-1] == tok[0]:
            tok = tok[1:-1]
        out.append(tok)
    return out


def _to_array(values: list[str]) -> np.ndarray:
    """int64 if every value is an integer literal, else float64 if all are numbers, else str."""
    if not values:
        return np.zeros(0, dtype=np.float64)
    for dtype in (np.int64, np.float64):
        try:
            return np.array(values, dtype=dtype)
        except (ValueError, OverflowError, TypeError):
            pass
    return np.array(values, dtype=object)


def _guess_dtype(token: str):
    if _INT.fullmatch(token):
        return "i8"
    try:
        float(token)
        return "f8"
    except ValueError:
        return object


def _loadtxt_loop(raw: bytes, start: int, stop: int, labels: list[str]) -> dict[str, np.ndarray] | None:
    """Parse a large, simple loop (no quotes/comments/brackets) with numpy's C reader.

    Column types are guessed from the first row and corrected from numpy's error messages
    (an int column with a float later, a number column with text later). Returns None when
    this fast path does not apply; the caller then parses in Python.
    """
    line_end = raw.find(b"\n", start, stop)
    tokens = raw[start:stop if line_end < 0 else line_end].decode("utf-8", "surrogateescape").split()
    if len(tokens) != len(labels):
        return None
    types = [_guess_dtype(t) for t in tokens]
    n_lines = raw.count(b"\n", start, stop) + 1
    for _attempt in range(8):
        dtype = [(f"f{j}", t) for j, t in enumerate(types)]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                lines = io.BytesIO(raw)      # shares raw's buffer; iterating lines runs in C
                lines.seek(start)
                table = np.loadtxt(itertools.islice(lines, n_lines), dtype=dtype, comments=None,
                                   ndmin=1, encoding="utf-8")
        except (ValueError, DeprecationWarning, UserWarning) as exc:
            match = _NUMPY_COLUMN.search(str(exc))
            if match is None or not 1 <= int(match.group(1)) <= len(types):
                return None
            j = int(match.group(1)) - 1
            if types[j] is object:
                return None
            types[j] = "f8" if types[j] == "i8" else object
            continue
        return {label: np.ascontiguousarray(table[f"f{j}"]) for j, label in enumerate(labels)}
    return None


def _trim_trailing_comments(raw: bytes, start: int, stop: int) -> int:
    """Move ``stop`` back over blank and '#' lines that end a loop region."""
    while stop > start:
        prev = raw.rfind(b"\n", start, stop)
        last = raw[prev + 1 if prev >= 0 else start:stop].strip()
        if last and not last.startswith(b"#"):
            break
        if prev < start:
            return start
        stop = prev
    return stop


def _parse_loop(path: Path, raw: bytes, start: int, stop: int,
                labels: list[str]) -> dict[str, np.ndarray]:
    """Columns of the loop whose value lines occupy ``raw[start:stop]``."""
    simple = all(raw.find(c, start, stop) < 0 for c in (b'"', b"'", b"#", b"["))
    if simple and raw.count(b"\n", start, stop) >= _LOADTXT_MIN_LINES:
        columns = _loadtxt_loop(raw, start, stop, labels)
        if columns is not None:
            return columns
    text = raw[start:stop].decode("utf-8", "surrogateescape")
    tokens = text.split() if simple else _tokens(text)
    ncol = len(labels)
    if len(tokens) % ncol:
        first_line = raw.count(b"\n", 0, start) + 1
        for k, line in enumerate(text.splitlines()):
            found = len(_tokens(line))
            if found and found != ncol:
                raise ValueError(f"{path}, line {first_line + k}: {found} values but the loop declares "
                                 f"{ncol} labels ({', '.join(labels[:4])}...). The file is truncated or "
                                 "malformed: re-export it or fix that line.")
        raise ValueError(f"{path}: a loop starting at line {first_line} has {len(tokens)} values, "
                         f"not a multiple of its {ncol} labels; re-export the file.")
    return {label: _to_array(tokens[j::ncol]) for j, label in enumerate(labels)}


def read_star(path: str | os.PathLike) -> Blocks:
    """Read every data block of a STAR file.

    Returns ``{block_name: {label: column}}`` with ``data_`` and the leading ``_`` removed
    (``data_`` alone gives the name ''). Loops give columns of their row count; key/value
    blocks give columns of length 1. Handles comments, blank lines, tabs, quoted strings and
    RELION 5 bracketed arrays (one str token each).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read STAR file {path}: {exc.strerror or exc}. Check the path.") from exc
    blocks: Blocks = {}
    block: dict[str, np.ndarray] | None = None
    labels: list[str] | None = None      # set while reading a loop_ header
    pos, size = 0, len(raw)

    def line_no() -> int:
        return raw.count(b"\n", 0, pos) + 1

    def close_loop() -> None:
        if block is not None and labels:
            for label in labels:
                block[label] = np.zeros(0, dtype=np.float64)

    while pos < size:
        end = raw.find(b"\n", pos)
        end = size if end < 0 else end
        line = raw[pos:end].decode("utf-8", "surrogateescape").strip()
        if not line or line[0] == "#" or line.startswith(("global_", "save_")):
            pos = end + 1
            continue
        if line.startswith("data_"):
            close_loop()
            labels = None
            block = blocks.setdefault(line.split()[0][5:], {})
        elif block is None:
            raise ValueError(f"{path}, line {line_no()}: content before any 'data_' block; "
                             "is this a STAR file?")
        elif line.startswith("loop_"):
            close_loop()
            labels = []
        elif line[0] == "_":
            tokens = _tokens(line)
            label = tokens[0][1:]
            if labels is not None:
                if label in labels:
                    raise ValueError(f"{path}, line {line_no()}: label _{label} appears twice in one loop")
                labels.append(label)
            elif len(tokens) < 2:
                raise ValueError(f"{path}, line {line_no()}: _{label} has no value (put it on the same line)")
            else:
                block[label] = _to_array(tokens[1:2])
        elif labels:
            match = _STRUCTURE.search(raw, end)
            stop = _trim_trailing_comments(raw, pos, match.start() if match else size)
            block.update(_parse_loop(path, raw, pos, stop, labels))
            labels = None
            pos = stop + 1
            continue
        else:
            raise ValueError(f"{path}, line {line_no()}: values outside a loop_ (or a loop_ without "
                             "labels); the file is malformed: re-export it.")
        pos = end + 1
    close_loop()
    return blocks


# --------------------------------------------------------------------------- writing
def _needs_quotes(text: str) -> bool:
    """Whether a string value must be quoted to read back as one token."""
    return bool(_QUOTE.search(text)) and not (text[:1] == "[" and text[-1:] == "]")


def _column_needs_quotes(items: list[str]) -> bool:
    """Vectorised ``any(map(_needs_quotes, items))``: one scan over the joined column."""
    joined = "\x01" + "\x01".join(items)
    return len(joined.split(None, 1)) > 1 or joined != joined.rstrip() or bool(_QUOTE_START.search(joined))


def _format_column(values, label: str, path: Path) -> tuple[str, list]:
    """printf spec and Python values for one column."""
    column = np.asarray(values)
    if column.ndim == 0:
        column = column.reshape(1)
    if column.ndim != 1:
        raise ValueError(f"cannot write {path}: column {label} must be 1-D, got shape {column.shape}")
    kind = column.dtype.kind
    if kind == "b" or kind in "iu":
        return "%d", column.astype(np.int64).tolist()
    if kind == "f":
        # repr of a float64 is the shortest string that reads back exactly; 9 digits for float32
        return ("%r" if column.dtype.itemsize >= 8 else "%.9g"), column.astype(np.float64).tolist()
    if kind in "OUS":
        items = [v.decode() if isinstance(v, bytes) else str(v) for v in column.tolist()]
        if _column_needs_quotes(items):
            items = [(("'%s'" if '"' in s else '"%s"') % s) if _needs_quotes(s) else s for s in items]
        return "%s", items
    raise ValueError(f"cannot write {path}: column {label} has unsupported dtype {column.dtype}")


def write_star(path: str | os.PathLike, blocks: dict[str, dict[str, np.ndarray | list]]) -> None:
    """Write blocks RELION style: '# version 30001', 'data_<name>', 'loop_', '_label #n', rows.

    Every block is written as a loop_. float64 values are written with their shortest exact
    representation (round trips are exact), float32 with 9 significant digits, ints as ints,
    strings as they are (quoted when they contain spaces). The file is replaced atomically.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as out:
            out.write("\n# version 30001\n")
            for name, columns in blocks.items():
                out.write(f"\ndata_{name}\n\nloop_\n")
                formats, lists = [], []
                for j, (label, values) in enumerate(columns.items(), start=1):
                    label = str(label).lstrip("_")
                    out.write(f"_{label} #{j}\n")
                    spec, items = _format_column(values, label, path)
                    formats.append(spec)
                    lists.append(items)
                lengths = {len(items) for items in lists}
                if len(lengths) > 1:
                    raise ValueError(f"cannot write {path}: columns of block '{name}' have different "
                                     f"lengths {sorted(lengths)}")
                row_format = " ".join(formats)
                n_rows = lengths.pop() if lengths else 0
                for a in range(0, n_rows, _WRITE_CHUNK):
                    rows = zip(*(items[a:a + _WRITE_CHUNK] for items in lists))
                    out.write("\n".join([row_format % row for row in rows]))
                    out.write("\n")
                out.write("\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------- particles
_OPTICS_PER_PARTICLE_30 = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
                           "rlnMagnification", "rlnDetectorPixelSize", "rlnImagePixelSize",
                           "rlnPixelSize", "rlnImageSize", "rlnImageDimensionality")
_PER_PARTICLE_FIELDS = (("rot_deg", "rlnAngleRot"), ("tilt_deg", "rlnAngleTilt"),
                        ("psi_deg", "rlnAnglePsi"), ("shift_x_A", "rlnOriginXAngst"),
                        ("shift_y_A", "rlnOriginYAngst"), ("defocus_u_A", "rlnDefocusU"),
                        ("defocus_v_A", "rlnDefocusV"), ("defocus_angle_deg", "rlnDefocusAngle"),
                        ("phase_shift_deg", "rlnPhaseShift"), ("ctf_bfactor_A2", "rlnCtfBfactor"),
                        ("ctf_scale", "rlnCtfScalefactor"), ("class_number", "rlnClassNumber"),
                        ("random_subset", "rlnRandomSubset"))
_OPTICS_FIELDS = (("pixel_size_A", "rlnImagePixelSize"), ("image_size", "rlnImageSize"),
                  ("voltage_kV", "rlnVoltage"), ("cs_mm", "rlnSphericalAberration"),
                  ("amplitude_contrast", "rlnAmplitudeContrast"))


@dataclass
class ParticleTable:
    """Per-particle metadata as arrays (N rows), units in the names.

    Alignment fields are None when the file has no 3D angles (rlnAngleRot/rlnAngleTilt); CTF
    fields are None when it has no rlnDefocusU. ``image_size`` is 0 where the box is unknown
    (no rlnImageSize and no readable image). ``columns`` keeps every original particle column
    so that unknown labels are carried through on write; ``optics`` the original optics block.
    """
    star_path: Path
    image_index: np.ndarray
    image_path: np.ndarray
    pixel_size_A: np.ndarray
    image_size: np.ndarray
    optics_group: np.ndarray
    rot_deg: np.ndarray | None = None
    tilt_deg: np.ndarray | None = None
    psi_deg: np.ndarray | None = None
    shift_x_A: np.ndarray | None = None
    shift_y_A: np.ndarray | None = None
    defocus_u_A: np.ndarray | None = None
    defocus_v_A: np.ndarray | None = None
    defocus_angle_deg: np.ndarray | None = None
    voltage_kV: np.ndarray | None = None
    cs_mm: np.ndarray | None = None
    amplitude_contrast: np.ndarray | None = None
    phase_shift_deg: np.ndarray | None = None
    ctf_bfactor_A2: np.ndarray | None = None
    ctf_scale: np.ndarray | None = None
    class_number: np.ndarray | None = None
    random_subset: np.ndarray | None = None
    columns: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    optics: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.image_index)

    @property
    def has_alignment(self) -> bool:
        return self.rot_deg is not None

    @property
    def has_ctf(self) -> bool:
        return self.defocus_u_A is not None

    def subset(self, indices) -> "ParticleTable":
        """A new table with rows ``indices`` (int positions or a boolean mask of length N)."""
        rows = np.asarray(indices)
        if rows.dtype == bool:
            if rows.shape != (len(self),):
                raise ValueError(f"boolean mask of shape {rows.shape} for {len(self)} particles")
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64).ravel()
        if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise ValueError(f"subset rows out of range for {len(self)} particles")
        changes = {f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), np.ndarray)}
        changes["columns"] = {k: v[rows] for k, v in self.columns.items()}
        return dataclasses.replace(self, **changes)


def _group_rows(group_ids: np.ndarray, particle_groups: np.ndarray, path) -> np.ndarray:
    """Row of each particle's optics group in the optics block."""
    ids = _as_int(group_ids, "rlnOpticsGroup", path)
    if len(ids) == 0:
        raise ValueError(f"{path}: data_optics is empty; add the optics groups or re-export the file.")
    order = np.argsort(ids, kind="stable")
    pos = np.clip(np.searchsorted(ids[order], particle_groups), 0, len(ids) - 1)
    rows = order[pos]
    missing = ids[rows] != particle_groups
    if missing.any():
        raise ValueError(f"{path}: particles use optics group(s) {sorted(set(particle_groups[missing].tolist()))[:10]} "
                         "that are missing from data_optics; fix the optics table or re-export the file.")
    return rows


def _as_int(values: np.ndarray, label: str, path) -> np.ndarray:
    array = _as_float(values, label, path)
    if not np.all(array == np.round(array)):
        raise ValueError(f"{path}: _{label} must hold integers")
    return array.astype(np.int64)


def _as_float(values: np.ndarray, label: str, path) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError):
        raise ValueError(f"{path}: _{label} must be numeric (found e.g. {values[0]!r})") from None


def _resolve_paths(names: list[str], star_dir: Path, root) -> list[str]:
    """Absolute paths for (unique) relative image paths; see ``read_particles``."""
    if root is not None:
        bases = [os.path.abspath(root)]
    else:
        bases = [str(star_dir)] + [str(p) for p in list(star_dir.parents)[:3]] + [os.getcwd()]
    resolved, last = [], 0
    for name in names:
        name = strip_format_suffix(name)
        if os.path.isabs(name):
            resolved.append(os.path.normpath(name))
            continue
        found = None
        if root is None:
            for k in [last] + [k for k in range(len(bases)) if k != last]:
                if os.path.exists(os.path.join(bases[k], name)):
                    found, last = os.path.join(bases[k], name), k
                    break
        resolved.append(os.path.normpath(found or os.path.join(bases[0], name)))
    return resolved


def _split_image_names(names: np.ndarray, star_dir: Path, root, path) -> tuple[np.ndarray, np.ndarray]:
    """'index@path' (or 'path' = index 1) -> (int64 indices, object array of absolute paths)."""
    texts = list(map(str, names.tolist()))
    if not texts:
        return np.zeros(0, np.int64), np.zeros(0, dtype=object)
    heads, seps, tails = zip(*map(str.partition, texts, itertools.repeat("@")))
    if all(seps):
        index_text, rel = heads, tails
    else:
        index_text = [h if sep else "1" for h, sep in zip(heads, seps)]
        rel = [t if sep else h for h, sep, t in zip(heads, seps, tails)]
    try:
        index = np.array(index_text, dtype=np.int64)
    except ValueError:
        bad = next((t for t, i in zip(texts, index_text) if not _INT.fullmatch(i.strip())), texts[0])
        raise ValueError(f"{path}: image name {bad!r} is not 'index@stack'; fix _rlnImageName") from None
    first_seen = np.fromiter(map({}.setdefault, rel, itertools.count()), dtype=np.int64, count=len(rel))
    firsts, codes = np.unique(first_seen, return_inverse=True)
    absolute = _resolve_paths([rel[i] for i in firsts.tolist()], star_dir, root)
    return index, np.array(absolute, dtype=object)[codes.ravel()]


def read_particles(path: str | os.PathLike, root: str | os.PathLike | None = None) -> ParticleTable:
    """Read a particle STAR file (RELION 3.0 to 5, or a cryoSPARC/other RELION-style export).

    Optics (RELION 3.1+) are joined per particle through rlnOpticsGroup; per-particle values
    win over optics ones. Pixel size: rlnImagePixelSize, else rlnPixelSize, else
    rlnDetectorPixelSize [um] * 1e4 / rlnMagnification. Origins in pixels (rlnOriginX/Y) are
    converted to Angstrom. Relative image paths are resolved against ``root`` if given, else the
    first existing of: the STAR file's directory, its parents up to 3 levels, the current
    directory; otherwise they stay relative to the STAR file's directory (``mrc.check_images``
    reports missing files).
    """
    star_path = Path(os.path.abspath(path))
    blocks = read_star(star_path)
    candidates = [n for n in blocks if "rlnImageName" in blocks[n]]
    if not candidates:
        raise ValueError(f"{star_path}: no block has _rlnImageName (blocks: {list(blocks)}); "
                         "give a particle STAR file (e.g. from Extract, Refine3D or Class3D).")
    name = "particles" if "particles" in candidates else candidates[0]
    parts = blocks[name]
    n = len(parts["rlnImageName"])
    optics = blocks.get("optics") if name != "optics" else None
    rows = None
    if optics:
        if "rlnOpticsGroup" in parts and "rlnOpticsGroup" in optics:
            rows = _group_rows(optics["rlnOpticsGroup"], _as_int(parts["rlnOpticsGroup"], "rlnOpticsGroup", star_path), star_path)
        elif len(next(iter(optics.values()))) == 1:
            rows = np.zeros(n, dtype=np.int64)
        else:
            raise ValueError(f"{star_path}: several optics groups but particles lack _rlnOpticsGroup")

    def get(label: str) -> np.ndarray | None:
        if label in parts:
            return _as_float(parts[label], label, star_path)
        if rows is not None and label in optics:
            return _as_float(optics[label], label, star_path)[rows]
        return None

    pixel = get("rlnImagePixelSize")
    pixel = get("rlnPixelSize") if pixel is None else pixel
    if pixel is None and get("rlnMagnification") is not None and get("rlnDetectorPixelSize") is not None:
        pixel = get("rlnDetectorPixelSize") * 1e4 / get("rlnMagnification")
    if pixel is None:
        raise ValueError(f"{star_path}: no pixel size. Add _rlnImagePixelSize (data_optics, RELION 3.1+), "
                         "or _rlnPixelSize, or _rlnMagnification with _rlnDetectorPixelSize (RELION 3.0).")
    if not np.all(np.isfinite(pixel) & (pixel > 0)):
        raise ValueError(f"{star_path}: pixel sizes must be positive numbers")
    image_index, image_path = _split_image_names(parts["rlnImageName"], star_path.parent, root, star_path)
    size = get("rlnImageSize")
    if size is None:
        size = np.zeros(n)
        existing = next((p for p in dict.fromkeys(image_path.tolist()) if os.path.isfile(p)), None)
        if existing is not None:
            size[:] = read_header(existing).nx
    groups = get("rlnOpticsGroup")
    fields: dict = dict(star_path=star_path, image_index=image_index, image_path=image_path,
                        pixel_size_A=pixel, image_size=size.astype(np.int64),
                        optics_group=np.ones(n, np.int64) if groups is None else groups.astype(np.int64),
                        columns=dict(parts), optics=optics if optics else None)
    rot, tilt = get("rlnAngleRot"), get("rlnAngleTilt")
    if rot is not None or tilt is not None:
        zeros = np.zeros(n)
        fields.update(rot_deg=zeros if rot is None else rot, tilt_deg=zeros if tilt is None else tilt)
        fields["psi_deg"] = zeros if get("rlnAnglePsi") is None else get("rlnAnglePsi")
        for axis in "XY":
            value = get(f"rlnOrigin{axis}Angst")
            if value is None and get(f"rlnOrigin{axis}") is not None:
                value = get(f"rlnOrigin{axis}") * pixel
            fields[f"shift_{axis.lower()}_A"] = zeros if value is None else value
    defocus_u = get("rlnDefocusU")
    if defocus_u is not None:
        needed = {"voltage_kV": "rlnVoltage", "cs_mm": "rlnSphericalAberration"}
        missing = [label for label in needed.values() if get(label) is None]
        if missing:
            raise ValueError(f"{star_path}: _rlnDefocusU is present but {' and '.join('_' + m for m in missing)} "
                             "missing; add them (to data_optics in RELION 3.1+).")
        fields.update({key: get(label) for key, label in needed.items()})
        fields["amplitude_contrast"] = get("rlnAmplitudeContrast")
        if fields["amplitude_contrast"] is None:
            warnings.warn(f"{star_path}: no _rlnAmplitudeContrast, using {DEFAULT_AMPLITUDE_CONTRAST}")
            fields["amplitude_contrast"] = np.full(n, DEFAULT_AMPLITUDE_CONTRAST)
        defaults = {"defocus_v_A": ("rlnDefocusV", defocus_u), "defocus_angle_deg": ("rlnDefocusAngle", 0.0),
                    "phase_shift_deg": ("rlnPhaseShift", 0.0), "ctf_bfactor_A2": ("rlnCtfBfactor", 0.0),
                    "ctf_scale": ("rlnCtfScalefactor", 1.0)}
        fields["defocus_u_A"] = defocus_u
        for key, (label, default) in defaults.items():
            value = get(label)
            fields[key] = np.broadcast_to(default, (n,)).astype(np.float64) if value is None else value
    for key, label in (("class_number", "rlnClassNumber"), ("random_subset", "rlnRandomSubset")):
        if label in parts:
            fields[key] = _as_int(parts[label], label, star_path)
    return ParticleTable(**fields)


def _image_names(table: ParticleTable) -> np.ndarray:
    return np.array(["%06d@%s" % pair for pair in zip(table.image_index.tolist(), table.image_path.tolist())],
                    dtype=object)


def _synthesise_optics(table: ParticleTable, values: dict[str, np.ndarray]) -> tuple[dict, np.ndarray]:
    """One optics group per distinct (pixel size, box, voltage, Cs, Q): (optics block, group ids)."""
    keys = np.stack([v.astype(np.float64) for v in values.values()], axis=1)
    if len(keys) == 0 or np.all(keys == keys[0]):
        first, inverse = np.arange(min(1, len(keys))), np.zeros(len(keys), dtype=np.int64)
    else:
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        inverse = inverse.ravel()
    count = len(first)
    optics = {"rlnOpticsGroup": np.arange(1, count + 1),
              "rlnOpticsGroupName": np.array([f"opticsGroup{g}" for g in range(1, count + 1)], dtype=object),
              "rlnImageDimensionality": np.full(count, 2)}
    for label, value in values.items():
        optics[label] = value[first]
    return optics, inverse.astype(np.int64) + 1


def particle_blocks(table: ParticleTable, updates: dict[str, np.ndarray] | None = None) -> Blocks:
    """RELION 3.1-style ``{'optics': ..., 'particles': ...}`` blocks for ``write_star``.

    Particles keep every original column; rlnImageName becomes '%06d@/absolute/stack'; the typed
    fields (angles, shifts in Angstrom, CTF, class, half-set) are written from the table's
    arrays; pixel origins become rlnOriginX/YAngst. Optics come from ``table.optics`` (values
    that differ from it per particle are kept in the particle block) or, for RELION 3.0 input,
    are synthesised with one group per distinct (pixel size, box, voltage, Cs, Q), and the
    per-particle optics columns are dropped. ``updates`` (label -> (N,) array) come last.
    """
    n = len(table)
    parts = dict(table.columns)
    parts["rlnImageName"] = _image_names(table)
    for axis in "XY":                    # origins in pixels -> Angstrom (overwritten below if aligned)
        if f"rlnOrigin{axis}" in parts:
            pixels = np.asarray(parts.pop(f"rlnOrigin{axis}"), dtype=np.float64)
            parts[f"rlnOrigin{axis}Angst"] = pixels * table.pixel_size_A
    for key, label in _PER_PARTICLE_FIELDS:
        if getattr(table, key) is not None:
            parts[label] = getattr(table, key)
    values = {label: getattr(table, key) for key, label in _OPTICS_FIELDS
              if getattr(table, key) is not None and not (key == "image_size" and not np.any(table.image_size))}
    if table.optics is not None:
        optics = dict(table.optics)
        n_optics = len(next(iter(optics.values())))
        if "rlnOpticsGroup" not in optics:            # a single optics row without its number
            optics = {"rlnOpticsGroup": np.arange(1, n_optics + 1), **optics}
        rows = _group_rows(optics["rlnOpticsGroup"], table.optics_group, table.star_path)
        for label, value in values.items():
            if label in optics and np.array_equal(np.asarray(optics[label], dtype=np.float64)[rows], value):
                continue
            used, first = np.unique(rows, return_index=True)
            per_row = np.full(n_optics, value[first[0]] if n else 0, dtype=value.dtype)
            per_row[used] = value[first]
            if label not in optics and np.array_equal(per_row[rows], value):
                optics[label] = per_row
            else:
                parts[label] = value
        parts["rlnOpticsGroup"] = table.optics_group
    else:
        optics, groups = _synthesise_optics(table, values)
        for label in _OPTICS_PER_PARTICLE_30:
            parts.pop(label, None)
        parts["rlnOpticsGroup"] = groups
    for label, value in (updates or {}).items():
        column = np.asarray(value)
        if column.shape != (n,):
            raise ValueError(f"update for {label} has shape {column.shape}, expected ({n},)")
        parts[str(label).lstrip("_")] = column
    return {"optics": optics, "particles": parts}


def write_particles(path: str | os.PathLike, table: ParticleTable,
                    updates: dict[str, np.ndarray] | None = None) -> None:
    """``write_star(path, particle_blocks(table, updates))``."""
    write_star(path, particle_blocks(table, updates))


def new_particle_table(image_path, image_index, pixel_size_A, image_size, *,
                       rot_deg=None, tilt_deg=None, psi_deg=None, shift_x_A=None, shift_y_A=None,
                       defocus_u_A=None, defocus_v_A=None, defocus_angle_deg=None, voltage_kV=None,
                       cs_mm=None, amplitude_contrast=None, phase_shift_deg=None, ctf_bfactor_A2=None,
                       ctf_scale=None, class_number=None, random_subset=None,
                       extra_columns: dict[str, np.ndarray] | None = None,
                       star_path: str | os.PathLike | None = None) -> ParticleTable:
    """Build a table from arrays (e.g. in simulators); scalars broadcast to N = len(image_index).

    Angles default to 0 once any is given, shifts to 0 with angles; CTF needs defocus_u_A plus
    voltage_kV, cs_mm and amplitude_contrast (defocus_v = defocus_u, angle/phase/B 0, scale 1).
    Optics get one group per distinct (pixel size, box, voltage, Cs, Q).
    """
    index = np.asarray(image_index, dtype=np.int64).ravel()
    n = len(index)

    def full(value, dtype=np.float64):
        return None if value is None else np.broadcast_to(np.asarray(value, dtype=dtype), (n,)).copy()

    paths = np.array([os.path.abspath(strip_format_suffix(p)) for p in np.broadcast_to(
        np.asarray(image_path, dtype=object), (n,)).tolist()] + [""], dtype=object)[:-1]
    fields: dict = dict(image_index=index, image_path=paths, pixel_size_A=full(pixel_size_A),
                        image_size=full(image_size, np.int64), optics_group=np.ones(n, np.int64),
                        class_number=full(class_number, np.int64), random_subset=full(random_subset, np.int64))
    if any(v is not None for v in (rot_deg, tilt_deg, psi_deg)):
        for key, value in (("rot_deg", rot_deg), ("tilt_deg", tilt_deg), ("psi_deg", psi_deg),
                           ("shift_x_A", shift_x_A), ("shift_y_A", shift_y_A)):
            fields[key] = full(0.0 if value is None else value)
    if defocus_u_A is not None:
        if voltage_kV is None or cs_mm is None or amplitude_contrast is None:
            raise ValueError("a CTF needs defocus_u_A, voltage_kV, cs_mm and amplitude_contrast")
        fields.update(defocus_u_A=full(defocus_u_A), voltage_kV=full(voltage_kV), cs_mm=full(cs_mm),
                      amplitude_contrast=full(amplitude_contrast),
                      defocus_v_A=full(defocus_u_A if defocus_v_A is None else defocus_v_A))
        for key, value, default in (("defocus_angle_deg", defocus_angle_deg, 0.0),
                                    ("phase_shift_deg", phase_shift_deg, 0.0),
                                    ("ctf_bfactor_A2", ctf_bfactor_A2, 0.0), ("ctf_scale", ctf_scale, 1.0)):
            fields[key] = full(default if value is None else value)
    extra = {str(k).lstrip("_"): np.asarray(v) for k, v in (extra_columns or {}).items()}
    if any(v.shape != (n,) for v in extra.values()):
        raise ValueError(f"extra_columns must be arrays of shape ({n},)")
    draft = ParticleTable(star_path=Path(os.path.abspath(star_path or "particles.star")), columns=extra, **fields)
    blocks = particle_blocks(draft)
    draft.optics, draft.columns = blocks["optics"], blocks["particles"]
    draft.optics_group = blocks["particles"]["rlnOpticsGroup"]
    return draft
