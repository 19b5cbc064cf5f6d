"""What a phase kind is: the `PhaseKind` class a method subclasses, the `PhaseState` it creates at its
phase's start, the `PhaseContext` the pipeline offers it, and the registry of kinds by flow letter.

A kind owns its settings (class attributes that say how the pipeline's per-phase lists apply to it and,
optionally, its own block in the study file, validated by its `Settings` model), its state (the object
that lives for the phase: per-step hooks that know the step index, `state_dict()` for checkpoints and
shared prefixes) and its cost (the densities it trains at from each step on, and extra work, which
`dsdtune.cost` turns into training FLOPs). Nothing else looks at a kind's letter. This module never
imports the pipeline: the pipeline implements `PhaseContext`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Protocol

import torch

from ..config import KindSettings, PipelineSpec, SpecError
from ..registry import Registry
from ..sparsity.masks import Masks

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
    Change: `set_masks` (zeroes the masked weights and their optimizer state), `release_masks`,
    `mask_grads` (the per-step mask application before the optimizer step, which then leaves masked
    weights at exactly 0; a no-op when nothing is masked; `mask_hooks()` gives it bound to the masks
    of now, for a phase whose masks stay fixed), `mask_weights` (after changing weights by other
    means), `reset_optimizer`, `load_weights`.
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
    """A phase trained under masks fixed for the phase: gradients masked before every step (no hooks at
    all when every weight is kept, as in the fine-tune control)."""

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

