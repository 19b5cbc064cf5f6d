"""A flow of phases, the pipeline state, checkpoint/restore and per-epoch events.

What each phase kind does at its start, per step and at its end lives in `dsdtune.phases` (the kinds
and flow expansion); this module knows no kind, it runs them in order through the small interface
the kinds see (`phases.PhaseContext`, which `Pipeline` implements):
- a phase starts with its own data-order generator (derived from (seed, phase index), so arms that
  branch from one trained prefix see the same data order), the optimizer carried over with the
  phase's settings, then the kind's `start`, which returns the phase's state object;
- every epoch trains with the state's per-step hooks (each given the step index in the phase),
  evaluates and reports;
- a phase ends with the state's end, the phase-end metrics (`acc_after_<label>`, and with
  `diagnostics: [jacobian]` the Jacobian's singular values), the densities it leaves and the cost it
  recorded, and optional weight histograms.
Snapshots: the weights at a (phase, step) point that a later phase asks for (a lottery ticket's
rewind point) are kept with the pipeline's state, in checkpoints and shared prefixes.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

import torch

from .config import InitSpec, RunSpec, SpecError, parse_run_spec
from .cost import ModelCost, TrialCost, measure_model, trial_cost
from .data import Dataset, StreamingDataset, dataset_loader, load_dataset
from .models import TORCHVISION_PREFIX, build_model, model_factory
from .phases import (
    Phase, PhaseState, check_flow, check_phases, expand_phases, flow_snapshots, kind_of, resolve_exclude_first,
    steps_per_epoch,
)
from .seeding import generator as seeded_generator, seed_everything
from .sparsity.checkpoint import load_init_checkpoint
from .sparsity.masks import MaskApplier, Masks, measured_sparsity, prunable_weights
from .training import (
    evaluate_batches, make_optimizer, scheduled_lr, select_device, set_hyperparameters, set_lr, train_batches,
)

EpochCallback = Callable[[dict, "Pipeline"], None]


def check_names(spec: RunSpec, unused_blocks: bool = True) -> None:
    """Registry names and combinations a run spec refers to; raises SpecError (one line).

    `unused_blocks` False refuses a kind's settings block that the flow does not use (a study checks
    that no arm uses it instead: its arms share one base spec).
    """
    dataset_loader(spec.task.dataset)  # built-in, registered or a user's module:function
    if not spec.task.model.startswith(TORCHVISION_PREFIX):
        model_factory(spec.task.model)
    check_flow(spec.pipeline, unused_blocks=unused_blocks)
    check_phases(spec.pipeline, spec.init, expand_phases(spec.pipeline, spec.init))


def needs_init(init: InitSpec) -> bool:
    """Whether the init scheme changes anything the model's own init did."""
    return init.sparse or init.weights != "base" or init.base != "default" or init.bias != "default"


