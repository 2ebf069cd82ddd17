"""The app's own process keeps the memory it frees, as CUDA's caching allocator does.

glibc's malloc gives blocks above its mmap threshold (at most 32 MB) back to the OS when they are
freed, and trims the top of its heap, so on CPU a training step page-faults its large tensors (a
lookup's output, its gradient) in again every step. ``train`` raises the threshold and the trim
point for its own process: freed memory stays for the next step. The library sets nothing (its
users' processes keep glibc's defaults); ``MULTIHASH_SYSTEM_MALLOC=1`` keeps them in the app too.
"""

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_ABOVE = 1 << 30  # blocks this large still come from mmap (whole tables), and go back when freed
_TRIM_ABOVE = 2**31 - 1  # (an int to mallopt)


def keep_freed_memory() -> bool:
    """Raises glibc's mmap threshold and trim point for this process; False where there is no glibc
    (another libc) or ``MULTIHASH_SYSTEM_MALLOC=1`` says to leave them."""
    if os.environ.get("MULTIHASH_SYSTEM_MALLOC") == "1":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_ABOVE)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE))
