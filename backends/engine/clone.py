"""A new module tree that shares weight storage with the original but no module or
Parameter objects: moving or re-assigning weights on the copy never touches the source.

Only the tree's structure is new. Every other attribute (configuration objects, callables,
host bookkeeping) is shared by reference, never deep-copied: a copy of an object that owns
native resources (pinned buffers, handles) would free them twice. Attributes a host keeps
about a module's loaded state can be left out with `drop`."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

WeightSource = Callable[[str, torch.Tensor], torch.Tensor]

# nn.Module's own containers besides _parameters and _modules (rebuilt below): copied one
# level so the copy can gain or lose buffers and hooks without the source seeing it.
_MODULE_CONTAINERS = ("_buffers", "_non_persistent_buffers_set",
                      "_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                      "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
                      "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
                      "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                      "_forward_pre_hooks_with_kwargs")


def clone_tree(root: nn.Module, weight_source: Optional[WeightSource] = None,
               drop: Callable[[str], bool] = lambda name: False) -> nn.Module:
    """Parameters become new Parameter objects over the same data (tied ones stay tied);
    buffers are the same tensors. `weight_source(name, tensor)` may substitute the tensor
    a parameter starts from (e.g. an unpatched backup). Instance attributes whose name
    `drop(name)` accepts are not carried over (a class attribute of that name then applies)."""
    new_params: dict = {}
    new_modules: dict = {}
    param_names = {id(p): name for name, p in root.named_parameters(remove_duplicate=True)}

    def new_param(param: nn.Parameter) -> nn.Parameter:
        if id(param) not in new_params:
            name = param_names.get(id(param), "")
            data = param.data if weight_source is None else weight_source(name, param.data)
            new_params[id(param)] = nn.Parameter(data, requires_grad=param.requires_grad)
        return new_params[id(param)]

    def copy_module(module: nn.Module) -> nn.Module:
        if id(module) in new_modules:  # a module reachable twice stays one module
            return new_modules[id(module)]
        new = module.__class__.__new__(module.__class__)
        new_modules[id(module)] = new
        state = {k: v for k, v in module.__dict__.items() if not drop(k)}
        for k in _MODULE_CONTAINERS:
            if k in state:
                state[k] = type(state[k])(state[k])
        state["_parameters"] = {k: None if p is None else new_param(p)
                                for k, p in module._parameters.items()}
        state["_modules"] = {k: None if c is None else copy_module(c)
                             for k, c in module._modules.items()}
        new.__dict__.update(state)
        return new

    try:
        return copy_module(root)
    finally:  # copy_module refers to itself (a cycle): it must not keep the copy alive until gc
        new_modules.clear()
        new_params.clear()
