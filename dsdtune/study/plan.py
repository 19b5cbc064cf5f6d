"""The plan of a study, without Ray: its arms, seeds, shared prefixes and epoch counts.

An arm is one combination of the study's factors (grid/choice values, variants, pre-sampled random
values); every arm's run spec is built and checked here. The shared prefix is the run of leading
phases that all arms have in common: it is trained once per seed, and it pairs the arms of a seed.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from ..config import SpecError, StudySpec, build_run_spec, same_value

STAGE_SWEEP, STAGE_SEARCH, STAGE_CONFIRM = "sweep", "search", "confirm"


@dataclass
class Arm:
    label: str
    assign: dict[str, Any]  # dotted path -> value, applied to the study's base spec
    factors: dict[str, Any]  # factor name (dotted path or "variant") -> value


@dataclass
class Plan:
    """Arms x seeds, and the shared prefixes: the leading phases an arm has in common with other arms
    (same task, init and seed) are trained once, by one trial, for every trial that shares them. Arms
    share as much as they have in common: in a study of DSD, GMP (DM) and static sparse training (S),
    the D and M arms of a seed share their dense phase and the S arms train alone."""

    arms: list[Arm]
    seeds: list[int]
    prefix_length: int  # the longest shared prefix of any arm, in phases (0: nothing shared)
    prefixes: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> (arm label, seed)
    trial_prefix: dict[tuple[str, int], str] = field(default_factory=dict)
    epochs_per_trial: dict[str, int] = field(default_factory=dict)  # arm label -> epochs
    arm_prefix_length: dict[str, int] = field(default_factory=dict)  # arm label -> phases it shares
    prefix_epochs_of: dict[str, int] = field(default_factory=dict)  # prefix id -> its epochs
    factors: list[str] = field(default_factory=list)
    runs: list = field(default_factory=list)  # one checked RunSpec per arm (or Optuna probe), first seed
    # prefix id -> (phase index, step) points inside the prefix whose weights some trial sharing it needs
    prefix_snapshots: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    model_costs: dict[str, dict] = field(default_factory=dict)  # model_cost_key -> ModelCost.as_dict()

    @property
    def epochs_without_sharing(self) -> int:
        return sum(self.epochs_per_trial[a.label] for a in self.arms) * len(self.seeds)

    @property
    def epochs_with_sharing(self) -> int:
        shared = sum(self.prefix_epochs_of[pid] for pid in self.trial_prefix.values() if pid in self.prefixes)
        return self.epochs_without_sharing - shared + sum(self.prefix_epochs_of[pid] for pid in self.prefixes)

    @property
    def prefix_epochs(self) -> int:
        """The longest shared prefix's epochs (what a trial restored from a prefix skips at most)."""
        return max((self.prefix_epochs_of[pid] for pid in self.prefixes), default=0)


def _label(factors: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in factors.items()) or "base"


def _grid_arms(spec: StudySpec) -> list[Arm]:
    """Variants x grid axes (grid and choice) x pre-sampled random axes."""
    space = spec.search.space
    if spec.search.algorithm == "grid":
        for path, axis in space.items():
            if axis.kind not in ("grid", "choice"):
                raise SpecError(f"search.space.{path}: {axis.kind} needs search.algorithm random or optuna; "
                                f"grid search takes grid or choice")
    grid_paths = [p for p, a in space.items() if a.kind in ("grid", "choice")]
    grid_values = [space[p].grid if space[p].grid is not None else space[p].choice for p in grid_paths]
    sampled_paths = [p for p, a in space.items() if a.kind not in ("grid", "choice")]
    samples: list[dict[str, Any]] = [{}]
    if spec.search.algorithm == "random" and sampled_paths:
        import numpy as np  # pre-sampled so that every seed of an arm sees the same values
        rng = np.random.default_rng(spec.search.seed)
        samples = [{p: _sample(space[p], rng) for p in sampled_paths} for _ in range(spec.search.num_samples)]
    variants = list((spec.variants or {"": {}}).items())
    arms = []
    for (vname, vassign), combo, sample in itertools.product(variants, itertools.product(*grid_values), samples):
        factors: dict[str, Any] = {"variant": vname} if vname else {}
        factors.update(zip(grid_paths, combo))
        factors.update(sample)
        assign = dict(vassign)
        assign.update({k: v for k, v in factors.items() if k != "variant"})
        arms.append(Arm(_label(factors), assign, factors))
    if not arms:
        raise SpecError("search.space: the study has no arms; give at least one grid value or variant")
    return arms


