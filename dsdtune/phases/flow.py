"""Flow expansion: a pipeline spec's flow string and per-phase settings (scalars broadcast, lists aligned
with the flow or its sparse phases, the kinds' own blocks) as a list of `Phase`s, with the checks of
the flow as a whole (letters known, blocks known and valid, a sparse init's mask only where the first
phase trains it) and the methods' defaults (`exclude_first`). Reads the kinds; imports no pipeline.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from pydantic import ValidationError

from ..config import InitSpec, PipelineSpec, SpecError, _as_list, format_validation_error
from .kind import PHASE_KINDS, Phase, PhaseKind, all_kinds, init_mask_letters, kind_of

DEFAULT_SPARSITY = 0.5  # a sparse phase's target when pipeline.sparsity is not set (DSD's CNN setting)


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


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    return math.ceil(num_train / batch_size) if num_train else 0

