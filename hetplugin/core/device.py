"""The one place where the compute device and default dtype are resolved."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os

import torch

DEFAULT_DTYPE = torch.float32


def resolve_device(name: str | None = None) -> torch.device:
    """Return the torch device for ``name`` ('cpu', 'cuda', 'cuda:N' or 'auto').

    ``None`` reads ``HETPLUGIN_DEVICE`` (default 'auto'). 'auto' takes CUDA when
    it is available, else the CPU. Asking for CUDA where there is none raises a
    ValueError that says so, rather than failing later inside a kernel.
    """
    if name is None:
        name = os.environ.get("HETPLUGIN_DEVICE", "auto")
    name = name.strip().lower()
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device '{name}' was asked for but torch sees no CUDA device; "
            "use --device cpu (or HETPLUGIN_DEVICE=cpu)")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device '{name}': use cpu, cuda, cuda:N or auto") from exc


def set_threads(n_threads: int | None) -> None:
    """Limit torch's intra-op CPU threads (the protocol's numberOfThreads)."""
    if n_threads is not None and n_threads > 0:
        torch.set_num_threads(int(n_threads))


def release_memory() -> None:
    """Hand the heap memory of freed temporaries back to the system (glibc's ``malloc_trim``;
    nothing elsewhere).

    glibc keeps freed blocks below its mmap threshold (which grows to 32 MB as large blocks are
    freed) for reuse. After an E-step that is hundreds of MB the process no longer uses (measured
    at box 128: 840 MB held, 340 MB live), on top of which the next phase's own peak would come.
    Called between phases (a few times an iteration): one call takes milliseconds.
    """
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)


# glibc's mallopt parameters and the thresholds its dynamic adjustment ends at on 64-bit systems
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20


@contextlib.contextmanager
def large_blocks_returned(threshold_bytes: int = 1 << 20):
    """Within the block, glibc maps blocks of ``threshold_bytes`` or more on their own and returns
    them to the system when they are freed (nothing elsewhere).

    For a phase that makes many large temporaries of varied sizes once (the M-step's grids and
    maps): freed into the heap they fragment it, and the next phase's peak comes on top
    (measured at box 128: the M-step's peak 35 MB lower, the next E-step's 55 MB). Outside the
    block the threshold is where glibc's own adjustment leads (32 MB, trimming at 64 MB): a
    phase that makes the same temporaries batch after batch (the E-step) reuses heap blocks
    instead of mapping and faulting in fresh pages each time.
    """
    mallopt = _libc("mallopt")
    if mallopt is None:
        yield
        return
    mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_MAX)
    mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes))
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)


@functools.lru_cache(maxsize=None)
def _libc(name: str):
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return getattr(libc, name)
    except (OSError, AttributeError):
        return None
