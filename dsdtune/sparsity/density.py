"""Per-layer density allocators for static sparse training: uniform, ERK/ER, SNIP, GraSP, SynFlow.

Each allocator returns {weight name: density}. The pruners (SNIP, GraSP, SynFlow) also give their
own masks (`pruner_masks`, exactly the masks those densities come from): the init scheme keeps
them (`init.positions: pruner`) or redraws positions at the same densities (see `sparsity.init`).

Closed-form allocators (uniform, ERK) work on shapes. Score-based ones (SNIP, GraSP, SynFlow) score
every weight on a deep copy of the model (the caller's model is never touched), keep the global
top K = round(density * total) scores exactly, and report kept_l / N_l per layer. Ties go to the
lower position: layers in `names` order, then flat (row-major) order inside a layer.

Guard (`min_density`): no layer ends below one weight (an empty layer disconnects the network and
no weight scheme can draw it). `min_density` (a float for every layer, or {name: floor}) raises the
floor further, e.g. `eoi_min_density(shapes)` for what EOI can represent. Layers that would end
below their floor are set to it and the rest are re-balanced so the overall budget still holds:
ERK/uniform solve clip(eps * raw, floor, 1) exactly; score-based allocators re-run the
global top-K over the remaining layers. Only when the floors alone exceed the budget is the
overall density above the target.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dsdtune.sparsity.topk import kept_count, top_k_mask

MinDensity = float | Mapping[str, float] | None

GRASP_SIGNS = ("original", "flipped")
SYNFLOW_RESCALE = ("auto", "always", "never")
# Input level of a rescaled SynFlow pass: small enough that saturating activations (tanh) act
# linearly, i.e. the pass computes the paper's R_SF of the linearized network.
_SYNFLOW_INPUT_LEVEL = 1e-4


# ---------------------------------------------------------------------------------------------
# Checks and floors


def _check_density(density: float) -> float:
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return density


def _floors(numels: Mapping[str, int], min_density: MinDensity) -> dict[str, float]:
    """Per-layer density floor: at least one weight, raised to `min_density` where given."""
    floors = {}
    for name, numel in numels.items():
        if min_density is None:
            wanted = 0.0
        elif isinstance(min_density, Mapping):
            wanted = float(min_density.get(name, 0.0))
        else:
            wanted = float(min_density)
        if not 0.0 <= wanted <= 1.0:
            raise ValueError(f"min_density for {name} must be in [0, 1], got {wanted}")
        floors[name] = min(1.0, max(1.0 / numel, wanted))
    return floors


def eoi_min_density(shapes: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Lowest density EOI can draw per layer: 1 / max(c_out, c_in).

    An EOI matrix always holds its (rectangular) diagonal, i.e. at least 1/M of its entries. For
    conv kernels this is the floor of the centre matrix, so it is conservative for the whole kernel.
    """
    return {name: 1.0 / max(int(shape[0]), int(shape[1])) for name, shape in shapes.items()}


# ---------------------------------------------------------------------------------------------
# Uniform and ERK


def _solve_proportional(
    raw: Mapping[str, float], numels: Mapping[str, int], density: float, floors: Mapping[str, float]
) -> tuple[dict[str, float], list[float]]:
    """density_l = clip(eps * raw_l, floor_l, 1) with eps solved for the budget (exact).

    The inner loop is RigL's: layers over 1 (the group tied at the largest raw) become dense and
    leave the budget, eps is re-solved. Then free layers under their floor are fixed at it and the
    inner loop starts again from scratch, so a layer made dense under a larger eps is reconsidered
    (fixing floors only lowers eps, so a floored layer never needs releasing). The result is the
    unique clip(eps * raw, floor, 1) meeting the budget. Returns the densities and every eps solved.
    """
    budget = density * sum(numels.values())
    floored: dict[str, float] = {}
    history: list[float] = []
    while True:
        dense: set[str] = set()
        while True:
            free = [n for n in raw if n not in floored and n not in dense]
            if not free:
                break
            remaining = budget - sum(floored[n] * numels[n] for n in floored) - sum(numels[n] for n in dense)
            eps = max(remaining, 0.0) / sum(raw[n] * numels[n] for n in free)
            history.append(eps)
            top = max(raw[n] for n in free)
            if eps * top <= 1.0:
                break
            # Making the densest layers dense only raises eps, so other layers over 1 stay over.
            dense.update(n for n in free if raw[n] == top)
        low = [n for n in free if eps * raw[n] < floors[n]]
        if not low:
            break
        floored.update({n: floors[n] for n in low})
    return {n: floored[n] if n in floored else 1.0 if n in dense else eps * raw[n] for n in raw}, history


