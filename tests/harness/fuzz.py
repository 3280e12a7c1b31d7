"""Shared settings and checks for the fuzz tests of the file readers.

By default each fuzz test runs a CI-sized number of cases; QUANTKIT_FUZZ_FULL=1 runs
FULL_CASES per test (the opt-in full run; an env var, not a marker, because .ci/test
selects markers with `-m "not gpu"` and would run a marked test anyway).
"""
from __future__ import annotations

import os
import tempfile
import tracemalloc
from datetime import timedelta

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

# hypothesis caches (unicode tables, constants) outside the checkout; no example database
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "quantkit-hypothesis"))
FULL = os.environ.get("QUANTKIT_FUZZ_FULL") == "1"
FULL_CASES = 10_000


def scratch_file(name: str) -> str:
    """A path in a folder of its own, removed when the test process ends: the file each
    fuzz case rewrites."""
    import atexit
    import shutil
    folder = tempfile.mkdtemp(prefix="quantkit-fuzz-")
    atexit.register(shutil.rmtree, folder, True)
    return os.path.join(folder, name)


def fuzz_settings(ci_cases: int):
    """ci_cases by default, FULL_CASES in the full run; a case over 5 s counts as a hang."""
    return settings(max_examples=FULL_CASES if FULL else ci_cases, database=None,
                    deadline=timedelta(seconds=5), derandomize=not FULL,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


NATIVE_SLACK = 32 << 20  # page granularity, allocator arenas and tracemalloc's own tables


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peaks(fn, *args):
    """(fn(*args), peak bytes of Python memory it took (tracemalloc: Python and numpy
    objects), peak growth of the process's resident memory while it ran (what torch or any
    C code allocated and touched: Linux's VmHWM, reset to the current RSS first)). fn runs
    twice, the RSS run first and without tracemalloc, whose own tables would count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    before = _status_bytes("VmRSS")
    fn(*args)
    native = _status_bytes("VmHWM") - before
    tracemalloc.start()
    try:
        return fn(*args), tracemalloc.get_traced_memory()[1], native
    finally:
        tracemalloc.stop()


# integers a corrupt header is likely to hold in a count, a length, an offset or a dim
def interesting_ints(size: int):
    return st.sampled_from([0, 1, 2, 3, 4, 7, 8, 31, 32, 33, 63, 64, 255, 256, 2**16, 2**31 - 1,
                            2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, size, size + 1,
                            size - 1, size // 2])


def mutations(data: bytes):
    """A strategy of bytes: `data` with 1-4 corruptions (bit flips, overwritten integers,
    cuts, deleted, inserted or repeated ranges)."""
    n = len(data)
    pos = st.integers(0, max(0, n - 1))
    op = st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(1, 255)),
        st.tuples(st.just("int"), pos, st.sampled_from([4, 8]), interesting_ints(n)),
        st.tuples(st.just("cut"), pos),
        st.tuples(st.just("delete"), pos, st.integers(1, 64)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("repeat"), pos, st.integers(1, 256)),
    )

    def apply(ops):
        out = bytearray(data)
        for o in ops:
            at = min(o[1], len(out))
            if o[0] == "flip" and at < len(out):
                out[at] ^= o[2]
            elif o[0] == "int":
                out[at:at + o[2]] = (o[3] % 2**(8 * o[2])).to_bytes(o[2], "little")
            elif o[0] == "cut":
                del out[at:]
            elif o[0] == "delete":
                del out[at:at + o[2]]
            elif o[0] == "insert":
                out[at:at] = o[2]
            elif o[0] == "repeat":
                out[at:at] = out[at:at + o[2]]
        return bytes(out)
    return st.lists(op, min_size=1, max_size=4).map(apply)
