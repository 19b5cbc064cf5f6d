"""Starting from trained weights (`init.checkpoint`): load a state_dict file into a freshly built model.

It replaces the model's own init, so it sits beside the init schemes (`init.py`); a trained model is
then pruned by the flow's first S phase. Files load with `torch.load(weights_only=True)`. Every
mismatch is a one-line `SpecError` naming `init.checkpoint` and the first bad key.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..config import SpecError

FIELD = "init.checkpoint"


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a state_dict file into `model` (weights_only); a mismatch is one line naming the first bad key.

    Accepts `torch.save(model.state_dict(), path)`, a {"state_dict": ...} wrapper, or a dsdtune pipeline
    checkpoint (its "model" entry). Keys and shapes must match the model exactly.
    """
    if not os.path.isfile(path):
        raise SpecError(f"{FIELD}: {path} does not exist; give a path relative to the study file, or an absolute one")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SpecError(f"{FIELD}: {path} cannot be read with torch.load(weights_only=True) "
                        f"({type(err).__name__}); save it with torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise SpecError(f"{FIELD}: {path} is not a state_dict of tensors; save it with "
                        f"torch.save(model.state_dict(), path)")
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise SpecError(f"{FIELD}: {path} has no {key!r}, which the model has (shape {list(tensor.shape)}); "
                            f"was it saved from this task.model with these model_args?")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise SpecError(f"{FIELD}: {key!r} has shape {list(state[key].shape)} in {path} but "
                            f"{list(tensor.shape)} in the model; check task.model_args and the dataset's classes")
    extra = [k for k in state if k not in expected]
    if extra:
        raise SpecError(f"{FIELD}: {path} holds {extra[0]!r}, which the model does not have "
                        f"({len(extra)} such key(s)); was it saved from this task.model?")
    model.load_state_dict(state)


def load_init_checkpoint(model: nn.Module, init: Any) -> None:
    """Apply `init.checkpoint` (if set) to a freshly built model; it replaces the model's own init."""
    path = getattr(init, "checkpoint", None)
    if not path:
        return
    if init.density != "dense" or init.weights != "base":
        raise SpecError(f"{FIELD}: starts from trained weights, so leave init.density: dense and "
                        "init.weights: base; prune the trained model with an S phase (flow SD, SDSD)")
    load_checkpoint(model, path)
