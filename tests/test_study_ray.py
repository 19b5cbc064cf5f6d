"""The study runner on real Ray: stages, shared prefixes, divergence, kill + resume, dashboard, cluster."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import requests
import torch

from drivers import start_study, wait_for
from dsdtune.config import build_run_spec, load_study
from dsdtune.pipeline import run_pipeline
from dsdtune.study import main

TINY = Path(__file__).parent / "studies" / "tiny.yaml"


def reference_metrics(study_path, overrides, arm_assign, seed):
    """What an uninterrupted, in-process run of one trial ends with (Ray trials use 1 thread)."""
    spec = load_study(study_path, overrides)
    torch.set_num_threads(1)
    result = run_pipeline(build_run_spec(spec.base_run(), arm_assign, seed))
    return result.final


def test_study_runs_shares_prefixes_and_records_divergence(ray_local, tmp_path):
    overrides = ['variants={stable: {}, diverging: {pipeline.lr: [0.05, 1000.0, 0.0005]}}']
    sets = sum((["--set", o] for o in overrides), [])
    args = [str(TINY), "--results", str(tmp_path), "--no-report", "--fresh", *sets]
    out = tmp_path / "tiny"
    # A previous run's files in the folder dsdtune made for it, and a file of the user's
    from dsdtune.study.state import claim_folders
    claim_folders(out, out / "ray", "tiny")
    stale = ["report.md", "summary.csv", "comparisons.csv", "costs.csv", "fig_metric_by_arm.png",
             "masks/0123a_00007.npz", "ray/sweep/trial_0123a_00007/result.json"]
    for name in stale + ["notes.md"]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("previous run")
    assert main(args) == 0
    # --fresh --no-report: no report of the previous run beside the new results; the user's file stays
    assert not [name for name in stale if (out / name).exists()]
    assert not list(out.glob("fig_*")) and (out / "notes.md").read_text() == "previous run"
    trials = pd.read_csv(out / "trials.csv")
    sweep = trials[trials.stage == "sweep"]
    assert len(trials) == len(sweep) == 8  # 2 variants x 2 sparsities x 2 seeds, no separate prefix trials
    assert sorted(sweep.groupby(["arm", "seed"]).size().tolist()) == [1] * 8
    assert sweep.groupby("seed").prefix_id.nunique().eq(1).all() and sweep.prefix_id.nunique() == 2
    assert (sweep.epochs_trained[sweep.status == "ok"] == 7).all()  # the whole flow, shared D1 included
    diverging = sweep[sweep.variant == "diverging"]
    assert (diverging.status == "diverged").all() and (sweep[sweep.variant == "stable"].status == "ok").all()
    # the baseline of every arm of a seed is the same trained prefix
    assert sweep.groupby("seed").acc_after_D1.nunique().eq(1).all()
    history = pd.read_csv(out / "history.csv")
    ok_trial = sweep[sweep.status == "ok"].trial_id.iloc[0]
    assert history[history.trial_id == ok_trial].epoch.tolist() == list(range(1, 8))  # prefix epochs included
    meta = json.loads((out / "study.json").read_text())
    assert meta["factors"] == ["variant", "pipeline.sparsity"] and meta["shared_prefix"] is True
    # the S phase's own per-layer densities are recorded (exact costs): layer-wise pruning keeps half of each layer
    layers = pd.read_csv(out / "layers.csv")
    half = sweep[(sweep["pipeline.sparsity"] == 0.5) & (sweep.status == "ok")].trial_id
    s1 = layers[layers.trial_id.isin(half) & (layers.phase_label == "S1")]
    assert len(s1) == 2 * len(half) and (s1.density == 0.5).all()  # the two hidden layers; the first stays dense
    # every finished trial's final masks are saved and load back with the trial's measured sparsity
    from dsdtune.sparsity.mask_files import load_masks
    for _, row in sweep[sweep.status == "ok"].iterrows():
        masks = load_masks(out / "masks" / f"{row.trial_id}.npz")
        assert masks.sparsity() == pytest.approx(row.final_sparsity, abs=1e-12)
    assert not (out / "masks").exists() or len(list((out / "masks").iterdir())) == (sweep.status == "ok").sum()
    # A trial restored from the shared prefix ends exactly where an uninterrupted run ends.
    row = sweep[(sweep.variant == "stable") & (sweep["pipeline.sparsity"] == 0.5) & (sweep.seed == 1)].iloc[0]
    ref = reference_metrics(TINY, overrides, {"pipeline.sparsity": 0.5}, 1)
    assert row.final_test_acc == ref["test_acc"] and row.final_val_acc == ref["val_acc"]
    assert row.final_val_loss == pytest.approx(ref["val_loss"], rel=1e-6)


def _args(tmp_path, overrides):
    return [str(TINY), "--results", str(tmp_path / "results"), "--no-report"] + sum((["--set", o] for o in overrides), [])


def test_dashboard_needs_the_token_and_shows_the_gauges(tmp_path):
    # Long phases, so that the study is still running while Ray exports the gauges (every few seconds).
    proc, lines = start_study(_args(tmp_path, ["pipeline.epochs=[400, 400, 400]"]), tmp_path)
    try:
        text = lambda: "".join(lines)
        dash = wait_for(lambda: re.search(r"Ray dashboard at (http://[\d.:]+)", text()), 120, "the dashboard line")
        metrics_url = wait_for(lambda: re.search(r"Prometheus metrics \S+ at (http://\S+)", text()), 30, "metrics")
        assert dash.group(1).startswith("http://127.0.0.1:")
        token = (Path.home() / ".ray" / "auth_token").read_text().strip()
        assert token not in text()  # where the token is gets printed, never the token
        assert requests.get(dash.group(1) + "/api/version", timeout=10).status_code == 401
        reply = requests.get(dash.group(1) + "/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert reply.status_code == 200 and reply.json()["ray_version"]
        gauges = wait_for(lambda: (lambda t: t if "ray_dsdtune_epoch{" in t else "")(
            requests.get(metrics_url.group(1), timeout=10).text), 120, "the dsdtune gauges on the metrics endpoint")
        assert 'ray_dsdtune_val_metric{' in gauges and 'study="tiny"' in gauges and "ray_dsdtune_sparsity{" in gauges
        assert proc.poll() is None  # still running: the gauges were live, not left over
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_killed_driver_resumes_every_trial_once_with_same_results(tmp_path):
    overrides = ["pipeline.epochs=[4, 200, 200]", "checkpoint_every_s=0.2",
                 "search.space={pipeline.sparsity: {grid: [0.0, 0.5, 0.75]}}"]
    args = _args(tmp_path, overrides)
    proc, lines = start_study(args, tmp_path)
    sweep_dir = tmp_path / "results" / "tiny" / "ray" / "sweep"
    try:  # kill the driver (and the Ray instance it owns) as soon as the sweep has produced results
        wait_for(lambda: any(p.stat().st_size > 0 for p in sweep_dir.glob("*/result.json")), 300, "sweep results")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "results" / "tiny" / "trials.csv").exists(), "the study ended before the kill"
    again = subprocess.run([sys.executable, "-m", "dsdtune.study", *args], cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr  # never silently overwrite a run
    resumed = subprocess.run([sys.executable, "-m", "dsdtune.study", *args, "--resume"], cwd=tmp_path,
                             capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "token"})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    trials = pd.read_csv(tmp_path / "results" / "tiny" / "trials.csv")
    sweep = trials[trials.stage == "sweep"]
    assert len(sweep) == 6 and sweep.groupby(["arm", "seed"]).size().eq(1).all()
    assert (sweep.status == "ok").all()
    for _, row in sweep.iterrows():
        ref = reference_metrics(TINY, overrides, {"pipeline.sparsity": row["pipeline.sparsity"]}, row["seed"])
        assert (row.final_test_acc, row.final_val_acc) == (ref["test_acc"], ref["val_acc"]), row.arm


def nodes_reporting(sweep_dir) -> set:
    """The node ids in the trials' result files so far."""
    found = set()
    for path in sweep_dir.glob("*/result.json"):
        for line in path.read_text().splitlines():
            try:
                found.add(json.loads(line).get("node_id"))
            except ValueError:  # a line being written
                pass
    return found


