"""A flow of phases, the pipeline state, checkpoint/restore and per-epoch events.

What each phase kind does at its start, per step and at its end lives in `dsdtune.phases` (D dense,
S sparse with a fixed mask, G global sparse momentum); this module runs them in order:
- a phase starts with its own generator (derived from (seed, phase index), so arms that branch from
  one trained prefix see the same data order), the optimizer carried over with the phase's
  settings, then the kind's transition;
- every epoch trains with the kind's per-step hooks, evaluates and reports;
- a phase ends with the kind's end, the phase-end metrics (`acc_after_<label>`, and with
  `diagnostics: [jacobian]` the Jacobian's singular values) and optional weight histograms.

Semantic checks (`check_names`): a sparse init needs a flow that starts with S (its mask is that
phase's mask), and that phase's sparsity comes from the init (an explicit, different
`pipeline.sparsity` is refused).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Union

import torch

from .config import InitSpec, PipelineSpec, RunSpec, SpecError, _as_list, parse_run_spec
from .data import Dataset, StreamingDataset, dataset_loader, load_dataset
from .models import TORCHVISION_PREFIX, build_model, model_factory
from .phases import PHASE_KINDS, init_mask_letters, kind_of, resolve_exclude_first
from .sparsity.checkpoint import load_init_checkpoint
from .sparsity.masks import MaskApplier, Masks, measured_sparsity, prunable_weights
from .seeding import generator, seed_everything
from .training import (
    evaluate_batches, make_optimizer, scheduled_lr, select_device, set_hyperparameters, set_lr, train_batches,
)

DEFAULT_SPARSITY = 0.5  # a sparse phase's target when pipeline.sparsity is not set (DSD's CNN setting)

EpochCallback = Callable[[dict, "Pipeline"], None]


@dataclass(frozen=True)
class Phase:
    index: int
    kind: str  # a letter of dsdtune.phases.PHASE_KINDS
    label: str  # D1, S1, D2, ... (kind + ordinal of that kind)
    epochs: int
    lr: float
    sparsity: float  # target for sparse kinds, 0 for the others
    criterion: str
    schedule: str
    optimizer: str
    momentum: float
    nesterov: bool
    weight_decay: float


def check_flow(spec: PipelineSpec) -> None:
    """Phase letters known, and sparse-only lists aligned with the flow's sparse phases."""
    unknown = sorted({c for c in spec.flow if c not in PHASE_KINDS})
    if unknown:
        allowed = ", ".join(f"{k} ({v.name})" for k, v in PHASE_KINDS.items())
        raise SpecError(f"pipeline.flow: unknown phase kind {', '.join(unknown)} in {spec.flow!r}; allowed: {allowed}")
    n, n_sparse = len(spec.flow), sum(kind_of(c).sparse for c in spec.flow)
    for name in ("sparsity", "criterion"):
        value = getattr(spec, name)
        if isinstance(value, list) and len(value) not in (n, n_sparse):
            raise SpecError(f"pipeline.{name}: has {len(value)} entries; flow {spec.flow!r} needs {n} (one per "
                            f"phase) or {n_sparse} (one per sparse phase)")


def _init_density_phase(spec: PipelineSpec, init: Optional[InitSpec]) -> bool:
    """Whether the first phase takes its mask (and sparsity) from a sparse init."""
    return init is not None and init.sparse and kind_of(spec.flow[0]).trains_init_mask


