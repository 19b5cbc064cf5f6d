"""dsdtune.report on small synthetic results directories with known values."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from dsdtune import stats
from dsdtune.report import ReportError, main, write_report

SEEDS = [0, 1, 2, 3, 4, 5]
LABELS = ["D1", "S1", "D2"]
EPOCHS = (4, 3, 3)  # per phase


def _study_json(d: Path, **over) -> dict:
    meta = {"name": "synthetic_dsd", "description": "A synthetic DSD sparsity sweep.",
            "metric": "val_acc", "mode": "max", "test_metric": "test_acc",
            "factors": ["pipeline.sparsity"], "flow": "DSD", "phase_labels": LABELS,
            "seeds": SEEDS, "search_alg": "grid", "control": {"pipeline.sparsity": 0.0},
            "shared_prefix": True}
    meta.update(over)
    (d / "study.json").write_text(json.dumps(meta))
    return meta


def _trial(tid, arm, factors, seed, base, final, status="ok", stage="sweep", prefix=None, val=None):
    row = {"trial_id": tid, "stage": stage, "arm": arm, **factors, "seed": seed, "status": status,
           "prefix_id": prefix if prefix is not None else f"p{seed}", "epochs_trained": sum(EPOCHS),
           "wall_time_s": 1.0, "final_val_acc": final - 0.002 if val is None else val,
           "final_val_loss": 0.3, "final_test_acc": final, "final_test_loss": 0.3,
           "final_sparsity": 0.0, "acc_after_D1": base, "val_acc_after_D1": base - 0.001,
           "acc_after_S1": final - 0.01, "val_acc_after_S1": final - 0.011,
           "acc_after_D2": final, "val_acc_after_D2": final - 0.002}
    if status != "ok":
        row.update(final_test_acc=np.nan, final_val_acc=np.nan, acc_after_D2=np.nan, acc_after_S1=np.nan)
    return row


def make_sweep(d: Path, *, shared_prefix=True, diverge=True, with_history=True, seed=0) -> pd.DataFrame:
    """Sparsities 0/0.3/0.5/0.7 x 6 seeds; one diverged trial at 0.7; a real effect at 0.5."""
    d.mkdir(parents=True, exist_ok=True)
    _study_json(d, shared_prefix=shared_prefix)
    rng = np.random.default_rng(seed)
    base = 0.90 + 0.004 * rng.standard_normal(len(SEEDS))
    effect = {0.0: 0.002, 0.3: 0.004, 0.5: 0.012, 0.7: -0.001}
    rows, tid = [], 0
    for sp, eff in effect.items():
        for i, s in enumerate(SEEDS):
            status = "diverged" if (diverge and sp == 0.7 and s == 5) else "ok"
            final = base[i] + eff + 0.002 * rng.standard_normal()
            rows.append(_trial(tid, f"pipeline.sparsity={sp:g}", {"pipeline.sparsity": sp}, s,
                               base[i], final, status))
            tid += 1
    trials = pd.DataFrame(rows)
    trials.to_csv(d / "trials.csv", index=False)
    if with_history:
        hist = []
        for r in rows:
            epoch = 0
            for ph, (n_ep, lab) in enumerate(zip(EPOCHS, LABELS)):
                for _ in range(n_ep):
                    epoch += 1
                    acc = 0.5 + 0.4 * (1 - np.exp(-epoch / 2)) + 0.01 * rng.standard_normal()
                    hist.append({"trial_id": r["trial_id"], "epoch": epoch, "phase": ph,
                                 "phase_kind": lab[0], "phase_label": lab, "lr": 0.1 / 10**ph,
                                 "sparsity": r["pipeline.sparsity"] if lab == "S1" else 0.0,
                                 "train_loss": 1 - acc, "val_loss": 1 - acc, "val_acc": acc,
                                 "test_loss": 1 - acc, "test_acc": acc + 0.002})
        pd.DataFrame(hist).to_csv(d / "history.csv", index=False)
    return trials


def _ok_values(trials: pd.DataFrame, sp: float, col="final_test_acc") -> np.ndarray:
    t = trials[(trials["pipeline.sparsity"] == sp) & (trials["status"] == "ok")]
    return t.sort_values("seed")[col].to_numpy(dtype=float)


# ------------------------------------------------------------------------------------------ tests


def test_summary_matches_numpy_and_counts_diverged(tmp_path):
    trials = make_sweep(tmp_path)
    paths = write_report(tmp_path, figures=False)
    summ = pd.read_csv(paths["summary"])
    s = summ[summ["metric"] == "final_test_acc"].set_index("pipeline.sparsity")
    for sp in (0.0, 0.3, 0.5, 0.7):
        x = _ok_values(trials, sp)
        n = len(x)
        half = sps.t.ppf(0.975, n - 1) * x.std(ddof=1) / np.sqrt(n)
        row = s.loc[sp]
        assert row["n"] == n
        assert row["mean"] == pytest.approx(x.mean(), abs=1e-12)
        assert row["sd"] == pytest.approx(x.std(ddof=1), rel=1e-9)
        assert row["sem"] == pytest.approx(x.std(ddof=1) / np.sqrt(n), rel=1e-9)
        assert row["ci_low"] == pytest.approx(x.mean() - half, rel=1e-9)
        assert row["ci_high"] == pytest.approx(x.mean() + half, rel=1e-9)
        assert row["median"] == pytest.approx(np.median(x))
        assert (row["min"], row["max"]) == pytest.approx((x.min(), x.max()))
    # The diverged trial is counted, not used: 6 trials, 5 ok, 1 diverged, n = 5.
    r7 = s.loc[0.7]
    assert (r7["n_total"], r7["n_ok"], r7["n_diverged"], r7["n_error"], r7["n"]) == (6, 5, 1, 0, 5)
    # Per-phase metrics are summarized too (the diverged trial has a D1 value but is still excluded).
    d1 = summ[(summ["metric"] == "acc_after_D1") & (summ["pipeline.sparsity"] == 0.7)].iloc[0]
    assert d1["n"] == 5
    assert d1["mean"] == pytest.approx(_ok_values(trials, 0.7, "acc_after_D1").mean())
    assert set(summ["metric"]) >= {"final_test_acc", "acc_after_D1", "acc_after_S1", "acc_after_D2"}


def test_paired_t_by_seed_with_shared_prefix_and_holm_family(tmp_path):
    trials = make_sweep(tmp_path, shared_prefix=True)
    comp = pd.read_csv(write_report(tmp_path, figures=False)["comparisons"])
    cc = comp[comp["family"] == "vs_control"].set_index("pipeline.sparsity")
    assert sorted(cc.index) == [0.3, 0.5, 0.7]  # the control is not compared with itself
    assert set(cc["test"]) == {"paired_t"}
    ctrl = trials[(trials["pipeline.sparsity"] == 0.0) & (trials["status"] == "ok")].set_index("seed")
    raw = {}
    for sp in (0.3, 0.5, 0.7):
        arm = trials[(trials["pipeline.sparsity"] == sp) & (trials["status"] == "ok")].set_index("seed")
        common = arm.index.intersection(ctrl.index)
        ref = stats.paired_t(arm.loc[common, "final_test_acc"], ctrl.loc[common, "final_test_acc"])
        got = cc.loc[sp]
        assert got["n_a"] == len(common)
        assert got["p_value"] == pytest.approx(ref.p_value, rel=1e-9)
        assert got["diff"] == pytest.approx(ref.diff, rel=1e-9)
        assert (got["ci_low"], got["ci_high"]) == pytest.approx((ref.ci_low, ref.ci_high), rel=1e-9)
        assert got["rank_test"] == "wilcoxon_signed_rank"
        raw[sp] = ref.p_value
    holm = stats.holm([raw[sp] for sp in (0.3, 0.5, 0.7)])
    assert holm.m == 3 and set(cc["family_m"]) == {3}
    assert list(cc.loc[[0.3, 0.5, 0.7], "p_holm"]) == pytest.approx(holm.p_adjusted, rel=1e-9)
    bh = stats.benjamini_hochberg([raw[sp] for sp in (0.3, 0.5, 0.7)])
    assert list(cc.loc[[0.3, 0.5, 0.7], "p_bh"]) == pytest.approx(bh.p_adjusted, rel=1e-9)
    assert list(cc["significant"]) == [p < 0.05 for p in cc["p_holm"]]
    assert bool(cc.loc[0.5, "significant"])  # the planted +1 pp effect over the control


def test_welch_without_shared_prefix_and_effect_sizes(tmp_path):
    trials = make_sweep(tmp_path, shared_prefix=False)
    comp = pd.read_csv(write_report(tmp_path, figures=False)["comparisons"])
    cc = comp[comp["family"] == "vs_control"].set_index("pipeline.sparsity")
    assert set(cc["test"]) == {"welch_t"}
    a, c = _ok_values(trials, 0.7), _ok_values(trials, 0.0)
    ref = stats.welch_t(a, c)
    got = cc.loc[0.7]
    assert (got["n_a"], got["n_b"]) == (5, 6)
    assert got["p_value"] == pytest.approx(ref.p_value, rel=1e-9)
    assert got["df"] == pytest.approx(ref.df, rel=1e-9)
    assert got["hedges_g"] == pytest.approx(stats.hedges_g(a, c).value, rel=1e-9)
    assert got["p_better"] == pytest.approx(stats.prob_superiority(a, c).value, rel=1e-9)
    assert got["rank_p"] == pytest.approx(stats.mann_whitney(a, c).p_value, rel=1e-9)
    pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(c) - 1) * c.var(ddof=1)) / (len(a) + len(c) - 2))
    # The MDE is at Holm's strictest level alpha / m, so an effect that large is flagged significant.
    assert got["family_m"] == 3 and got["mde_alpha"] == pytest.approx(0.05 / 3)
    mde = stats.minimum_detectable_effect(len(a), len(c), alpha=0.05 / 3, sd=pooled).effect_metric
    assert got["mde"] == pytest.approx(mde, rel=1e-9)
    assert bool(got["underpowered"]) == (abs(got["diff"]) < mde)


def test_prefix_mismatch_falls_back_to_welch(tmp_path):
    make_sweep(tmp_path)
    t = pd.read_csv(tmp_path / "trials.csv")
    t.loc[t["pipeline.sparsity"] == 0.3, "prefix_id"] = "other"
    t.to_csv(tmp_path / "trials.csv", index=False)
    comp = pd.read_csv(write_report(tmp_path, figures=False)["comparisons"])
    cc = comp[comp["family"] == "vs_control"].set_index("pipeline.sparsity")
    assert cc.loc[0.3, "test"] == "welch_t" and "prefix_id differs" in cc.loc[0.3, "note"]
    assert cc.loc[0.5, "test"] == "paired_t"


def test_baseline_family_is_paired_within_trial(tmp_path):
    trials = make_sweep(tmp_path)
    comp = pd.read_csv(write_report(tmp_path, figures=False)["comparisons"])
    bc = comp[comp["family"] == "vs_baseline"].set_index("pipeline.sparsity")
    assert sorted(bc.index) == [0.0, 0.3, 0.5, 0.7] and set(bc["test"]) == {"paired_t"}
    ok = trials[(trials["pipeline.sparsity"] == 0.5) & (trials["status"] == "ok")]
    ref = stats.paired_t(ok["final_test_acc"], ok["acc_after_D1"])
    assert bc.loc[0.5, "p_value"] == pytest.approx(ref.p_value, rel=1e-9)
    assert set(bc["family_m"]) == {4}


def test_multifactor_control_matched_within_init_scheme(tmp_path):
    _study_json(tmp_path, factors=["init.weights", "pipeline.sparsity"], shared_prefix=False)
    rng = np.random.default_rng(1)
    rows, tid = [], 0
    offset = {"base": 0.0, "eoi": 0.05}  # a big init effect: a wrong match would show up in diff
    for w in ("base", "eoi"):
        for sp in (0.0, 0.5):
            for s in SEEDS[:4]:
                final = 0.8 + offset[w] + 0.003 * rng.standard_normal()
                rows.append(_trial(tid, f"init.weights={w}, pipeline.sparsity={sp:g}",
                                   {"init.weights": w, "pipeline.sparsity": sp}, s, 0.79, final,
                                   prefix=f"{w}{s}"))
                tid += 1
    pd.DataFrame(rows).to_csv(tmp_path / "trials.csv", index=False)
    paths = write_report(tmp_path, figures=False)
    comp = pd.read_csv(paths["comparisons"])
    cc = comp[comp["family"] == "vs_control"]
    assert len(cc) == 2 and set(cc["family_m"]) == {2}
    for _, r in cc.iterrows():
        assert r["pipeline.sparsity"] == 0.5
        assert r["reference"] == f"init.weights={r['init.weights']}, pipeline.sparsity=0"
        assert abs(r["diff"]) < 0.02  # same init scheme on both sides
    report = paths["report"].read_text()
    assert "same init.weights" in report


def test_optuna_best_on_validation_vs_confirm(tmp_path):
    _study_json(tmp_path, name="opt", search_alg="optuna", factors=["pipeline.lr"],
                control={"pipeline.lr": 0.1}, shared_prefix=False)
    rows = [
        # lr 0.05 is best on validation; lr 0.2 is best on test (must not be chosen).
        _trial(0, "pipeline.lr=0.05", {"pipeline.lr": 0.05}, 0, 0.9, 0.91, val=0.95),
        _trial(1, "pipeline.lr=0.2", {"pipeline.lr": 0.2}, 1, 0.9, 0.99, val=0.90),
        _trial(2, "pipeline.lr=0.3", {"pipeline.lr": 0.3}, 2, 0.9, 0.5, status="error"),
    ]
    rng = np.random.default_rng(2)
    tid = 3
    for lr, mu in ((0.05, 0.92), (0.1, 0.90)):
        for s in range(1000, 1005):
            rows.append(_trial(tid, f"pipeline.lr={lr:g}", {"pipeline.lr": lr}, s, 0.88,
                               mu + 0.003 * rng.standard_normal(), stage="confirm"))
            tid += 1
    trials = pd.DataFrame(rows)
    trials.to_csv(tmp_path / "trials.csv", index=False)
    paths = write_report(tmp_path)
    comp = pd.read_csv(paths["comparisons"])
    cc = comp[comp["family"] == "vs_control"]
    assert len(cc) == 1 and cc.iloc[0]["pipeline.lr"] == 0.05 and cc.iloc[0]["family_m"] == 1
    conf = trials[trials["stage"] == "confirm"]
    ref = stats.welch_t(conf.loc[conf["pipeline.lr"] == 0.05, "final_test_acc"],
                        conf.loc[conf["pipeline.lr"] == 0.1, "final_test_acc"])
    assert cc.iloc[0]["p_value"] == pytest.approx(ref.p_value, rel=1e-9)
    assert (cc.iloc[0]["n_a"], cc.iloc[0]["n_b"]) == (5, 5)  # sweep rows are not mixed in
    summ = pd.read_csv(paths["summary"])
    assert set(summ["stage"]) == {"confirm", "sweep"}
    report = paths["report"].read_text()
    assert "Best configuration by mean `final_val_acc`: **pipeline.lr=0.05**" in report
    assert "fig_search" in paths and paths["fig_search"].stat().st_size > 0


# Run in a fresh interpreter: forking is only safe without other threads, and a test process may hold
# Ray's (the report itself then draws in-process; a helper forked there can hang).
_HELPER_PROBE = """
import json, sys, threading
from pathlib import Path
from dsdtune.report import drawing, write_report
folder = Path(sys.argv[1])
drawing.os.sched_getaffinity = lambda pid: {0, 1}  # two cores on any machine
real_count = threading.active_count
threading.active_count = lambda: 2  # another thread: drawn in this process
serial = write_report(folder, out_dir=folder / "serial")
threading.active_count = real_count
helpers, real_start = [], drawing.FigureDrawing.start.__func__
def start(cls):
    started = real_start(cls)
    helpers.append(started.helper)
    return started
