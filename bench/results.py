"""One JSON result per run: metadata plus records, rewritten after every record so that a
run stopped at its time limit keeps what it measured. Several files merge by key."""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path


class ResultFile:
    def __init__(self, path: Path, meta: dict):
        self.path = Path(path)
        self.data = {"meta": meta, "records": []}
        self._index = {}
        self.save()

    def record(self, part: str, model: str, fmt: str) -> dict:
        """The record for (part, model, format), created empty on first use."""
        key = (part, model, fmt)
        if key not in self._index:
            rec = {"part": part, "model": model, "format": fmt}
            self._index[key] = rec
            self.data["records"].append(rec)
        return self._index[key]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def base_meta(command: str, device: str, versions: dict, parts, full: bool) -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device, "versions": versions, "command": command, "parts": list(parts),
            "sizes": "full" if full else "reduced (CPU smoke)"}


def load_merged(paths) -> dict:
    """Records of several result files (later files win per key); metadata of each kept."""
    metas, by_key = [], {}
    for p in paths:
        data = json.loads(Path(p).read_text())
        metas += data["metas"] if "metas" in data else [data["meta"]]  # merged files merge again
        for rec in data["records"]:
            key = (rec["part"], rec["model"], rec["format"])
            merged = by_key.setdefault(key, {})
            if rec.get("step") or rec.get("rel_err") or rec.get("step_s"):
                for stale in ("skipped", "errors", "error"):  # a later measurement replaces them
                    if stale not in rec:
                        merged.pop(stale, None)
            merged.update(rec)
    return {"metas": metas, "records": list(by_key.values())}
