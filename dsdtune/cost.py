"""What a trial costs: parameters, inference FLOPs of the final model, training FLOPs of its flow.

FLOPs are counted the way the sparse-training literature counts them (RigL, Evci et al. 2020,
appendix H): the forward FLOPs of each layer are measured once on one batch with
`torch.utils.flop_counter.FlopCounterMode` (a multiply-add is 2 FLOPs; only the ops torch counts -
matmuls and convolutions - enter, so biases, norms and activations are left out) and attributed to
the layer whose module ran them. A masked layer at density d costs d times its dense FLOPs, layer by
layer; layers that are never pruned (the first layer by default) stay dense. One training step on
one sample costs about 3x its forward FLOPs (forward, gradient of the input, gradient of the
weights), so a phase costs 3 x forward FLOPs at its densities x training samples x epochs.

These are the FLOPs an ideal sparse kernel would spend; dsdtune itself multiplies by masks on dense
kernels, so its wall time does not shrink with sparsity.

Per-phase densities: given by the caller when it knows them (e.g. recorded masks), else derived
from the phase's rule - D phases dense; S phases keep `kept_count(numel, 1 - sparsity)` weights
per layer under the layer-wise criteria (exact), global magnitude is approximated by its target
density in every layer; a sparse init's densities (flow starting with S) and GSM's final densities
come from `init_densities` / `final_densities` when given, else the target density in every layer
(approximate). A G phase trains dense (GSM computes every gradient; weights only reach zero at its
truncation), and leaves the truncated model for inference. `TrialCost.exact` says whether every
density used was exact.

No Ray, no pandas.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .sparsity.masks import kept_count, prunable_weights

if TYPE_CHECKING:
    from .config import RunSpec

TRAIN_FLOPS_PER_FORWARD = 3.0  # forward + backward (input gradient + weight gradient)
LAYERWISE_CRITERIA = ("layerwise_magnitude", "random")  # exactly kept_count per layer


@dataclass(frozen=True)
class ModelCost:
    """Dense forward FLOPs per sample of a model, in total and per layer weight."""

    forward_flops: float  # per sample, every counted op of the model
    layer_flops: dict[str, float]  # weight name -> forward FLOPs per sample of its module
    layer_numel: dict[str, int]  # weight name -> entries of the weight
    params: int  # every parameter (weights, biases, norms)
    prunable: tuple[str, ...]  # the weights masks apply to

    def forward_flops_at(self, densities: Mapping[str, float]) -> float:
        """Per-sample forward FLOPs with each prunable layer scaled by its density (default 1)."""
        saved = sum((1.0 - float(densities.get(n, 1.0))) * self.layer_flops[n] for n in self.prunable)
        return self.forward_flops - saved

    def nonzero_params_at(self, densities: Mapping[str, float]) -> float:
        """Parameters left when each prunable weight keeps its density (biases, norms all kept)."""
        removed = sum((1.0 - float(densities.get(n, 1.0))) * self.layer_numel[n] for n in self.prunable)
        return self.params - removed


def measure_model(model: nn.Module, batch: torch.Tensor, prunable: Sequence[str]) -> ModelCost:
    """Forward FLOPs of `model` on one `batch` (first dimension = samples), per sample and layer.

    `prunable` names the weights masks apply to (as `prunable_weights` returns them). Runs in eval
    mode without gradients; a layer's FLOPs are those FlopCounterMode attributes to its module.
    """
    all_weights = prunable_weights(model, exclude_first=False)
    missing = [n for n in prunable if n not in all_weights]
    if missing:
        raise ValueError(f"not a layer weight of this model: {missing[0]!r}")
    samples = int(batch.shape[0])
    if samples < 1:
        raise ValueError("need a batch with at least one sample")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(batch)
    finally:
        model.train(was_training)
    by_module = counter.get_flop_counts()
    root = type(model).__name__  # FlopCounterMode names modules "<RootClass>.<path>"
    layer_flops, layer_numel = {}, {}
    for name, weight in all_weights.items():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        key = f"{root}.{owner}" if owner else root
        layer_flops[name] = sum(by_module.get(key, {}).values()) / samples
        layer_numel[name] = weight.numel()
    params = sum(p.numel() for p in model.parameters())
    return ModelCost(counter.get_total_flops() / samples, layer_flops, layer_numel, params, tuple(prunable))


@dataclass(frozen=True)
class PhaseCost:
    label: str
    kind: str
    epochs: int
    densities: dict[str, float]  # prunable weight -> density trained at in this phase
    forward_flops: float  # per sample at those densities
    training_flops: float  # 3 x forward x samples x epochs
    exact: bool


@dataclass(frozen=True)
class TrialCost:
    params: int  # dense parameter count
    params_final: float  # non-zero parameters of the final model
    inference_flops: float  # per sample, final model (masked layers scaled by density)
    inference_flops_dense: float  # per sample, the same model dense
    training_flops: float  # whole flow
    training_flops_dense: float  # the same epochs, every phase dense
    samples_per_epoch: int
    phases: list[PhaseCost] = field(default_factory=list)
    exact: bool = True
    note: str = ""

    def as_row(self) -> dict[str, float]:
        """Flat numbers for a table."""
        return {"params": self.params, "params_final": self.params_final,
                "inference_flops": self.inference_flops, "inference_flops_dense": self.inference_flops_dense,
                "training_flops": self.training_flops, "training_flops_dense": self.training_flops_dense,
                "cost_exact": self.exact}


def rule_densities(model_cost: ModelCost, kind: str, sparsity: float, criterion: str) -> tuple[dict[str, float], bool]:
    """A phase's per-layer densities from its rule alone; (densities, exact)."""
    if kind != "S" or sparsity <= 0:
        return {n: 1.0 for n in model_cost.prunable}, True
    numel = model_cost.layer_numel
    if criterion in LAYERWISE_CRITERIA:
        return {n: kept_count(numel[n], 1.0 - sparsity) / numel[n] for n in model_cost.prunable}, True
    return {n: 1.0 - sparsity for n in model_cost.prunable}, False