@pytest.mark.slow
def test_cluster_spreads_trials_and_survives_a_lost_node(tmp_path):
    import ray
    from ray.cluster_utils import Cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    ray.init(address=cluster.address)
    try:
        overrides = ["resources.gpu=0.5", "pipeline.epochs=[6, 200, 200]", "checkpoint_every_s=1", "max_failures=3",
                     "search.space={pipeline.sparsity: {grid: [0.0, 0.25, 0.5, 0.75]}}"]
        args = [str(TINY), "--results", str(tmp_path), "--no-report", "--address", cluster.address]
        args += sum((["--set", o] for o in overrides), [])
        sweep_dir = tmp_path / "tiny" / "ray" / "sweep"
        doomed = workers[1].node_id

        def remove_a_worker():  # once trials run on both workers (and have checkpoints to restart from)
            wait_for(lambda: doomed in nodes_reporting(sweep_dir) and len(list(sweep_dir.glob("*/checkpoint_*"))) >= 2,
                     300, "trials on both workers")
            cluster.remove_node(workers[1])

        killer = threading.Thread(target=remove_a_worker, daemon=True)
        killer.start()
        assert main(args) == 0
        killer.join(timeout=1)
        trials = pd.read_csv(tmp_path / "tiny" / "trials.csv")
        sweep = trials[trials.stage == "sweep"]
        assert len(sweep) == 8 and (sweep.status == "ok").all()  # no trial lost, none errored
        nodes = [set(ids.split()) for ids in trials.node_ids]
        assert len(set().union(*nodes)) == 2  # trials ran on both workers
        assert trials.node_id.nunique() == 1  # and ended on the one left
        assert any(len(n) == 2 for n in nodes)  # a trial of the lost node restarted on the other one
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_ctrl_c_on_a_cluster_stops_the_trials_of_every_node_with_a_checkpoint(tmp_path):
    """Two worker nodes: the stop request reaches the trials of both (the fast test of the mechanism is
    test_a_stop_request_reaches_a_trial_through_ray_not_the_drivers_disk): every running trial
    checkpoints, so the driver ends well before its grace time, and a resume finishes every trial."""
    import ray
    from ray.cluster_utils import Cluster
    from dsdtune.study.run import StopOnSignal
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    ray.init(address=cluster.address)
    try:
        overrides = ["pipeline.epochs=[4, 300, 300]", "checkpoint_every_s=600",
                     "search.space={pipeline.sparsity: {grid: [0.0, 0.25, 0.5, 0.75]}}"]
        args = [str(TINY), "--results", str(tmp_path), "--no-report", "--address", cluster.address]
        args += sum((["--set", o] for o in overrides), [])
        sweep_dir = tmp_path / "tiny" / "ray" / "sweep"
        nodes = {w.node_id for w in workers}
        stopped_at = []

        def ctrl_c():  # once trials run on both worker nodes
            wait_for(lambda: nodes <= nodes_reporting(sweep_dir), 300, "trials on both workers")
            stopped_at.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=ctrl_c, daemon=True).start()
        assert main(args) == 130
        assert time.monotonic() - stopped_at[0] < StopOnSignal.grace_s  # no trial was waited for to the end
        trials = pd.read_csv(tmp_path / "tiny" / "trials.csv")
        started = trials[trials.epochs_trained > 0]
        # A trial of the first node to start can end before the other node's first report (604 short
        # epochs); every trial still running at the Ctrl-C was stopped with a checkpoint, on both nodes.
        finished = started[started.status == "ok"]
        assert (finished.epochs_trained == 604).all() and len(finished) < len(started)
        running = started[started.status != "ok"]
        assert set(running.node_id) == nodes and (running.status == "interrupted").all()
        checkpoints = {p.parent.name for p in sweep_dir.glob("*/checkpoint_*")}
        assert all(any(str(t) in c for c in checkpoints) for t in running.trial_id)
        assert main(args + ["--resume"]) == 0
        trials = pd.read_csv(tmp_path / "tiny" / "trials.csv")
        assert len(trials) == 8 and (trials.status == "ok").all() and (trials.epochs_trained == 604).all()
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_optuna_search_then_best_config_beside_control(ray_local, tmp_path):
    study = str(Path(__file__).parent / "studies" / "tiny_optuna.yaml")
    assert main([study, "--results", str(tmp_path)]) == 0
    out = tmp_path / "tiny_optuna"
    trials = pd.read_csv(out / "trials.csv")
    search, confirm = trials[trials.stage == "search"], trials[trials.stage == "confirm"]
    assert len(search) == 4 and set(search.status) <= {"ok", "stopped"}  # 4 suggestions x 1 seed
    assert sorted(confirm.seed.unique()) == [1000, 1001, 1002] and (confirm.status == "ok").all()
    best = confirm[confirm.arm == "best"]
    control = confirm[confirm.arm == "control"]
    assert len(best) == len(control) == 3
    assert best["pipeline.lr.1"].nunique() == 1 and (control["pipeline.lr.1"] == best["pipeline.lr.1"].iloc[0]).all()
    assert (best["pipeline.sparsity"] == 0.5).all() and (control["pipeline.sparsity"] == 0.0).all()
    # the best config is the best mean validation accuracy of the search, never chosen on test
    full = search[search.status == "ok"].groupby("pipeline.lr.1").final_val_acc.mean()
    chosen = min(full.index, key=lambda lr: abs(lr - best["pipeline.lr.1"].iloc[0]))
    assert full[chosen] == full.max()  # ties (40 validation samples) may pick any of the best
    comparisons = pd.read_csv(out / "comparisons.csv")
    assert (comparisons[comparisons.family == "vs_control"].test == "paired_t").all()
    # the search is an Optuna study on disk (what optuna-dashboard opens): one trial per suggestion
    import optuna
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "optuna.journal")))
    assert optuna.get_all_study_names(storage) == ["tiny_optuna"]
    stored = optuna.load_study(study_name="tiny_optuna", storage=storage).trials
    assert len(stored) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in stored)
    history = pd.read_csv(out / "history.csv")
    first_epochs = []
    for trial in stored:
        (row,) = search[search["pipeline.lr.1"] == trial.params["pipeline.lr.1"]].itertuples()
        assert trial.value == row.final_val_acc  # the metric it ended with (stopped ones: where ASHA stopped them)
        # the epochs the trial trained itself: the whole flow for the one that trained the shared prefix
        # (3 epochs) on the way, the epochs after it for the trials that waited for it
        first = min(trial.intermediate_values)
        epochs = history[(history.trial_id == row.trial_id) & (history.epoch >= first)]
        assert trial.intermediate_values == dict(zip(epochs.epoch, epochs.val_acc))
        first_epochs.append(first)
    assert sorted(first_epochs) == [1, 4, 4, 4]  # no barrier: the search's first trial trained the prefix
    # one row per trial and epoch, from 1 without gaps (prefix epochs included), in both stages
    assert set(history.trial_id) == set(trials.trial_id) and not history.duplicated(["trial_id", "epoch"]).any()
    for trial_id, rows in history.groupby("trial_id"):
        assert rows.epoch.tolist() == list(range(1, len(rows) + 1)), trial_id
    assert (history[history.trial_id.isin(confirm.trial_id)].groupby("trial_id").size() == 7).all()


