"""Phase kinds as registered objects: what a phase does at its start, at every step, and at its end.

A flow is a string of phase letters ("DSD", "DGD", "S"). Each letter names a `PhaseKind`:
- `start(pipe, phase)`: the transition into the phase (choose masks, drop them, build GSM ...);
- `hooks(pipe)`: the per-step hooks the epoch loop calls (`before_step`, `after_step`, or `step`
  replacing the optimizer step);
- `end_epoch(pipe)` and `end(pipe, phase, metrics)`: bookkeeping after an epoch and at the phase end
  (GSM truncates; the end's metrics are measured after it);
- `state_dict` / `load_state_dict`: what a checkpoint taken inside the phase must carry.
Class attributes say how the spec maps onto the phase: `sparse` (takes a target sparsity and a
criterion), `uses_gsm_momentum`, `decays_weights_only`, `includes_first_layer` (the method's own
default for `pipeline.exclude_first`).

Adding a method (gradual magnitude pruning, RigL/SET, lottery-ticket rewinding) is one subclass here
and one `register` call; config, pipeline and report look kinds up in `PHASE_KINDS`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from .config import PipelineSpec, SpecError
from .sparsity.prune import CRITERIA

if TYPE_CHECKING:  # the pipeline passes itself in; no import cycle at run time
    from .pipeline import Phase, Pipeline


class PhaseKind:
    letter: str = ""
    name: str = ""
    sparse: bool = False  # takes a target sparsity (and a criterion, if `criteria` is not None)
    criteria: Optional[dict] = None  # allowed `pipeline.criterion` values, None if the kind has none
    uses_gsm_momentum: bool = False  # a scalar pipeline.momentum yields to pipeline.gsm_momentum
    decays_weights_only: bool = False  # weight decay on layer weights only, never biases/norms
    includes_first_layer: bool = False  # the method's own default: prune the first layer too
    trains_init_mask: bool = False  # as a flow's first phase, it trains a sparse init's mask

    def check(self, phase: "Phase") -> None:
        if self.criteria is not None and phase.criterion not in self.criteria:
            raise SpecError(f"pipeline.criterion: {phase.criterion!r} is unknown; allowed: {', '.join(self.criteria)}")

    def start(self, pipe: "Pipeline", phase: "Phase") -> None:
        pass

    def hooks(self, pipe: "Pipeline") -> dict[str, Any]:
        return {}

    def end_epoch(self, pipe: "Pipeline") -> None:
        pass

    def end(self, pipe: "Pipeline", phase: "Phase", metrics: dict) -> None:
        pass

    def state_dict(self, pipe: "Pipeline") -> Optional[dict]:
        return None

    def load_state_dict(self, pipe: "Pipeline", phase: "Phase", state: Optional[dict]) -> None:
        pass


PHASE_KINDS: dict[str, PhaseKind] = {}


def register(kind: PhaseKind) -> PhaseKind:
    if len(kind.letter) != 1 or not kind.letter.isupper():
        raise ValueError(f"a phase kind is one capital letter, got {kind.letter!r}")
    PHASE_KINDS[kind.letter] = kind
    return kind


def kind_of(letter: str) -> PhaseKind:
    return PHASE_KINDS[letter]


def init_mask_letters() -> str:
    return "".join(k for k, v in PHASE_KINDS.items() if v.trains_init_mask)


class Dense(PhaseKind):
    """D: train every weight. After a masked phase (re-dense) the pruned weights restart from
    exactly zero with zero momentum, and the mask is dropped."""

    letter, name = "D", "dense"

    def start(self, pipe, phase):
        pipe.release_masks()

    def hooks(self, pipe):
        return pipe.mask_hooks()


class Sparse(PhaseKind):
    """S: masks chosen at the phase start by the criterion (or the sparse init's, for a flow that
    starts with S), fixed during the phase; gradients masked before and weights after each step."""

    letter, name = "S", "sparse"
    sparse = True
    trains_init_mask = True
    criteria = CRITERIA

    def start(self, pipe, phase):
        if phase.index == 0 and pipe.init_masks is not None:
            masks = pipe.init_masks  # static sparse training from a sparse init
        else:
            masks = CRITERIA[phase.criterion](dict(pipe.prunable), phase.sparsity, generator=pipe.generator)
        pipe.set_masks(masks)

    def hooks(self, pipe):
        return pipe.mask_hooks()


class GlobalSparseMomentum(PhaseKind):
    """G: global sparse momentum SGD (see `dsdtune.sparsity.gsm`), truncated at the phase end. The
    official code puts the first layer in the global top-Q, so G includes it by default."""

    letter, name = "G", "gsm"
    sparse = True
    uses_gsm_momentum = True
    decays_weights_only = True
    includes_first_layer = True

    def _build(self, pipe, phase):
        from .sparsity.gsm import GlobalSparseMomentum as GSM
        return GSM(pipe.model, pipe.prunable, pipe.optimizer, phase.sparsity, budget=pipe.spec.pipeline.gsm_budget)

    def start(self, pipe, phase):
        pipe.release_masks()
        pipe.gsm = self._build(pipe, phase)

    def hooks(self, pipe):
        return {"step": pipe.gsm.step}

    def end_epoch(self, pipe):
        pipe.gsm.end_epoch()

    def end(self, pipe, phase, metrics):
        pipe.gsm.truncate()
        pipe.set_masks(pipe.gsm.final_masks())  # weights pruned by GSM stay out until re-dense
        pipe.extra["gsm_layer_densities"] = pipe.masks.layer_densities()
        pipe.extra.setdefault("gsm_overlap", []).extend(pipe.gsm.overlap_history)
        pipe.gsm = None
        # Truncation changes the network: the phase-end accuracy is measured after it.
        metrics.update(pipe.evaluate())
        metrics["sparsity"] = pipe.measured_sparsity()

    def state_dict(self, pipe):
        return pipe.gsm.state_dict() if pipe.gsm is not None else None

    def load_state_dict(self, pipe, phase, state):
        if state is not None:
            pipe.gsm = self._build(pipe, phase)
            pipe.gsm.load_state_dict(state)


register(Dense())
register(Sparse())
register(GlobalSparseMomentum())


def resolve_exclude_first(spec: PipelineSpec) -> bool:
    """`pipeline.exclude_first`, or the methods' own default when it is not set: the first layer
    is kept dense (the DSD paper) unless every sparse phase of the flow is of a kind that includes
    it (GSM's official code)."""
    if spec.exclude_first is not None:
        return bool(spec.exclude_first)
    kinds = [PHASE_KINDS[c] for c in spec.flow if PHASE_KINDS[c].sparse]
    return not (kinds and all(k.includes_first_layer for k in kinds))