def _sample(axis, rng) -> Any:
    low, high = getattr(axis, axis.kind)
    if axis.kind == "uniform":
        return float(rng.uniform(low, high))
    if axis.kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    return int(rng.integers(low, high + 1))


def _probe_values(axis) -> list[Any]:
    """Every value of a grid or choice; the ends and the middle of a range (what a search may draw)."""
    if axis.kind in ("grid", "choice"):
        return list(axis.grid if axis.grid is not None else axis.choice)
    low, high = getattr(axis, axis.kind)
    middle = (low + high) // 2 if axis.kind == "int" else \
        math.sqrt(low * high) if axis.kind == "loguniform" else (low + high) / 2
    return list(dict.fromkeys([low, middle, high]))


def _optuna_probes(spec: StudySpec) -> tuple[list[Arm], dict[str, list[int]]]:
    """The base spec, every axis at its probe values alone, and all axes at their first and at their last
    values together: the configs that decide which leading phases every search trial shares. Also the
    probes' indices of each axis."""
    space = spec.search.space
    values = {p: _probe_values(axis) for p, axis in space.items()}
    assigns: list[dict[str, Any]] = [{}]
    of_axis: dict[str, list[int]] = {}
    for path, vals in values.items():
        for v in vals:
            of_axis.setdefault(path, []).append(len(assigns))
            assigns.append({path: v})
    if len(space) > 1:
        assigns += [{p: vals[0] for p, vals in values.items()}, {p: vals[-1] for p, vals in values.items()}]
    arms, labels = [], set()
    for i, assign in enumerate(assigns):
        label = _label(assign)
        label = label if label not in labels else f"{label} #{i}"
        labels.add(label)
        arms.append(Arm(label, assign, assign))
    return arms, of_axis


def _check_trial(spec: StudySpec, assign: dict[str, Any], seed: int, where: str):
    from ..pipeline import check_names  # imports torch: only after the cheap checks passed
    try:
        run = build_run_spec(spec.base_run(), assign, seed)
        check_names(run)
    except SpecError as err:
        raise SpecError(f"{err}{where}") from None
    return run


def check_settings_blocks(runs: list) -> None:
    """A kind's settings block that no arm's flow uses changes nothing: refused (one line)."""
    from ..phases import block_owners, settings_blocks
    used = {c for run in runs for c in run.pipeline.flow}
    owners = block_owners()
    for run in runs:
        for key in settings_blocks(run.pipeline):  # check_names has refused keys no kind owns
            kinds = owners[key]
            if not any(k.letter in used for k in kinds):
                letters = "/".join(k.letter for k in kinds)
                flows = ", ".join(sorted({r.pipeline.flow for r in runs}))
                raise SpecError(f"pipeline.{key}: sets {letters} ({kinds[0].name}), which no arm's flow uses "
                                f"(flows: {flows}); drop the block or use {letters} in a flow")


def _trial_id(run) -> str:
    """What a trial computes, as a name: equal names <=> bit-identical trials (its whole flow's prefix id)."""
    from ..phases import expand_phases
    from ..pipeline import prefix_id
    return prefix_id(run, len(expand_phases(run.pipeline, run.init)))


def check_arm_labels(spec: StudySpec, arms: list[Arm]) -> None:
    """Each arm has a label of its own (results, the plan and the report key arms by label)."""
    labels: set[str] = set()
    for arm in arms:
        if arm.label in labels:
            if spec.search.algorithm == "random":
                raise SpecError(f"search: two random samples drew the same values ({arm.label}); widen the int "
                                f"ranges, lower search.num_samples or change search.seed")
            raise SpecError(f"search.space: two arms are labelled {arm.label!r}; give values that print differently")
        labels.add(arm.label)


def check_distinct_arms(arms: list[Arm], runs: list) -> None:
    """Two arms that would train bit-identical trials (a factor that changes nothing for them) are refused:
    the report would pool copies of one trial as if they were two."""
    seen: dict[str, Arm] = {}
    for arm, run in zip(arms, runs):
        key = _trial_id(run)
        if key in seen:
            other = seen[key]
            differ = [k for k in dict.fromkeys([*other.factors, *arm.factors])
                      if not same_value(other.factors.get(k), arm.factors.get(k))]
            where = "variants" if differ == ["variant"] else \
                f"search.space.{differ[0]}" if len(differ) == 1 else "search.space"
            raise SpecError(f"{where}: arms {other.label} and {arm.label} would train identical trials: "
                            f"{' and '.join(differ) or 'their factors'} changes nothing for them (same task, init "
                            f"and phases); drop one of the values, or the factor")
        seen[key] = arm