def uniform(
    shapes: Mapping[str, Sequence[int]], density: float, min_density: MinDensity = None
) -> dict[str, float]:
    """Every layer at `density` (layers raised to their floor make the others slightly sparser)."""
    density = _check_density(density)
    numels = {n: math.prod(s) for n, s in shapes.items()}
    densities, _ = _solve_proportional({n: 1.0 for n in shapes}, numels, density, _floors(numels, min_density))
    return densities


def erk_solve(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    variant: str = "erk",
    min_density: MinDensity = None,
) -> tuple[dict[str, float], list[float]]:
    """ERK / ER densities and the eps of every pass (Evci et al., RigL).

    raw_l = sum(shape) / prod(shape) over all dims ("erk") or over the two channel dims only
    ("er": (n_out + n_in) / (n_out * n_in)); density_l = eps * raw_l, eps solved so that the kept
    total is density * total; layers pushed over 1 become dense and eps is solved again.
    """
    density = _check_density(density)
    if variant == "erk":
        raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    elif variant == "er":
        raw = {n: (s[0] + s[1]) / (s[0] * s[1]) for n, s in shapes.items()}
    else:
        raise ValueError(f"unknown ERK variant {variant!r}; allowed: 'erk', 'er'")
    numels = {n: math.prod(s) for n, s in shapes.items()}
    return _solve_proportional(raw, numels, density, _floors(numels, min_density))


def erk(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    variant: str = "erk",
    min_density: MinDensity = None,
) -> dict[str, float]:
    """ERK (or ER with variant="er") per-layer densities; see `erk_solve`."""
    return erk_solve(shapes, density, variant, min_density)[0]


# ---------------------------------------------------------------------------------------------
# Global top-K on scores


def _select(
    scores: Mapping[str, torch.Tensor], total_kept: int, floor_counts: Mapping[str, int]
) -> dict[str, torch.Tensor]:
    """Flat bool masks: global top `total_kept`, with layers under their floor count re-balanced."""
    names = list(scores)
    flat = {n: scores[n].detach().flatten() for n in names}
    for name, values in flat.items():
        if torch.isnan(values).any():
            raise ValueError(f"scores of {name} contain NaN")
    numels = {n: v.numel() for n, v in flat.items()}
    fixed: set[str] = set()
    while True:
        free = [n for n in names if n not in fixed]
        masks: dict[str, torch.Tensor] = {}
        if free:
            budget = total_kept - sum(floor_counts[n] for n in fixed)
            keep = top_k_mask(torch.cat([flat[n] for n in free]), budget)
            masks = dict(zip(free, torch.split(keep, [numels[n] for n in free])))
        low = [n for n in free if int(masks[n].sum()) < floor_counts[n]]
        if not low:
            break
        # Each pass fixes at least one more layer, so this ends after at most len(names) passes.
        fixed.update(low)
    for name in fixed:
        masks[name] = top_k_mask(flat[name], floor_counts[name])
    return masks


def _floor_counts(tensors: Mapping[str, torch.Tensor], min_density: MinDensity) -> dict[str, int]:
    """Fewest weights each layer may keep."""
    numels = {n: t.numel() for n, t in tensors.items()}
    return {n: kept_count(numels[n], f) for n, f in _floors(numels, min_density).items()}


