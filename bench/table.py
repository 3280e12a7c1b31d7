"""The result table (plain text for the terminal, markdown for RESULTS.md)."""
from __future__ import annotations

from .step_profile import KINDS, OTHER

GIB = 2 ** 30


def _gib(v):
    return "" if v is None else f"{v / GIB:.2f}"


def _ms(v):
    return "" if v is None else f"{v * 1000:.1f}"


def _pct(v):
    if v is None:
        return ""
    return "nan" if v != v else f"{v * 100:.2f}"


def _status(rec) -> str:
    if rec.get("error"):
        return "unsupported: " + rec["error"]
    errs = rec.get("errors") or {}
    if errs:
        return "; ".join(f"{d}: {e}" for d, e in errs.items())
    return rec.get("skipped", "")


def denoiser_rows(records):
    by_model = {}
    for r in records:
        if r["part"] in ("denoiser", "encoder"):
            by_model.setdefault((r["part"], r["model"]), []).append(r)
    rows = []
    for (part, model), recs in by_model.items():
        ref = "bf16" if part == "denoiser" else "fp16"
        if part == "denoiser" and not any(r["format"] == ref for r in recs):
            ref = "fp32"  # a CPU run
        bases = {r["format"]: r["step"]["median_s"] for r in recs if r.get("step")}
        for r in recs:
            # compiled rows compare with the compiled reference
            base_t = bases.get(ref + (" compiled" if r["format"].endswith(" compiled") else ""))
            step = (r.get("step") or {}).get("median_s")
            err = r.get("rel_err") or {}
            n, h = err.get("normal", {}), err.get("heavy", {})
            g = r.get("gguf") or {}
            host = (r.get("step") or {}).get("host_s")
            rows.append([
                r.get("label", model), r["format"], _gib(r.get("weight_bytes")), _gib(r.get("step_peak_bytes")),
                _ms(step), "" if step is None or not base_t else f"{step / base_t:.2f}x", _ms(host),
                _kernels(r.get("kernels")),
                _pct(n.get("fp32")), _pct(n.get(ref)), _pct(h.get(ref)),
                "" if not r.get("quant_s") else f"{max(r['quant_s'].values()):.1f}",
                _gguf_load(g, step),
                _status(r)[:120]])
    return rows


def _gguf_load(g, step) -> str:
    """Load GGUF Model: seconds to read the file, and its step time against the same format
    made by Quantize Model."""
    if "load_s" not in g:
        return ""
    loaded = (g.get("step") or {}).get("median_s")
    ratio = f", step {loaded / step:.2f}x" if loaded and step else ""
    return f"{g['load_s']:.1f}{ratio}"


def _kernels(counts) -> str:
    """Which linear kernels ran during the timed steps (share of calls)."""
    if not counts:
        return ""
    total = sum(counts.values())
    return ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


HEAD = ["model", "format", "weights GiB", "step peak GiB", "ms/step", "vs ref", "host ms", "kernels",
        "err% vs fp32 (N)", "err% vs ref (N)", "err% vs ref (t3)", "quant s", "gguf load s, step vs quantized", "status"]


def pipeline_rows(records):
    rows = []
    for r in records:
        if r["part"] not in ("pipeline", "lowvram"):
            continue
        rows.append([r["part"], r.get("label", r["model"]), r["format"], _gib(r.get("peak_bytes")),
                     ", ".join(f"{k} {_gib(v)}" for k, v in (r.get("phase_peak_bytes") or {}).items()),
                     _ms(r.get("step_s")), "" if r.get("total_s") is None else f"{r['total_s']:.1f}",
                     r.get("note", ""), _status(r)[:120]])
    return rows


PHEAD = ["part", "model", "format", "peak GiB", "phase peaks GiB", "ms/step", "total s", "note", "status"]


def profile_rows(records):
    """Where the step time went: wall and busy time, then the kinds in a fixed order."""
    rows = []
    for r in records:
        p = r.get("profile")
        if not p:
            continue
        kinds = p["kinds_ms"]
        rows.append([r.get("label", r["model"]), r["format"], f"{p['wall_ms']:.1f}", f"{p['busy_ms']:.1f}"]
                    + [f"{kinds.get(k, 0.0):.1f}" for k in PROFILE_KINDS])
    return rows


PROFILE_KINDS = [kind for kind, _ in KINDS] + [OTHER]
PRHEAD = ["model", "format", "wall ms (profiled)", "busy ms"] + [f"{k} ms" for k in PROFILE_KINDS]


def _text(head, rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    line = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _md(head, rows) -> str:
    esc = lambda x: str(x).replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(esc(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


def render(merged, markdown: bool = False) -> str:
    fmt = _md if markdown else _text
    parts = []
    rows = denoiser_rows(merged["records"])
    if rows:
        parts.append(fmt(HEAD, rows))
    prow = pipeline_rows(merged["records"])
    if prow:
        parts.append(fmt(PHEAD, prow))
    frow = profile_rows(merged["records"])
    if frow:
        parts.append(fmt(PRHEAD, frow))
    return "\n\n".join(parts) if parts else "(no records)"