def prefix_id(spec: RunSpec, length: int) -> str:
    """Name of the state after the first `length` phases: equal ids <=> bit-identical states.

    Everything that shapes those phases goes in: task, init, seed, the phases' settings and the
    pipeline options that decide which weights are prunable (they set the optimizer's groups).
    """
    pipeline_spec = spec.pipeline
    key = {
        "task": spec.task.model_dump(), "init": spec.init.model_dump(), "seed": spec.seed,
        "phases": [asdict(p) for p in expand_phases(pipeline_spec, spec.init)[:length]],
        "exclude_first": resolve_exclude_first(pipeline_spec), "exclude": pipeline_spec.exclude,
        "weight_histograms": pipeline_spec.weight_histograms,
    }
    if pipeline_spec.diagnostics:  # they add metrics, so a prefix with them is a different state to restore
        key.update({"diagnostics": pipeline_spec.diagnostics, "jacobian_samples": pipeline_spec.jacobian_samples})
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{pipeline_spec.flow[:length]}-s{spec.seed}-{digest}"


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
    """One trial's training: build task and model, then run the flow's phases epoch by epoch.

    `snapshots` adds (phase index, step) points to keep the weights of, beyond what the flow's own
    kinds ask for: the trial that trains a shared prefix keeps what every arm sharing it needs.
    """

    def __init__(self, spec: Union[dict, RunSpec], dataset: Optional[Union[Dataset, StreamingDataset]] = None,
                 device: Optional[Union[str, torch.device]] = None, snapshots: Iterable[tuple[int, int]] = ()):
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
        self.steps_per_epoch = steps_per_epoch(self.data.num_train, task.batch_size)
        for phase in self.phases:
            kind_of(phase.kind).check_steps(phase, self.phases, self.steps_per_epoch)
        self.snapshot_points = sorted(set(flow_snapshots(self.phases)) | {tuple(p) for p in snapshots})
        self.exclude_first = resolve_exclude_first(self.spec.pipeline)
        self.prunable = prunable_weights(self.model, exclude_first=self.exclude_first,
                                         exclude=self.spec.pipeline.exclude)
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
        self.phase_state: Optional[PhaseState] = None  # the running phase's state (its kind's object)
        self.snapshots: dict[str, dict[str, torch.Tensor]] = {}
        self.data_generator = torch.Generator()
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

    # ---- the interface phase kinds see (dsdtune.phases.PhaseContext) --------------------------
    @property
    def phase(self) -> Phase:
        return self.phases[self.phase_index]

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the running phase."""
        return self.phase.epochs * self.steps_per_epoch

    def generator(self, stream: int) -> torch.Generator:
        """The running phase's own generator for `stream` (never the data order's)."""
        return seeded_generator(self.spec.seed, self.phase_index, 1000 + int(stream))

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
        """Per-step hooks keeping masked weights at exactly zero (none when nothing is masked).

        Only the gradients need masking: `set_masks` zeroes the masked weights and their optimizer
        state, and SGD (momentum, Nesterov, weight decay) and Adam then move a weight only by its
        gradient, its decay term (wd x 0) and that state, all exactly 0 where masked. Bound to the
        masks of now: a phase that changes its masks mid-epoch uses `mask_grads`, which follows the
        bound masks (and `mask_weights` after changing weights by other means)."""
        if self.applier is None or self.masks_full:
            return {}
        return {"before_step": self.applier.apply_to_grads}

    def mask_grads(self, step: int = 0) -> None:
        if self.applier is not None and not self.masks_full:
            self.applier.apply_to_grads()

    def mask_weights(self, step: int = 0) -> None:
        if self.applier is not None and not self.masks_full:
            self.applier.apply_to_weights()

    def reset_optimizer(self) -> None:
        """Fresh optimizer state (momentum, Adam moments) with the running phase's settings."""
        self.optimizer = self._build_optimizer(self.phase)
        self.optimizer_phase = self.phase_index

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load a model state (e.g. a snapshot) into the model; the bound masks are applied after it."""
        self.model.load_state_dict(state)
        if self.applier is not None:
            self.applier.apply_to_weights()

    def snapshot(self, phase_index: int, step: int) -> dict[str, torch.Tensor]:
        """The model's state after `step` optimizer steps of phase `phase_index` (asked for in advance)."""
        key = _snapshot_key(phase_index, step)
        if key not in self.snapshots:
            raise RuntimeError(f"no snapshot of phase {phase_index} at step {step}: a kind must ask for it "
                               f"with PhaseKind.snapshots before the flow runs")
        return self.snapshots[key]

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
        self.data_generator = seeded_generator(self.spec.seed, phase.index)
        self._ensure_optimizer(phase)
        self._take_snapshot(phase.index, 0)  # the weights the phase starts from (a lottery ticket's step 0)
        self.phase_state = kind_of(phase.kind).start(self, phase)
        self.phase_started = True

    def _bind_masks(self, masks: Optional[Masks]) -> None:
        self.masks = masks
        self.applier = MaskApplier(self.model, masks) if masks is not None else None
        # sparsity 0 (the fine-tune control) keeps everything: masking every step would only cost time.
        self.masks_full = masks is not None and all(bool(m.all()) for m in masks.tensors.values())

    def _take_snapshot(self, phase_index: int, step: int) -> None:
        key = _snapshot_key(phase_index, step)
        if (phase_index, step) in self.snapshot_points and key not in self.snapshots:
            self.snapshots[key] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _end_phase(self, phase: Phase, metrics: dict) -> None:
        state = self.phase_state
        state.end(metrics)
        self.extra.setdefault("phase_costs", {})[phase.label] = state.cost_record()
        if self.masks is not None:  # the densities this phase leaves (layers.csv; S: the ones it trained at)
            self.extra.setdefault("phase_layer_densities", {})[phase.label] = self.masks.layer_densities()
        self.phase_state = None
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

    def _epoch_hooks(self, phase: Phase, first_step: int) -> dict[str, Any]:
        hooks = dict(self.phase_state.hooks())
        due = [s for p, s in self.snapshot_points if p == phase.index and first_step < s <= first_step +
               self.steps_per_epoch and _snapshot_key(p, s) not in self.snapshots]
        if due:  # keep the weights after `s` steps: after the optimizer step of index s - 1
            inner = hooks.get("after_step")

            def after_step(step: int) -> None:
                if inner is not None:
                    inner(step)
                if step + 1 in due:
                    self._take_snapshot(phase.index, step + 1)

            hooks["after_step"] = after_step
        return hooks

    def _train_one_epoch(self, phase: Phase) -> dict:
        lr = scheduled_lr(phase.schedule, phase.lr, self.epoch_in_phase, phase.epochs)
        set_lr(self.optimizer, lr)
        first_step = self.epoch_in_phase * self.steps_per_epoch
        # The one place the pipeline iterates over training data (tensors on the device, or streamed).
        batches = self.data.train_batches(self.spec.task.batch_size, self.data_generator, self.spec.task.augment)
        train_loss = train_batches(self.model, batches, self.optimizer, first_step=first_step,
                                   **self._epoch_hooks(phase, first_step))
        self.epoch_in_phase += 1
        self.global_epoch += 1
        metrics = {"epoch": self.global_epoch, "phase": phase.index, "phase_kind": phase.kind,
                   "phase_label": phase.label, "lr": lr, "train_loss": train_loss}
        if not math.isfinite(train_loss):
            self.status = "diverged"
            metrics.update({"val_loss": math.nan, "val_acc": math.nan, "test_loss": math.nan,
                            "test_acc": math.nan, "sparsity": math.nan})
            return metrics
        self.phase_state.end_epoch()
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

    # ---- cost ------------------------------------------------------------------------------
    def measure(self) -> ModelCost:
        """The model's dense forward FLOPs per sample and layer, measured on one batch of the data."""
        split = "val" if _has_rows(self.data, "val") else "test"
        batch, _ = next(iter(self.data.eval_batches(split, min(self.spec.task.batch_size, 8))))
        return measure_model(self.model, batch, list(self.prunable))

    def cost(self, model_cost: Optional[ModelCost] = None) -> TrialCost:
        """Training FLOPs of the phases run so far (as their kinds recorded them) and the final model's
        parameters and inference FLOPs as it is now (its non-zero entries counted)."""
        model_cost = model_cost or self.measure()
        records = [(p, self.extra.get("phase_costs", {}).get(p.label)) for p in self.phases[:self.phase_index]]
        return trial_cost(model_cost, records, self.data.num_train, self.spec.task.batch_size, self.model)

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
            "generator": self.data_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "history": [dict(h) for h in self.history],
            "phase_end": dict(self.phase_end),
            "histograms": self.histograms,
            "extra": self.extra,
            "snapshots": {k: {n: t.cpu() for n, t in v.items()} for k, v in self.snapshots.items()},
            "phase_state": self.phase_state.state_dict() if self.phase_state is not None else None,
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
        self.data_generator = torch.Generator()
        self.data_generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.history = [dict(h) for h in state["history"]]
        self.phase_end = dict(state["phase_end"])
        self.histograms = dict(state["histograms"])
        self.extra = dict(state["extra"])
        self.snapshots = {k: {n: t.to(self.device) for n, t in v.items()} for k, v in state["snapshots"].items()}
        self.phase_state = None
        if self.phase_started and self.phase_index < len(self.phases):
            phase = self.phases[self.phase_index]
            self.phase_state = kind_of(phase.kind).resume(self, phase, state["phase_state"] or {})

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


def _snapshot_key(phase_index: int, step: int) -> str:
    return f"{phase_index}:{step}"


def _has_rows(data, split: str) -> bool:
    return any(True for _ in data.eval_batches(split, 1))


def run_pipeline(spec: Union[dict, RunSpec], on_epoch: Optional[EpochCallback] = None,
                 dataset: Optional[Dataset] = None) -> PipelineResult:
    """Run a whole flow from a spec with `task` / `init` / `pipeline` sections and an integer `seed`."""
    return Pipeline(spec, dataset=dataset).run(on_epoch)
