"""A trial's masks on disk: one compressed .npz file, 1 bit per weight.

Each mask is stored as its shape and its bits packed 8 to a byte (`numpy.packbits`), inside a
zip-deflated `.npz` (`numpy.savez_compressed`); loading needs numpy only, never unpickling. A
ResNet-20 mask set (0.27 M weights) takes about 34 kB before compression, and far less when sparse.
The file is written through `dsdtune.atomic`: a reader finds the old file or the new one, whole.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Union

import numpy as np
import torch

from ..atomic import write_atomic
from .masks import Masks

_SHAPE, _BITS = "shape::", "bits::"


def nonzero_masks(weights: Mapping[str, torch.Tensor]) -> Masks:
    """The masks a set of weights has: 1 where a weight is nonzero (what a trial ended with)."""
    return Masks({name: (w.detach() != 0).float().cpu() for name, w in weights.items()})


def save_masks(masks: Union[Masks, Mapping[str, torch.Tensor]], path: Union[str, Path]) -> Path:
    """Write masks (0/1 or bool tensors by parameter name) to `path` (.npz), atomically."""
    tensors = masks.tensors if isinstance(masks, Masks) else dict(masks)
    arrays = {}
    for name, mask in tensors.items():
        bits = mask.detach().cpu().numpy().astype(bool)
        arrays[_SHAPE + name] = np.asarray(bits.shape, dtype=np.int64)
        arrays[_BITS + name] = np.packbits(bits.ravel())
    # savez to an open file object keeps the name as given (a path would get ".npz" appended)
    return write_atomic(path, lambda handle: np.savez_compressed(handle, **arrays))


def load_masks(path: Union[str, Path]) -> Masks:
    """Masks written by `save_masks`, as 0/1 float tensors on the CPU."""
    tensors = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            if key.startswith(_SHAPE):
                name = key[len(_SHAPE):]
                shape = tuple(int(s) for s in data[key])
                count = int(np.prod(shape))
                bits = np.unpackbits(data[_BITS + name], count=count).astype(bool).reshape(shape)
                tensors[name] = torch.from_numpy(bits).float()
    return Masks(tensors)
