"""Resident memory of a process, measured so that repeated runs can be compared: after a
garbage collection and, in this process, glibc's malloc_trim (freed heap goes back to the
system instead of staying as allocator slack that would read as a leak)."""
from __future__ import annotations

import ctypes
import gc
import os
import time

import psutil

SOAK_RUNS_ENV = "QUANTKIT_SOAK_RUNS"


def soak_runs(default: int = 3) -> int:
    """How many times a soak test repeats its run: QUANTKIT_SOAK_RUNS (the full run: 20), else
    a CI-sized default."""
    return max(2, int(os.environ.get(SOAK_RUNS_ENV, default)))


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the bound then has to absorb the slack
        pass


def collected_rss() -> int:
    """This process's RSS in bytes after gc and a heap trim."""
    gc.collect()
    _trim_heap()
    return psutil.Process().memory_info().rss


# ComfyUI's prompt worker collects garbage after a prompt at most every 10 s, and only
# after it has stored the prompt's history entry (which is what the test waits for).
COMFY_GC_INTERVAL_S = 10.0


def resident_kib(pid: int) -> dict:
    """RssAnon, RssFile, RssShmem of /proc/<pid>/status, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.startswith("Rss"):
                out[key] = int(value.split()[0])
    return out


def anonymous_rss(pid: int) -> int:
    """Resident anonymous memory in bytes: what a leak grows. The rest of RSS is pages of
    mapped files (libraries, model files read through mmap), which the kernel may drop and
    re-read at any time."""
    return resident_kib(pid)["RssAnon"] * 1024


# glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, so later
# tensors come from the heap and stay resident after they are freed: a ComfyUI server's
# anonymous RSS then climbs by gigabytes over identical runs with nothing leaked (measured:
# even without QuantKit). A fixed threshold returns freed tensors to the system; what stays
# is what is still referenced. Users can set it too.
RETURN_FREED_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def settled_server_memory(pid: int) -> int:
    """A ComfyUI server's anonymous RSS once its prompt worker has collected garbage after
    a prompt."""
    time.sleep(COMFY_GC_INTERVAL_S + 1.0)
    return anonymous_rss(pid)


def live_objects(cls) -> int:
    """Objects of `cls` (or a subclass) still alive after a collection."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, cls))


def growth_after_first(samples: list) -> int:
    """The largest rise of any later sample over the first one (bytes; 0 if none rose)."""
    return max(0, max(samples[1:]) - samples[0])
