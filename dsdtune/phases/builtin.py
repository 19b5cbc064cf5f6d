"""The built-in phase kinds: D dense, S sparse, G global sparse momentum, M gradual magnitude pruning,
R RigL, E SET, L lottery ticket. Each is one `PhaseKind` subclass with its state (and settings block);
adding a method is one more class here (a user's own: their module, see `register_phase_kind`).
"""
from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field, StrictFloat, StrictInt, model_validator

from ..config import KindSettings, SpecError
from ..sparsity.dst import drop_and_grow_layers
from ..sparsity.masks import Masks
from ..sparsity.prune import CRITERIA, MAGNITUDE_CRITERIA
from ..sparsity.schedules import cosine_drop_fraction, gmp_sparsity, is_dst_update_step, is_gmp_step, phase_step
from .kind import MaskedState, PhaseKind, PhaseState, register


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
    starts with S), fixed during the phase; gradients masked before each step."""

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
        from ..sparsity.gsm import GlobalSparseMomentum
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
