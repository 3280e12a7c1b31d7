"""Per-format expectations shared by the tests: relative error bounds on heavy-tailed
weights (Student-t, 3 dof, std 0.02) for one denoiser call, by format id. A format without
an entry fails the tests until someone states its bound."""

# Denoiser output vs the unquantized model on the same inputs (tiny SD3, heavy-tailed).
OUTPUT_TOLERANCE = {
    "torchao:int8wo": 0.03, "torchao:int8dq": 0.04, "torchao:fp8wo": 0.05, "torchao:fp8dq": 0.08,
    "torchao:int4wo": 0.25,
    "bnb:nf4": 0.25, "bnb:nf4dq": 0.25, "bnb:fp4": 0.35, "bnb:fp4dq": 0.35, "bnb:int8": 0.05,
    "quanto:int8": 0.03, "quanto:fp8": 0.06, "quanto:int4": 0.25,
    "gguf:Q8_0": 0.03, "gguf:Q6_K": 0.06, "gguf:Q5_K": 0.1, "gguf:Q5_1": 0.1, "gguf:Q5_0": 0.12,
    "gguf:Q4_K": 0.2, "gguf:Q4_1": 0.2, "gguf:Q4_0": 0.25, "gguf:Q3_K": 0.35, "gguf:Q2_K": 0.7,
}


def cpu_format_ids(registry, hardware_problem):
    import torch
    out = []
    # a backend whose package is missing keeps its formats here: their tests fail, saying
    # which package to install, rather than the parametrisation shrinking unnoticed
    for adapter in registry.adapters().values():
        for spec in adapter.formats.values():
            if not spec.read_only and hardware_problem(spec, torch.device("cpu")) is None:
                out.append(spec.id)
    return out
