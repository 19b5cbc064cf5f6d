"""Methods ranked across tasks: a study whose factors include task fields (task.model, task.dataset).

Per task and method the mean over seeds (ok trials); Friedman over the tasks with complete rows,
Iman-Davenport's F beside it, average ranks, then Wilcoxon signed-rank on the per-task means for
every pair of methods with Holm over all pairs (Demsar 2006). `autorank` does a similar job but
chooses its tests from normality checks and follows Friedman with Nemenyi, not Wilcoxon + Holm,
so scipy/statsmodels are used directly.
"""
from __future__ import annotations

import itertools

import numpy as np

from dsdtune import stats

from .arms import canon, fmt_level
from .types import ArmTrials, MetricInfo, RankResult


def _label(factors: dict, names: list[str]) -> str:
    return ", ".join(f"{f}={fmt_level(factors[f])}" for f in names) or "all"


def rank_summary(study, arms: list[ArmTrials], info: MetricInfo) -> RankResult | None:
    """None unless the study varies a task field over at least 2 tasks and has 2+ methods."""
    task_f = [f for f in study.factors if f.startswith("task.")
              and len({canon(a.factors[f]) for a in arms}) > 1]
    if not task_f:
        return None
    method_f = [f for f in study.factors if f not in task_f]
    cells: dict[tuple[str, str], float] = {}
    tasks: dict[str, None] = {}
    methods: dict[str, None] = {}
    for a in arms:
        task, method = _label(a.factors, task_f), _label(a.factors, method_f)
        tasks.setdefault(task)
        methods.setdefault(method)
        m = stats.describe(a.values(info.name)).mean
        if m is not None:
            cells[(task, method)] = m
    if len(methods) < 2:
        return None
    method_list = list(methods)
    complete = [t for t in tasks if all((t, m) in cells for m in method_list)]
    dropped = [t for t in tasks if t not in complete]
    means = np.array([[cells[(t, m)] for m in method_list] for t in complete], dtype=float).reshape(
        len(complete), len(method_list))
    fr = stats.friedman_ranks(means, higher_is_better=info.higher_is_better) if len(complete) else \
        stats.RankSummary("insufficient_n", 0, len(method_list), [float("nan")] * len(method_list),
                          None, None, None, None, None, None, "no task has every method")
    pairs = []
    for i, j in itertools.combinations(range(len(method_list)), 2):
        w = stats.wilcoxon_signed_rank(means[:, i], means[:, j]) if len(complete) else None
        pairs.append({"method_a": method_list[i], "method_b": method_list[j], "n_tasks": len(complete),
                      "mean_diff": float(np.mean(means[:, i] - means[:, j])) if len(complete) else float("nan"),
                      "p": w.p_value if w is not None else None,
                      "status": w.status if w is not None else "insufficient_n"})
    adj = stats.holm([p["p"] for p in pairs])
    for p, ph in zip(pairs, adj.p_adjusted):
        p["p_holm"] = ph
    return RankResult(task_f, complete, method_list, means, fr, pairs, dropped)


def ranks_frame(rk: RankResult):
    """ranks.csv: one row per method (average rank, per-task means) and one per pair of methods."""
    import pandas as pd

    rows = [{"kind": "method", "method_a": m, "average_rank": rk.friedman.average_ranks[i],
             **{f"mean[{t}]": rk.means[j, i] for j, t in enumerate(rk.tasks)}} for i, m in enumerate(rk.methods)]
    fr = rk.friedman
    rows.append({"kind": "friedman", "n_tasks": fr.n_blocks, "statistic": fr.statistic, "p": fr.p_value,
                 "f_statistic": fr.f_statistic, "f_p": fr.f_p_value, "status": fr.status})
    rows += [{"kind": "pair", **p} for p in rk.pairs]
    return pd.DataFrame(rows)
