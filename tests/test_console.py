"""The researcher's console: progress display, trial names, tracking, and a real 12-trial study."""
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from dsdtune.config import SpecError
from dsdtune.results import load_results
from dsdtune.study.progress import StageProgress, arm_label, trial_label
from dsdtune.study.tracking import check_tracking, epoch_metrics, mlflow_tracking_uri

TINY12 = Path(__file__).parent / "studies" / "tiny12.yaml"
TINY = Path(__file__).parent / "studies" / "tiny.yaml"


def _trial(tid, config, status="PENDING"):
    return SimpleNamespace(trial_id=tid, config=config, status=status)


def test_trial_labels_name_study_arm_and_seed():
    assert trial_label("sweep_s", "sweep", {"arm": "pipeline.sparsity=0.5", "seed": 3}) == \
        "sweep_s/pipeline.sparsity=0.5/seed=3"
    searched = {"assign": {"pipeline.lr.1": 0.0123456, "pipeline.sparsity": 0.5}, "__trial_index__": 1}
    assert trial_label("s", "search", searched, seeds=[10, 11]) == \
        "s/search/pipeline.lr.1=0.01235, pipeline.sparsity=0.5/seed=11"
    assert arm_label("confirm", {"arm": "best", "seed": 1000}) == "confirm/best"


def test_stage_progress_counts_epochs_eta_and_best_per_arm_in_plain_lines():
    out = io.StringIO()
    spans = {"a": (2, 6), "b": (2, 6)}  # each trial trains epochs 3..6 of its flow (2 came from a prefix)
    progress = StageProgress("sweep", total_trials=3, epochs_of=lambda c: spans[c["arm"]], metric="val_loss",
                             mode="min", arm_of=lambda c: c["arm"], out=out, live=False, interval_s=0.0)
    progress.setup()
    t1, t2, t3 = _trial("1", {"arm": "a"}, "RUNNING"), _trial("2", {"arm": "b"}, "RUNNING"), _trial("3", {"arm": "a"})
    progress.on_step_end(0, [t1, t2, t3])
    for epoch, loss in [(3, 0.9), (4, 0.5), (5, 0.7)]:
        progress.on_trial_result(0, [t1, t2, t3], t1, {"epoch": epoch, "val_loss": loss})
    progress.on_trial_result(0, [t1, t2, t3], t2, {"epoch": 3, "val_loss": float("inf"), "status": "diverged"})
    t2.status = "TERMINATED"
    progress.on_trial_complete(0, [t1, t2, t3], t2)
    counts = progress.counts()
    assert (counts["done"], counts["running"], counts["pending"], counts["failed"], counts["diverged"]) == (1, 1, 1, 0, 1)
    # done: 3 of trial 1 + 1 of trial 2; left: 1 of trial 1 + 4 of trial 3 (trial 2 ended early)
    assert counts["epochs_done"] == 4 and counts["epochs_total"] == 9
    assert counts["eta_s"] == pytest.approx(counts["elapsed_s"] * 5 / 4, rel=0.05)
    assert [(arm, best) for arm, _, _, best in progress.arms()] == [("a", 0.5), ("b", None)]  # inf is no best
    t3.status = "ERROR"
    progress.on_trial_error(0, [t1, t2, t3], t3)
    t1.status = "TERMINATED"
    progress.on_experiment_end([t1, t2, t3])
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("dsdtune: sweep: 0/3 trials done, 2 running, 1 pending; epochs 0/12")
    assert "1/3 trials done (1 diverged)" in lines[-3] or "2/3 trials done (1 diverged)" in lines[-3]
    assert "1 failed" in lines[-3] and "best val_loss 0.5000 (a)" in lines[-3] and "ETA" not in lines[-3]
    assert lines[-2:] == ["  a: 1/2 done, best val_loss 0.5000", "  b: 1/1 done, best val_loss -"]