def keep_masks(
    scores: Mapping[str, torch.Tensor], density: float, min_density: MinDensity = None
) -> dict[str, torch.Tensor]:
    """Bool masks keeping the global top round(density * total) scores (higher = keep).

    Ties go to the lower position (layers in order, then flat order). Layers that would end below
    their floor (one weight, or `min_density`) keep their own top floor-count weights, and the
    global top-K is re-run over the other layers with what is left of the budget.
    """
    density = _check_density(density)
    total_kept = kept_count(sum(s.numel() for s in scores.values()), density)
    masks = _select(scores, total_kept, _floor_counts(scores, min_density))
    return {n: masks[n].reshape(s.shape) for n, s in scores.items()}


def _densities(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {n: int(m.sum()) / m.numel() for n, m in masks.items()}


# ---------------------------------------------------------------------------------------------
# Scoring on a copy


def _scoring_copy(model: nn.Module, names: Iterable[str]) -> tuple[nn.Module, list[str], list[nn.Parameter]]:
    """Deep copy of the model whose only parameters needing gradients are the named weights."""
    names = list(names)
    work = copy.deepcopy(model)
    params = dict(work.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"not parameters of the model: {missing}")
    if not names:
        raise ValueError("no weights to allocate densities for")
    for param in work.parameters():
        param.requires_grad_(False)
        param.grad = None
    weights = [params[n] for n in names]
    for weight in weights:
        weight.requires_grad_(True)
    return work, names, weights


def _no_cudnn_rnn(model: nn.Module):
    """cuDNN RNNs support neither double backward (GraSP) nor backward in eval mode (SynFlow)."""
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        return torch.backends.cudnn.flags(enabled=False)
    return contextlib.nullcontext()


def _grads(output: torch.Tensor, weights: list[nn.Parameter], **kwargs) -> list[torch.Tensor]:
    """d output / d weights, zeros for weights the output does not depend on."""
    if not output.requires_grad:
        return [torch.zeros_like(w) for w in weights]
    grads = torch.autograd.grad(output, weights, allow_unused=True, **kwargs)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, weights)]


def _batch_on(weights: list[nn.Parameter], inputs: torch.Tensor, targets: torch.Tensor):
    device = weights[0].device
    return inputs.to(device), targets.to(device)


