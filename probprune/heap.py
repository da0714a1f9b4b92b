"""Returning freed heap memory to the OS (glibc only) after each scored mask and each streamed-compaction layer, so
peak memory stays at one mask (one layer) instead of growing."""

from __future__ import annotations


def _load_malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_heap() -> None:
    """Hand memory that is free in glibc's heap back to the OS (``malloc_trim(0)``); a no-op off glibc.

    Each mask's forward allocates weight slices and activations sized by that mask's widths. glibc keeps what they
    free for reuse, and across masks of different widths its heap fragments: on SmolLM2-135M a search's resident
    memory grew by ~100 MiB per step for the first steps, and its peak varied by 150 MiB from run to run. Trimming
    after each mask costs one walk of the free lists plus re-faulting the pages the next mask touches and bounds the
    peak to what one mask needs (``benchmarks/throughput.py`` prints both the speed and the peak-memory ratios).
    """
    trim = _MALLOC_TRIM
    if trim is not None:
        trim(0)


_MALLOC_TRIM = _load_malloc_trim()