def test_a_restored_search_continues_its_optuna_study_and_fails_the_orphans(tmp_path):
    """What Tune's restore does to the searcher (no Ray needed): it reloads the last snapshot."""
    import optuna
    from dsdtune.study.search import make_searcher, open_journal
    spec = load_study(Path(__file__).parent / "studies" / "tiny_optuna.yaml")
    journal = tmp_path / "optuna.journal"
    searcher = make_searcher(spec, open_journal(journal, fresh=True))
    first = searcher.suggest("a")
    assert set(first) == {"assign"} and 0.0001 <= first["assign"]["pipeline.lr.1"] <= 0.05
    searcher.suggest("b")
    searcher.on_trial_complete("a", {"val_acc": 0.5, "epoch": 4})
    searcher.save(tmp_path / "searcher.pkl")  # Tune's snapshot
    searcher.suggest("c")  # asked after the snapshot: Tune, restored, will never run it
    restored = make_searcher(spec, open_journal(journal, fresh=False))
    restored.restore(tmp_path / "searcher.pkl")
    restored.on_trial_result("b", {"val_acc": 0.25, "epoch": 4})
    restored.on_trial_complete("b", {"val_acc": 0.75, "epoch": 5})
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    assert optuna.get_all_study_names(storage) == ["tiny_optuna"]  # the same study, not a second one
    trials = optuna.load_study(study_name="tiny_optuna", storage=storage).trials
    states = optuna.trial.TrialState
    assert [(t.state, t.value, t.intermediate_values) for t in trials] == [
        (states.COMPLETE, 0.5, {4: 0.5}), (states.COMPLETE, 0.75, {4: 0.25, 5: 0.75}), (states.FAIL, None, {})]
    # a search stage that starts anew starts a new study
    assert optuna.get_all_study_names(open_journal(journal, fresh=True)) == []


