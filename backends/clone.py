"""A new module tree that shares weight storage with the original but no module or
Parameter objects: moving or re-assigning weights on the copy never touches the source."""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn


def clone_tree(root: nn.Module,
               weight_source: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
               share: Iterable[object] = ()) -> nn.Module:
    """Deep-copies modules and small attributes; parameters become new Parameter objects
    over the same data, buffers are shared tensors. `weight_source(name, tensor)` may
    substitute the tensor a parameter starts from (e.g. an unpatched backup). Objects in
    `share` are referenced, not copied (e.g. back-references to a host's wrapper)."""
    memo = {id(obj): obj for obj in share}
    for name, param in root.named_parameters(remove_duplicate=False):
        if id(param) in memo:
            continue
        data = param.data if weight_source is None else weight_source(name, param.data)
        memo[id(param)] = nn.Parameter(data, requires_grad=param.requires_grad)
    for buf in root.buffers():
        memo[id(buf)] = buf
    return copy.deepcopy(root, memo)
