"""Fit to a VRAM budget (issue 12): the per-layer mix Fit Model to VRAM Budget chooses
against every single format of its candidate list, by output error vs fp32 at the same
bytes, on stand-in SDXL and PixArt models with N(0, 0.02) and Student-t(3) weights.

  python -m bench.fit_budget                       # CPU: reduced stand-ins (specs()), latent 48
  python -m bench.fit_budget --full --latent 128   # GPU: real SDXL / PixArt-Sigma at 1024²

Rows: budgets of 25, 35 and 50 % of the model's bf16 size (the mix against the best single
format that fits the same budget), and the mix at exactly each single format's bytes (the
issue's target: at equal bytes, lower error than any single format).

The calibration runs as the node runs it (measure_model: a short euler run with a random
prompt through ComfyUI's sampler, then the gradient replays). The evaluation input is
another draw (bench.models.denoiser_inputs, seed 0), so the choice is not judged on the
data it was made from. Each layer is quantized once per format while measuring; every
variant is assembled from those parts, which are the bytes Quantize Model and the node
produce (--check confirms it through both nodes for one format and one budget).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench import comfy_env, models  # noqa: E402
from bench.measure import free, rel_error  # noqa: E402
from bench.standins import components  # noqa: E402
from bench.weights import fill_state_dict  # noqa: E402

BUDGETS = (0.25, 0.35, 0.50)  # of the bf16 size
STEPS = 4


def _reduced_sdxl() -> dict:
    """Real SDXL widths (320/640/1280, context 2048), one res block per level and one
    transformer block per attention level: 436M parameters instead of 2.57B."""
    c = copy.deepcopy(components.SDXL_UNET)
    c.update(num_res_blocks=[1, 1, 1], transformer_depth=[0, 1, 1], transformer_depth_middle=1,
             transformer_depth_output=[0, 0, 1, 1, 1, 1])
    return c


def specs(full: bool, latent: int, smoke: bool = False) -> dict:
    real = models.denoisers(True)
    if smoke:  # code paths only: narrow SDXL, PixArt of 2 blocks
        small = models.denoisers(False)["sdxl"]
        return {"sdxl": replace(small, latent=latent),
                "pixart": replace(real["pixart"], label="PixArt-Sigma (depth 2)",
                                  config=components.pixart_sigma_unet(2), latent=latent)}
    if full:
        return {k: replace(real[k], latent=latent) for k in ("sdxl", "pixart")}
    return {"sdxl": replace(real["sdxl"], label="SDXL UNet (1 res block a level, 436M)",
                            config=_reduced_sdxl(), latent=latent),
            "pixart": replace(real["pixart"], label="PixArt-Sigma (depth 6 of 28, 144M)",
                              config=components.pixart_sigma_unet(6), latent=latent)}


def _mod(sub):
    return importlib.import_module(f"{comfy_env.PACK_NAME}.{sub}")


POOLED = {"SDXL": 1280}  # CLIP-G's pooled output; SDXL adds its size embeddings to make y (2816)


def conditioning(spec, device, seed: int):
    """A random prompt as CONDITIONING: context tokens, and the pooled output where the
    model takes one."""
    g = torch.Generator(device=device).manual_seed(seed)
    context = torch.randn(1, spec.tokens, spec.context_dim, generator=g, device=device)
    pooled = POOLED.get(spec.class_name, spec.y_dim)
    extra = {"pooled_output": torch.randn(1, pooled, generator=g, device=device)} if pooled else {}
    return [[context, extra]]


class Variants:
    """Models assembled from the measured parts: one format per searched layer."""

    def __init__(self, source, measured, parts, recipe: str):
        self.source = source
        self.recipe = recipe
        self.measured = measured
        self.parts = parts
        self.options = {c.name: {o.format_id: o for o in c.options} for c in measured.layers}

    def nbytes(self, plan: dict) -> int:
        return self.measured.fixed_bytes + sum(self.options[n][f].nbytes for n, f in plan.items())

    def uniform(self, format_id: str) -> dict:
        """What Quantize Model does with one format (plan_layer: fallbacks, final projection)."""
        quantize, registry = _mod("backends.engine.quantize"), _mod("backends.engine.registry")
        recipe = _mod("backends.engine.recipes").get_recipe(self.recipe)
        adapter, spec = registry.get_format(format_id)
        dm = self.source.model.diffusion_model
        plan = {}
        for c in self.measured.layers:
            action, use, _ = quantize.plan_layer(c.name, dm.get_submodule(c.name), adapter, spec, recipe, None)
            plan[c.name] = None if use is None else use.id
        return plan

    def model(self, plan: dict):
        clone, modules = _mod("backends.engine.clone"), _mod("backends.engine.modules")
        registry, patcher = _mod("backends.engine.registry"), _mod("nodes.comfy_patcher")
        layers = _mod("nodes.comfy_layers").LAYER_CLASSES
        root = clone.clone_tree(self.source.model)
        dm = root.diffusion_model
        for name, fmt in plan.items():
            if fmt is None:
                continue
            module = dm.get_submodule(name)
            adapter, spec = registry.get_format(fmt)
            new = modules.make_quantized(module, adapter, spec, self.parts[(name, fmt)], module.bias, layers)
            parent, _, attr = name.rpartition(".")
            setattr(dm.get_submodule(parent) if parent else dm, attr, new)
        return patcher.new_quantized_patcher(self.source, root)


def run_model(env, spec, dist, device, check: bool) -> list:
    fit_layers, fit_plan = _mod("backends.engine.fit_layers"), _mod("backends.engine.fit_plan")
    calibration, errors = _mod("nodes.budget_calibration"), _mod("backends.engine.errors")
    fit_node = _mod("nodes.fit_model_to_budget")
    recipes = _mod("backends.engine.recipes")
    meta = models.meta_state_dict(spec)
    sd = fill_state_dict(meta, dist, device)
    inputs = models.denoiser_inputs(spec, 2, device)
    ref_model = models.build_diffusion(env, spec, sd, torch.float32, device)
    ref = _output(ref_model, inputs)
    del ref_model
    free(device)
    # bf16 as on a GPU, also on a CPU (its kept layers then take the bytes they take there)
    source = models.build_diffusion(env, spec, sd, torch.bfloat16, device)
    _mod("nodes.comfy_patcher").settle_stored_dtypes(source.model)  # Dynamic VRAM keeps the fp32 draw
    del sd
    free(device)
    formats = fit_layers.default_candidates(device)
    recipe = recipes.get_recipe(spec.recipe)
    parts = {}

    def keep(name, fmt, p):
        parts[(name, fmt)] = {k: v.to(device) for k, v in p.items()}

    start = time.perf_counter()
    latent = {"samples": torch.zeros(1, spec.channels, spec.latent, spec.latent)}
    with torch.inference_mode():
        measured = calibration.measure_model(source, conditioning(spec, device, 1), conditioning(spec, device, 2),
                                             latent, STEPS, 0, formats, recipe, None, device, on_parts=keep)
    measure_s = time.perf_counter() - start
    v = Variants(source, measured, parts, spec.recipe)
    size16 = fit_node.size_at_16_bits(source.model.diffusion_model)
    base = {"model": spec.key, "label": spec.label, "dist": dist, "latent": spec.latent,
            "bf16_bytes": size16, "measure_s": measure_s,
            "bf16_err": rel_error(_output(source, inputs), ref)}  # the floor: no layer quantized
    sys.modules["comfy.model_management"].unload_all_models()
    singles = {}
    for fmt in formats:
        plan = v.uniform(fmt)
        singles[fmt] = {"bytes": v.nbytes(plan), "err": _output_error(v, plan, inputs, ref)}
        print(f"  {spec.key} {dist} {fmt}: {singles[fmt]['bytes'] / size16:.3f} of bf16, "
              f"error {singles[fmt]['err']:.5f}", flush=True)
    rows = []

    def mix(target):
        plan = fit_plan.plan_fit(measured.layers, measured.kept, measured.fixed_bytes, target,
                                   measured.output_energy, formats)
        assert v.nbytes(plan.formats) == plan.nbytes
        return plan, _output_error(v, plan.formats, inputs, ref)

    for share in BUDGETS:
        target = int(size16 * share)
        row = dict(base, kind="budget", budget=share, budget_bytes=target)
        fitting = {f: s for f, s in singles.items() if s["bytes"] <= target}
        if fitting:
            best = min(fitting, key=lambda f: fitting[f]["err"])
            row.update(single=best, single_bytes=fitting[best]["bytes"], single_err=fitting[best]["err"])
        try:
            plan, err = mix(target)
            row.update(mix_bytes=plan.nbytes, mix_err=err, estimated=plan.estimated_error,
                       mix_formats=plan.layers_by_format())
        except errors.BudgetUnreachable as exc:
            row.update(unreachable=exc.smallest)
        rows.append(row)
        print(f"  {row}", flush=True)
    for fmt, s in singles.items():
        row = dict(base, kind="equal_bytes", single=fmt, single_bytes=s["bytes"], single_err=s["err"])
        plan, err = mix(s["bytes"])
        row.update(mix_bytes=plan.nbytes, mix_err=err, estimated=plan.estimated_error,
                   mix_formats=plan.layers_by_format())
        rows.append(row)
        print(f"  {fmt}: single {s['err']:.5f} mix {err:.5f} ({plan.nbytes} <= {s['bytes']})", flush=True)
    if check:
        at_q4k = next(r for r in rows if r["kind"] == "equal_bytes" and r["single"] == "gguf:Q4_K")
        rows.append(dict(base, kind="check", **_check(env, v, source, spec, device, inputs, ref, singles,
                                                      latent, at_q4k)))
    del v, parts, measured, source
    free(device)
    return rows


def _check(env, v, source, spec, device, inputs, ref, singles, latent, mix_at_q4k) -> dict:
    """The assembled variants against the nodes' own output (same bytes, same error): Quantize
    Model with gguf:Q4_K, and the Fit node at Q4_K's bytes."""
    nodes = env.pack.nodes.NODE_CLASS_MAPPINGS
    fmt = "gguf:Q4_K"
    with torch.inference_mode():
        q = nodes["QuantKitQuantizeModel"]().quantize(source, fmt, spec.recipe, "", "auto")["result"][0]
    q_report = q.model.quantkit_reports[-1]
    out = {"quantize_model_bytes": q_report.bytes_after, "assembled_bytes": singles[fmt]["bytes"],
           "quantize_model_err": rel_error(_output(q, inputs), ref), "assembled_err": singles[fmt]["err"]}
    del q
    with torch.inference_mode():
        f = nodes["QuantKitFitModelToBudget"]().fit(source, conditioning(spec, device, 1), latent,
                                                    "GiB", singles[fmt]["bytes"] / 2**30,
                                                    negative=conditioning(spec, device, 2))["result"][0]
    out.update(node_fit_bytes=f.model.quantkit_reports[-1].bytes_after,
               node_fit_err=rel_error(_output(f, inputs), ref),
               assembled_fit_bytes=mix_at_q4k["mix_bytes"], assembled_fit_err=mix_at_q4k["mix_err"])
    return out