def test_a_diverged_prefix_marks_its_trials_instead_of_seeding_them(ray_local, tmp_path):
    overrides = ["pipeline.lr=[1000.0, 0.005, 0.0005]", "pipeline.epochs=[3, 1, 1]"]
    args = [str(TINY), "--results", str(tmp_path), "--no-report"] + sum((["--set", o] for o in overrides), [])
    assert main(args) == 0
    trials = pd.read_csv(tmp_path / "tiny" / "trials.csv")
    assert len(trials) == 4
    reps = trials[trials.status == "diverged"]
    assert len(reps) == 2 and set(reps.seed) == {0, 1}  # each seed's representative trained the prefix
    others = trials[trials.status != "diverged"]
    assert (others.status == "prefix_diverged").all() and (others.epochs_trained == 0).all()
    assert others.final_test_acc.isna().all()


def test_a_failing_report_keeps_the_results_and_says_how_to_rerun(ray_local, tmp_path, capsys, monkeypatch):
    import dsdtune.report

    def broken(results_dir):
        raise RuntimeError("no figures today")

    monkeypatch.setattr(dsdtune.report, "write_report", broken)
    assert main([str(TINY), "--results", str(tmp_path), "--set", "pipeline.epochs=[1, 1, 1]"]) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the report failed" in err and "python -m dsdtune.report" in err and "complete" in err
    assert len(pd.read_csv(tmp_path / "tiny" / "trials.csv")) == 4


