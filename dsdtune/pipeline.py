"""Phases (D, S, G), flows like "DSDSD", the pipeline state, checkpoint/restore and per-epoch events.

A phase starts with its transition and then trains for its epochs:
- S: masks are chosen by the phase's criterion (or taken from a sparse init when the flow starts
  with S); weights and every optimizer buffer are masked at once; during the phase gradients are
  masked before and weights after every step, so pruned weights stay exactly zero.
- D after S (re-dense): momentum where the mask was 0 is zeroed and the mask is dropped; pruned
  weights restart from exactly zero.
- G: global sparse momentum (see `dsdtune.sparsity.gsm`), truncated at the phase end.

Every phase draws its data order from a generator derived from (seed, phase index), so arms that
branch from one trained prefix see the same data order.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Union

import torch

from .config import PipelineSpec, RunSpec, SpecError, _as_list, parse_run_spec
from .data import Dataset, StreamingDataset, dataset_loader, load_dataset
from .models import TORCHVISION_PREFIX, build_model, load_init_checkpoint, model_factory
from .sparsity.masks import MaskApplier, Masks, measured_sparsity, prunable_weights
from .sparsity.prune import CRITERIA
from .training import (
    derive_seed, evaluate_batches, make_optimizer, scheduled_lr, seed_everything, select_device,
    set_hyperparameters, set_lr, train_batches,
)

EpochCallback = Callable[[dict, "Pipeline"], None]


@dataclass(frozen=True)
class Phase:
    index: int
    kind: str  # D, S or G
    label: str  # D1, S1, D2, ... (kind + ordinal of that kind)
    epochs: int
    lr: float
    sparsity: float  # target for S/G, 0 for D
    criterion: str
    schedule: str
    optimizer: str
    momentum: float
    nesterov: bool
    weight_decay: float


def expand_phases(spec: PipelineSpec) -> list[Phase]:
    """Per-phase settings from scalars (broadcast) or lists (aligned with the flow or S/G phases)."""
    flow = spec.flow
    n = len(flow)

    def per_phase(value):
        return list(value) if isinstance(value, list) else [value] * n

    def per_sparse_phase(value, dense_value):
        values = _as_list(value)
        if len(values) == n:
            return [v if kind in "SG" else dense_value for v, kind in zip(values, flow)]
        if len(values) == 1:
            return [values[0] if kind in "SG" else dense_value for kind in flow]
        it = iter(values)
        return [next(it) if kind in "SG" else dense_value for kind in flow]

    lrs: list[float] = []
    for i, lr in enumerate(_as_list(spec.lr) if isinstance(spec.lr, list) else [spec.lr] + [None] * (n - 1)):
        lrs.append(float(lr) if lr is not None else lrs[i - 1] * spec.lr_decay)
    epochs, schedules, optimizers = per_phase(spec.epochs), per_phase(spec.schedule), per_phase(spec.optimizer)
    momenta, nesterovs, decays = per_phase(spec.momentum), per_phase(spec.nesterov), per_phase(spec.weight_decay)
    sparsities = per_sparse_phase(spec.sparsity, 0.0)
    if not isinstance(spec.sparsity, list) and spec.sparsity_decay != 1.0:
        order = [sum(k in "SG" for k in flow[:i]) for i in range(n)]  # index among the sparse phases
        sparsities = [s * spec.sparsity_decay ** order[i] for i, s in enumerate(sparsities)]
    criteria = per_sparse_phase(spec.criterion, "")
    counts: dict[str, int] = {}
    phases = []
    for i, kind in enumerate(flow):
        counts[kind] = counts.get(kind, 0) + 1
        momentum = spec.gsm_momentum if kind == "G" and not isinstance(spec.momentum, list) else momenta[i]
        phases.append(Phase(i, kind, f"{kind}{counts[kind]}", int(epochs[i]), lrs[i], float(sparsities[i]),
                            criteria[i], schedules[i], optimizers[i], float(momentum), bool(nesterovs[i]),
                            float(decays[i])))
    return phases


def check_names(spec: RunSpec) -> None:
    """Registry names a run spec refers to; raises SpecError naming the field and the allowed values."""
    dataset_loader(spec.task.dataset)  # built-in, registered or a user's module:function
    if not spec.task.model.startswith(TORCHVISION_PREFIX):
        model_factory(spec.task.model)
    for phase in expand_phases(spec.pipeline):
        if phase.kind == "S" and phase.criterion not in CRITERIA:
            raise SpecError(f"pipeline.criterion: {phase.criterion!r} is unknown; allowed: {', '.join(CRITERIA)}")


def prefix_id(spec: RunSpec, length: int) -> str:
    """Name of the state after the first `length` phases: equal ids <=> bit-identical states.

    Everything that shapes those phases goes in: task, init, seed, the phases' settings and the
    pipeline options that decide which weights are prunable (they set the optimizer's groups).
    """
    pipe = spec.pipeline
    key = {
        "task": spec.task.model_dump(), "init": spec.init.model_dump(), "seed": spec.seed,
        "phases": [asdict(p) for p in expand_phases(pipe)[:length]],
        "exclude_first": pipe.exclude_first, "exclude": pipe.exclude, "gsm_budget": pipe.gsm_budget,
        "weight_histograms": pipe.weight_histograms,
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{pipe.flow[:length]}-s{spec.seed}-{digest}"


@dataclass
class PipelineResult:
    status: str  # ok | diverged
    history: list[dict]
    final: dict
    model: torch.nn.Module
    masks: Optional[Masks]
    layer_densities: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, dict] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """One trial's training: build task and model, then run the flow's phases epoch by epoch."""

    def __init__(self, spec: Union[dict, RunSpec], dataset: Optional[Union[Dataset, StreamingDataset]] = None,
                 device: Optional[Union[str, torch.device]] = None):
        self.spec = parse_run_spec(spec)
        check_names(self.spec)
        task = self.spec.task
        self.device = torch.device(device) if device is not None else select_device(task.device)
        self.data = dataset if dataset is not None else load_dataset(
            task.dataset, device=self.device, val_fraction=task.val_fraction, data_dir=task.data_dir,
            stream=task.stream, loader_workers=task.loader_workers, **task.dataset_args)
        seed_everything(self.spec.seed)
        self.model = build_model(task.model, self.data.input_shape, self.data.num_classes,
                                 **task.model_args).to(self.device)
        load_init_checkpoint(self.model, self.spec.init)  # init.checkpoint: start from trained weights
        if self.data.streaming and self.spec.init.density in ("snip", "grasp"):
            raise SpecError(f"init.density: {self.spec.init.density} scores a batch of tensors; streamed data "
                            f"(task.stream or a loader's Datasets) does not provide one yet; use erk or synflow")
        self.phases = expand_phases(self.spec.pipeline)
        pipe = self.spec.pipeline
        self.prunable = prunable_weights(self.model, exclude_first=pipe.exclude_first, exclude=pipe.exclude)
        if not self.prunable:
            raise SpecError(f"task.model: {task.model!r} has no prunable layers once the first layer and "
                            f"pipeline.exclude are left out")
        self.init_masks: Optional[Masks] = None
        self.layer_densities: dict[str, float] = {}
        if self.spec.init.density != "dense" or self.spec.init.weights != "base":
            from .sparsity.init import initialize  # only sparse inits pay for this import
            self.init_masks = initialize(self.model, self.prunable, self.spec.init, self.data, self.spec.seed)
            if self.init_masks is not None:
                self.layer_densities = self.init_masks.layer_densities()

        self._bind_masks(None)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.optimizer_phase = -1  # the phase whose settings the optimizer carries
        self.gsm = None
        self.generator = torch.Generator()
        self.phase_index = 0
        self.epoch_in_phase = 0
        self.phase_started = False
        self.global_epoch = 0
        self.status = "running"
        self.history: list[dict] = []
        self.phase_end: dict[str, float] = {}
        self.histograms: dict[str, dict] = {}
        self.extra: dict[str, Any] = {}

    # ---- phase transitions -----------------------------------------------------------------
    def _param_groups(self) -> list[dict]:
        # Group 0: every layer weight, prunable or not (e.g. the dense first layer); group 1: biases and
        # norms. G decays group 0 only: GSM's authors decay all conv/FC weights, never biases/norms.
        weights = list(prunable_weights(self.model, exclude_first=False).values())
        ids = {id(p) for p in weights}
        rest = [p for p in self.model.parameters() if id(p) not in ids]
        return [{"params": weights}] + ([{"params": rest}] if rest else [])

    def _build_optimizer(self, phase: Phase) -> torch.optim.Optimizer:
        optimizer = make_optimizer(self._param_groups(), phase.optimizer, phase.lr, phase.momentum,
                                   phase.nesterov, phase.weight_decay)
        set_hyperparameters(optimizer, phase.momentum, phase.nesterov, phase.weight_decay,
                            decay_groups={0} if phase.kind == "G" else None)
        return optimizer

    def _ensure_optimizer(self, phase: Phase) -> None:
        if self.optimizer is None or self.phases[self.optimizer_phase].optimizer != phase.optimizer:
            self.optimizer = self._build_optimizer(phase)
        else:
            set_hyperparameters(self.optimizer, phase.momentum, phase.nesterov, phase.weight_decay,
                                decay_groups={0} if phase.kind == "G" else None)
        self.optimizer_phase = phase.index

    def _start_phase(self, phase: Phase) -> None:
        self.generator = torch.Generator().manual_seed(derive_seed(self.spec.seed, phase.index))
        self._ensure_optimizer(phase)
        if self.masks is not None and phase.kind != "S":
            # Re-dense: pruned weights are already exactly 0; their momentum must restart from 0 too.
            self.applier.apply_to_optimizer_state(self.optimizer)
            self._bind_masks(None)
        if phase.kind == "S":
            if phase.index == 0 and self.init_masks is not None:
                masks = self.init_masks  # static sparse training from a sparse init
            else:
                criterion = CRITERIA[phase.criterion]
                masks = criterion(dict(self.prunable), phase.sparsity, generator=self.generator)
            self._set_masks(masks)
        elif phase.kind == "G":
            from .sparsity.gsm import GlobalSparseMomentum
            self.gsm = GlobalSparseMomentum(self.model, self.prunable, self.optimizer, phase.sparsity,
                                            budget=self.spec.pipeline.gsm_budget)
        self.phase_started = True

    def _bind_masks(self, masks: Optional[Masks]) -> None:
        self.masks = masks
        self.applier = MaskApplier(self.model, masks) if masks is not None else None
        # sparsity 0 (the fine-tune control) keeps everything: masking every step would only cost time.
        self.masks_full = masks is not None and all(bool(m.all()) for m in masks.tensors.values())

    def _set_masks(self, masks: Masks) -> None:
        self._bind_masks(masks)
        self.applier.apply_to_weights()
        if self.optimizer is not None:
            self.applier.apply_to_optimizer_state(self.optimizer)

    def _end_phase(self, phase: Phase, metrics: dict) -> None:
        if phase.kind == "G":
            self.gsm.truncate()
            self._set_masks(self.gsm.final_masks())  # weights pruned by GSM stay out until re-dense
            self.extra["gsm_layer_densities"] = self.masks.layer_densities()
            self.extra.setdefault("gsm_overlap", []).extend(self.gsm.overlap_history)
            self.gsm = None
            # Truncation changes the network: the phase-end accuracy is measured after it.
            metrics.update(self._evaluate())
            metrics["sparsity"] = self.measured_sparsity()
        self.phase_end[f"acc_after_{phase.label}"] = metrics["test_acc"]
        self.phase_end[f"val_acc_after_{phase.label}"] = metrics["val_acc"]
        metrics.update({k: v for k, v in self.phase_end.items() if k.endswith(phase.label)})
        if self.spec.pipeline.weight_histograms:
            self.histograms[phase.label] = self.weight_histogram()

    # ---- one epoch -------------------------------------------------------------------------
    def _evaluate(self) -> dict:
        bs = self.spec.task.eval_batch_size
        val_loss, val_acc = evaluate_batches(self.model, self.data.eval_batches("val", bs))
        test_loss, test_acc = evaluate_batches(self.model, self.data.eval_batches("test", bs))
        return {"val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc}

    def measured_sparsity(self) -> float:
        return measured_sparsity(self.prunable.values())

    def _train_one_epoch(self, phase: Phase) -> dict:
        lr = scheduled_lr(phase.schedule, phase.lr, self.epoch_in_phase, phase.epochs)
        set_lr(self.optimizer, lr)
        hooks: dict[str, Any] = {}
        if self.gsm is not None:
            hooks["step"] = self.gsm.step
        elif self.applier is not None and not self.masks_full:
            hooks["before_step"] = self.applier.apply_to_grads
            hooks["after_step"] = self.applier.apply_to_weights
        batches = self.data.train_batches(self.spec.task.batch_size, self.generator, self.spec.task.augment)
        train_loss = train_batches(self.model, batches, self.optimizer, **hooks)
        self.epoch_in_phase += 1
        self.global_epoch += 1
        metrics = {"epoch": self.global_epoch, "phase": phase.index, "phase_kind": phase.kind,
                   "phase_label": phase.label, "lr": lr, "train_loss": train_loss}
        if not math.isfinite(train_loss):
            self.status = "diverged"
            metrics.update({"val_loss": math.nan, "val_acc": math.nan, "test_loss": math.nan,
                            "test_acc": math.nan, "sparsity": math.nan})
            return metrics
        if self.gsm is not None:
            self.gsm.end_epoch()
        metrics.update(self._evaluate())
        metrics["sparsity"] = self.measured_sparsity()
        return metrics

    # ---- the run ---------------------------------------------------------------------------
    def run(self, on_epoch: Optional[EpochCallback] = None, stop_after_phase: Optional[int] = None) -> PipelineResult:
        """Run (or continue) the flow; `stop_after_phase` ends after that phase index (a prefix)."""
        while self.status == "running" and self.phase_index < len(self.phases):
            if stop_after_phase is not None and self.phase_index > stop_after_phase:
                break
            phase = self.phases[self.phase_index]
            if not self.phase_started:
                self._start_phase(phase)
            if phase.epochs == 0:  # a transition only (e.g. prune without retraining)
                metrics = {"epoch": self.global_epoch, "phase": phase.index, "phase_kind": phase.kind,
                           "phase_label": phase.label, "lr": 0.0, "train_loss": math.nan, **self._evaluate(),
                           "sparsity": self.measured_sparsity()}
            else:
                metrics = self._train_one_epoch(phase)
            if self.status != "diverged" and self.epoch_in_phase == phase.epochs:
                self._finish_phase(phase, metrics)
            self.history.append(metrics)
            if on_epoch is not None:
                on_epoch(metrics, self)
        if self.status == "running" and self.phase_index >= len(self.phases):
            self.status = "ok"
        return self.result()

    def _finish_phase(self, phase: Phase, metrics: dict) -> None:
        self._end_phase(phase, metrics)
        self.phase_index += 1
        self.epoch_in_phase = 0
        self.phase_started = False

    @property
    def finished(self) -> bool:
        return self.status != "running"

    def result(self) -> PipelineResult:
        final = dict(self.history[-1]) if self.history else {}
        final.update(self.phase_end)
        final["status"] = self.status if self.status != "running" else "partial"
        final["epochs_trained"] = self.global_epoch
        return PipelineResult(self.status, list(self.history), final, self.model, self.masks,
                              dict(self.layer_densities), dict(self.histograms), dict(self.extra))

    # ---- checkpoint / restore --------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue bit for bit (CPU); loads with torch.load(weights_only=True)."""
        state = {
            "phase_index": self.phase_index, "epoch_in_phase": self.epoch_in_phase,
            "phase_started": self.phase_started, "global_epoch": self.global_epoch, "status": self.status,
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "optimizer_phase": self.optimizer_phase,
            "masks": self.masks.state_dict() if self.masks is not None else None,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "history": [dict(h) for h in self.history],
            "phase_end": dict(self.phase_end),
            "histograms": self.histograms,
            "extra": self.extra,
            "gsm": self.gsm.state_dict() if self.gsm is not None else None,
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.phase_index = state["phase_index"]
        self.epoch_in_phase = state["epoch_in_phase"]
        self.phase_started = state["phase_started"]
        self.global_epoch = state["global_epoch"]
        self.status = state["status"]
        self.optimizer, self.optimizer_phase = None, state["optimizer_phase"]
        if state["optimizer"] is not None:
            self.optimizer = self._build_optimizer(self.phases[self.optimizer_phase])
            self.optimizer.load_state_dict(state["optimizer"])  # restores the group settings too
        self._bind_masks(None if state["masks"] is None else
                         Masks.from_state_dict(state["masks"], dict(self.model.named_parameters())))
        self.generator = torch.Generator()
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.history = [dict(h) for h in state["history"]]
        self.phase_end = dict(state["phase_end"])
        self.histograms = dict(state["histograms"])
        self.extra = dict(state["extra"])
        if state["gsm"] is not None:
            from .sparsity.gsm import GlobalSparseMomentum
            phase = self.phases[self.phase_index]
            self.gsm = GlobalSparseMomentum(self.model, self.prunable, self.optimizer, phase.sparsity,
                                            budget=self.spec.pipeline.gsm_budget)
            self.gsm.load_state_dict(state["gsm"])

    def save(self, path) -> None:
        torch.save(self.state_dict(), path)

    def restore(self, path) -> None:
        self.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))

    @torch.no_grad()
    def weight_histogram(self, bins: int = 80) -> dict:
        """Histogram of all prunable weight values (the DSD paper's Figure 2)."""
        flat = torch.cat([w.detach().reshape(-1).float() for w in self.prunable.values()])
        bound = float(flat.abs().max()) or 1.0
        counts = torch.histc(flat, bins=bins, min=-bound, max=bound)
        return {"min": -bound, "max": bound, "counts": counts.cpu().tolist()}


def run_pipeline(spec: Union[dict, RunSpec], on_epoch: Optional[EpochCallback] = None,
                 dataset: Optional[Dataset] = None) -> PipelineResult:
    """Run a whole flow from a spec with `task` / `init` / `pipeline` sections and an integer `seed`."""
    return Pipeline(spec, dataset=dataset).run(on_epoch)
