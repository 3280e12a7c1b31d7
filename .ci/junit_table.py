"""A table of pass/fail/skip counts per test file from JUnit XML files (one per run)."""
from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def counts(path: Path) -> dict:
    table = defaultdict(lambda: {"passed": 0, "failed": 0, "skipped": 0})
    for case in ET.parse(path).getroot().iter("testcase"):
        group = case.get("classname", "?").split(".")[-1]
        kinds = {child.tag for child in case}
        kind = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
        table[group][kind] += 1
    return table


def main(paths) -> None:
    runs = {Path(p).stem: counts(Path(p)) for p in paths if Path(p).exists()}
    groups = sorted({g for t in runs.values() for g in t})
    print("| tests | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    for g in groups + ["all"]:
        cells = []
        for t in runs.values():
            rows = t.values() if g == "all" else [t.get(g, {"passed": 0, "failed": 0, "skipped": 0})]
            p, f, s = (sum(r[k] for r in rows) for k in ("passed", "failed", "skipped"))
            cells.append(f"{p} passed" + (f", {f} failed" if f else "") + (f", {s} skipped" if s else ""))
        print(f"| {g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