# ---- the gates that release trials as their shared prefixes are stored (no Ray needed) ----

def _sweep_trials():
    return [{"arm": "a", "seed": 0, "role": "rep", "prefix": "p0"}, {"arm": "b", "seed": 0, "role": "dependent", "prefix": "p0"},
            {"arm": "c", "seed": 0, "role": "dependent", "prefix": "p0"}, {"arm": "s", "seed": 0, "role": "solo", "prefix": ""}]


def test_a_failed_prefix_holds_its_trials_and_a_restored_gate_trains_it_again(tmp_path):
    from dsdtune.study.gates import GateGenerator, PrefixGate
    from ray.tune.search import Searcher
    gate = PrefixGate(_sweep_trials(), str(tmp_path / "prefixes"))
    assert [gate.suggest(t)["arm"] for t in ("t1", "t2")] == ["a", "s"]  # the representative and the solo trial
    assert gate.suggest("t3") is None  # the dependents wait for the prefix
    gate.on_trial_complete("t1", None, error=True)  # the representative failed before storing it
    assert gate.suggest("t4") == Searcher.FINISHED  # nothing left to start: the dependents are held ...
    assert [t["arm"] for t in gate.held()] == ["b", "c"]  # ... never started (listed as prefix_error)
    gate.save(tmp_path / "gate.pkl")
    # --resume: Tune restores the gate's state and resumes the errored representative
    restored = PrefixGate(_sweep_trials(), str(tmp_path / "prefixes"))
    restored.restore(tmp_path / "gate.pkl")
    assert restored.suggest("t5") is None and restored.held() == []  # waiting for the prefix, trained again
    restored.on_trial_result("t1", {"prefix_stored": "p0"})
    released = [restored.suggest(t) for t in ("t6", "t7")]
    assert [(c["arm"], c["role"]) for c in released] == [("b", "dependent"), ("c", "dependent")]
    assert all("prefix_status" not in c for c in released)  # they train from the prefix
    assert restored.suggest("t8") == Searcher.FINISHED
    # Tune stored FINISHED with the stage; a restored generator asks its gate again
    generator = GateGenerator(restored)
    generator.set_state({"counter": 2, "total_samples": 4, "finished": True, "experiment": None})
    assert not generator.is_finished()
    # a diverged prefix stays diverged after a restore (it would diverge again)
    gate = PrefixGate(_sweep_trials(), str(tmp_path / "prefixes2"))
    gate.suggest("t1")
    gate.on_trial_complete("t1", {"status": "diverged"})
    gate.save(tmp_path / "gate2.pkl")
    gate.restore(tmp_path / "gate2.pkl")
    assert gate.suggest("t2")["arm"] == "s" and gate.suggest("t3") == Searcher.FINISHED and len(gate.held()) == 2


def test_max_concurrent_counts_the_trials_a_restored_gate_resumes(tmp_path):
    from dsdtune.study.gates import PrefixGate
    trials = [{"arm": a, "seed": 0, "role": "solo", "prefix": ""} for a in "abcd"]
    gate = PrefixGate(trials, str(tmp_path), max_concurrent=2)
    assert [gate.suggest(t)["arm"] for t in ("t1", "t2")] == ["a", "b"] and gate.suggest("t3") is None
    gate.on_trial_complete("t1", {"status": "ok"})
    assert gate.suggest("t4")["arm"] == "c"
    gate.on_trial_complete("t4", None, error=True)
    gate.save(tmp_path / "gate.pkl")
    # resumed with max_concurrent 1: t2 (still running) and t4 (errored: Tune resumes it) count
    restored = PrefixGate(trials, str(tmp_path), max_concurrent=1)
    restored.restore(tmp_path / "gate.pkl")
    assert restored.max_concurrent == 1 and restored.suggest("t5") is None
    restored.on_trial_complete("t2", {"status": "ok"})
    assert restored.suggest("t6") is None  # t4 runs again
    restored.on_trial_complete("t4", {"status": "ok"})
    assert restored.suggest("t7")["arm"] == "d"