def flow_cost(model_cost: ModelCost, phases: Sequence, samples_per_epoch: int,
              phase_densities: Optional[Sequence[Optional[Mapping[str, float]]]] = None,
              init_densities: Optional[Mapping[str, float]] = None,
              final_densities: Optional[Mapping[str, float]] = None,
              init_target_density: Optional[float] = None) -> TrialCost:
    """Cost of a flow of phases (objects with kind, label, epochs, sparsity, criterion, index).

    `phase_densities[i]` (when given and not None) is what phase i trained at; `init_densities` are
    a sparse init's densities (used by a first S phase); `final_densities` what a G phase left
    after truncation; `init_target_density` is a sparse init's target density (None: dense init,
    a first S phase prunes by its criterion). Anything not given is derived by the phase's rule.
    """
    phases = list(phases)
    if phase_densities is not None and len(phase_densities) != len(phases):
        raise ValueError(f"phase_densities has {len(phase_densities)} entries for {len(phases)} phases")
    dense = {n: 1.0 for n in model_cost.prunable}
    out: list[PhaseCost] = []
    final, final_exact = dense, True
    notes = []
    for i, phase in enumerate(phases):
        given = phase_densities[i] if phase_densities is not None else None
        if given is not None:
            train, exact = {n: float(given.get(n, 1.0)) for n in model_cost.prunable}, True
        elif phase.kind == "S" and i == 0 and init_target_density is not None:
            if init_densities is not None:
                train, exact = {n: float(init_densities.get(n, 1.0)) for n in model_cost.prunable}, True
            else:
                train, exact = {n: float(init_target_density) for n in model_cost.prunable}, False
                notes.append(f"{phase.label}: sparse init's densities not recorded, target density used")
        else:
            train, exact = rule_densities(model_cost, phase.kind, phase.sparsity, phase.criterion)
            if not exact:
                notes.append(f"{phase.label}: {phase.criterion} densities not recorded, target density used")
        forward = model_cost.forward_flops_at(train)
        flops = TRAIN_FLOPS_PER_FORWARD * forward * samples_per_epoch * phase.epochs
        out.append(PhaseCost(phase.label, phase.kind, int(phase.epochs), train, forward, flops, exact))
        if phase.kind == "S":
            final, final_exact = train, exact
        elif phase.kind == "G":
            if final_densities is not None:
                final, final_exact = {n: float(final_densities.get(n, 1.0)) for n in model_cost.prunable}, True
            else:
                final, final_exact = {n: 1.0 - phase.sparsity for n in model_cost.prunable}, False
                notes.append(f"{phase.label}: GSM's final densities not recorded, target density used")
        else:  # D: the mask is dropped, the model is dense again
            final, final_exact = dense, True
    total_epochs = sum(p.epochs for p in phases)
    return TrialCost(
        params=model_cost.params,
        params_final=model_cost.nonzero_params_at(final),
        inference_flops=model_cost.forward_flops_at(final),
        inference_flops_dense=model_cost.forward_flops,
        training_flops=sum(p.training_flops for p in out),
        training_flops_dense=TRAIN_FLOPS_PER_FORWARD * model_cost.forward_flops * samples_per_epoch * total_epochs,
        samples_per_epoch=int(samples_per_epoch),
        phases=out,
        exact=final_exact and all(p.exact for p in out),
        note="; ".join(notes),
    )


def model_cost_for(run_spec: Union[dict, "RunSpec"], dataset=None) -> tuple[ModelCost, int]:
    """The task's model measured on one training batch, and the training samples per epoch."""
    from .config import parse_run_spec
    from .data import load_dataset
    from .models import build_model

    spec = parse_run_spec(run_spec)
    task = spec.task
    data = dataset if dataset is not None else load_dataset(
        task.dataset, device="cpu", val_fraction=task.val_fraction, data_dir=task.data_dir, **task.dataset_args)
    model = build_model(task.model, data.input_shape, data.num_classes, **task.model_args)
    pipe = spec.pipeline
    from .phases import resolve_exclude_first
    prunable = list(prunable_weights(model, exclude_first=resolve_exclude_first(pipe), exclude=pipe.exclude))
    batch, _ = next(iter(data.eval_batches("val", task.batch_size)))  # tensors or streamed alike
    return measure_model(model, batch.to("cpu"), prunable), int(data.num_train)


def trial_cost(run_spec: Union[dict, "RunSpec"], layer_densities_per_phase=None, dataset=None,
               init_densities: Optional[Mapping[str, float]] = None,
               final_densities: Optional[Mapping[str, float]] = None,
               model_cost: Optional[tuple[ModelCost, int]] = None) -> TrialCost:
    """Cost of one trial from its run spec: builds the task's model, measures it on one batch.

    `layer_densities_per_phase` (one {weight: density} or None per phase) makes the count exact
    where the runner recorded the masks; `dataset` avoids loading the task's data again and
    `model_cost` (from `model_cost_for`) measuring the same model again.
    """
    from .config import parse_run_spec
    from .pipeline import expand_phases

    spec = parse_run_spec(run_spec)
    cost, samples = model_cost if model_cost is not None else model_cost_for(spec, dataset)
    # The pipeline uses a sparse init's masks for a first S phase; a dense init leaves it to the criterion.
    init_target = spec.init.init_density if spec.init.density != "dense" else None
    return flow_cost(cost, expand_phases(spec.pipeline, spec.init), samples, layer_densities_per_phase,
                     init_densities, final_densities, init_target_density=init_target)
