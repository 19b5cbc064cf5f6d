"""Seeds and derived generators: one integer seed per trial, sub-streams for each use of randomness.

A trial's seed seeds the global generators once (the model's own init, dropout); everything else
draws from a generator of its own derived from (seed, stream...): each phase's data order from
(seed, phase index), a sparse init's mask positions and values from their streams, so two arms that
share a prefix see the same data and differ only where their settings differ. Imports nothing of
dsdtune.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def derive_seed(seed: int, *stream: int) -> int:
    """A 63-bit seed for a sub-stream (e.g. (seed, phase index)); stable across processes."""
    value = seed & 0xFFFFFFFFFFFF
    for s in stream:
        # splitmix64-style mixing: neighbouring (seed, phase) pairs give unrelated streams.
        value = (value * 0x9E3779B97F4A7C15 + s + 1) & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
        value = (value * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 29
    return value & 0x7FFFFFFFFFFFFFFF


def generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator for the sub-stream (seed, *stream)."""
    return torch.Generator().manual_seed(derive_seed(seed, *stream))


def seed_everything(seed: int) -> None:
    """Seed the global generators (model init, dropout); data order uses its own generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
