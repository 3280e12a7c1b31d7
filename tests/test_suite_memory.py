"""The suite's memory watch (tests/harness/suite_memory.py), which states the suite's peak in
every run: it must see memory that child processes allocate and keep file pages apart."""
from __future__ import annotations

import subprocess
import sys
import time

from harness.suite_memory import SuiteMemoryWatch

MIB = 1024 ** 2
CHILD_ANON_MIB = 400


def sample_beside_child(watch: SuiteMemoryWatch, code: str):
    """One sample while a child process that ran `code` (then printed 'ready') is alive."""
    proc = subprocess.Popen([sys.executable, "-c", f"{code}; print('ready', flush=True); import time; time.sleep(30)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        return watch.sample()
    finally:
        proc.kill()
        proc.wait()


def test_watch_sees_a_child_process_allocation_and_names_the_test():
    """A child process that touches 400 MiB raises the peak by about that much, under the name
    of the test that was running. Shown able to fail: counting only the test process (no
    children) in tree_memory -> the rise is ~0 and the first assertion fails."""
    watch = SuiteMemoryWatch()
    watch.current_test = "before"
    base = watch.sample().anon
    watch.current_test = "allocating child"
    seen = sample_beside_child(watch, f"b=bytearray({CHILD_ANON_MIB}*{MIB}); b[::4096]=b'x'*len(b[::4096])")
    assert seen.anon - base >= 0.95 * CHILD_ANON_MIB * MIB
    assert seen.anon - seen.own >= 0.95 * CHILD_ANON_MIB * MIB, "the child's share is not the test process's"
    assert seen.processes >= 2
    watch.current_test = "after"
    watch.sample()
    assert watch.peak.test == "allocating child"
    assert watch.heaviest(1)[0][0] == "allocating child"


def test_watch_keeps_mapped_file_pages_out_of_the_anonymous_figure(tmp_path):
    """Reading a 300 MiB file through mmap in a child adds file pages, not anonymous memory
    (model files are read that way; the kernel can drop them). Shown able to fail: adding
    RssFile to `anon` in tree_memory -> the anonymous rise is ~300 MiB and the test fails."""
    path = tmp_path / "weights.bin"
    with open(path, "wb") as f:
        f.truncate(300 * MIB)
    watch = SuiteMemoryWatch()
    base = watch.sample()
    seen = sample_beside_child(watch, f"import mmap; f=open({str(path)!r},'rb'); "
                               "m=mmap.mmap(f.fileno(),0,access=mmap.ACCESS_READ); s=sum(m[i] for i in range(0,len(m),4096))")
    assert seen.file - base.file >= 0.9 * 300 * MIB
    assert seen.anon - base.anon < 64 * MIB


def test_watch_thread_samples_while_tests_run():
    """Started, the watch samples on its own thread: a peak appears without calling sample().
    Shown able to fail: a _run loop that never samples -> peak stays None until stop()."""
    watch = SuiteMemoryWatch(interval_s=0.05).start()
    try:
        deadline = time.time() + 5
        while watch.peak is None and time.time() < deadline:
            time.sleep(0.05)
        assert watch.peak is not None and watch.peak.anon > 0
    finally:
        watch.stop()
    assert "peak anonymous resident memory" in watch.summary_lines()[0]
