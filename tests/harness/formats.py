"""Facts about the formats that the tests share (their tolerances: tolerances.py)."""
FLOAT8_FORMATS = {"torchao:fp8wo", "torchao:fp8dq", "quanto:fp8"}  # e4m3: 3 mantissa bits
# formats that also round the activations to 8 bits (W8A8, fp8 row-wise, LLM.int8)
ACTIVATION_QUANTIZED = {"torchao:int8dq", "torchao:fp8dq", "bnb:int8"}


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