def _unused_settings() -> list[tuple[str, Any, Any, str]]:
    """(field, set in a run, used by a run, why it is unused): settings that do nothing where unused."""
    from ..phases import PHASE_KINDS, kind_of
    pruning = ", ".join(k.letter for k in PHASE_KINDS.values() if k.criteria is not None)
    return [
        ("init.gain", lambda run, phases: run.init.gain != 1.0,
         lambda run, phases: run.init.base == "orthogonal" or run.init.weights == "eoi",
         "it multiplies orthogonal weights (init.base: orthogonal) and EOI weights (init.weights: eoi) only; "
         "drop it, or use one of those"),
        ("init.bias_std", lambda run, phases: run.init.bias_std != 0.0,
         lambda run, phases: run.init.bias == "normal",
         "it is the spread of init.bias: normal only; drop it, or set init.bias: normal"),
        ("pipeline.nesterov", lambda run, phases: any(p.nesterov for p in phases),
         lambda run, phases: any(p.nesterov and p.optimizer == "sgd" and p.momentum > 0 for p in phases),
         "Nesterov momentum is SGD's with momentum > 0, and every phase with it uses adam or momentum 0; "
         "drop it"),
        ("pipeline.criterion", lambda run, phases: run.pipeline.criterion is not None,
         lambda run, phases: any(kind_of(p.kind).criteria is not None for p in phases),
         f"no phase of {{flows}} prunes by a criterion (kinds that do: {pruning}); drop it"),
    ]


def _sets(arm: Arm, path: str) -> bool:
    return any(k == path or k.startswith(path + ".") for k in arm.assign)


def check_unused_settings(arms: list[Arm], runs: list, own_only: bool = False) -> None:
    """A setting that changes nothing is refused: one an arm sets for itself (a variant or a searched
    value) and does not use, and one the study sets for all arms that none of them uses (a shared one
    may serve some arms only: nesterov for the SGD arms of an optimizer grid). `own_only`: the first
    kind only (a confirm control that changes what makes a shared setting useful)."""
    from ..phases import expand_phases
    phase_lists = [expand_phases(run.pipeline, run.init) for run in runs]
    # nesterov given per phase: per phase, by the same two rules
    per_phase: dict[int, list[tuple[Arm, Any, bool]]] = {}
    for arm, run, phases in zip(arms, runs, phase_lists):
        if isinstance(run.pipeline.nesterov, list):
            for p in phases:
                if p.nesterov:
                    per_phase.setdefault(p.index, []).append((arm, p, p.optimizer == "sgd" and p.momentum > 0))
    for entries in per_phase.values():
        bad = [(arm, p) for arm, p, useful in entries if not useful and _sets(arm, "pipeline.nesterov")]
        if not bad and not own_only and not any(useful for _, _, useful in entries):
            bad = [(arm, p) for arm, p, _ in entries]
        if bad:
            arm, p = bad[0]
            why = f"uses {p.optimizer}" if p.optimizer != "sgd" else "has momentum 0"
            raise SpecError(f"pipeline.nesterov: is true for {p.label}, which {why}"
                            f"{' in arm ' + arm.label if arm.factors else ''}; Nesterov momentum is SGD's with "
                            f"momentum > 0, so set it false there")
    for path, is_set, used, why in _unused_settings():
        having = [(arm, run, phases) for arm, run, phases in zip(arms, runs, phase_lists) if is_set(run, phases)]
        for arm, run, phases in having:
            if _sets(arm, path) and not used(run, phases):
                raise SpecError(f"{path}: changes nothing in arm {arm.label}: "
                                f"{why.format(flows='flow ' + run.pipeline.flow)}")
        if having and not own_only and not any(used(run, phases) for _, run, phases in having):
            flows = sorted({run.pipeline.flow for _, run, _ in having})
            raise SpecError(f"{path}: changes nothing{' in any arm' if len(runs) > 1 else ''}: "
                            f"{why.format(flows=('flow ' if len(flows) == 1 else 'flows ') + ', '.join(flows))}")


