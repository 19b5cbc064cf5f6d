"""Phase kinds: the one place a sparse-training method lives.

A flow is a string of phase letters ("DSD", "DMD", "DLLL"); each letter names a `PhaseKind`:
- `kind.py`: what a kind is (`PhaseKind`, the `PhaseState` it creates at its phase's start, the
  `PhaseContext` the pipeline offers it) and the registry of kinds by letter (`register_phase_kind`,
  a study file's `phase_kinds`);
- `builtin.py`: the built-in kinds D, S, G, M, R, E, L (a new method is one class there);
- `flow.py`: a pipeline spec's flow and per-phase settings as a list of `Phase`s, and its checks.
The pipeline runs the kinds through `PhaseContext`; nothing here imports it.
"""
from .builtin import (  # importing it registers the built-in kinds
    SET, Dense, DenseState, GlobalSparseMomentumKind, GradualMagnitude, GradualState, LotteryTicket, RigL,
    RigLState, SETState, Sparse, SparseState,
)
from .flow import (
    DEFAULT_SPARSITY, block_owners, check_flow, check_phases, expand_phases, flow_snapshots,
    resolve_exclude_first, settings_blocks, steps_per_epoch,
)
from .kind import (
    BUILTIN_KINDS, PHASE_KINDS, MaskedState, Phase, PhaseContext, PhaseKind, PhaseState, all_kinds,
    init_mask_letters, kind_of, register_phase_kind, register_study_kinds,
)

__all__ = ["Phase", "PhaseContext", "PhaseState", "MaskedState", "PhaseKind", "PHASE_KINDS", "BUILTIN_KINDS",
           "register_phase_kind", "register_study_kinds", "kind_of", "all_kinds", "init_mask_letters",
           "Dense", "DenseState", "Sparse", "SparseState", "GlobalSparseMomentumKind", "GradualMagnitude",
           "GradualState", "RigL", "RigLState", "SET", "SETState", "LotteryTicket", "DEFAULT_SPARSITY",
           "block_owners", "check_flow", "check_phases", "expand_phases", "flow_snapshots",
           "resolve_exclude_first", "settings_blocks", "steps_per_epoch"]
