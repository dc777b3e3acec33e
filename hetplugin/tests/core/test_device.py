"""Device resolution and the heap handling between phases."""
import numpy as np
import pytest

from hetplugin.core.device import _libc, large_blocks_returned, release_memory, resolve_device


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def test_cuda_asked_for_without_cuda_says_so():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def _kept_after_a_temporary() -> tuple[int, int]:
    """(bytes held while a 24 MB temporary lives, bytes still held once it is freed)."""
    before = _rss_bytes()
    block = np.ones(3 << 20)
    held = _rss_bytes() - before
    del block
    return held, _rss_bytes() - before


@pytest.mark.skipif(_libc("mallopt") is None, reason="not glibc: the heap is left to the platform's allocator")
def test_large_blocks_freed_within_the_block_leave_the_process():
    """Outside the block glibc keeps a freed 24 MB block in the heap for reuse (its threshold is
    32 MB) until release_memory trims it; within it (1 MB) the block is given back at once."""
    with large_blocks_returned(1 << 20):
        pass
    release_memory()
    held, kept = _kept_after_a_temporary()
    assert held > 20 << 20 and kept > 20 << 20
    release_memory()
    with large_blocks_returned(1 << 20):
        held, kept = _kept_after_a_temporary()
    assert held > 20 << 20 and kept < 4 << 20