def _output(patcher, inputs):
    env_mm = sys.modules["comfy.model_management"]
    env_mm.load_models_gpu([patcher])
    with torch.inference_mode():
        out = models.raw_output(models.step(patcher, inputs), inputs).float().cpu()
    return out


def _output_error(v, plan, inputs, ref) -> float:
    patcher = v.model(plan)
    try:
        return rel_error(_output(patcher, inputs), ref)
    finally:
        sys.modules["comfy.model_management"].unload_all_models()
        del patcher


def table(rows) -> str:
    def pct(b, ref):
        return f"{100 * b / ref:5.1f}%"
    lines = ["model   weights  budget   single format (bytes, error)        mix (bytes, error, est.)       mix/single"]
    floors = set()
    for r in rows:
        if r["kind"] == "check":
            continue
        name = f"{r['model']:7} {r['dist']:7}"
        if "bf16_err" in r and name not in floors:  # results before 2026-12-06 GPU have none
            floors.add(name)
            lines.append(f"{name}   100%  bf16 (nothing quantized)  {100 * r['bf16_err']:6.2f}%")
        if r["kind"] == "budget":
            head = f"{name}  {pct(r['budget_bytes'], r['bf16_bytes'])}"
        else:
            head = f"{name}  ={r['single']:>10}"
        single = (f"{r['single']:11} {pct(r['single_bytes'], r['bf16_bytes'])} {100 * r['single_err']:6.2f}%"
                  if r.get("single") else "none fits".ljust(27))
        if "unreachable" in r:
            mix = f"unreachable: smallest {pct(r['unreachable'], r['bf16_bytes'])}"
            ratio = ""
        else:
            mix = (f"{pct(r['mix_bytes'], r['bf16_bytes'])} {100 * r['mix_err']:6.2f}% "
                   f"(est. {100 * r['estimated']:5.2f}%)")
            ratio = f"{r['mix_err'] / r['single_err']:.2f}" if r.get("single_err") else ""
        lines.append(f"{head}  {single:35} {mix:30} {ratio}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="pixart,sdxl")
    ap.add_argument("--dists", default="normal,heavy")
    ap.add_argument("--full", action="store_true", help="real sizes (needs a GPU's speed)")
    ap.add_argument("--latent", type=int, default=None, help="latent size (default: 32 CPU, 128 full)")
    ap.add_argument("--check", action="store_true", help="also through the nodes, once per model")
    ap.add_argument("--smoke", action="store_true", help="tiny models: the code paths only")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", type=Path, nargs="+", help="only print the table of these result files")
    args = ap.parse_args(argv)
    if args.table:
        print(table([r for p in args.table for r in json.loads(p.read_text())["rows"]]))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = comfy_env.start(cpu=device.type == "cpu")
    latent = args.latent or (128 if args.full else 48)  # PixArt needs 40 or more
    chosen = specs(args.full, latent, args.smoke)
    out = args.out or Path(__file__).resolve().parent / "results" / f"fit-budget-{time.strftime('%Y%m%d-%H%M%S')}.json"
    result = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M"), "device": comfy_env.device_name(),
                       "versions": comfy_env.versions(env), "command": " ".join(sys.argv),
                       "sizes": "full" if args.full else "reduced"}, "rows": []}
    for key in args.models.split(","):
        for i, dist in enumerate(args.dists.split(",")):
            result["rows"] += run_model(env, chosen[key], dist, device, check=args.check and i == 0)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"\nresults: {out}")
    print(table(result["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
