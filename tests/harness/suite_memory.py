"""The suite's own memory watch: a background thread samples the resident memory of the test
process and every process it started (ComfyUI servers, workers) and remembers which test was
running at the peak. The terminal summary states the peak and the heaviest tests, so every
run of the suite says whether it still fits a 24 GB machine, and which test to look at if not.

Anonymous memory (RssAnon) is what counts: it is what the processes allocated and what runs a
machine out of memory; file pages (model files read through mmap) are shown apart, since the
kernel can drop them and several processes may share them."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import psutil

from .process_memory import resident_kib

SAMPLE_INTERVAL_S = 1.0
HEAVIEST_SHOWN = 8
GIB = 1024 ** 3


@dataclass
class Sample:
    anon: int  # bytes, all processes
    file: int  # bytes, all processes
    processes: int
    test: str
    own: int = 0  # anonymous bytes of the test process itself


def tree_memory(root_pid: int) -> tuple:
    """(anonymous bytes, file-backed bytes, process count, the root's own anonymous bytes) of
    a process and its descendants."""
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0, 0, 0
    anon = file = count = own = 0
    for proc in procs:
        try:
            kib = resident_kib(proc.pid)
        except (OSError, KeyError, ValueError):  # exited between listing and reading
            continue
        anon += kib.get("RssAnon", 0) * 1024
        file += (kib.get("RssFile", 0) + kib.get("RssShmem", 0)) * 1024
        count += 1
        if proc.pid == root_pid:
            own = kib.get("RssAnon", 0) * 1024
    return anon, file, count, own


@dataclass
class SuiteMemoryWatch:
    interval_s: float = SAMPLE_INTERVAL_S
    current_test: str = "(collection)"
    peak: Optional[Sample] = None
    per_test_peak: dict = field(default_factory=dict)  # nodeid -> largest anon bytes seen
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: Optional[threading.Thread] = None

    def sample(self) -> Sample:
        anon, file, count, own = tree_memory(os.getpid())
        s = Sample(anon, file, count, self.current_test, own)
        if self.peak is None or s.anon > self.peak.anon:
            self.peak = s
        if s.anon > self.per_test_peak.get(s.test, -1):
            self.per_test_peak[s.test] = s.anon
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> "SuiteMemoryWatch":
        self._thread = threading.Thread(target=self._run, name="suite-memory-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sample()

    def heaviest(self, n: int = HEAVIEST_SHOWN) -> list:
        return sorted(self.per_test_peak.items(), key=lambda kv: -kv[1])[:n]

    def summary_lines(self) -> list:
        if self.peak is None:
            return ["no memory sample was taken"]
        p = self.peak
        lines = [f"peak anonymous resident memory of the test process and its children: "
                 f"{p.anon / GIB:.1f} GiB ({p.processes} processes, the test process "
                 f"{p.own / GIB:.1f} GiB of it; file pages beside it {p.file / GIB:.1f} GiB), sampled every {self.interval_s:g} s, during {p.test}",
                 "heaviest tests (peak GiB while each ran):"]
        lines += [f"  {anon / GIB:5.1f}  {test}" for test, anon in self.heaviest()]
        return lines


class SuiteMemoryPlugin:
    """pytest hooks around a SuiteMemoryWatch (registered by tests/conftest.py)."""

    def __init__(self, watch: Optional[SuiteMemoryWatch] = None):
        self.watch = watch or SuiteMemoryWatch()

    def pytest_sessionstart(self, session):
        self.watch.start()

    def pytest_runtest_logstart(self, nodeid, location):
        self.watch.current_test = nodeid

    def pytest_sessionfinish(self, session, exitstatus):
        self.watch.stop()

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.section("suite memory")
        for line in self.watch.summary_lines():
            terminalreporter.write_line(line)
        log = os.environ.get("QUANTKIT_MEMORY_LOG")
        if log:
            with open(log, "a") as f:
                f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + "\n".join(self.watch.summary_lines()) + "\n")