def check_test_metric(spec: StudySpec, runs: list) -> None:
    """`test_metric` must be a column trials report: test_acc, test_loss or acc_after_<phase label>."""
    from ..phases import expand_phases
    labels = dict.fromkeys(p.label for run in runs for p in expand_phases(run.pipeline, run.init))
    allowed = ["test_acc", "test_loss"] + [f"acc_after_{label}" for label in labels]
    if spec.test_metric not in allowed:
        raise SpecError(f"test_metric: {spec.test_metric!r} is not a column the trials report; allowed: "
                        f"{', '.join(allowed)}")


def make_plan(spec: StudySpec) -> Plan:
    """Arms, seeds, shared prefixes and epoch counts; validates every arm's run spec.

    A study's own phase kinds (`phase_kinds`) are registered first; their modules are found in the
    search folders (`dsdtune.registry.add_search_paths`, which the command line sets to the study
    file's folder and the current directory)."""
    if spec.phase_kinds:
        from ..phases import register_study_kinds
        register_study_kinds(spec.phase_kinds)
    for path in list(spec.search.space) + [p for v in (spec.variants or {}).values() for p in v]:
        if path.split(".")[0] not in ("task", "init", "pipeline"):
            raise SpecError(f"search.space.{path}: searched fields live under task., init. or pipeline.")
    if spec.search.algorithm != "optuna":
        arms = _grid_arms(spec)
        check_arm_labels(spec, arms)  # first: the plan keys arms by label
        plan = plan_for_arms(spec, arms)
        check_distinct_arms(arms, plan.runs)
        check_unused_settings(arms, plan.runs)
        check_test_metric(spec, plan.runs)
        return plan
    if not spec.search.space:
        raise SpecError("search.space: optuna needs at least one searched field")
    # Optuna's arms are unknown in advance: probe every axis (ends, middle, all at once) to find the one
    # prefix every trial shares; any probe whose prefix id differs leaves nothing shared.
    probes, of_axis = _optuna_probes(spec)
    plan = plan_for_arms(spec, probes, common=True)
    check_unused_settings(probes, plan.runs)
    check_test_metric(spec, plan.runs)
    for path, indices in of_axis.items():
        if len(indices) > 1 and len({_trial_id(plan.runs[i]) for i in indices}) == 1:
            values = ", ".join(str(probes[i].assign[path]) for i in indices)
            raise SpecError(f"search.space.{path}: changes nothing: its values ({values}) give identical trials "
                            f"(same task, init and phases); drop it")
    # Factors: the searched fields, and what the confirm stage's control changes (e.g. sparsity).
    control_keys = [k for k in (spec.confirm.control if spec.confirm else {}) if k not in spec.search.space]
    plan.arms, plan.factors, plan.trial_prefix = [], list(spec.search.space) + control_keys, {}
    needed = sorted({point for points in plan.prefix_snapshots.values() for point in points})
    plan.prefixes, plan.prefix_snapshots = {}, {}
    if plan.prefix_length:
        from ..pipeline import prefix_id
        for seed in plan.seeds:
            pid = prefix_id(build_run_spec(spec.base_run(), {}, seed), plan.prefix_length)
            plan.prefixes[pid] = ("base", seed)
            if needed:
                plan.prefix_snapshots[pid] = needed
    return plan


