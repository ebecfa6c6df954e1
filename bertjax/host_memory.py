"""Keep the host memory XLA:CPU frees between steps inside the process, so the next step reuses it.

XLA's CPU runtime allocates each execution's temporaries as one buffer (746 MB for the tiny seq2seq
step at 32 x 128, ~4 GB at small) through glibc's `malloc`, from a worker thread. glibc serves a request
that large with a fresh `mmap` and gives it back with `munmap` when the step ends, so every step faults
in every page of its temporaries again: the kernel zero-fills them, and on a virtual machine whose host
reclaims freed guest memory (free page reporting, as on Firecracker) it must back them again as well,
which after a few seconds' pause costs ~20x more per page (experiments/seq2seq_train_speed/README.md).

`keep()` asks glibc, through `mallopt`, to keep freed memory: one arena for all threads
(`M_ARENA_MAX=1`; glibc's per-thread arenas `mmap` large blocks whatever `M_MMAP_MAX` says), no
`mmap` for large blocks (`M_MMAP_MAX=0`) and no trimming of the heap (`M_TRIM_THRESHOLD`: never). The
training step then takes no page faults once the heap has grown to hold it.

The price is memory. The heap keeps its peak, and a freed temporary buffer that a small allocation
lands in cannot take the next step's buffer, so the heap grows by a few temporaries' worth in the first
steps and then settles (tiny seq2seq pretraining, 200 steps with evaluations and checkpoints: peak
resident memory 3.7 GB against 1.7 GB, wall time 3:24 against 4:41). So the trainers call
`release_if_tight()` after their first step and again whenever they log: once the process holds more than
a third of the machine's memory, glibc goes back to its defaults and the freed memory back to the system.

`keep()` must run before the threads that allocate exist (a thread keeps the arena it was first given),
so `bertjax.cli.main` calls it before JAX is imported. `BERTJAX_KEEP_HOST_MEMORY=0` turns it off. Outside
glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

ENV = "BERTJAX_KEEP_HOST_MEMORY"
# glibc's defaults, restored by release_if_tight (the trim threshold's default is 128 KiB).
DEFAULT_MMAP_MAX = 65536
DEFAULT_TRIM_THRESHOLD = 128 * 1024

log = logging.getLogger(__name__)
_kept = False


def _libc():
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on
        libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        return libc
    except (OSError, AttributeError):  # no mallopt: not glibc
        return None


def keep() -> bool:
    """Set glibc's malloc to keep freed memory (module docstring). Returns whether it was applied."""
    global _kept
    libc = _libc()
    if libc is None or os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    # -1 as M_TRIM_THRESHOLD is SIZE_MAX to glibc: the heap's top is never given back. Each setting is
    # tried (a list, not all()'s short circuit), so what glibc accepts is applied whatever it refuses.
    accepted = [libc.mallopt(option, value) == 1 for option, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))]
    if not all(accepted):
        log.warning("glibc refused %d of the 3 malloc settings that keep freed memory (bertjax.host_memory)", accepted.count(False))
    _kept = any(accepted)  # release_if_tight must undo what was applied
    return all(accepted)


def _resident_and_total_bytes() -> tuple[int, int]:
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as statm:
        resident = int(statm.read().split()[1]) * page
    return resident, os.sysconf("SC_PHYS_PAGES") * page


def release_if_tight(fraction: float = 1 / 3) -> bool:
    """After keep(): if this process holds more than `fraction` of the machine's memory, undo it. Returns whether it did."""
    global _kept
    if not _kept:
        return False
    resident, total = _resident_and_total_bytes()
    if resident <= fraction * total:
        return False
    libc = _libc()
    libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
    libc.malloc_trim(0)
    _kept = False
    log.warning(
        "this process holds %.1f of the machine's %.1f GiB, so freed memory goes back to the system from now on "
        "(slower steps on CPU, no growth; bertjax.host_memory)", resident / 2**30, total / 2**30,
    )
    return True
