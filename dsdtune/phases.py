"""Phase kinds: the one place a sparse-training method lives.

A flow is a string of phase letters ("DSD", "DMD", "DLLL"); each letter names a `PhaseKind`. A kind owns
- its **settings**: class attributes that say how the pipeline's per-phase lists apply to it (`sparse`:
  it takes a target `pipeline.sparsity`; `criteria`: the `pipeline.criterion` values it accepts) and,
  optionally, its own block in the study file (`settings_key`, validated by its `Settings` model, e.g.
  `pipeline.gradual: {every_steps: 100}`);
- its **state**: `start()` makes the transition into the phase (choose masks, drop them, rewind) and
  returns a `PhaseState`, the object that lives for the phase: per-step hooks that know the step index
  in the phase (and `ctx.total_steps`), epoch and phase ends, and `state_dict()` for checkpoints and
  shared prefixes, so a run resumed in the middle of any phase continues bit for bit;
- its **cost**: the state records the per-layer densities it trains at from each step on
  (`record_densities`) and any extra work (`record_work`, e.g. RigL's dense gradients), which
  `dsdtune.cost` turns into training FLOPs; nothing else looks at a kind's letter.

Kinds talk to the pipeline through `PhaseContext` (the model, its prunable weights, the optimizer, the
masks, seeded generators, snapshots of earlier weights); this module never imports the pipeline.
Flow expansion (per-phase settings from scalars or lists) lives here, next to the kinds it reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Protocol

import torch
from pydantic import Field, StrictFloat, StrictInt, ValidationError, model_validator

from .config import InitSpec, KindSettings, PipelineSpec, SpecError, _as_list, format_validation_error
from .registry import Registry
from .sparsity.masks import Masks
from .sparsity.dst import drop_and_grow_layers
from .sparsity.prune import CRITERIA, MAGNITUDE_CRITERIA
from .sparsity.schedules import cosine_drop_fraction, gmp_sparsity, is_dst_update_step, is_gmp_step, phase_step

DEFAULT_SPARSITY = 0.5  # a sparse phase's target when pipeline.sparsity is not set (DSD's CNN setting)

Densities = dict[str, float]  # prunable weight name -> density; {} means every layer dense


@dataclass(frozen=True)
class Phase:
    index: int
    kind: str  # a letter of PHASE_KINDS
    label: str  # D1, S1, D2, ... (kind + ordinal of that kind)
    epochs: int
    lr: float
    sparsity: float  # target for sparse kinds, 0 for the others
    criterion: str  # "" for kinds without one
    schedule: str
    optimizer: str
    momentum: float
    nesterov: bool
    weight_decay: float
    settings: dict = field(default_factory=dict)  # the kind's own block, validated, defaults filled in


class PhaseContext(Protocol):
    """What a phase kind may read and change; the pipeline implements it.

    Read: `model`, `prunable` (name -> weight), `optimizer`, `masks` (the bound Masks or None),
    `init_masks` (a sparse init's), `phase`, `steps_per_epoch`, `total_steps` (of the phase), `extra`
    (a dict reported with the trial's results; kinds write their own keys).
    Change: `set_masks`, `release_masks`, `mask_grads` / `mask_weights` (the per-step mask application,
    a no-op when nothing is masked; `mask_hooks()` gives both bound to the masks of now, for a phase
    whose masks stay fixed), `reset_optimizer`, `load_weights`.
    Randomness: `generator(stream)` is the phase's own generator for `stream` (derived from the trial's
    seed and the phase index, never the data order's).
    """

    model: torch.nn.Module
    prunable: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    masks: Optional[Masks]
    init_masks: Optional[Masks]
    phase: Phase
    steps_per_epoch: int
    total_steps: int
    extra: dict[str, Any]

    def set_masks(self, masks: Masks) -> None: ...
    def release_masks(self) -> None: ...
    def mask_hooks(self) -> dict[str, Callable[[int], None]]: ...
    def mask_grads(self, step: int = 0) -> None: ...
    def mask_weights(self, step: int = 0) -> None: ...
    def reset_optimizer(self) -> None: ...
    def load_weights(self, state: dict[str, torch.Tensor]) -> None: ...
    def generator(self, stream: int) -> torch.Generator: ...
    def snapshot(self, phase_index: int, step: int) -> dict[str, torch.Tensor]: ...
    def evaluate(self) -> dict: ...
    def measured_sparsity(self) -> float: ...


class PhaseState:
    """One phase's live state: created by its kind's `start`, dropped at the phase end.

    Hooks (`hooks()`): `before_step(step)` after the backward pass, `step(step)` instead of the
    optimizer's step, `after_step(step)` after it; `step` counts the phase's optimizer steps from 0.
    `state_dict()` holds everything the state needs to continue after a checkpoint (tensors on the CPU
    are fine: `load_state_dict` moves them), `load_state_dict()` restores it without repeating the
    phase's transition.
    """

    # Streams of `ctx.generator` a kind may use; other numbers are free for users' kinds.
    CRITERION_STREAM, GROW_STREAM = 1, 2

    def __init__(self, ctx: PhaseContext, phase: Phase, settings: Optional[KindSettings] = None):
        self.ctx, self.phase, self.settings = ctx, phase, settings
        self.density_changes: list[tuple[int, Densities]] = []  # (first step, densities from then on)
        self.work: list[tuple[int, Densities, float]] = []  # (step, densities, forward passes per sample)

    # ---- the transition and the steps ------------------------------------------------------
    def enter(self) -> None:
        """The transition into the phase (called once, by `PhaseKind.start`)."""

    def hooks(self) -> dict[str, Callable[[int], None]]:
        return {}

    def end_epoch(self) -> None:
        pass

    def end(self, metrics: dict) -> None:
        """The phase's last step is done; metrics measured after this (`metrics` may be updated)."""

    # ---- cost ----------------------------------------------------------------------------------
    def record_densities(self, step: int) -> None:
        """From `step` on, the phase trains at the bound masks' densities (dense when there are none)."""
        densities = self.ctx.masks.layer_densities() if self.ctx.masks is not None else {}
        if self.density_changes and self.density_changes[-1][0] == step:
            self.density_changes[-1] = (step, densities)
        elif not self.density_changes or self.density_changes[-1][1] != densities:
            self.density_changes.append((step, densities))

    def record_work(self, step: int, densities: Densities, passes: float) -> None:
        """Extra work at `step`: `passes` forward passes per sample of that step's batch at `densities`."""
        self.work.append((step, dict(densities), float(passes)))

    def cost_record(self) -> dict:
        return {"density_changes": [[s, d] for s, d in self.density_changes],
                "work": [[s, d, p] for s, d, p in self.work]}

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"cost": self.cost_record()}

    def load_state_dict(self, state: dict) -> None:
        cost = state.get("cost") or {}
        self.density_changes = [(int(s), dict(d)) for s, d in cost.get("density_changes", [])]
        self.work = [(int(s), dict(d), float(p)) for s, d, p in cost.get("work", [])]


class MaskedState(PhaseState):
    """A phase trained under masks fixed for the phase: gradients masked before and weights after every
    step (no hooks at all when every weight is kept, as in the fine-tune control)."""

    def hooks(self):
        return self.ctx.mask_hooks()


class PhaseKind:
    """A method, as a flow letter. Subclass it, set the class attributes, give it a `State`."""

    letter: ClassVar[str] = ""
    name: ClassVar[str] = ""
    State: ClassVar[type[PhaseState]] = PhaseState
    settings_key: ClassVar[Optional[str]] = None  # the study file's pipeline.<settings_key> block
    Settings: ClassVar[Optional[type[KindSettings]]] = None
    sparse: ClassVar[bool] = False  # takes a target sparsity (pipeline.sparsity)
    criteria: ClassVar[Optional[dict]] = None  # accepted pipeline.criterion values; None: takes none
    default_criterion: ClassVar[str] = "layerwise_magnitude"
    dense: ClassVar[bool] = False  # trains every weight, no mask: a leading dense phase is a baseline
    includes_first_layer: ClassVar[bool] = False  # the method's own default: prune the first layer too
    trains_init_mask: ClassVar[bool] = False  # as a flow's first phase, it trains a sparse init's mask
    decays_weights_only: ClassVar[bool] = False  # weight decay on layer weights only, never biases/norms

    def settings(self, phase: Phase) -> Optional[KindSettings]:
        return self.Settings(**phase.settings) if self.Settings is not None else None

    def phase_defaults(self, settings: Optional[KindSettings]) -> dict[str, Any]:
        """Phase fields the kind sets where the pipeline gives a scalar for every phase (GSM's momentum)."""
        return {}

    def check(self, phase: Phase, phases: list[Phase]) -> None:
        """Checks beyond the settings model; raise SpecError with one line."""
        if self.criteria is not None and phase.criterion not in self.criteria:
            raise SpecError(f"pipeline.criterion: {phase.criterion!r} is not a criterion of {self.letter} "
                            f"({self.name}); allowed: {', '.join(self.criteria)}")

    def check_steps(self, phase: Phase, phases: list[Phase], steps_per_epoch: int) -> None:
        """Checks that need the task's steps per epoch (run once the data is known)."""

    def snapshots(self, phase: Phase, phases: list[Phase]) -> list[tuple[int, int]]:
        """(phase index, step) points of the flow whose weights this phase needs (lottery tickets)."""
        return []

    def start(self, ctx: PhaseContext, phase: Phase) -> PhaseState:
        state = self.State(ctx, phase, self.settings(phase))
        state.enter()
        state.record_densities(0)
        return state

    def resume(self, ctx: PhaseContext, phase: Phase, saved: dict) -> PhaseState:
        state = self.State(ctx, phase, self.settings(phase))
        state.load_state_dict(saved)
        return state

    def describe(self) -> dict[str, Any]:
        """What the report needs to know of the kind (written to study.json)."""
        return {"name": self.name, "dense": self.dense, "sparse": self.sparse}


def _is_kind_class(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, PhaseKind)


# Letter -> the built-in kinds (filled below); a user's kinds are registered classes (`register_phase_kind`,
# or a study file's `phase_kinds: {X: "package.module:ClassName"}`), which travel to Ray workers with the study.
BUILTIN_KINDS: dict[str, PhaseKind] = {}
PHASE_KINDS = Registry("phase_kind", "pipeline.flow", BUILTIN_KINDS, check=_is_kind_class,
                       expects="a subclass of dsdtune.PhaseKind", import_hint=None, name_pattern=r"[A-Z]",
                       name_rule="one capital letter", shown=[])
_INSTANCES: dict[type, PhaseKind] = {}


def register(kind: PhaseKind) -> PhaseKind:
    """A built-in kind under its letter (users: `register_phase_kind`)."""
    if len(kind.letter) != 1 or not kind.letter.isupper():
        raise ValueError(f"a phase kind is one capital letter, got {kind.letter!r}")
    BUILTIN_KINDS[kind.letter] = kind
    return kind


def register_phase_kind(letter: str, cls: Optional[type[PhaseKind]] = None):
    """Make a user's `PhaseKind` subclass usable as `letter` in `pipeline.flow` (call or decorator).

    Built-in letters are refused; registering a letter again replaces it (a notebook cell run twice).
    Registered kinds travel to Ray workers with the study (classes of a notebook are shipped by value).
    """
    if cls is None:
        return lambda target: register_phase_kind(letter, target)
    if letter in BUILTIN_KINDS:
        raise ValueError(f"register_phase_kind: {letter!r} is the built-in kind {BUILTIN_KINDS[letter].name}; "
                         f"choose another capital letter")
    if _is_kind_class(cls):
        _check_kind_class(cls, f"register_phase_kind({letter!r})")
    PHASE_KINDS.register(letter, cls)
    return cls


def register_study_kinds(kinds: dict[str, str]) -> None:
    """A study file's `phase_kinds: {X: "package.module:ClassName"}`: each resolved and registered, or one line."""
    for letter, path in kinds.items():
        field = f"phase_kinds.{letter}"
        if letter in BUILTIN_KINDS:
            raise SpecError(f"{field}: {letter} is the built-in kind {BUILTIN_KINDS[letter].letter} "
                            f"({BUILTIN_KINDS[letter].name}); choose a free capital letter (taken: "
                            f"{''.join(sorted(BUILTIN_KINDS))})")
        if not (isinstance(letter, str) and len(letter) == 1 and letter.isupper()):
            raise SpecError(f"{field}: a phase kind's letter is one capital letter, got {letter!r}")
        if not isinstance(path, str) or ":" not in path:
            raise SpecError(f"{field}: give the class as an import path, 'package.module:ClassName', got {path!r}")
        cls = PHASE_KINDS.resolve(path, field)
        _check_kind_class(cls, field)
        PHASE_KINDS.register(letter, cls)


def _check_kind_class(cls: type[PhaseKind], field: str) -> None:
    """What a user's kind must get right before it runs (one line each)."""
    taken = {k.settings_key: k for k in BUILTIN_KINDS.values() if k.settings_key}
    key = cls.settings_key
    if key is not None:
        if cls.Settings is None or not (isinstance(cls.Settings, type) and issubclass(cls.Settings, KindSettings)):
            raise SpecError(f"{field}: {cls.__name__} names settings_key {key!r} but its Settings is not a "
                            f"subclass of dsdtune.KindSettings")
        if key in PipelineSpec.model_fields or (key in taken and not issubclass(cls, type(taken[key]))):
            raise SpecError(f"{field}: {cls.__name__}.settings_key {key!r} is taken (pipeline.{key}); choose another")
    if not (isinstance(cls.State, type) and issubclass(cls.State, PhaseState)):
        raise SpecError(f"{field}: {cls.__name__}.State must be a subclass of dsdtune.PhaseState")


def kind_of(letter: str) -> PhaseKind:
    """The kind a flow letter stands for (a registered class is instantiated once, under its letter)."""
    kind = PHASE_KINDS[letter]
    if isinstance(kind, PhaseKind):
        return kind
    instance = _INSTANCES.get(kind)
    if instance is None or instance.letter != letter:
        instance = _INSTANCES[kind] = kind()
        instance.letter = letter
    return instance


def all_kinds() -> dict[str, PhaseKind]:
    """Every kind usable in a flow now, by letter: the built-ins, then the registered ones."""
    return {letter: kind_of(letter) for letter in PHASE_KINDS}


def init_mask_letters() -> str:
    return "".join(k for k, v in all_kinds().items() if v.trains_init_mask)


# ---------------------------------------------------------------------------------------------
# The built-in kinds


class DenseState(PhaseState):
    def enter(self):
        self.ctx.release_masks()  # re-dense: pruned weights restart from exactly 0 with zero momentum


class Dense(PhaseKind):
    """D: train every weight. After a masked phase (re-dense) the pruned weights restart from
    exactly zero with zero momentum, and the mask is dropped."""

    letter, name = "D", "dense"
    State = DenseState
    dense = True


class SparseState(MaskedState):
    def enter(self):
        ctx, phase = self.ctx, self.phase
        if phase.index == 0 and ctx.init_masks is not None:
            ctx.set_masks(ctx.init_masks)  # static sparse training from a sparse init
        else:
            ctx.set_masks(CRITERIA[phase.criterion](dict(ctx.prunable), phase.sparsity,
                                                    generator=ctx.generator(self.CRITERION_STREAM)))


class Sparse(PhaseKind):
    """S: masks chosen at the phase start by the criterion (or the sparse init's, for a flow that
    starts with S), fixed during the phase; gradients masked before and weights after each step."""

    letter, name = "S", "sparse"
    State = SparseState
    sparse = True
    trains_init_mask = True
    criteria = CRITERIA


class GSMSettings(KindSettings):
    momentum: StrictFloat = Field(0.98, ge=0.0, lt=1.0)  # GSM's beta where pipeline.momentum is one value
    budget: Optional[StrictInt] = Field(None, gt=0)  # kept weights instead of a sparsity (the paper's Q)


class GSMState(PhaseState):
    def _build(self):
        from .sparsity.gsm import GlobalSparseMomentum
        ctx = self.ctx
        return GlobalSparseMomentum(ctx.model, ctx.prunable, ctx.optimizer, self.phase.sparsity,
                                    budget=self.settings.budget)

    def enter(self):
        self.ctx.release_masks()
        self.gsm = self._build()

    def hooks(self):
        return {"step": self.gsm.step}

    def end_epoch(self):
        self.gsm.end_epoch()

    def end(self, metrics):
        ctx = self.ctx
        self.gsm.truncate()
        ctx.set_masks(self.gsm.final_masks())  # weights pruned by GSM stay out until re-dense
        ctx.extra["gsm_layer_densities"] = ctx.masks.layer_densities()
        ctx.extra.setdefault("gsm_overlap", []).extend(self.gsm.overlap_history)
        # Truncation changes the network: the phase-end accuracy is measured after it.
        metrics.update(ctx.evaluate())
        metrics["sparsity"] = ctx.measured_sparsity()

    def state_dict(self):
        return {**super().state_dict(), "gsm": self.gsm.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.gsm = self._build()
        self.gsm.load_state_dict(state["gsm"])


class GlobalSparseMomentumKind(PhaseKind):
    """G: global sparse momentum SGD (see `dsdtune.sparsity.gsm`), truncated at the phase end. It
    computes every weight's gradient, so it trains at dense cost. The official code puts the first
    layer in the global top-Q, so G includes it by default. Settings: `pipeline.gsm`."""

    letter, name = "G", "global sparse momentum"
    State = GSMState
    settings_key, Settings = "gsm", GSMSettings
    sparse = True
    decays_weights_only = True
    includes_first_layer = True

    def phase_defaults(self, settings):
        return {"momentum": settings.momentum}


class GradualSettings(KindSettings):
    """`pipeline.gradual`: the cubic ramp of Zhu & Gupta (2017); begin/end are fractions of the phase's steps."""

    initial_sparsity: StrictFloat = Field(0.0, ge=0.0, lt=1.0)
    begin: StrictFloat = Field(0.0, ge=0.0, le=1.0)
    end: StrictFloat = Field(0.75, ge=0.0, le=1.0)
    every_steps: StrictInt = Field(100, gt=0)

    @model_validator(mode="after")
    def _order(self) -> "GradualSettings":
        if self.begin > self.end:
            raise ValueError(f"begin: {self.begin} is after end {self.end}; the ramp runs from begin to end")
        return self


class GradualState(PhaseState):
    """Masks recomputed by the criterion at the ramp's steps (among the weights kept so far, so pruned
    weights stay pruned, their momentum zeroed), fixed from the ramp's end to the phase's end."""

    def __init__(self, ctx, phase, settings):
        super().__init__(ctx, phase, settings)
        steps = ctx.total_steps
        self.ramp_begin = phase_step(settings.begin, steps) if steps else 0
        self.ramp_end = phase_step(settings.end, steps) if steps else 0

    def enter(self):
        if self.ctx.masks is None:  # nothing pruned yet: every weight kept, the ramp prunes from here
            self.ctx.set_masks(Masks({n: torch.ones_like(w) for n, w in self.ctx.prunable.items()}))
        self.prune_if_due(0)

    def prune_if_due(self, t: int) -> None:
        """Before step t: the mask at the schedule's sparsity, when t is one of the ramp's steps."""
        settings = self.settings
        if not is_gmp_step(t, begin=self.ramp_begin, end=self.ramp_end, every=settings.every_steps):
            return
        target = gmp_sparsity(t, begin=self.ramp_begin, end=self.ramp_end, final=self.phase.sparsity,
                              initial=settings.initial_sparsity)
        ctx = self.ctx
        ctx.set_masks(CRITERIA[self.phase.criterion](dict(ctx.prunable), target, within=ctx.masks))
        self.record_densities(t)

    def hooks(self):
        ctx = self.ctx

        def after_step(step: int) -> None:
            ctx.mask_weights()
            if step + 1 < ctx.total_steps:
                self.prune_if_due(step + 1)

        return {"before_step": ctx.mask_grads, "after_step": after_step}


class GradualMagnitude(PhaseKind):
    """M: gradual magnitude pruning (Zhu & Gupta 2017; TensorFlow model-optimization's PolynomialDecay
    with power 3). The target sparsity at step t of the phase is s(t) = s_f + (s_i - s_f)(1 - p)^3,
    p = clip((t - t_b) / (t_e - t_b), 0, 1); the masks are recomputed every `every_steps` steps from
    t_b to t_e (and at t_e), then fixed. Settings: `pipeline.gradual`."""

    letter, name = "M", "gradual magnitude pruning"
    State = GradualState
    settings_key, Settings = "gradual", GradualSettings
    sparse = True
    criteria = MAGNITUDE_CRITERIA

    def check(self, phase, phases):
        super().check(phase, phases)
        settings = self.settings(phase)
        if settings.initial_sparsity > phase.sparsity:
            raise SpecError(f"pipeline.gradual.initial_sparsity: {settings.initial_sparsity:g} is above the phase's "
                            f"sparsity {phase.sparsity:g} ({phase.label}); the ramp only prunes")


class DSTSettings(KindSettings):
    """`pipeline.dst`: RigL's schedule (Evci et al. 2020): drop fraction a/2 (1 + cos(pi t / t_end))."""

    drop_fraction: StrictFloat = Field(0.3, ge=0.0, le=1.0)
    every_steps: StrictInt = Field(100, gt=0)
    end: StrictFloat = Field(0.75, gt=0.0, le=1.0)


class RigLState(MaskedState):
    """Constant per-layer density; every `every_steps` steps until `end`, per layer, the smallest active
    weights are dropped and as many inactive ones grown (by |dense gradient| for RigL, at random for
    SET); grown weights start at exactly 0 with zero optimizer state.

    The update follows the optimizer step of the batch whose dense gradient it uses (every step is a
    training step), so the weights it grows are 0 when the next step starts. The dense gradient costs
    RigL one dense weight-gradient pass instead of a sparse one on that batch (recorded as work)."""

    grows_by_gradient = True

    def __init__(self, ctx, phase, settings):
        super().__init__(ctx, phase, settings)
        self.update_end = max(1, phase_step(settings.end, ctx.total_steps)) if ctx.total_steps else 1
        self.grow_scores: Optional[dict[str, torch.Tensor]] = None

    def enter(self):
        ctx, phase = self.ctx, self.phase
        if phase.index == 0 and ctx.init_masks is not None:
            ctx.set_masks(ctx.init_masks)  # dynamic sparse training from a sparse init (ERK in the paper)
        else:
            ctx.set_masks(CRITERIA[phase.criterion](dict(ctx.prunable), phase.sparsity, within=ctx.masks,
                                                    generator=ctx.generator(self.CRITERION_STREAM)))

    def due(self, t: int) -> bool:
        return is_dst_update_step(t, every=self.settings.every_steps, end=self.update_end)

    def hooks(self):
        ctx = self.ctx

        def before_step(step: int) -> None:
            if self.grows_by_gradient and self.due(step + 1):  # the dense gradient, before masking
                self.grow_scores = {n: w.grad.detach().abs() for n, w in ctx.prunable.items()}
            ctx.mask_grads()

        def after_step(step: int) -> None:
            ctx.mask_weights()
            if self.due(step + 1):
                self.update(step)

        return {"before_step": before_step, "after_step": after_step}

    def random_generator(self) -> Optional[torch.Generator]:
        return None

    @torch.no_grad()
    def update(self, step: int) -> None:
        ctx = self.ctx
        fraction = cosine_drop_fraction(step + 1, initial=self.settings.drop_fraction, end=self.update_end)
        drop = {n: w.detach().abs() for n, w in ctx.prunable.items()}
        masks, grown = drop_and_grow_layers(ctx.masks, drop, self.grow_scores, fraction,
                                            generator=self.random_generator())
        densities = ctx.masks.layer_densities()
        if self.grows_by_gradient:  # this step's weight gradient was dense
            self.record_work(step, {}, 1.0)
            self.record_work(step, densities, -1.0)
        self.grow_scores = None
        ctx.set_masks(masks)  # dropped weights and their optimizer state are zeroed with it
        for name, positions in grown.items():  # grown ones start at exactly 0, with zero optimizer state
            weight = ctx.prunable[name]
            weight.masked_fill_(positions, 0.0)
            for value in ctx.optimizer.state.get(weight, {}).values():
                if torch.is_tensor(value) and value.shape == weight.shape:
                    value.masked_fill_(positions, 0.0)


class RigL(PhaseKind):
    """R: RigL (Evci et al. 2020): dynamic sparse training at constant per-layer density, growing by the
    dense gradient's magnitude. Trains a sparse init's mask as a flow's first phase (the paper uses
    ERK), or prunes to its sparsity by the criterion after a dense phase. Settings: `pipeline.dst`."""

    letter, name = "R", "RigL"
    State = RigLState
    settings_key, Settings = "dst", DSTSettings
    sparse = True
    trains_init_mask = True
    criteria = MAGNITUDE_CRITERIA

    def check_steps(self, phase, phases, steps_per_epoch):
        steps = phase.epochs * steps_per_epoch
        settings = self.settings(phase)
        end = max(1, phase_step(settings.end, steps)) if steps else 1
        if steps and settings.drop_fraction > 0 and not any(
                is_dst_update_step(t, every=settings.every_steps, end=end) for t in range(1, end)):
            raise SpecError(f"pipeline.dst.every_steps: {settings.every_steps} leaves {phase.label} no update "
                            f"before its end (step {end} of {steps}); lower every_steps or raise end")


class SETState(RigLState):
    grows_by_gradient = False

    def __init__(self, ctx, phase, settings):
        super().__init__(ctx, phase, settings)
        self.grow_generator = ctx.generator(self.GROW_STREAM)  # the trial's seed, this phase: never the data's

    def random_generator(self):
        return self.grow_generator

    def state_dict(self):
        return {**super().state_dict(), "grow_generator": self.grow_generator.get_state()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.grow_generator.set_state(state["grow_generator"])


class SET(RigL):
    """E: SET (Mocanu et al. 2018): RigL's drop and schedule, growing at random."""

    letter, name = "E", "SET"
    State = SETState


class RewindSettings(KindSettings):
    """`pipeline.rewind`: the rewind point, an optimizer step of the flow's first phase (0: its start)."""

    step: StrictInt = Field(0, ge=0)


class LotteryState(MaskedState):
    def enter(self):
        ctx, phase = self.ctx, self.phase
        masks = CRITERIA[phase.criterion](dict(ctx.prunable), phase.sparsity, within=ctx.masks,
                                          generator=ctx.generator(self.CRITERION_STREAM))
        ctx.load_weights(ctx.snapshot(0, self.settings.step))  # every parameter and buffer, as then
        ctx.set_masks(masks)
        ctx.reset_optimizer()


class LotteryTicket(PhaseKind):
    """L: lottery-ticket rewinding (Frankle & Carbin 2019; Frankle et al. 2020; open_lth). At the phase
    start: prune to the phase's sparsity by the criterion (global magnitude by default, as open_lth)
    among the weights kept so far, reset every weight, bias and buffer to its value at the rewind
    point (`pipeline.rewind.step` of the flow's first phase; 0 = the initialization), fresh optimizer
    state, then train under the mask. DLLL with sparsity [0.2, 0.36, 0.488] is iterative magnitude
    pruning with three levels. The data order and LR schedule are the phase's own (open_lth replays
    them from the rewind point). Like open_lth it prunes the first layer too unless excluded."""

    letter, name = "L", "lottery ticket"
    State = LotteryState
    settings_key, Settings = "rewind", RewindSettings
    sparse = True
    criteria = CRITERIA
    default_criterion = "global_magnitude"
    includes_first_layer = True

    def snapshots(self, phase, phases):
        return [(0, self.settings(phase).step)]

    def check(self, phase, phases):
        super().check(phase, phases)
        step = self.settings(phase).step
        if phase.index == 0 and step > 0:
            raise SpecError(f"pipeline.rewind.step: {step} is inside {phase.label} itself, the flow's first phase; "
                            f"a flow that starts with L rewinds to its start (step 0), or train first (DL)")

    def check_steps(self, phase, phases, steps_per_epoch):
        step, first = self.settings(phase).step, phases[0]
        if step > first.epochs * steps_per_epoch:
            raise SpecError(f"pipeline.rewind.step: {step} is beyond the flow's first phase ({first.label}: "
                            f"{first.epochs} epochs x {steps_per_epoch} steps = {first.epochs * steps_per_epoch}); "
                            f"use at most that")


register(Dense())
register(Sparse())
register(GlobalSparseMomentumKind())
register(GradualMagnitude())
register(RigL())
register(SET())
register(LotteryTicket())


# ---------------------------------------------------------------------------------------------
# Flow expansion


def resolve_exclude_first(spec: PipelineSpec) -> bool:
    """`pipeline.exclude_first`, or the methods' own default when it is not set: the first layer
    is kept dense (the DSD paper) unless every sparse phase of the flow is of a kind that includes
    it (GSM's official code)."""
    if spec.exclude_first is not None:
        return bool(spec.exclude_first)
    kinds = [kind_of(c) for c in spec.flow if c in PHASE_KINDS and kind_of(c).sparse]
    return not (kinds and all(k.includes_first_layer for k in kinds))


def settings_blocks(spec: PipelineSpec) -> dict[str, Any]:
    """The kinds' blocks given in a pipeline spec (its keys beyond the common fields)."""
    return dict(spec.model_extra or {})


def check_flow(spec: PipelineSpec, unused_blocks: bool = True) -> None:
    """Phase letters known, sparse-only lists aligned with the flow's sparse phases, settings blocks
    known and valid; with `unused_blocks` False a block for a kind the flow does not use is refused."""
    unknown = sorted({c for c in spec.flow if c not in PHASE_KINDS})
    if unknown:
        allowed = ", ".join(f"{k} ({v.name})" for k, v in all_kinds().items())
        raise SpecError(f"pipeline.flow: unknown phase kind {', '.join(unknown)} in {spec.flow!r}; allowed: {allowed}")
    n, n_sparse = len(spec.flow), sum(kind_of(c).sparse for c in spec.flow)
    for name in ("sparsity", "criterion"):
        value = getattr(spec, name)
        if isinstance(value, list) and len(value) not in (n, n_sparse):
            raise SpecError(f"pipeline.{name}: has {len(value)} entries; flow {spec.flow!r} needs {n} (one per "
                            f"phase) or {n_sparse} (one per sparse phase)")
    owners = block_owners()
    for key, value in settings_blocks(spec).items():
        kinds = owners.get(key)
        if not kinds:
            hint = _RENAMED.get(key)
            if hint:
                raise SpecError(f"pipeline.{key}: is now {hint}")
            allowed = ", ".join(list(PipelineSpec.model_fields) + sorted(owners))
            raise SpecError(f"pipeline.{key}: unknown key; allowed: {allowed}")
        letters = "/".join(k.letter for k in kinds)
        if not unused_blocks and not any(k.letter in spec.flow for k in kinds):
            raise SpecError(f"pipeline.{key}: sets {letters} ({kinds[0].name}), which flow {spec.flow!r} does not "
                            f"use; drop the block or use {letters} in the flow")
        if not isinstance(value, dict):
            raise SpecError(f"pipeline.{key}: must be a mapping of {letters}'s settings, e.g. {json_example(kinds[0])}")
        for kind in kinds:
            try:
                kind.Settings.model_validate(value)
            except ValidationError as err:
                raise SpecError(format_validation_error(err, prefix=f"pipeline.{key}")) from None


def block_owners() -> dict[str, list[PhaseKind]]:
    """Settings block key -> the kinds that read it (R and E share `pipeline.dst`)."""
    owners: dict[str, list[PhaseKind]] = {}
    for kind in all_kinds().values():
        if kind.settings_key:
            owners.setdefault(kind.settings_key, []).append(kind)
    return owners


_RENAMED = {"gsm_momentum": "pipeline.gsm.momentum", "gsm_budget": "pipeline.gsm.budget"}


def json_example(kind: PhaseKind) -> str:
    fields = kind.Settings.model_fields if kind.Settings is not None else {}
    return "{" + ", ".join(f"{k}: {v.default}" for k, v in fields.items()) + "}"


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
    kinds = [kind_of(c) for c in flow]
    sparse = [k.sparse for k in kinds]

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
    criteria = [c if c is not None else "" for c in per_sparse_phase(spec.criterion, None)]
    blocks = settings_blocks(spec)
    counts: dict[str, int] = {}
    phases = []
    for i, (letter, kind) in enumerate(zip(flow, kinds)):
        counts[letter] = counts.get(letter, 0) + 1
        settings = kind.Settings.model_validate(blocks.get(kind.settings_key) or {}) if kind.Settings else None
        fields = {"momentum": float(momenta[i])}
        if not isinstance(spec.momentum, list):
            fields.update(kind.phase_defaults(settings))
        criterion = "" if kind.criteria is None else (criteria[i] or kind.default_criterion)
        phases.append(Phase(i, letter, f"{letter}{counts[letter]}", int(epochs[i]), lrs[i], float(sparsities[i]),
                            criterion, schedules[i], optimizers[i], float(fields["momentum"]), bool(nesterovs[i]),
                            float(decays[i]), settings.model_dump() if settings is not None else {}))
    return phases


def check_phases(spec: PipelineSpec, init: Optional[InitSpec], phases: list[Phase]) -> None:
    """Each kind's own checks, and a sparse init's mask only where the flow's first phase trains it."""
    if init is not None and init.sparse and not kind_of(spec.flow[0]).trains_init_mask:
        raise SpecError(f"pipeline.flow: a sparse init (init.density {init.density}) needs a flow that starts "
                        f"with {' or '.join(init_mask_letters())} (static sparse training from its mask), got "
                        f"{spec.flow!r}; use init.density: dense for other flows")
    if _init_density_phase(spec, init) and spec.sparsity is not None:
        given = _as_list(spec.sparsity)[0]
        if abs(float(given) - phases[0].sparsity) > 1e-9:
            raise SpecError(f"pipeline.sparsity: the first {spec.flow[0]} phase trains the sparse init's mask "
                            f"(init.init_density {init.init_density:g} = sparsity {phases[0].sparsity:g}), not "
                            f"{given:g}; leave pipeline.sparsity unset or set init.init_density")
    for phase in phases:
        kind_of(phase.kind).check(phase, phases)


def flow_snapshots(phases: list[Phase]) -> list[tuple[int, int]]:
    """Every (phase index, step) whose weights a phase of the flow needs later."""
    needed = {point for p in phases for point in kind_of(p.kind).snapshots(p, phases)}
    return sorted(needed)


def steps_in_phase(phase: Phase, steps_per_epoch: int) -> int:
    return phase.epochs * steps_per_epoch


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    return math.ceil(num_train / batch_size) if num_train else 0
