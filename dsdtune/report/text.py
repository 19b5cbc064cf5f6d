"""Numbers and sentences as the report prints them."""
from __future__ import annotations

import math
from typing import Any

from .types import ArmTrials, MetricInfo, Reference, ReportInput

ALPHA = 0.05  # the level of every test, flag and sentence
POWER = 0.8  # of the minimum detectable effect
BOOTSTRAP_SEED = 0  # percentile-bootstrap CIs are reproducible


def nan_if_none(x: Any) -> float:
    return float("nan") if x is None else float(x)


# -------------------------------------------------------------------------------- formatting


def fmt_p(p: float) -> str:
    if p is None or math.isnan(p):
        return "–"
    if p < 1e-4:
        return f"{p:.1e}"
    return f"{p:.2g}" if p < 0.1 else f"{p:.2f}"


def fmt_v(x: float, info: MetricInfo) -> str:
    """Accuracies in % with 2 decimals (the DSD paper's precision); other metrics to 4 digits."""
    if x is None or math.isnan(x):
        return "–"
    return f"{x * info.scale:.2f}" if info.is_acc else f"{x:.4g}"


def fmt_d(x: float, info: MetricInfo) -> str:
    if x is None or math.isnan(x):
        return "–"
    return f"{x * info.scale:+.2f}" if info.is_acc else f"{x:+.3g}"


def test_name(test: str) -> str:
    return {"welch_t": "Welch", "paired_t": "paired t", "mann_whitney": "Mann-Whitney",
            "wilcoxon_signed_rank": "Wilcoxon"}.get(test, test)


def subject_of(study: ReportInput, arm: ArmTrials, reference: Reference) -> str:
    if arm.key in reference.reference_keys and "fine-tune" in reference.name:
        return f"Direct fine-tuning ({arm.label})"
    flow = study.flow
    # One flow names the method ("DSD with sparsity=0.5"); several (variants) are in the arm label.
    if flow and "," not in flow and not any("flow" in f for f in study.factors):
        return f"{flow} with {arm.label}"
    return arm.label


def comparison_sentence(r: dict[str, Any], subject: str, ref_name: str, info: MetricInfo) -> str:
    """One plain sentence saying what the data say about one comparison."""
    u, du = info.unit, info.diff_unit
    n_txt = (f"n = {fmt_n(r['n_a'])} pairs" if r["test"] == "paired_t"
             else f"n = {fmt_n(r['n_a'])} vs {fmt_n(r['n_b'])}")
    means = f"{fmt_v(r['mean_a'], info)}{u} vs {fmt_v(r['mean_ref'], info)}{u}"
    if r["status"] == "insufficient_n":
        return (f"{subject} could not be tested against {ref_name}: {n_txt} usable trials (a t-test "
                f"needs at least 2 per arm); means {means}.")
    if r["status"] == "no_variance":
        return (f"{subject} vs {ref_name}: {means} ({n_txt}), with no run-to-run variance at all (deterministic "
                "runs?), so no t-test is possible; the difference is exact for these seeds only.")
    better = (r["diff"] > 0) == info.higher_is_better and r["diff"] != 0
    p_txt = (f"{test_name(r['test'])} p = {fmt_p(r['p_value'])}, Holm p = {fmt_p(r['p_holm'])} "
             f"(m = {r['family_m']})")
    numbers = (f"{means} ({n_txt}; diff {fmt_d(r['diff'], info)}{du}, 95% CI [{fmt_d(r['ci_low'], info)}, "
               f"{fmt_d(r['ci_high'], info)}]), {p_txt}")
    equiv = equivalence_clause(r, info)
    if r["significant"]:
        verb = "beat" if better else "did worse than"
        return f"{subject} {verb} {ref_name}: {numbers}{equiv}."
    if better:
        verb = "was not significantly better than"
    elif r["diff"] == 0:
        verb = "did not differ from"
    else:
        verb = "did not beat"
    tail = ""
    if not math.isnan(r["mde"]):
        tail = (f"; no effect larger than {fmt_v(abs(r['mde']), info)}{du} detected "
                f"(80% power at {mde_alpha_text(r['mde_alpha'], r['family_m'])})")
    if r["p_value"] < ALPHA:
        tail += "; nominally p < 0.05, but not after Holm correction"
    return f"{subject} {verb} {ref_name}: {numbers}{tail}{equiv}."


def mde_alpha_text(alpha: float, m: int) -> str:
    return f"α = {ALPHA:g}/{m} = {alpha:.2g}" if m > 1 else f"α = {alpha:g}"


def margin_text(margin: float, info: MetricInfo) -> str:
    return f"±{fmt_v(margin, info)}{info.diff_unit}"


def equivalence_clause(r: dict[str, Any], info: MetricInfo) -> str:
    """'; equivalent within ±0.50 pp (...)' or 'not shown equivalent'; '' without a margin."""
    margin = r.get("margin")
    if margin is None or math.isnan(margin):
        return ""
    within = margin_text(margin, info)
    if r.get("tost_status") != "ok":
        return f"; equivalence within {within} could not be tested ({r.get('tost_status')})"
    ci = (f"{int(round(100 * (1 - 2 * ALPHA)))}% CI [{fmt_d(r['tost_ci_low'], info)}, "
          f"{fmt_d(r['tost_ci_high'], info)}]")
    detail = f"TOST p = {fmt_p(r['tost_p'])}, Holm p = {fmt_p(r['tost_p_holm'])}, {ci}"
    if r["equivalent"]:
        return f"; equivalent within {within} ({detail})"
    return f"; not shown equivalent within {within} ({detail})"


def fmt_flops(x: float) -> str:
    """FLOPs with an SI prefix and 3 significant digits: 156672 -> '157 kFLOP'."""
    if x is None or math.isnan(x):
        return "–"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}FLOP"
    return f"{x:.3g} FLOP"


def fmt_n(n: Any) -> str:
    return "–" if n is None or (isinstance(n, float) and math.isnan(n)) else str(int(n))


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(cell(h) for h in headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


