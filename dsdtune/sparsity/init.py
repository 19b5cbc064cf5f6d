"""An init scheme = a density allocator x a weight scheme -> initial weights and masks.

The allocator decides how dense each layer is (uniform, ERK, SNIP, GraSP, SynFlow); the weight
scheme decides where the kept weights sit and what values they start with:
- base: the model's own init times a random mask with exactly round(d * N) ones per layer;
- eoi:  exact orthogonal (random Givens rotations; delta-orthogonal for convs), whose support is
        the mask;
- ai:   the base mask, weights optimised towards isometry (only approximately orthogonal).
Only the allocator's per-layer densities are kept from SNIP/GraSP/SynFlow (the EOI paper's way).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import InitSpec, SpecError
from .density import ALLOCATORS, allocate, eoi_min_density
from .masks import Masks, kept_count
from .orthogonal import approximate_isometry, eoi_mask_and_weight

INIT_STREAM = 1_000_003  # generator stream for init, apart from the data-order streams


def scoring_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, per_class: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """About `per_class` random training samples of every class (SNIP/GraSP's small batch)."""
    order = torch.randperm(y.shape[0], generator=generator).to(y.device)
    picked = torch.cat([order[y[order] == c][:per_class] for c in range(num_classes)])
    return x[picked], y[picked]


def layer_densities(model: nn.Module, prunable: dict[str, nn.Parameter], spec: InitSpec, data,
                    generator: torch.Generator) -> dict[str, float]:
    if spec.density == "dense":
        return {name: 1.0 for name in prunable}
    options = {k: v for k, v in spec.options.items() if k in ("temperature", "sign", "rounds", "variant", "rescale")}
    if spec.weights == "eoi":
        # An EOI matrix cannot be sparser than one entry per row/column: floor such layers there.
        options["min_density"] = eoi_min_density({n: tuple(p.shape) for n, p in prunable.items()})
    batch = None
    if spec.density in ("snip", "grasp"):
        batch = scoring_batch(data.train_x, data.train_y, data.num_classes, int(spec.options.get("per_class", 10)),
                              generator)
    if spec.density == "synflow":
        options["input_shape"] = tuple(data.input_shape)
    if spec.density not in ALLOCATORS:
        raise SpecError(f"init.density: {spec.density!r} is unknown; allowed: dense, {', '.join(ALLOCATORS)}")
    return allocate(spec.density, model, list(prunable), spec.init_density, batch=batch, **options)


@torch.no_grad()
def initialize(model: nn.Module, prunable: dict[str, nn.Parameter], spec: InitSpec, data, seed: int) -> Optional[Masks]:
    """Set the prunable weights' initial values in place; return the masks (None for a dense init)."""
    from ..training import derive_seed
    generator = torch.Generator().manual_seed(derive_seed(seed, INIT_STREAM))
    with torch.enable_grad():
        densities = layer_densities(model, prunable, spec, data, generator)
    gain = float(spec.options.get("gain", 1.0))
    masks: dict[str, torch.Tensor] = {}
    for name, weight in prunable.items():
        density = densities[name]
        if spec.weights == "eoi":
            values, mask = eoi_mask_and_weight(tuple(weight.shape), density, generator, gain=gain,
                                               centre_density=spec.options.get("centre_density"))
            weight.copy_(values.to(weight))
        else:
            mask = random_mask(weight.shape, density, generator)
        masks[name] = mask.to(device=weight.device, dtype=weight.dtype)
    if spec.weights == "ai":
        steps = int(spec.options.get("ai_steps", 1000))
        new = approximate_isometry({n: p.detach() for n, p in prunable.items()}, masks, steps=steps,
                                   lr=float(spec.options.get("ai_lr", 0.1)))
        for name, weight in prunable.items():
            weight.copy_(new[name])
    for name, weight in prunable.items():
        weight.mul_(masks[name])
    if spec.density == "dense":
        return None  # a dense orthogonal (or AI) init: new weights, nothing masked
    return Masks(masks)


def random_mask(shape, density: float, generator: torch.Generator) -> torch.Tensor:
    """Exactly kept_count(N, density) ones at uniformly random positions."""
    numel = int(torch.Size(shape).numel())
    mask = torch.zeros(numel)
    mask[torch.randperm(numel, generator=generator)[:kept_count(numel, density)]] = 1
    return mask.reshape(shape)


# The `init.options` keys each part of an init scheme reads; any other key would be ignored silently.
ALLOCATOR_OPTIONS = {"dense": (), "uniform": (), "erk": ("variant",), "snip": ("per_class",),
                     "grasp": ("per_class", "temperature", "sign"), "synflow": ("rounds", "rescale")}
WEIGHT_OPTIONS = {"base": (), "eoi": ("gain", "centre_density"), "ai": ("ai_steps", "ai_lr")}


def check_options(specs: list[InitSpec]) -> None:
    """Refuse `init.options` keys that no allocator or weight scheme among `specs` (a study's arms) takes.

    A study's options are shared by its arms, so a key one arm's scheme reads (ai_steps for the AI
    arms) is fine in another's; a key none reads is a typo that would be ignored.
    """
    allowed = sorted({key for spec in specs for key in
                      ALLOCATOR_OPTIONS.get(spec.density, ()) + WEIGHT_OPTIONS.get(spec.weights, ())})
    for spec in specs:
        unknown = sorted(set(spec.options) - set(allowed))
        if unknown:
            schemes = sorted({f"{s.density}/{s.weights}" for s in specs})
            raise SpecError(f"init.options: {', '.join(unknown)} is not an option of {', '.join(schemes)}; "
                            f"allowed: {', '.join(allowed) or 'none'}")