class _Recorder:
    """An inner searcher that suggests lr = 1, 2, 3, ... and records what it is told."""

    metric, mode = "val_acc", "max"

    def __init__(self):
        self.count, self.results, self.completed = 0, [], {}

    def suggest(self, trial_id):
        self.count += 1
        return {"assign": {"pipeline.lr.1": float(self.count)}}

    def on_trial_result(self, trial_id, result):
        self.results.append((trial_id, result["epoch"]))

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.completed[trial_id] = (result or {}).get("val_acc")


def test_a_search_trains_each_seeds_prefix_in_its_first_trial_and_holds_the_rest(tmp_path):
    from dsdtune.study.gates import SearchGate
    from ray.tune.search import Searcher
    inner = _Recorder()
    gate = SearchGate(inner, [0, 1], {0: "p0", 1: "p1"}, str(tmp_path), num_samples=3)
    first = [gate.suggest(t) for t in ("a", "b")]
    assert [(c["seed"], c["role"], c["assign"]["pipeline.lr.1"]) for c in first] == [(0, "rep", 1.0), (1, "rep", 1.0)]
    assert gate.suggest("c") is None and inner.count == 1  # both seeds wait: no suggestion asked for
    gate.on_trial_result("a", {"epoch": 3, "prefix_stored": "p0"})
    second = gate.suggest("c")
    assert (second["seed"], second["role"], second["assign"]["pipeline.lr.1"]) == (0, "dependent", 2.0)
    third = gate.suggest("d")  # a free slot takes a new suggestion, on a seed that can start
    assert (third["seed"], third["role"], third["assign"]["pipeline.lr.1"]) == (0, "dependent", 3.0)
    assert gate.suggest("e") is None and inner.count == 3  # 3 suggestions; their seed-1 trials wait
    assert inner.results == []  # several seeds: the inner searcher gets means, no intermediate values
    gate.on_trial_complete("b", {"val_acc": 0.25, "status": "diverged"})  # seed 1's prefix diverged
    gate.on_trial_complete("a", {"val_acc": 0.5, "status": "ok"})
    assert inner.completed == {"a": 0.375}  # the first suggestion: the mean over its two seeds
    gate.on_trial_complete("c", {"val_acc": 0.75, "status": "ok"})  # seed 1 dropped out: c alone
    assert inner.completed["c"] == 0.75
    assert "searcher" not in gate.get_state()  # what Tune stores (the inner searcher saves itself)
    gate.on_trial_complete("d", None, error=True)
    assert math.isnan(inner.completed["d"]) and gate.suggest("f") == Searcher.FINISHED  # NaN: Optuna fails it
    # one seed: the inner searcher sees the trial itself, every report (its intermediate values)
    inner = _Recorder()
    gate = SearchGate(inner, [7], {7: "p7"}, str(tmp_path), num_samples=2, max_concurrent=1)
    assert gate.suggest("x")["role"] == "rep" and gate.suggest("y") is None
    gate.on_trial_result("x", {"epoch": 1, "val_acc": 0.5})
    gate.on_trial_result("x", {"epoch": 3, "val_acc": 0.6, "prefix_stored": "p7"})
    assert gate.suggest("y") is None  # max_concurrent 1: x still runs
    gate.on_trial_complete("x", {"epoch": 7, "val_acc": 0.7})
    assert inner.results == [("x", 1), ("x", 3)] and inner.completed == {"x": 0.7}
    assert gate.suggest("y")["role"] == "dependent"


def test_a_search_trial_stopped_inside_the_prefix_leaves_it_to_the_next_trial(tmp_path):
    from dsdtune.study.gates import SearchGate
    gate = SearchGate(_Recorder(), [0], {0: "p0"}, str(tmp_path), num_samples=3)
    assert gate.suggest("a")["role"] == "rep"
    gate.on_trial_complete("a", {"epoch": 2, "val_acc": 0.1, "status": "running"})  # ASHA stopped it at epoch 2
    assert gate.suggest("b")["role"] == "rep"  # the next trial trains the prefix