def test_stage_progress_renders_live_with_rich():
    from rich.console import Console
    progress = StageProgress("sweep", total_trials=2, epochs_of=lambda c: (0, 4), metric="val_acc", mode="max",
                             arm_of=lambda c: c["arm"], out=io.StringIO(), live=False)
    trial = _trial("1", {"arm": "x=1"}, "RUNNING")
    progress.on_step_end(0, [trial])
    progress.on_trial_result(0, [trial], trial, {"epoch": 2, "val_acc": 0.75})
    console = Console(file=io.StringIO(), width=100)
    console.print(progress)
    text = console.file.getvalue()
    assert "epochs 2/8" in text and "1 running, 1 pending, 0 failed" in text
    assert re.search(r"x=1\s+0/1\s+0\.7500", text)


def test_unknown_or_missing_tracker_is_one_line_saying_what_to_install(monkeypatch):
    with pytest.raises(SpecError, match="allowed: mlflow, tensorboard, wandb"):
        check_tracking(["neptune"])
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(SpecError, match=r"pip install 'dsdtune\[tracking\]'"):
        check_tracking(["tensorboard", "mlflow"])


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_missing_tracker_exits_2_before_ray_also_in_a_dry_run(tmp_path, capsys, monkeypatch, dry_run):
    from dsdtune.study import main
    assert main([str(TINY12), "--results", str(tmp_path), "--log", "nonsense", *dry_run]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--log nonsense" in err
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main([str(TINY12), "--results", str(tmp_path), "--log", "wandb", *dry_run]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'dsdtune[tracking]'" in err and "wandb" in err
    assert not (tmp_path / "tiny12").exists() or not any((tmp_path / "tiny12").iterdir())


def test_wandb_online_without_a_login_is_refused_before_ray(tmp_path, capsys, monkeypatch):
    import dsdtune.study.tracking as tracking
    from dsdtune.study import main
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(tracking, "_wandb_logged_in", lambda: False)
    assert main([str(TINY12), "--results", str(tmp_path), "--log", "wandb", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wandb login" in err and "WANDB_MODE=offline" in err
    monkeypatch.setenv("WANDB_MODE", "offline")  # offline needs no login
    assert main([str(TINY12), "--results", str(tmp_path), "--log", "wandb", "--dry-run"]) == 0


def test_the_console_and_the_trackers_import_no_ray():
    code = ("import sys, dsdtune.study.cli, dsdtune.study.progress, dsdtune.study.tracking; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.stdout.strip() == "[]"


def test_hparams_list_every_factor_of_the_study_and_every_seed():
    from dsdtune.config import load_study
    from dsdtune.study.tracking import hparam_domains
    sweep = load_study(TINY, ['variants={a: {}, b: {pipeline.lr: [0.1, 0.01, 0.001]}}'])
    factors = {"variant=a, pipeline.sparsity=0.0": {"variant": "a", "pipeline.sparsity": 0.0},
               "variant=b, pipeline.sparsity=0.5": {"variant": "b", "pipeline.sparsity": 0.5}}
    assert hparam_domains(sweep, factors) == {"variant": ["a", "b"], "pipeline.sparsity": [0.0, 0.5], "seed": [0, 1]}
    # an Optuna study: a sampled axis has no value list; the confirm stage's control and seeds are listed
    search = load_study(Path(__file__).parent / "studies" / "tiny_optuna.yaml")
    assert hparam_domains(search, {}) == {"pipeline.lr.1": None, "pipeline.sparsity": [0.0],
                                          "seed": [0, 1000, 1001, 1002]}


def test_run_folders_are_the_trial_names_one_per_trial(tmp_path):
    from dsdtune.study.tracking import run_dir
    first = run_dir(tmp_path, "s/search/pipeline.lr.1=0.01, x=a/b/seed=3", "t1")
    assert first == tmp_path / "s" / "search" / "pipeline.lr.1=0.01, x=a" / "b" / "seed=3"
    assert run_dir(tmp_path, "s/search/pipeline.lr.1=0.01, x=a/b/seed=3", "t1") == first  # a resumed trial
    twin = run_dir(tmp_path, "s/search/pipeline.lr.1=0.01, x=a/b/seed=3", "t2")  # the same config suggested twice
    assert twin == first.with_name("seed=3 (t2)")
    assert run_dir(tmp_path, "s/x=../seed=0", "t3") == tmp_path / "s" / "x=.." / "seed=0"
    assert run_dir(tmp_path, "s/../seed=0", "t4") == tmp_path / "s" / "_" / "seed=0"  # never outside the root


def test_mlflow_store_is_the_users_uri_else_sqlite_in_the_results_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_tracking_uri(tmp_path / "s") == f"sqlite:///{(tmp_path / 's').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert mlflow_tracking_uri(tmp_path / "s") == "http://mlflow.example:5000"


def test_epoch_metrics_keep_numbers_drop_bookkeeping():
    result = {"epoch": 3, "val_acc": 0.5, "lr": 0.1, "time_total_s": 9.0, "training_iteration": 1,
              "layer_densities_json": "{}", "acc_after_D1": 0.4, "val_loss": float("nan"), "status": "ok"}
    assert epoch_metrics(result, "val_acc") == {"val_acc": 0.5, "lr": 0.1, "acc_after_D1": 0.4}


# ---- one real study, run as a user runs it (a subprocess, output piped), shared by the tests below ----

@pytest.fixture(scope="module")
def tiny12_run(tmp_path_factory):
    """`python -m dsdtune.study tiny12 --log mlflow --log tensorboard`, with the state API polled meanwhile."""
    root = tmp_path_factory.mktemp("tiny12")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "dsdtune.study", str(TINY12), "--results", str(root),
                             "--no-report", "--num-cpus", "2", "--log", "mlflow", "--log", "tensorboard"],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, actors = [], {}
    threading.Thread(target=lambda: [lines.append(line) for line in proc.stdout], daemon=True).start()

    def poll_actors():
        from ray.util.state import list_actors
        while proc.poll() is None:
            match = re.search(r"Ray dashboard at (http://[\d.:]+)", "".join(lines))
            if match:
                try:
                    for actor in list_actors(address=match.group(1), detail=True, raise_on_missing_output=False):
                        actors[actor.actor_id] = (actor.class_name, actor.repr_name)
                except Exception:  # the dashboard is starting or the study is ending
                    pass
            time.sleep(1.0)

    poller = threading.Thread(target=poll_actors, daemon=True)
    poller.start()
    code = proc.wait(timeout=900)
    poller.join(timeout=30)
    time.sleep(0.5)
    return SimpleNamespace(code=code, output="".join(lines), out=root / "tiny12", actors=actors)


def test_a_12_trial_study_prints_at_most_100_lines_and_no_ray_warning(tiny12_run):
    assert tiny12_run.code == 0, tiny12_run.output[-3000:]
    lines = tiny12_run.output.splitlines()
    assert len(lines) <= 100, tiny12_run.output
    assert "snapshotting" not in tiny12_run.output and "WARNING" not in tiny12_run.output
    assert "Trial status" not in tiny12_run.output  # Ray's tables are off
    log = tiny12_run.out / "ray.log"
    assert f"Ray's own output goes to {log}" in tiny12_run.output and log.stat().st_size > 0
    assert "snapshotting may become a bottleneck" not in log.read_text()  # fixed at its cause
    # 3 trials train their seed's shared prefix on the way (5 epochs), 9 start from it (3 epochs)
    assert re.search(r"dsdtune: sweep: 12/12 trials done, 0 running, 0 pending; epochs 42/42", tiny12_run.output)
    assert "tiny12 finished in" in lines[-1] and "12 ok" in lines[-1]


def test_every_trial_is_named_in_the_dashboard(tiny12_run):
    reprs = {r for _, r in tiny12_run.actors.values() if r}
    assert reprs, "no actor seen through the state API"
    pattern = re.compile(r"^tiny12/pipeline\.sparsity=0\.\d+/seed=[012]$")
    assert all(pattern.match(r) for r in reprs), reprs
    assert {c for c, r in tiny12_run.actors.values() if r in reprs} == {"run_trial"}
    # Actors are reused across trials: each trial's start is a line of its actor's log (here: ray.log).
    started = re.findall(r"dsdtune: trial (tiny12/\S+/seed=\d) ", (tiny12_run.out / "ray.log").read_text())
    assert len(set(started)) == 12


@pytest.fixture
def mlflow_server(tiny12_run):
    """`mlflow server` on the study's store, on a free loopback port: the UI's backend, as a user starts it."""
    import shutil
    import socket
    import requests
    from drivers import wait_for
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    proc = subprocess.Popen([mlflow, "server", "--backend-store-uri", f"sqlite:///{tiny12_run.out / 'mlflow.db'}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited: {proc.stderr.read()[-2000:]}")
        try:
            return requests.get(f"{url}/health", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False
    try:
        wait_for(up, 120, "mlflow server")
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_mlflow_ui_server_shows_one_run_per_trial_with_per_epoch_metrics(tiny12_run, mlflow_server):
    import requests
    api = f"{mlflow_server}/api/2.0/mlflow"
    experiment = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "tiny12"}, timeout=30)
    assert experiment.status_code == 200, experiment.text  # the server reads the store the study wrote
    experiment_id = experiment.json()["experiment"]["experiment_id"]
    runs = requests.post(f"{api}/runs/search", json={"experiment_ids": [experiment_id], "max_results": 100},
                         timeout=30).json()["runs"]
    assert len(runs) == 12 and len({r["info"]["run_name"] for r in runs}) == 12
    trials = pd.read_csv(tiny12_run.out / "trials.csv")
    firsts = []
    for run in runs:
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["stage"] == "sweep" and params["study"] == "tiny12"
        assert run["info"]["run_name"] == f"tiny12/{params['arm']}/seed={params['seed']}"
        history = requests.get(f"{api}/metrics/get-history", timeout=30,
                               params={"run_id": run["info"]["run_id"], "metric_key": "val_acc"}).json()["metrics"]
        steps = [m["step"] for m in sorted(history, key=lambda m: m["step"])]
        # every epoch: from 1 for the trial that trained its seed's shared prefix (2 epochs), else after it
        assert steps in ([1, 2, 3, 4, 5], [3, 4, 5]), steps
        firsts.append(steps[0])
        row = trials[(trials.arm == params["arm"]) & (trials.seed == int(params["seed"]))]
        assert max(history, key=lambda m: m["step"])["value"] == pytest.approx(row.final_val_acc.iloc[0])
        assert float(params["pipeline.sparsity"]) == row["pipeline.sparsity"].iloc[0]
        assert run["info"]["status"] == "FINISHED"
    assert firsts.count(1) == 3  # one per seed


def test_tensorboard_runs_are_named_like_the_trials_with_their_hparams(tiny12_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata
    root = tiny12_run.out / "tensorboard"
    runs = sorted(str(p.parent.relative_to(root)) for p in root.glob("**/events.out.tfevents.*"))
    trials = pd.read_csv(tiny12_run.out / "trials.csv")
    assert runs == sorted(f"tiny12/{arm}/seed={seed}" for arm, seed in zip(trials.arm, trials.seed))
    for run in runs:
        events = EventAccumulator(str(root / run))
        events.Reload()
        val_acc = events.Scalars("val_acc")
        assert [e.step for e in val_acc] in ([1, 2, 3, 4, 5], [3, 4, 5])  # as for MLflow
        arm, seed = run.split("/")[1], int(run.split("=")[-1])
        row = trials[(trials.arm == arm) & (trials.seed == seed)].iloc[0]
        assert val_acc[-1].value == pytest.approx(row.final_val_acc, abs=1e-6)
        assert {"train_loss", "val_loss", "test_acc", "sparsity", "lr"} <= set(events.Tags()["scalars"])
        hparams = events.PluginTagToContent(metadata.PLUGIN_NAME)
        experiment = metadata.parse_experiment_plugin_data(hparams[metadata.EXPERIMENT_TAG])
        domains = {h.name: [v.number_value if v.HasField("number_value") else v.string_value
                            for v in h.domain_discrete.values] for h in experiment.hparam_infos}
        assert domains == {"pipeline.sparsity": [0.0, 0.25, 0.5, 0.75], "seed": ["0", "1", "2"]}
        # the validation and test metrics first: the HParams table shows the first five
        assert [m.name.tag for m in experiment.metric_infos][:4] == ["val_acc", "test_acc", "val_loss", "test_loss"]
        start = metadata.parse_session_start_info_plugin_data(hparams[metadata.SESSION_START_INFO_TAG])
        assert {k: v.number_value if v.HasField("number_value") else v.string_value
                for k, v in start.hparams.items()} == {"pipeline.sparsity": row["pipeline.sparsity"], "seed": str(seed)}
        end = metadata.parse_session_end_info_plugin_data(hparams[metadata.SESSION_END_INFO_TAG])
        assert end.status == 1  # STATUS_SUCCESS


def _wandb_records(path: Path):
    """The records of a W&B run's transaction log (`run-<id>.wandb`, what `wandb sync` uploads): a
    7-byte header, then LevelDB's log format (32 KiB blocks of checksum, length, type, payload)."""
    import struct
    from wandb.proto import wandb_internal_pb2
    data, block, at, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while at + 7 <= len(data):
        if block - at % block < 7:  # a block's tail too short for a header is padding
            at += block - at % block
            continue
        length, kind = struct.unpack("<HB", data[at + 4:at + 7])
        pending += data[at + 7:at + 7 + length]
        at += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


def test_wandb_logs_one_offline_run_per_trial(ray_local, tmp_path, monkeypatch):
    # Ray's workers started without it: the logging actors must get the driver's W&B settings
    monkeypatch.setenv("WANDB_MODE", "offline")
    from dsdtune.study import main
    args = [str(TINY), "--results", str(tmp_path), "--no-report", "--log", "wandb",
            "--set", "seeds=1", "--set", "pipeline.epochs=[1, 1, 1]"]
    assert main(args) == 0
    out = tmp_path / "tiny"
    results = load_results(out)  # the one reader: trial ids stay text
    trials, history = results.trials.set_index("trial_id"), results.history
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == len(trials) == 2
    firsts = []
    for run in runs:
        records = list(_wandb_records(next(run.glob("run-*.wandb"))))
        (info,) = [r.run for r in records if r.HasField("run")]
        row = trials.loc[info.run_id]
        assert info.display_name == f"tiny/{row.arm}/seed={row.seed}" and info.run_group == f"tiny/{row.arm}"
        assert (info.project, info.job_type) == ("tiny", "sweep")
        config = {item.key: json.loads(item.value_json) for item in info.config.update}
        assert config["pipeline.sparsity"] == row["pipeline.sparsity"] and config["seed"] == row.seed
        logged = {}
        for record in records:
            if record.HasField("history"):
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                logged[record.history.step.num] = items["val_acc"]
        expected = history[history.trial_id == info.run_id].set_index("epoch").val_acc
        assert list(logged) in ([1, 2, 3], [2, 3])  # W&B's step is the epoch; the prefix's are its trainer's
        assert list(logged.values()) == pytest.approx(list(expected[list(logged)]))
        firsts.append(min(logged))
    assert sorted(firsts) == [1, 2]


def test_load_results_round_trips_the_studys_files(tiny12_run):
    import dsdtune
    results = dsdtune.load_results(tiny12_run.out)
    pd.testing.assert_frame_equal(results.trials, pd.read_csv(tiny12_run.out / "trials.csv"))
    history = pd.read_csv(tiny12_run.out / "history.csv")
    assert len(results.history) == len(history)
    pd.testing.assert_frame_equal(results.history[history.columns], history)
    sweep = results.history[results.history.stage == "sweep"]
    assert sweep.groupby(["arm", "seed"]).epoch.apply(list).map(lambda e: e == [1, 2, 3, 4, 5]).all()
    assert set(sweep["pipeline.sparsity"]) == {0.0, 0.25, 0.5, 0.75}
    assert results.meta == json.loads((tiny12_run.out / "study.json").read_text())
    assert results.summary.empty and results.comparisons.empty  # --no-report: no report tables
    assert results.factors == ["pipeline.sparsity"] and results.metric == "val_acc"


def test_study_json_holds_the_provenance(tiny12_run):
    from dsdtune.config import load_study
    from dsdtune.study.provenance import spec_hash
    meta = json.loads((tiny12_run.out / "study.json").read_text())
    assert meta["spec_hash"] == spec_hash(load_study(TINY12)) and meta["spec"]["name"] == "tiny12"
    assert {"python", "dsdtune", "torch", "ray", "optuna"} <= set(meta["versions"])
    assert meta["machine"]["cpu"] and "gpus" in meta["machine"]
    assert meta["study_file"] == str(TINY12.resolve()) and "git" in meta
    assert meta["started"] < meta["ended"]