def plan_for_arms(spec: StudySpec, arms: list[Arm], common: bool = False) -> Plan:
    """The plan for fixed arms x the study's seeds, with each arm's shared prefix.

    An arm shares its leading phases with the other arms that have the most of them in common (same
    task, init and seed: equal prefix ids); `common` asks for one prefix all arms share (an Optuna
    search, whose trials are not known in advance). At least one phase is left for each trial."""
    from ..phases import expand_phases, flow_snapshots
    from ..pipeline import prefix_id
    seeds = spec.seed_list
    runs = {a.label: _check_trial(spec, a.assign, seeds[0], f" (arm {a.label})" if a.factors else "") for a in arms}
    phase_lists = {label: expand_phases(run.pipeline, run.init) for label, run in runs.items()}
    check_settings_blocks(list(runs.values()))

    def shared(a: str, b: str) -> int:
        pa, pb = phase_lists[a], phase_lists[b]
        n = 0
        while n < min(len(pa), len(pb)) - 1 and pa[n] == pb[n]:
            n += 1
        while n > 0 and prefix_id(runs[a], n) != prefix_id(runs[b], n):  # another task or init
            n -= 1
        return n

    labels = list(runs)
    if not spec.share_prefixes:
        lengths = {a: 0 for a in labels}
    elif common:
        length = min(min(shared(labels[0], b) for b in labels[1:]), len(phase_lists[labels[0]]) - 1) \
            if len(labels) > 1 else len(phase_lists[labels[0]]) - 1
        lengths = {a: max(0, length) for a in labels}
    else:
        lengths = {a: max((shared(a, b) for b in labels if b != a), default=0) for a in labels}
    plan = Plan(arms, seeds, max(lengths.values(), default=0), factors=list(arms[0].factors),
                runs=list(runs.values()), arm_prefix_length=lengths)
    plan.epochs_per_trial = {label: sum(p.epochs for p in plist) for label, plist in phase_lists.items()}
    users: dict[str, list[tuple[str, int]]] = {}
    for arm in arms:
        length = lengths[arm.label]
        if not length:
            continue
        # the points inside the prefix whose weights this arm's later phases rewind to
        needed = [point for point in flow_snapshots(phase_lists[arm.label]) if point[0] < length]
        for seed in seeds:
            pid = prefix_id(build_run_spec(spec.base_run(), arm.assign, seed), length)
            plan.trial_prefix[(arm.label, seed)] = pid
            plan.prefix_epochs_of[pid] = sum(p.epochs for p in phase_lists[arm.label][:length])
            users.setdefault(pid, []).append((arm.label, seed))
            plan.prefix_snapshots[pid] = sorted(set(plan.prefix_snapshots.get(pid, [])) | set(needed))
    plan.prefixes = {pid: trials[0] for pid, trials in users.items() if len(trials) > 1}
    plan.prefix_snapshots = {pid: pts for pid, pts in plan.prefix_snapshots.items() if pts and pid in plan.prefixes}
    return plan


def describe_plan(spec: StudySpec, plan: Plan) -> str:
    lines = [f"study {spec.name}: {spec.description.strip()}" if spec.description else f"study {spec.name}",
             f"flow {spec.pipeline.flow}, search {spec.search.algorithm}, seeds {plan.seeds}"]
    if spec.search.algorithm == "optuna":
        lines.append(f"optuna: {spec.search.num_samples} samples x {len(plan.seeds)} seeds over "
                     f"{', '.join(spec.search.space)}; scheduler {spec.scheduler.kind}")
        if spec.confirm:
            lines.append(f"confirm: best config and control on {spec.confirm.seeds} fresh seeds")
    else:
        lines.append(f"{len(plan.arms)} arms x {len(plan.seeds)} seeds = {len(plan.arms) * len(plan.seeds)} trials")
        for arm in plan.arms:
            lines.append(f"  arm {arm.label}: {plan.epochs_per_trial[arm.label]} epochs per trial")
    if plan.prefixes:
        where = "by one trial of each, which stores it for the others the moment it ends"
        groups: dict[tuple[int, int], int] = {}
        for pid, (label, _) in plan.prefixes.items():
            key = (plan.arm_prefix_length.get(label, plan.prefix_length), plan.prefix_epochs_of[pid])
            groups[key] = groups.get(key, 0) + 1
        what = "; ".join((f"{n} of the " if len(groups) > 1 else "") + f"first {length} phase(s), {epochs} epochs each"
                         for (length, epochs), n in sorted(groups.items()))
        lines.append(f"shared prefixes: {len(plan.prefixes)} ({what}), trained once {where}")
    if spec.search.algorithm != "optuna":
        lines.append(f"epochs: {plan.epochs_with_sharing} with shared prefixes, "
                     f"{plan.epochs_without_sharing} without")
    return "\n".join(lines)


def confirm_arms(spec: StudySpec, best: dict) -> list[Arm]:
    """The best searched config and its control (the same config with confirm.control applied)."""
    control = dict(best)
    control.update(spec.confirm.control if spec.confirm else {})
    return [Arm("best", best, {}), Arm("control", control, {})]


def phase_labels(spec: StudySpec, plan: Plan) -> list[str]:
    """Phase labels of every arm's flow (variants may change it), in order of first appearance."""
    from ..phases import expand_phases
    runs = [build_run_spec(spec.base_run(), a.assign, plan.seeds[0]) for a in plan.arms] or \
        [build_run_spec(spec.base_run(), {}, plan.seeds[0])]
    labels = [p.label for run in runs for p in expand_phases(run.pipeline, run.init)]
    return list(dict.fromkeys(labels))