class _Result:
    """What write_results reads of a Tune result: config, last metrics, the reports (each with its epochs)."""

    def __init__(self, trial_id, config, epochs, **metrics):
        self.config, self.error, self.checkpoint, self.path = config, None, None, f"/nowhere/{trial_id}"
        self.metrics = {**epochs[-1], "status": "ok", "epochs_trained": 7, "trial_id": trial_id, **metrics}
        self.metrics_dataframe = pd.DataFrame([{"history_json": json.dumps(epochs[:2])},
                                               {"history_json": json.dumps(epochs[2:])}])


def _epochs(first, phases=(0, 0, 0, 1, 1, 2, 2)):
    return [{"epoch": e, "phase": phases[e - 1], "val_acc": e / 10, "test_acc": e / 20} for e in range(first, 8)]


def test_confirm_history_holds_the_epochs_of_a_prefix_longer_than_the_searchs(tmp_path):
    """An Optuna search over the first phase's LR shares nothing; its confirm stage (best vs control, which
    differ in the S phase's sparsity) shares the D phase: the control starts from it, and its history
    holds the D epochs its representative trained (issue: they were cut at the search's prefix, 0 phases)."""
    from dsdtune.study.plan import confirm_arms, make_plan, plan_for_arms
    from dsdtune.study.results import write_results
    spec = load_study(Path(__file__).parent / "studies" / "tiny_optuna.yaml",
                      ["search.space={pipeline.lr.0: {loguniform: [0.01, 0.1]}}", "scheduler={kind: none}"])
    plan = make_plan(spec)
    assert plan.prefix_length == 0  # the search shares nothing
    best = {"pipeline.lr.0": 0.05}
    arms = confirm_arms(spec, best)
    confirm_spec = spec.model_copy(update={"seeds": [1000], "search": spec.search.model_copy(
        update={"algorithm": "grid", "space": {}}), "variants": None})
    confirm_plan = plan_for_arms(confirm_spec, arms)
    (pid,) = confirm_plan.prefixes
    assert confirm_plan.prefix_length == 1
    search = [_Result("s1", {"assign": best, "seed": 0, "role": "solo"}, _epochs(1), role="solo", prefix_id="",
                      prefix_phases=0)]
    confirm = [_Result("rep", {"arm": "best", "seed": 1000, "role": "rep", "prefix": pid}, _epochs(1), role="rep",
                       prefix_id=pid, prefix_phases=1),
               _Result("dep", {"arm": "control", "seed": 1000, "role": "dependent", "prefix": pid}, _epochs(4),
                       role="dependent", prefix_id=pid, prefix_phases=1)]
    write_results(tmp_path, spec, plan, {"search": search, "confirm": confirm}, arms,
                  {"search": [0], "confirm": [1000]})
    history = pd.read_csv(tmp_path / "history.csv")
    assert not history.duplicated(["trial_id", "epoch"]).any()
    for trial_id in ("s1", "rep", "dep"):
        rows = history[history.trial_id == trial_id]
        assert rows.epoch.tolist() == list(range(1, 8)), trial_id
    dep = history[history.trial_id == "dep"].set_index("epoch")
    assert dep.loc[[1, 2, 3], "val_acc"].tolist() == [0.1, 0.2, 0.3]  # the representative's D epochs


def test_a_stop_request_reaches_a_trial_through_ray_not_the_drivers_disk(ray_local, tmp_path, monkeypatch):
    """Ctrl-C's request is a key in Ray's GCS; a trial on any node asks it at epoch ends (at most once a
    second). No file is involved: another node sees what this one sees."""
    import ray
    from dsdtune.study.run import SignalState
    from dsdtune.trainable import STOP_POLL_S, StopRequests

    @ray.remote(num_cpus=0)
    def trial_side(name: str, seconds: float):
        """What a trial's reporter sees, asked at every 'epoch end' (every 50 ms), from a worker process."""
        import time
        stop, seen, start = StopRequests(name), [], time.monotonic()
        while time.monotonic() - start < seconds:
            seen.append((round(time.monotonic() - start, 2), stop.requested()))
            if seen[-1][1]:
                break
            time.sleep(0.05)
        return seen

    monkeypatch.chdir(tmp_path)
    signals = SignalState("tiny", "continue with: ...")
    try:
        watching = trial_side.remote(signals.flag_name, 30.0)
        assert not ray.get(trial_side.remote(signals.flag_name, 0.3))[-1][1]  # no stop asked for yet
        signals.signum, signals.requested_at = signal.SIGINT, time.monotonic()
        asked = time.monotonic()
        signals.tell_trials()  # what StopOnSignal does from Tune's loop
        seen = ray.get(watching)
        assert seen[-1][1] and not any(s for _, s in seen[:-1])
        assert time.monotonic() - asked < STOP_POLL_S + 5  # within a poll interval (and the task's return)
        assert list(tmp_path.iterdir()) == []  # nothing written on the driver's disk
        assert ray.get(trial_side.remote(signals.flag_name, 0.3))[-1][1]  # a trial starting now sees it at once
    finally:
        signals.close()
    assert not ray.get(trial_side.remote(signals.flag_name, 0.3))[-1][1]  # closed: the key is gone
    assert not StopRequests("stop-no-such-driver").requested()  # a flag that is gone asks nothing


