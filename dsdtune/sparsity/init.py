"""An init scheme = a density allocation x mask positions x a weight scheme -> weights + masks.

1. Biases (`init.bias`) and the dense base weights (`init.base`: the model's own init, or dense
   orthogonal) are set first: they are what a pruner scores and what base/AI weights start from.
2. The allocation: per-layer densities from the allocator alone, with EOI's floors applied to every
   arm (`init.floors: eoi`). It does not depend on the weight scheme, so arms that differ only in
   the weight scheme get identical per-layer densities (and, below, identical kept counts).
3. Positions and values:
   - base: the base weights times a mask of exactly round(d * N) ones per layer, at the pruner's own
     positions (`positions: pruner`, the default for snip/grasp/synflow) or at random positions;
   - eoi:  exact orthogonal (random Givens rotations; delta-orthogonal for convs) with exactly the
     same kept count per layer (zero-valued trainable positions top it up);
   - ai:   the base mask, weights optimised towards isometry (only approximately orthogonal).
4. Sanity controls of base weights (Frankle et al. 2021): `shuffle` permutes each layer's mask,
   `reinit` redraws the kept weights from the base distribution.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..config import InitSpec, SpecError
from ..seeding import generator as seeded_generator
from .density import ALLOCATORS, PRUNERS, allocate, eoi_min_density, pruner_masks
from .masks import Masks
from .orthogonal import approximate_isometry, eoi_exact_count
from .topk import kept_count

INIT_STREAM = 1_000_003  # generator stream for init, apart from the data-order streams
POSITIONS_STREAM = 1_000_033  # positions and values, apart from the allocation's draws
# init.options each allocator takes (a study may set e.g. GraSP's sign for all its allocators)
ALLOCATOR_OPTIONS = {"uniform": (), "erk": ("variant",), "er": (), "snip": (), "grasp": ("temperature", "sign"),
                     "synflow": ("rounds", "rescale")}


@dataclass
class InitResult:
    masks: Optional[Masks]  # None for a dense init
    allocated: dict[str, float] = field(default_factory=dict)  # the allocator's per-layer densities
    floored: list[str] = field(default_factory=list)  # layers held at EOI's floor (above the allocator's wish)
    positions: str = "none"  # pruner | random | eoi | none
    scoring_batch: Optional[tuple[torch.Tensor, torch.Tensor]] = None


def scoring_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, per_class: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """About `per_class` random training samples of every class (SNIP/GraSP's small batch)."""
    order = torch.randperm(y.shape[0], generator=generator).to(y.device)
    picked = torch.cat([order[y[order] == c][:per_class] for c in range(num_classes)])
    return x[picked], y[picked]


@torch.no_grad()
def init_biases(model: nn.Module, kind: str, std: float, generator: torch.Generator) -> None:
    """Every Linear/Conv bias: the model's default, zero, or normal(0, std)."""
    if kind == "default":
        return
    for module in model.modules():
        bias = getattr(module, "bias", None)
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and bias is not None:
            if kind == "zero":
                bias.zero_()
            else:
                values = torch.randn(bias.shape, generator=generator, dtype=torch.float64) * std
                bias.copy_(values.to(bias))


@torch.no_grad()
def orthogonal_weights(shape, gain: float, generator: torch.Generator) -> torch.Tensor:
    """Dense orthogonal (conv kernels as (out, in * k...)) times gain, float64 on the CPU."""
    weight = torch.empty(tuple(shape), dtype=torch.float64)
    torch.nn.init.orthogonal_(weight, gain=gain, generator=generator)
    return weight


def _floors(prunable: dict[str, nn.Parameter], spec: InitSpec) -> Optional[dict[str, float]]:
    if spec.floors == "none":
        return None
    return eoi_min_density({n: tuple(p.shape) for n, p in prunable.items()})


def _allocation(model: nn.Module, prunable: dict[str, nn.Parameter], spec: InitSpec, data,
                generator: torch.Generator) -> tuple[dict[str, float], Optional[dict], Optional[tuple]]:
    """(densities, the pruner's masks if the positions come from it, the scoring batch)."""
    if spec.density not in ALLOCATORS:
        raise SpecError(f"init.density: {spec.density!r} is unknown; allowed: dense, {', '.join(ALLOCATORS)}")
    options = {k: v for k, v in spec.options.items() if k in ALLOCATOR_OPTIONS.get(spec.density, ())}
    floors = _floors(prunable, spec)
    if floors is not None:
        options["min_density"] = floors
    batch = None
    if spec.density in ("snip", "grasp"):
        batch = scoring_batch(data.train_x, data.train_y, data.num_classes, int(spec.options.get("per_class", 10)),
                              generator)
    if spec.density == "synflow":
        options["input_shape"] = tuple(data.input_shape)
    if spec.density in PRUNERS:
        masks = pruner_masks(spec.density, model, list(prunable), spec.init_density, batch=batch, **options)
        densities = {n: int(m.sum()) / m.numel() for n, m in masks.items()}
        return densities, masks, batch
    return allocate(spec.density, model, list(prunable), spec.init_density, batch=batch, **options), None, batch


@torch.no_grad()
def initialize(model: nn.Module, prunable: dict[str, nn.Parameter], spec: InitSpec, data, seed: int) -> InitResult:
    """Set biases and prunable weights in place; return the masks (None for a dense init) and the allocation."""
    generator = seeded_generator(seed, INIT_STREAM)
    values_gen = seeded_generator(seed, POSITIONS_STREAM)
    init_biases(model, spec.bias, spec.bias_std, generator)
    if spec.base == "orthogonal":
        for weight in prunable.values():
            weight.copy_(orthogonal_weights(weight.shape, spec.gain, generator).to(weight))
    result = InitResult(None, positions=spec.resolved_positions)
    if spec.sparse:
        with torch.enable_grad():
            densities, own, result.scoring_batch = _allocation(model, prunable, spec, data, generator)
        result.allocated = densities
        floors = _floors(prunable, spec) or {}
        result.floored = [n for n, d in densities.items() if n in floors
                          and kept_count(prunable[n].numel(), d) == kept_count(prunable[n].numel(), floors[n])
                          and floors[n] > 1.0 / prunable[n].numel()]
    else:
        densities, own = {n: 1.0 for n in prunable}, None
    masks: dict[str, torch.Tensor] = {}
    for name, weight in prunable.items():
        kept = kept_count(weight.numel(), densities[name])
        if spec.weights == "eoi":
            values, mask = eoi_exact_count(tuple(weight.shape), kept, values_gen, gain=spec.gain,
                                           centre_density=spec.options.get("centre_density"))
            weight.copy_(values.to(weight))
        elif result.positions == "pruner":
            mask = own[name]
        else:
            mask = random_mask(weight.shape, densities[name], values_gen)
        if spec.control == "shuffle":
            mask = shuffled(mask, values_gen)
        elif spec.control == "reinit":
            weight.copy_(redrawn(weight, spec, values_gen))
        masks[name] = mask.to(device=weight.device, dtype=weight.dtype)
    if spec.weights == "ai":
        steps = int(spec.options.get("ai_steps", 1000))
        new = approximate_isometry({n: p.detach() for n, p in prunable.items()}, masks, steps=steps,
                                   lr=float(spec.options.get("ai_lr", 0.1)))
        for name, weight in prunable.items():
            weight.copy_(new[name])
    for name, weight in prunable.items():
        weight.mul_(masks[name])
    if spec.sparse:
        result.masks = Masks(masks)
    return result


def random_mask(shape, density: float, generator: torch.Generator) -> torch.Tensor:
    """Exactly kept_count(N, density) ones at uniformly random positions."""
    numel = int(torch.Size(shape).numel())
    mask = torch.zeros(numel)
    mask[torch.randperm(numel, generator=generator)[:kept_count(numel, density)]] = 1
    return mask.reshape(shape)


def shuffled(mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The same mask with its entries permuted at random within the layer (same count)."""
    flat = mask.reshape(-1)
    return flat[torch.randperm(flat.numel(), generator=generator).to(flat.device)].reshape(mask.shape)


def redrawn(weight: torch.Tensor, spec: InitSpec, generator: torch.Generator) -> torch.Tensor:
    """Fresh base weights for `reinit`: a new orthogonal draw, or the layer's own init values permuted.

    The model's default inits draw every entry of a layer i.i.d., so a random permutation of the
    layer's values is a fresh draw from exactly that distribution, independent of the mask.
    """
    if spec.base == "orthogonal":
        return orthogonal_weights(weight.shape, spec.gain, generator).to(weight)
    flat = weight.detach().reshape(-1)
    return flat[torch.randperm(flat.numel(), generator=generator).to(flat.device)].reshape(weight.shape)


# The `init.options` keys each weight scheme reads (the allocators': ALLOCATOR_OPTIONS above).
WEIGHT_OPTIONS = {"base": (), "eoi": ("centre_density",), "ai": ("ai_steps", "ai_lr")}


def check_options(specs: list[InitSpec]) -> None:
    """Refuse `init.options` keys that no allocator or weight scheme among `specs` (a study's arms) takes.

    A study's options are shared by its arms, so a key one arm's scheme reads (ai_steps for the AI
    arms) is fine in another's; a key none reads is a typo that would be ignored.
    """
    def reads(spec: InitSpec) -> tuple:
        scoring = ("per_class",) if spec.density in ("snip", "grasp") else ()  # the size of their scoring batch
        return ALLOCATOR_OPTIONS.get(spec.density, ()) + scoring + WEIGHT_OPTIONS.get(spec.weights, ())

    allowed = sorted({key for spec in specs for key in reads(spec)})
    for spec in specs:
        unknown = sorted(set(spec.options) - set(allowed))
        if unknown:
            schemes = sorted({f"{s.density}/{s.weights}" for s in specs})
            raise SpecError(f"init.options: {', '.join(unknown)} is not an option of {', '.join(schemes)}; "
                            f"allowed: {', '.join(allowed) or 'none'}")
