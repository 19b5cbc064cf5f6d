"""Magnitude pruning on a linear ramp: a new sparse-training method as a dsdtune phase kind.

Gradual magnitude pruning (dsdtune's M) raises the sparsity on Zhu & Gupta's cubic ramp, fast at first
and slowly near the end; this kind raises it linearly, s(t) = s_f * t / t_end, recomputing the mask
(the largest |w| of each layer, among the weights still kept) every `every_steps` steps. A study uses
it as flow letter X: `phase_kinds: {X: "linear_ramp:LinearRamp"}` and `pipeline.linear: {...}`.
"""
import torch
from pydantic import Field, StrictFloat, StrictInt

from dsdtune import KindSettings, PhaseKind, PhaseState
from dsdtune.sparsity.masks import Masks
from dsdtune.sparsity.prune import CRITERIA


class LinearSettings(KindSettings):
    end: StrictFloat = Field(0.75, gt=0.0, le=1.0)  # the ramp ends at this fraction of the phase's steps
    every_steps: StrictInt = Field(50, gt=0)  # a new mask every this many steps


class LinearRampState(PhaseState):
    @property
    def ramp_end(self) -> int:
        return max(1, round(self.settings.end * self.ctx.total_steps))

    def enter(self):  # the phase's start: every weight kept (or what an earlier phase left)
        if self.ctx.masks is None:
            self.ctx.set_masks(Masks({n: torch.ones_like(w) for n, w in self.ctx.prunable.items()}))

    def hooks(self):
        def after_step(step):
            t = step + 1  # optimizer steps done
            if t <= self.ramp_end and (t % self.settings.every_steps == 0 or t == self.ramp_end):
                self.prune(t)

        # masked gradients: the optimizer step leaves pruned weights at exactly 0
        return {"before_step": self.ctx.mask_grads, "after_step": after_step}

    def prune(self, t):
        target = self.phase.sparsity * t / self.ramp_end
        prune = CRITERIA[self.phase.criterion]
        self.ctx.set_masks(prune(dict(self.ctx.prunable), target, within=self.ctx.masks))
        self.record_densities(t)  # the phase trains at these densities from step t on (its FLOPs)


class LinearRamp(PhaseKind):
    name = "linear magnitude pruning"
    State = LinearRampState
    settings_key, Settings = "linear", LinearSettings
    sparse = True  # takes pipeline.sparsity, the final sparsity
    criteria = {name: CRITERIA[name] for name in ("layerwise_magnitude", "global_magnitude")}