def test_tune_stores_and_restores_a_search_gate_and_its_optuna_study(tmp_path):
    """Through Tune's own save_to_dir / restore_from_dir (what --resume runs): the gate's state comes back
    into a gate built with this run's max_concurrent, a failed prefix is trained again, and the restored
    generator asks the gate again although it had said FINISHED."""
    import optuna
    from ray.tune.search import Searcher
    from dsdtune.study.gates import GateGenerator, SearchGate
    from dsdtune.study.search import make_searcher, open_journal
    spec = load_study(Path(__file__).parent / "studies" / "tiny_optuna.yaml")
    journal, root = tmp_path / "optuna.journal", str(tmp_path / "prefixes")
    gate = SearchGate(make_searcher(spec, open_journal(journal, fresh=True)), [0], {0: "p0"}, root, num_samples=4)
    generator = GateGenerator(gate)
    generator._total_samples, generator._counter = 4, 1  # what Tune's experiment sets and counts
    assert gate.suggest("a")["role"] == "rep"
    gate.on_trial_complete("a", None, error=True)  # the prefix failed: its only seed drops out
    assert gate.suggest("b") == Searcher.FINISHED
    generator._finished = True  # what the generator records on FINISHED
    generator.save_to_dir(str(tmp_path), "first")
    fresh = SearchGate(make_searcher(spec, open_journal(journal, fresh=False)), [0], {0: "p0"}, root, num_samples=4,
                       max_concurrent=1)
    restored = GateGenerator(fresh)
    restored.restore_from_dir(str(tmp_path))
    assert not restored.is_finished() and fresh.max_concurrent == 1
    assert fresh.suggest("c") is None  # max_concurrent 1: trial a runs again (Tune resumes it)
    fresh.on_trial_result("a", {"epoch": 3, "val_acc": 0.5, "prefix_stored": "p0"})
    fresh.on_trial_complete("a", {"epoch": 7, "val_acc": 0.75})
    second = fresh.suggest("c")
    assert second["role"] == "dependent" and second["seed"] == 0
    study = optuna.load_study(study_name="tiny_optuna", storage=open_journal(journal, fresh=False))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING]


def test_the_best_config_does_not_depend_on_the_order_tune_returns_results_in():
    """A resumed Optuna study gets its search results back in another order; ties (40 validation
    samples make many) must still pick the same config, or the confirm stage would continue trials of
    one config with another."""
    import itertools
    from types import SimpleNamespace
    from dsdtune.study.run import best_assignment
    spec = load_study(Path(__file__).parent / "studies" / "tiny_optuna.yaml")
    results = [SimpleNamespace(error=None, config={"assign": {"pipeline.lr.1": lr}},
                               metrics={"trial_id": f"t_{i:05d}", "val_acc": acc, "status": "ok"})
               for i, (lr, acc) in enumerate([(0.003, 0.9), (0.002, 0.9), (0.01, 0.875), (0.004, 0.9)])]
    chosen = {json.dumps(best_assignment(list(order), spec)) for order in itertools.permutations(results)}
    assert chosen == {json.dumps({"pipeline.lr.1": 0.003})}  # the first suggested of the three best


def test_a_resumed_confirm_stage_keeps_the_config_it_started_with(tmp_path, capsys):
    from dsdtune.study.run import confirmed_config
    storage = str(tmp_path / "ray")
    assert confirmed_config(storage, {"pipeline.lr.1": 0.003}, restoring=False) == {"pipeline.lr.1": 0.003}
    # resumed: the search (whose errored trials ran again) now ranks another config first
    assert confirmed_config(storage, {"pipeline.lr.1": 0.002}, restoring=True) == {"pipeline.lr.1": 0.003}
    assert "continues with the config it started with" in capsys.readouterr().out
    # a confirm stage that starts anew takes the search's best
    assert confirmed_config(storage, {"pipeline.lr.1": 0.002}, restoring=False) == {"pipeline.lr.1": 0.002}