def snip_scores(
    model: nn.Module, names: Iterable[str], inputs: torch.Tensor, targets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """SNIP connection sensitivity |g * w| of the cross-entropy loss on one batch (Lee et al. 2019).

    Runs in train mode on a copy (batch norm uses the batch's statistics, as at the first step).
    """
    work, names, weights = _scoring_copy(model, names)
    work.train()
    inputs, targets = _batch_on(weights, inputs, targets)
    with _no_cudnn_rnn(work):
        loss = F.cross_entropy(work(inputs), targets)
        grads = _grads(loss, weights)
    return {n: (g * w).abs().detach() for n, g, w in zip(names, grads, weights)}


def snip(
    model: nn.Module,
    names: Iterable[str],
    density: float,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    min_density: MinDensity = None,
) -> dict[str, float]:
    """SNIP: per-layer densities of the global top-K of |g * w|."""
    return _densities(snip_masks(model, names, density, inputs, targets, min_density))


def snip_masks(
    model: nn.Module,
    names: Iterable[str],
    density: float,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    min_density: MinDensity = None,
) -> dict[str, torch.Tensor]:
    """SNIP's own mask: the global top-K of |g * w| on the batch (bool, per weight)."""
    density = _check_density(density)
    return keep_masks(snip_scores(model, names, inputs, targets), density, min_density)


def grasp_scores(
    model: nn.Module,
    names: Iterable[str],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 200.0,
    sign: str = "original",
) -> dict[str, torch.Tensor]:
    """GraSP keep-priorities (higher = keep) from the Hessian-gradient product (Wang et al. 2020).

    g = dL/dw and Hg = d(g_stopped . dL/dw)/dw for L = cross-entropy(logits / temperature), taken
    over the named weights only. The paper's score is S(-w) = -w * Hg, and GraSP *removes* the
    top fraction of S: removing a weight with large S lowers the gradient norm least (or raises it).
    The authors' code (alecwangcq/GraSP, pruner/GraSP.py) computes `-weight * grad` after
    backpropagating g . grad, takes topk of that score as the weights to remove, and keeps
    `score <= threshold`. So "original" keeps the LOWEST -w * Hg, i.e. priority = w * Hg (the
    Synaptic-Flow repository's port does the same: score = Hg * w, keep the top). "flipped" keeps
    the highest -w * Hg (priority = -w * Hg), which several public re-implementations do.
    """
    if sign not in GRASP_SIGNS:
        raise ValueError(f"unknown GraSP sign {sign!r}; allowed: {', '.join(GRASP_SIGNS)}")
    work, names, weights = _scoring_copy(model, names)
    work.train()
    inputs, targets = _batch_on(weights, inputs, targets)
    with _no_cudnn_rnn(work):
        loss = F.cross_entropy(work(inputs) / temperature, targets)
        grads = _grads(loss, weights, create_graph=True)
        flow = sum((g.detach() * g).sum() for g in grads)
        hessian_grad = _grads(flow, weights)
    scores = {}
    for name, w, hg in zip(names, weights, hessian_grad):
        paper_score = -(w.detach() * hg)  # S(-theta) = -theta * Hg; large = safe to remove
        scores[name] = -paper_score if sign == "original" else paper_score
    return scores


def grasp(
    model: nn.Module,
    names: Iterable[str],
    density: float,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 200.0,
    sign: str = "original",
    min_density: MinDensity = None,
) -> dict[str, float]:
    """GraSP: per-layer densities of the global top-K of `grasp_scores` (see there for the sign)."""
    return _densities(grasp_masks(model, names, density, inputs, targets, temperature, sign, min_density))


def grasp_masks(
    model: nn.Module,
    names: Iterable[str],
    density: float,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 200.0,
    sign: str = "original",
    min_density: MinDensity = None,
) -> dict[str, torch.Tensor]:
    """GraSP's own mask: the global top-K of `grasp_scores` (bool, per weight)."""
    density = _check_density(density)
    return keep_masks(grasp_scores(model, names, inputs, targets, temperature, sign), density, min_density)


# ---------------------------------------------------------------------------------------------
# SynFlow


class _SynFlowCopy:
    """A copy of the model with |parameters|, in eval mode, float64 (float32 on MPS), all-ones input.

    Scores are |w * dR/dw| with R = sum(output). Plain passes overflow for deep ReLU networks and,
    for deep tanh networks, underflow to exactly 0 (tanh saturates on the all-positive signal, so
    early layers' gradients vanish). A *rescaled* pass multiplies every weight tensor (>= 2-D) by
    1 / (mean row sum of its |W|), zeroes the biases and feeds 1e-4 * ones. For networks that are
    positively homogeneous in their weights (chains of Linear/Conv without bias, ReLU or identity,
    pooling, eval-mode batch norm at init) R is multilinear in the layers, so every score changes
    by the same factor prod(c_l) and the ranking is exact. With biases, saturating activations or
    residual connections that is no longer true (checked: a plain tanh net's scores do not scale by
    one factor); there the rescaled pass computes the SynFlow paper's own objective
    R_SF = 1^T prod|W_l| 1 of the linearized network (biases dropped, tanh ~ identity at 1e-4).
    """

    def __init__(self, model: nn.Module, names: Iterable[str], input_shape: Sequence[int]):
        self.work, self.names, self.weights = _scoring_copy(model, names)
        self.work.eval()  # train-mode batch norm on one constant input collapses the flow
        device = self.weights[0].device
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.work.to(self.dtype)
        self.params = dict(self.work.named_parameters())
        self.weights = [self.params[n] for n in self.names]
        self.magnitudes = {n: p.detach().abs().clone() for n, p in self.params.items()}
        self.ones = torch.ones((1, *input_shape), dtype=self.dtype, device=device)

    @torch.no_grad()
    def _load(self, masks: Mapping[str, torch.Tensor] | None, rescaled: bool) -> None:
        for name, param in self.params.items():
            value = self.magnitudes[name]
            if masks is not None and name in masks:
                value = value * masks[name].to(value.dtype)
            if rescaled:
                if name.rsplit(".", 1)[-1].startswith("bias"):
                    value = torch.zeros_like(value)
                elif value.dim() >= 2:
                    row_sum = float(value.reshape(value.shape[0], -1).sum(1).mean())
                    if row_sum > 0:
                        value = value / row_sum
            param.copy_(value)

    def scores(self, masks: Mapping[str, torch.Tensor] | None, rescaled: bool) -> dict[str, torch.Tensor]:
        self._load(masks, rescaled)
        level = _SYNFLOW_INPUT_LEVEL if rescaled else 1.0
        with _no_cudnn_rnn(self.work):
            output = self.work(self.ones * level)
            grads = _grads(output.sum(), self.weights)
        return {n: (w.detach() * g).abs() for n, w, g in zip(self.names, self.weights, grads)}

    def usable(self, scores: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None) -> bool:
        """Finite everywhere, and every layer with kept weights has a normal (not underflowed) max."""
        tiny = torch.finfo(self.dtype).tiny
        for name, score in scores.items():
            if not torch.isfinite(score).all():
                return False
            mask = None if masks is None else masks.get(name)
            kept = score if mask is None else score[mask.bool()]
            if kept.numel() and float(kept.max()) < tiny:
                return False
        return True

    def round(self, masks: Mapping[str, torch.Tensor] | None, rescale: str | bool) -> tuple[dict, bool]:
        """Scores for one round and whether they came from a rescaled pass."""
        if rescale is True or rescale == "always":
            return self.scores(masks, True), True
        scores = self.scores(masks, False)
        if rescale == "auto" and not self.usable(scores, masks):
            return self.scores(masks, True), True
        return scores, False


def _check_rescale(rescale: str) -> None:
    if rescale not in SYNFLOW_RESCALE:
        raise ValueError(f"unknown SynFlow rescale {rescale!r}; allowed: {', '.join(SYNFLOW_RESCALE)}")


def synflow_scores(
    model: nn.Module,
    names: Iterable[str],
    input_shape: Sequence[int],
    masks: Mapping[str, torch.Tensor] | None = None,
    rescale: str = "auto",
) -> dict[str, torch.Tensor]:
    """One SynFlow scoring pass |w * dR/dw| (float64) on a copy, with optional 0/1 masks applied.

    rescale: "never" (plain pass, may overflow/underflow), "always" (rescaled pass), "auto" (plain
    unless it gives non-finite or underflowed scores). See `_SynFlowCopy` for what rescaling does.
    """
    _check_rescale(rescale)
    return _SynFlowCopy(model, names, input_shape).round(masks, rescale)[0]


def synflow(
    model: nn.Module,
    names: Iterable[str],
    density: float,
    input_shape: Sequence[int],
    rounds: int = 100,
    rescale: str = "auto",
    min_density: MinDensity = None,
) -> dict[str, float]:
    """SynFlow: per-layer densities of `synflow_masks`."""
    return _densities(synflow_masks(model, names, density, input_shape, rounds, rescale, min_density))


def synflow_masks(
    model: nn.Module,
    names: Iterable[str],
    density: float,
    input_shape: Sequence[int],
    rounds: int = 100,
    rescale: str = "auto",
    min_density: MinDensity = None,
) -> dict[str, torch.Tensor]:
    """SynFlow (Tanaka et al. 2020): iterative data-free pruning; its own mask (bool, per weight).

    Round e = 1..rounds keeps the global top density**(e / rounds) of the weights still kept,
    re-scoring with the pruned weights zeroed. Once a round needs the rescaled pass ("auto"), the
    remaining rounds use it too, so one run does not mix objectives back and forth.
    """
    density = _check_density(density)
    _check_rescale(rescale)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    state = _SynFlowCopy(model, names, input_shape)
    total = sum(w.numel() for w in state.weights)
    floor_counts = _floor_counts(dict(zip(state.names, state.weights)), min_density)
    masks: dict[str, torch.Tensor] | None = None
    mode: str | bool = rescale
    for e in range(1, rounds + 1):
        scores, rescaled = state.round(masks, mode)
        mode = True if rescaled else mode
        if masks is not None:
            # Pruned weights score 0 like dead ones; -inf keeps them out for good.
            scores = {n: s.masked_fill(~masks[n].bool(), -math.inf) for n, s in scores.items()}
        # The floors hold in every round, so no layer collapses on the way to the last one.
        keep = _select(scores, kept_count(total, density ** (e / rounds)), floor_counts)
        masks = {n: keep[n].reshape(s.shape).to(state.dtype) for n, s in scores.items()}
    return {n: m.bool() for n, m in masks.items()}


# ---------------------------------------------------------------------------------------------
# Registry


def _shapes(model: nn.Module, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    params = dict(model.named_parameters())
    names = list(names)
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"not parameters of the model: {missing}")
    return {n: tuple(params[n].shape) for n in names}


def _need_batch(kind: str, batch) -> tuple[torch.Tensor, torch.Tensor]:
    if batch is None:
        raise ValueError(f"the {kind} allocator needs batch=(inputs, targets) from the training split")
    inputs, targets = batch
    return inputs, targets


def _allocate_uniform(model, names, density, batch, **options):
    return uniform(_shapes(model, names), density, **options)


def _allocate_erk(model, names, density, batch, **options):
    return erk(_shapes(model, names), density, **options)


def _allocate_er(model, names, density, batch, **options):
    return erk(_shapes(model, names), density, variant="er", **options)


def _allocate_snip(model, names, density, batch, **options):
    return snip(model, names, density, *_need_batch("snip", batch), **options)


def _allocate_grasp(model, names, density, batch, **options):
    return grasp(model, names, density, *_need_batch("grasp", batch), **options)


def _synflow_input_shape(input_shape, batch) -> tuple:
    """SynFlow scores an all-ones input: its per-sample shape, given or taken from a batch."""
    if input_shape is not None:
        return tuple(input_shape)
    if batch is None:
        raise ValueError("synflow needs input_shape=(per-sample shape) or a batch")
    return tuple(batch[0].shape[1:])


def _allocate_synflow(model, names, density, batch, input_shape=None, **options):
    return synflow(model, names, density, _synflow_input_shape(input_shape, batch), **options)


ALLOCATORS: dict[str, Callable[..., dict[str, float]]] = {
    "uniform": _allocate_uniform,
    "erk": _allocate_erk,
    "er": _allocate_er,
    "snip": _allocate_snip,
    "grasp": _allocate_grasp,
    "synflow": _allocate_synflow,
}


def _prune_snip(model, names, density, batch, **options):
    return snip_masks(model, names, density, *_need_batch("snip", batch), **options)


def _prune_grasp(model, names, density, batch, **options):
    return grasp_masks(model, names, density, *_need_batch("grasp", batch), **options)


def _prune_synflow(model, names, density, batch, input_shape=None, **options):
    return synflow_masks(model, names, density, _synflow_input_shape(input_shape, batch), **options)


# Allocators that are pruners: their own masks (not only their per-layer densities).
PRUNERS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "snip": _prune_snip,
    "grasp": _prune_grasp,
    "synflow": _prune_synflow,
}