def expand_phases(spec: PipelineSpec, init: Optional[InitSpec] = None) -> list[Phase]:
    """Per-phase settings from scalars (broadcast) or lists (aligned with the flow or sparse phases).

    With a sparse `init` and a flow whose first phase trains its mask, that phase's sparsity is the
    init's (1 - init.init_density).
    """
    check_flow(spec)
    flow = spec.flow
    n = len(flow)
    sparse = [kind_of(c).sparse for c in flow]

    def per_phase(value):
        return list(value) if isinstance(value, list) else [value] * n

    def per_sparse_phase(value, dense_value):
        values = _as_list(value)
        if len(values) == n:
            return [v if is_sparse else dense_value for v, is_sparse in zip(values, sparse)]
        if len(values) == 1:
            return [values[0] if is_sparse else dense_value for is_sparse in sparse]
        it = iter(values)
        return [next(it) if is_sparse else dense_value for is_sparse in sparse]

    lrs: list[float] = []
    for i, lr in enumerate(_as_list(spec.lr) if isinstance(spec.lr, list) else [spec.lr] + [None] * (n - 1)):
        lrs.append(float(lr) if lr is not None else lrs[i - 1] * spec.lr_decay)
    epochs, schedules, optimizers = per_phase(spec.epochs), per_phase(spec.schedule), per_phase(spec.optimizer)
    momenta, nesterovs, decays = per_phase(spec.momentum), per_phase(spec.nesterov), per_phase(spec.weight_decay)
    sparsities = per_sparse_phase(DEFAULT_SPARSITY if spec.sparsity is None else spec.sparsity, 0.0)
    if not isinstance(spec.sparsity, list) and spec.sparsity_decay != 1.0:
        order = [sum(sparse[:i]) for i in range(n)]  # index among the sparse phases
        sparsities = [s * spec.sparsity_decay ** order[i] for i, s in enumerate(sparsities)]
    if _init_density_phase(spec, init):
        sparsities[0] = 1.0 - init.init_density  # the init's mask is this phase's mask
    criteria = per_sparse_phase(spec.criterion, "")
    counts: dict[str, int] = {}
    phases = []
    for i, letter in enumerate(flow):
        counts[letter] = counts.get(letter, 0) + 1
        uses_gsm = kind_of(letter).uses_gsm_momentum and not isinstance(spec.momentum, list)
        momentum = spec.gsm_momentum if uses_gsm else momenta[i]
        phases.append(Phase(i, letter, f"{letter}{counts[letter]}", int(epochs[i]), lrs[i], float(sparsities[i]),
                            criteria[i], schedules[i], optimizers[i], float(momentum), bool(nesterovs[i]),
                            float(decays[i])))
    return phases


def check_names(spec: RunSpec) -> None:
    """Registry names and combinations a run spec refers to; raises SpecError (one line)."""
    dataset_loader(spec.task.dataset)  # built-in, registered or a user's module:function
    if not spec.task.model.startswith(TORCHVISION_PREFIX):
        model_factory(spec.task.model)
    pipe, init = spec.pipeline, spec.init
    check_flow(pipe)
    if init.sparse and not kind_of(pipe.flow[0]).trains_init_mask:
        raise SpecError(f"pipeline.flow: a sparse init (init.density {init.density}) needs a flow that starts "
                        f"with {' or '.join(init_mask_letters())} (static sparse training from its mask), got "
                        f"{pipe.flow!r}; use init.density: dense for other flows")
    phases = expand_phases(pipe, init)
    if _init_density_phase(pipe, init) and pipe.sparsity is not None:
        given = _as_list(pipe.sparsity)[0]
        if abs(float(given) - phases[0].sparsity) > 1e-9:
            raise SpecError(f"pipeline.sparsity: the first S phase trains the sparse init's mask (init.init_density "
                            f"{init.init_density:g} = sparsity {phases[0].sparsity:g}), not {given:g}; leave "
                            f"pipeline.sparsity unset or set init.init_density")
    for phase in phases:
        kind_of(phase.kind).check(phase)


def needs_init(init: InitSpec) -> bool:
    """Whether the init scheme changes anything the model's own init did."""
    return init.sparse or init.weights != "base" or init.base != "default" or init.bias != "default"