drawing.FigureDrawing.start = classmethod(start)
forked = write_report(folder, out_dir=folder / "forked")
drawing.save_fig = lambda fig, path: 1 / 0
try:
    write_report(folder, out_dir=folder / "broken")
    error = None
except ZeroDivisionError:
    error = "ZeroDivisionError"
print(json.dumps({"serial": {k: str(v) for k, v in serial.items()}, "forked": {k: str(v) for k, v in forked.items()},
                  "helpers": [None if h is None else h.exitcode for h in helpers], "error": error}))
"""


def test_figures_drawn_by_a_helper_process_equal_those_drawn_in_process(tmp_path):
    """With two cores and no other thread, a forked helper draws the figures (in two processes of its
    own) while the report runs its tests: the PNGs are the bytes the process itself draws, a figure's
    error reaches the caller, and the helper is stopped either way."""
    make_sweep(tmp_path)
    done = subprocess.run([sys.executable, "-c", _HELPER_PROBE, str(tmp_path)], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(seen["helpers"]) == 2 and all(code is not None for code in seen["helpers"])  # forked twice, both ended
    assert seen["helpers"][0] == 0 and seen["error"] == "ZeroDivisionError"
    figs = [k for k in seen["serial"] if k.startswith("fig_")]
    assert len(figs) >= 3 and figs == [k for k in seen["forked"] if k.startswith("fig_")]
    for key in figs:
        assert Path(seen["forked"][key]).read_bytes() == Path(seen["serial"][key]).read_bytes(), key
    broken = tmp_path / "broken"
    assert not list(broken.glob("*.png")) and not (broken / "report.md").exists()


def test_the_command_draws_while_it_analyzes_and_leaves_no_process_behind(tmp_path):
    """`python -m dsdtune.report` forks its figures' helper before it imports the analysis: its own
    process never imports matplotlib (the helper does, at the same time), and a refused folder stops
    the helper it had started."""
    make_sweep(tmp_path)
    probe = ("import multiprocessing, sys\n"
             "from dsdtune.report.cli import main\n"
             "codes = [main([sys.argv[1], '--out', sys.argv[2]]), main([sys.argv[2] + '/none'])]\n"
             "print(codes, 'matplotlib' in sys.modules, multiprocessing.active_children())\n")
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    one_core = len(os.sched_getaffinity(0)) < 2 if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1) < 2
    assert done.stdout.strip().splitlines()[-1] == f"[0, 2] {one_core} []"  # one core: drawn in-process
    assert len(list((tmp_path / "out").glob("fig_*.png"))) >= 3


def test_files_written_pngs_and_report_text(tmp_path):
    make_sweep(tmp_path)
    layers = [{"trial_id": t, "layer": f"layers.{i}.weight", "numel": 100, "density": 1.0 if i == 0 else 0.5}
              for t in range(24) for i in range(3)]
    pd.DataFrame(layers).to_csv(tmp_path / "layers.csv", index=False)
    edges = np.linspace(-0.3, 0.3, 21)
    weights = [{"trial_id": t, "phase_label": lab, "bin_left": lo, "bin_right": hi,
                "count": 5 + int(100 * np.exp(-((lo + hi) / 2) ** 2 / 0.01))}
               for t in range(24) for lab in LABELS for lo, hi in zip(edges[:-1], edges[1:])]
    pd.DataFrame(weights).to_csv(tmp_path / "weights.csv", index=False)
    out = tmp_path / "out"
    paths = write_report(tmp_path, out_dir=out)
    expected = {"summary", "comparisons", "report", "fig_metric_vs_sparsity", "fig_metric_by_arm",
                "fig_learning_curves", "fig_layer_density", "fig_weight_hist"}
    assert expected <= set(paths)
    for key, p in paths.items():
        assert p.parent == out and p.is_file() and p.stat().st_size > 0
        if key.startswith("fig_"):
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files
    # every file the report writes is one `--fresh` knows to remove (and nothing else is)
    from dsdtune.results import result_files
    (out / "notes.md").write_text("mine")
    assert set(result_files(out)) == set(paths.values())
    report = paths["report"].read_text()
    assert "did not beat the direct fine-tune control" in report or \
           "was not significantly better than the direct fine-tune control" in report
    assert "DSD with pipeline.sparsity=0.5 beat the direct fine-tune control (pipeline.sparsity=0)" in report
    assert "Holm over m = 3" in report and "Holm p =" in report and "(m = 3)" in report
    assert "± " in report and " SD (n=6)" in report and " SD (n=5)" in report
    assert "95% t-CI" in report and "SEM" in report
    assert "1 diverged" in report
    assert "no effect larger than" in report
    for fig in ("fig_metric_vs_sparsity.png", "fig_learning_curves.png", "fig_weight_hist.png"):
        assert f"]({fig})" in report


def test_partial_study_without_optional_files_and_missing_control(tmp_path):
    make_sweep(tmp_path, with_history=False)
    t = pd.read_csv(tmp_path / "trials.csv")
    t = t[t["pipeline.sparsity"] != 0.0]  # the control arm has not run yet
    t.loc[t.index[0], "status"] = "error"
    t.to_csv(tmp_path / "trials.csv", index=False)
    paths = write_report(tmp_path)
    assert "fig_learning_curves" not in paths and "fig_layer_density" not in paths
    report = paths["report"].read_text()
    assert "No trial matches the control (pipeline.sparsity=0)" in report
    comp = pd.read_csv(paths["comparisons"])
    assert set(comp["family"]) == {"vs_baseline"}
    summ = pd.read_csv(paths["summary"])
    row = summ[(summ["metric"] == "final_test_acc") & (summ["pipeline.sparsity"] == 0.3)].iloc[0]
    assert (row["n_error"], row["n"]) == (1, 5)


def test_guards_insufficient_n_and_no_variance(tmp_path):
    _study_json(tmp_path, shared_prefix=False)
    rows = [_trial(0, "s=0", {"pipeline.sparsity": 0.0}, 0, 0.9, 0.9),
            _trial(1, "s=0", {"pipeline.sparsity": 0.0}, 1, 0.9, 0.9),
            _trial(2, "s=0.5", {"pipeline.sparsity": 0.5}, 0, 0.9, 0.91),
            _trial(3, "s=0.5", {"pipeline.sparsity": 0.5}, 1, 0.9, 0.5, status="diverged"),
            _trial(4, "s=0.7", {"pipeline.sparsity": 0.7}, 0, 0.9, 0.9),
            _trial(5, "s=0.7", {"pipeline.sparsity": 0.7}, 1, 0.9, 0.9)]
    pd.DataFrame(rows).to_csv(tmp_path / "trials.csv", index=False)
    paths = write_report(tmp_path, figures=False)
    cc = pd.read_csv(paths["comparisons"]).query("family == 'vs_control'").set_index("pipeline.sparsity")
    assert cc.loc[0.5, "status"] == "insufficient_n" and np.isnan(cc.loc[0.5, "p_value"])
    assert cc.loc[0.7, "status"] == "no_variance"
    assert set(cc["family_m"]) == {0}  # no p-value, no family
    report = paths["report"].read_text()
    assert "could not be tested against the direct fine-tune control" in report
    assert "no run-to-run variance" in report


def test_control_option_and_no_control(tmp_path):
    make_sweep(tmp_path)
    comp = pd.read_csv(write_report(tmp_path, control="pipeline.sparsity=0.3", figures=False)["comparisons"])
    cc = comp[comp["family"] == "vs_control"]
    assert sorted(cc["pipeline.sparsity"]) == [0.0, 0.5, 0.7]
    assert set(cc["reference"]) == {"pipeline.sparsity=0.3"}
    _study_json(tmp_path, control=None)
    paths = write_report(tmp_path, figures=False)
    assert "names no control" in paths["report"].read_text()
    cc = pd.read_csv(paths["comparisons"]).query("family == 'vs_control'")
    # The reference is the best arm on validation (sparsity 0.5 carries the planted effect).
    assert set(cc["reference"]) == {"pipeline.sparsity=0.5"} and len(cc) == 3
    with pytest.raises(ReportError, match="not a factor"):
        write_report(tmp_path, control="lr=0.1", figures=False)


def test_cli_exit_codes(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "study.json").write_text("{not json")
    assert main([str(tmp_path / "bad")]) == 2
    make_sweep(tmp_path / "ok", with_history=False)
    assert main([str(tmp_path / "ok"), "--metric", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    # A real subprocess: exit code 2 and no traceback.
    proc = subprocess.run([sys.executable, "-m", "dsdtune.report", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_prefix_stage_rows_are_not_trials_of_an_arm(tmp_path):
    """The study runner writes the shared-prefix trainings as stage 'prefix' rows labelled with a
    representative arm; counting them would pair every arm with the baseline instead of the control."""
    import json
    import pandas as pd
    from dsdtune.report import write_report
    rows = []
    for seed in range(4):
        rows.append({"trial_id": f"p{seed}", "stage": "prefix", "arm": "pipeline.sparsity=0.0",
                     "pipeline.sparsity": 0.0, "seed": seed, "status": "ok", "prefix_id": f"D-s{seed}",
                     "final_test_acc": 0.60, "acc_after_D1": 0.60})
        for sparsity, final in [(0.0, 0.70 + 0.001 * seed), (0.5, 0.69 + 0.002 * seed)]:
            rows.append({"trial_id": f"t{seed}{sparsity}", "stage": "sweep", "arm": f"pipeline.sparsity={sparsity}",
                         "pipeline.sparsity": sparsity, "seed": seed, "status": "ok", "prefix_id": f"D-s{seed}",
                         "final_test_acc": final, "acc_after_D1": 0.60})
    pd.DataFrame(rows).to_csv(tmp_path / "trials.csv", index=False)
    (tmp_path / "study.json").write_text(json.dumps({
        "name": "p", "metric": "val_acc", "mode": "max", "test_metric": "test_acc", "factors": ["pipeline.sparsity"],
        "flow": "DSD", "phase_labels": ["D1", "S1", "D2"], "seeds": [0, 1, 2, 3], "search_alg": "grid",
        "control": {"pipeline.sparsity": 0.0}, "shared_prefix": True}))
    write_report(tmp_path, figures=False)
    summary = pd.read_csv(tmp_path / "summary.csv")
    control = summary[(summary.arm == "pipeline.sparsity=0.0") & (summary.metric == "final_test_acc")].iloc[0]
    assert control.n_total == 4 and abs(control["mean"] - 0.7015) < 1e-9
    comparison = pd.read_csv(tmp_path / "comparisons.csv")
    row = comparison[(comparison.family == "vs_control")].iloc[0]
    assert row["diff"] < 0  # DSD 0.693 vs fine-tune 0.7015: worse, not "better than the baseline"


# ------------------------------------------------------------------------ equivalence, costs, kinds


def test_tost_equals_statsmodels_and_verdict_only_with_margin(tmp_path):
    from statsmodels.stats.weightstats import ttost_ind, ttost_paired
    trials = make_sweep(tmp_path, shared_prefix=True)
    without = write_report(tmp_path, figures=False, costs=False)
    text = without["report"].read_text()
    assert "equivalent within" not in text and "no margin declared" in text
    assert pd.read_csv(without["comparisons"])["equivalent"].eq(False).all()

    paths = write_report(tmp_path, figures=False, margin=0.01, costs=False)
    cc = pd.read_csv(paths["comparisons"]).query("family == 'vs_control'").set_index("pipeline.sparsity")
    ctrl = trials[(trials["pipeline.sparsity"] == 0.0) & (trials["status"] == "ok")].set_index("seed")
    raw = {}
    for sp in (0.3, 0.5, 0.7):
        arm = trials[(trials["pipeline.sparsity"] == sp) & (trials["status"] == "ok")].set_index("seed")
        common = arm.index.intersection(ctrl.index)
        p, _, _ = ttost_paired(arm.loc[common, "final_test_acc"].to_numpy(), ctrl.loc[common, "final_test_acc"].to_numpy(),
                               -0.01, 0.01)
        assert cc.loc[sp, "tost_test"] == "tost_paired" and cc.loc[sp, "tost_p"] == pytest.approx(float(p), rel=1e-9)
        raw[sp] = float(p)
    adj = stats.holm([raw[sp] for sp in (0.3, 0.5, 0.7)]).p_adjusted
    assert list(cc.loc[[0.3, 0.5, 0.7], "tost_p_holm"]) == pytest.approx(adj, rel=1e-9)
    assert list(cc["equivalent"]) == [p < 0.05 for p in cc["tost_p_holm"]]
    assert cc["equivalent"].any() and not cc["equivalent"].all()  # 0.5 carries a +1.2 pp effect
    text = paths["report"].read_text()
    for sp, r in cc.iterrows():
        line = next(s for s in text.splitlines() if s.startswith("- ") and f"sparsity={sp:g} " in s
                    and "fine-tune control" in s)
        assert ("; equivalent within ±1.00 pp" in line) == bool(r["equivalent"])
        assert ("not shown equivalent within ±1.00 pp" in line) == (not r["equivalent"])
    # Welch where the design does not pair.
    make_sweep(tmp_path, shared_prefix=False)
    cw = pd.read_csv(write_report(tmp_path, figures=False, margin=0.01, costs=False)["comparisons"])
    cw = cw.query("family == 'vs_control'").set_index("pipeline.sparsity")
    a, c = _ok_values(trials, 0.7), _ok_values(trials, 0.0)
    p, _, _ = ttost_ind(a, c, -0.01, 0.01, usevar="unequal")
    assert cw.loc[0.7, "tost_test"] == "tost_welch" and cw.loc[0.7, "tost_p"] == pytest.approx(float(p), rel=1e-9)
    # The percentile bootstrap sits beside the t-interval, seeded.
    boot = stats.bootstrap_ci_diff(a, c, paired=False, seed=0)
    assert (cw.loc[0.7, "boot_ci_low"], cw.loc[0.7, "boot_ci_high"]) == pytest.approx((boot.ci_low, boot.ci_high))


def test_margin_from_the_study_and_bad_margins(tmp_path, capsys):
    make_sweep(tmp_path)
    _study_json(tmp_path, report={"margin": 0.02})
    paths = write_report(tmp_path, figures=False, costs=False)
    assert set(pd.read_csv(paths["comparisons"])["margin"]) == {0.02}
    assert "margin ±2.00 pp (from study.json)" in paths["report"].read_text()
    assert main([str(tmp_path), "--margin", "-1", "--no-costs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: margin") and "\n" not in err


def _spec_for(seeds, epochs=EPOCHS) -> dict:
    from dsdtune.config import StudySpec
    return StudySpec.model_validate({
        "name": "synthetic_dsd", "seeds": seeds,
        "task": {"dataset": "synthetic", "dataset_args": {"num_train": 200, "input_shape": [20], "num_classes": 4},
                 "model": "mlp", "model_args": {"widths": [32]}, "val_fraction": 0.1},
        "pipeline": {"flow": "DSD", "epochs": list(epochs), "lr": [0.1, 0.01, 0.001]},
        "search": {"space": {"pipeline.sparsity": {"grid": [0.0, 0.3, 0.5, 0.7]}}},
        "control": {"pipeline.sparsity": 0.0}}).model_dump(mode="json")


def _with_costs(d: Path, trials: pd.DataFrame) -> pd.DataFrame:
    """trials.csv with the cost columns each trial records (dsdtune.cost.TrialCost.as_row)."""
    dense = 2 * (20 * 32 + 32 * 4)  # Linear 20->32 (stays dense: first layer) and 32->4 (pruned)
    kept = (128 * (1 - trials["pipeline.sparsity"])).round()
    sparse = 2 * 20 * 32 + 2 * kept
    trials = trials.assign(params=902, params_final=902.0, inference_flops=float(dense),
                           inference_flops_dense=float(dense),
                           training_flops=3 * 180 * (4 * dense + 3 * sparse + 3 * dense),
                           training_flops_dense=3.0 * 180 * 10 * dense)
    trials.loc[trials["status"] != "ok", ["training_flops", "params_final"]] = np.nan  # diverged: none
    trials.to_csv(d / "trials.csv", index=False)
    return trials


def test_costs_are_what_the_trials_recorded(tmp_path):
    trials = _with_costs(tmp_path, make_sweep(tmp_path))
    paths = write_report(tmp_path)
    costs = pd.read_csv(paths["costs"])
    ok = trials[trials["status"] == "ok"]
    assert list(costs["trial_id"]) == list(ok["trial_id"]) and costs["cost_exact"].all()
    assert costs["training_flops"].to_numpy() == pytest.approx(ok["training_flops"].to_numpy())
    dense = 2 * (20 * 32 + 32 * 4)
    summ = pd.read_csv(paths["summary"]).query("metric == 'final_test_acc'").set_index("pipeline.sparsity")
    assert summ.loc[0.5, "training_flops"] == pytest.approx(3 * 180 * (7 * dense + 3 * (1280 + 128)))
    assert summ.loc[0.7, "training_flops"] == pytest.approx(3 * 180 * (7 * dense + 3 * (1280 + 2 * 38)))
    text = paths["report"].read_text()
    assert "## Cost" in text and "Recorded by each trial" in text
    assert "fig_metric_vs_training_flops" in paths and paths["fig_metric_vs_training_flops"].stat().st_size > 10_000


def test_results_without_recorded_costs_say_so(tmp_path):
    make_sweep(tmp_path)
    paths = write_report(tmp_path, figures=False)
    assert "costs" not in paths
    assert "Costs not recorded: these results were written before trials recorded their FLOPs" in \
        paths["report"].read_text()


def test_optuna_report_shows_confirm_seeds_and_counts_stopped(tmp_path):
    _study_json(tmp_path, name="opt", search_alg="optuna", factors=["pipeline.lr", "pipeline.sparsity"],
                control={"pipeline.sparsity": 0.0}, shared_prefix=False, seeds=[0],
                confirm_seeds=list(range(1000, 1006)))
    rows = [_trial(i, f"pipeline.lr={lr}", {"pipeline.lr": lr, "pipeline.sparsity": 0.5}, 0, 0.9, 0.91, status=st,
                   val=val) for i, (lr, st, val) in enumerate([(0.05, "ok", 0.95), (0.2, "stopped", 0.97),
                                                                (0.3, "stopped", None)])]
    rng = np.random.default_rng(3)
    for k, (arm, sp) in enumerate((("best", 0.5), ("control", 0.0))):
        for s in range(1000, 1006):
            rows.append(_trial(10 + 10 * k + s - 1000, arm, {"pipeline.lr": 0.05, "pipeline.sparsity": sp}, s, 0.88,
                               0.9 + 0.003 * rng.standard_normal(), stage="confirm"))
    pd.DataFrame(rows).to_csv(tmp_path / "trials.csv", index=False)
    paths = write_report(tmp_path, costs=False)
    text = paths["report"].read_text()
    assert "**Seeds (search)**: 1 per searched configuration (0)" in text
    assert "**Seeds (confirm)**: 6 fresh seeds per arm (1000, 1001, 1002, 1003, 1004, 1005); arms: control, best" in text
    assert "3 in stage search: 1 ok, 2 stopped early, 0 diverged, 0 error" in text
    assert "3 search trials (1 ok, 2 stopped early by the scheduler" in text
    # A stopped trial's better-looking value (0.97) does not make its config the best.
    assert "Best configuration by mean `final_val_acc`: **pipeline.lr=0.05" in text
    summ = pd.read_csv(paths["summary"]).query("stage == 'sweep' and metric == 'final_test_acc'")
    assert summ["n_stopped"].sum() == 2 and summ["n"].sum() == 1


def test_learning_curves_shade_each_flow_its_own_phases(tmp_path):
    from dsdtune.report import analyze, load_for_report
    from dsdtune.report.figures import plot_curves
    _study_json(tmp_path, factors=["variant", "pipeline.sparsity"], flow="DSD, DSDSD",
                phase_labels=["D1", "S1", "D2", "S2", "D3"], shared_prefix=False)
    rows, hist, tid = [], [], 0
    layouts = {"x1": ["D1", "S1", "D2"], "x2": ["D1", "S1", "D2", "S2", "D3"]}
    for variant, labels in layouts.items():
        for sp in (0.0, 0.5):
            for s in SEEDS[:3]:
                rows.append(_trial(tid, f"variant={variant}, pipeline.sparsity={sp:g}",
                                   {"variant": variant, "pipeline.sparsity": sp}, s, 0.8, 0.85 + 0.001 * s))
                for e in range(1, 3 * len(labels) + 1):
                    lab = labels[(e - 1) // 3]
                    hist.append({"trial_id": tid, "epoch": e, "phase": (e - 1) // 3, "phase_label": lab,
                                 "val_acc": 0.8, "test_acc": 0.8, "sparsity": 0.0})
                tid += 1
    pd.DataFrame(rows).to_csv(tmp_path / "trials.csv", index=False)
    pd.DataFrame(hist).to_csv(tmp_path / "history.csv", index=False)
    fig = plot_curves(analyze(load_for_report(tmp_path), costs=False))
    top = [ax for ax in fig.axes if ax.get_title()]
    assert sorted(ax.get_title() for ax in top) == ["phases D1 → S1 → D2", "phases D1 → S1 → D2 → S2 → D3"]
    for ax in top:
        shaded = [t.get_text() for t in ax.texts]
        assert shaded == ax.get_title().removeprefix("phases ").split(" → ")


def test_rank_summary_across_tasks(tmp_path):
    _study_json(tmp_path, factors=["task.model", "init.weights"], control={"init.weights": "base"},
                shared_prefix=False, flow="S", phase_labels=["S1"])
    rng = np.random.default_rng(5)
    offsets = {"base": 0.0, "eoi": 0.01, "ai": 0.004}
    rows, tid = [], 0
    for t_i, model in enumerate(["mlp", "conv1d", "lenet5", "gru", "resnet20", "vgg16"]):
        for w, off in offsets.items():
            for s in SEEDS[:3]:
                rows.append(_trial(tid, f"task.model={model}, init.weights={w}", {"task.model": model, "init.weights": w},
                                   s, 0.7, 0.7 + 0.02 * t_i + off + 0.001 * rng.standard_normal()))
                tid += 1
    trials = pd.DataFrame(rows)
    trials.to_csv(tmp_path / "trials.csv", index=False)
    paths = write_report(tmp_path, figures=False, costs=False)
    means = trials.groupby(["task.model", "init.weights"])["final_test_acc"].mean().unstack()
    table = means.loc[["mlp", "conv1d", "lenet5", "gru", "resnet20", "vgg16"], ["base", "eoi", "ai"]].to_numpy()
    ref = stats.friedman_ranks(table)
    ranks = pd.read_csv(paths["ranks"])
    fr = ranks[ranks["kind"] == "friedman"].iloc[0]
    assert fr["statistic"] == pytest.approx(ref.statistic) and fr["f_p"] == pytest.approx(ref.f_p_value)
    methods = ranks[ranks["kind"] == "method"].set_index("method_a")
    assert list(methods.loc[["init.weights=base", "init.weights=eoi", "init.weights=ai"], "average_rank"]) == \
        pytest.approx(ref.average_ranks)
    pairs = ranks[ranks["kind"] == "pair"]
    wil = [stats.wilcoxon_signed_rank(table[:, i], table[:, j]).p_value for i, j in ((0, 1), (0, 2), (1, 2))]
    assert list(pairs["p"]) == pytest.approx(wil) and list(pairs["p_holm"]) == pytest.approx(stats.holm(wil).p_adjusted)
    text = paths["report"].read_text()
    assert "## Ranks across tasks" in text and "Iman-Davenport F" in text