def pruner_masks(
    kind: str,
    model: nn.Module,
    names: Iterable[str],
    density: float,
    batch: tuple[torch.Tensor, torch.Tensor] | None = None,
    **options,
) -> dict[str, torch.Tensor]:
    """The pruner's own bool masks; `allocate(kind, ...)` gives exactly their per-layer densities."""
    if kind not in PRUNERS:
        raise ValueError(f"{kind!r} is not a pruner; pruners: {', '.join(PRUNERS)}")
    return PRUNERS[kind](model, list(names), density, batch, **options)


def allocate(
    kind: str,
    model: nn.Module,
    names: Iterable[str],
    density: float,
    batch: tuple[torch.Tensor, torch.Tensor] | None = None,
    **options,
) -> dict[str, float]:
    """{name: density} for the weights `names` of `model` by allocator `kind`.

    uniform / erk / er use only the shapes; snip and grasp need batch=(inputs, targets) (about 10
    training samples per class); synflow needs input_shape=... (or takes it from batch). Options
    go to the allocator (e.g. min_density, temperature, sign, rounds).
    """
    if kind not in ALLOCATORS:
        raise ValueError(f"unknown density allocator {kind!r}; allowed: {', '.join(ALLOCATORS)}")
    return ALLOCATORS[kind](model, list(names), density, batch, **options)