def prefix_id(spec: RunSpec, length: int) -> str:
    """Name of the state after the first `length` phases: equal ids <=> bit-identical states.

    Everything that shapes those phases goes in: task, init, seed, the phases' settings and the
    pipeline options that decide which weights are prunable (they set the optimizer's groups).
    """
    pipe = spec.pipeline
    key = {
        "task": spec.task.model_dump(), "init": spec.init.model_dump(), "seed": spec.seed,
        "phases": [asdict(p) for p in expand_phases(pipe, spec.init)[:length]],
        "exclude_first": resolve_exclude_first(pipe), "exclude": pipe.exclude, "gsm_budget": pipe.gsm_budget,
        "weight_histograms": pipe.weight_histograms,
    }
    if pipe.diagnostics:  # they add metrics, so a prefix with them is a different state to restore
        key.update({"diagnostics": pipe.diagnostics, "jacobian_samples": pipe.jacobian_samples})
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
        self.phases = expand_phases(self.spec.pipeline, self.spec.init)
        pipe = self.spec.pipeline
        self.exclude_first = resolve_exclude_first(pipe)
        self.prunable = prunable_weights(self.model, exclude_first=self.exclude_first, exclude=pipe.exclude)
        if not self.prunable:
            raise SpecError(f"task.model: {task.model!r} has no prunable layers once the first layer and "
                            f"pipeline.exclude are left out")
        self.init_masks: Optional[Masks] = None
        self.layer_densities: dict[str, float] = {}
        self.init_result = None
        if needs_init(self.spec.init):
            from .sparsity.init import initialize  # only sparse inits pay for this import
            self.init_result = initialize(self.model, self.prunable, self.spec.init, self.data, self.spec.seed)
            self.init_masks = self.init_result.masks
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
        if self.init_result is not None and self.init_result.floored:
            self.extra["init_floored_layers"] = list(self.init_result.floored)
        if self.init_masks is not None:  # how many layers EOI's floors held (every weight scheme alike)
            self.phase_end["init_floored_layers"] = float(len(self.init_result.floored))
        self._record_diagnostics("init")

    # ---- phase transitions -----------------------------------------------------------------
    def _param_groups(self) -> list[dict]:
        # Group 0: every layer weight, prunable or not (e.g. the dense first layer); group 1: biases and
        # norms. Kinds that decay weights only (G) decay group 0: GSM's authors never decay biases/norms.
        weights = list(prunable_weights(self.model, exclude_first=False).values())
        ids = {id(p) for p in weights}
        rest = [p for p in self.model.parameters() if id(p) not in ids]
        return [{"params": weights}] + ([{"params": rest}] if rest else [])

    def _set_hyperparameters(self, optimizer: torch.optim.Optimizer, phase: Phase) -> None:
        set_hyperparameters(optimizer, phase.momentum, phase.nesterov, phase.weight_decay,
                            decay_groups={0} if kind_of(phase.kind).decays_weights_only else None)

    def _build_optimizer(self, phase: Phase) -> torch.optim.Optimizer:
        optimizer = make_optimizer(self._param_groups(), phase.optimizer, phase.lr, phase.momentum,
                                   phase.nesterov, phase.weight_decay)
        self._set_hyperparameters(optimizer, phase)
        return optimizer

    def _ensure_optimizer(self, phase: Phase) -> None:
        if self.optimizer is None or self.phases[self.optimizer_phase].optimizer != phase.optimizer:
            self.optimizer = self._build_optimizer(phase)
        else:
            self._set_hyperparameters(self.optimizer, phase)
        self.optimizer_phase = phase.index

    def _start_phase(self, phase: Phase) -> None:
        self.generator = generator(self.spec.seed, phase.index)
        self._ensure_optimizer(phase)
        kind_of(phase.kind).start(self, phase)
        if self.masks is not None:  # the densities this phase trains at (exact costs, layers.csv)
            self.extra.setdefault("phase_layer_densities", {})[phase.label] = self.masks.layer_densities()
        self.phase_started = True

    # Helpers the phase kinds use.
    def release_masks(self) -> None:
        """Drop the masks (re-dense): pruned weights are exactly 0; their momentum restarts from 0 too."""
        if self.masks is not None:
            self.applier.apply_to_optimizer_state(self.optimizer)
            self._bind_masks(None)

    def set_masks(self, masks: Masks) -> None:
        """Bind masks and apply them at once to the weights and every optimizer buffer."""
        self._bind_masks(masks)
        self.applier.apply_to_weights()
        if self.optimizer is not None:
            self.applier.apply_to_optimizer_state(self.optimizer)

    def mask_hooks(self) -> dict[str, Any]:
        """Per-step hooks keeping masked weights at exactly zero (none when nothing is masked)."""
        if self.applier is None or self.masks_full:
            return {}
        return {"before_step": self.applier.apply_to_grads, "after_step": self.applier.apply_to_weights}

    def _bind_masks(self, masks: Optional[Masks]) -> None:
        self.masks = masks
        self.applier = MaskApplier(self.model, masks) if masks is not None else None
        # sparsity 0 (the fine-tune control) keeps everything: masking every step would only cost time.
        self.masks_full = masks is not None and all(bool(m.all()) for m in masks.tensors.values())

    def _end_phase(self, phase: Phase, metrics: dict) -> None:
        kind_of(phase.kind).end(self, phase, metrics)
        self.phase_end[f"acc_after_{phase.label}"] = metrics["test_acc"]
        self.phase_end[f"val_acc_after_{phase.label}"] = metrics["val_acc"]
        self._record_diagnostics(f"after_{phase.label}")
        metrics.update({k: v for k, v in self.phase_end.items() if k.endswith(phase.label)})
        if self.spec.pipeline.weight_histograms:
            self.histograms[phase.label] = self.weight_histogram()

    def _record_diagnostics(self, when: str) -> None:
        """`diagnostics: [jacobian]`: the input-to-logits Jacobian's singular values, as phase-end metrics."""
        if "jacobian" in self.spec.pipeline.diagnostics:
            from .diagnostics import jacobian_stats
            inputs, _ = next(iter(self.data.eval_batches("val", self.spec.pipeline.jacobian_samples)))
            self.phase_end.update({f"{k}_{when}": v for k, v in jacobian_stats(self.model, inputs).items()})

    # ---- one epoch -------------------------------------------------------------------------
    def evaluate(self) -> dict:
        bs = self.spec.task.eval_batch_size
        val_loss, val_acc = evaluate_batches(self.model, self.data.eval_batches("val", bs))
        test_loss, test_acc = evaluate_batches(self.model, self.data.eval_batches("test", bs))
        return {"val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc}

    def measured_sparsity(self) -> float:
        return measured_sparsity(self.prunable.values())

    def _train_one_epoch(self, phase: Phase) -> dict:
        lr = scheduled_lr(phase.schedule, phase.lr, self.epoch_in_phase, phase.epochs)
        set_lr(self.optimizer, lr)
        kind = kind_of(phase.kind)
        # The one place the pipeline iterates over training data (tensors on the device, or streamed).
        batches = self.data.train_batches(self.spec.task.batch_size, self.generator, self.spec.task.augment)
        train_loss = train_batches(self.model, batches, self.optimizer, **kind.hooks(self))
        self.epoch_in_phase += 1
        self.global_epoch += 1
        metrics = {"epoch": self.global_epoch, "phase": phase.index, "phase_kind": phase.kind,
                   "phase_label": phase.label, "lr": lr, "train_loss": train_loss}
        if not math.isfinite(train_loss):
            self.status = "diverged"
            metrics.update({"val_loss": math.nan, "val_acc": math.nan, "test_loss": math.nan,
                            "test_acc": math.nan, "sparsity": math.nan})
            return metrics
        kind.end_epoch(self)
        metrics.update(self.evaluate())
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
                           "phase_label": phase.label, "lr": 0.0, "train_loss": math.nan, **self.evaluate(),
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
            "phase_kind_state": kind_of(self.phases[self.phase_index].kind).state_dict(self)
            if self.phase_index < len(self.phases) else None,
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
        if self.phase_index < len(self.phases):
            phase = self.phases[self.phase_index]
            kind_of(phase.kind).load_state_dict(self, phase, state.get("phase_kind_state"))

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
