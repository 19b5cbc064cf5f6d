"""A study's life on real Ray: the lock, loopback-only ports, Ctrl-C, and a resume that is the same study."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import dsdtune
from drivers import start_study, wait_for
from dsdtune.config import SpecError, build_run_spec, first_difference, load_study
from dsdtune.pipeline import run_pipeline
from dsdtune.study.state import StudyLock

TINY = Path(__file__).parent / "studies" / "tiny.yaml"
# One trial at a time: the sweep must outlast a second driver's start and the socket scan (a trial
# of 603 epochs takes ~2.5 s here); it changes no trial's numbers.
OVERRIDES = ["pipeline.epochs=[3, 300, 300]", "checkpoint_every_s=30", "max_concurrent=1",
             "search.space={pipeline.sparsity: {grid: [0.0, 0.5, 0.75]}}"]


def _descendants(root: int) -> set[int]:
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, grew = {root}, True
    while grew:
        new = {pid for pid, pp in parent.items() if pp in found} - found
        found |= new
        grew = bool(new)
    return found


def _listening_addresses(pids: set[int]) -> list[str]:
    """Local addresses of the listening TCP sockets the processes `pids` hold (from /proc, no tools)."""
    inodes = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            pass
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(fields[1].split(":")[0])
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # /proc writes 32-bit words
            found.append(socket.inet_ntop(family, words))
    return found


def _is_loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("::1", "::ffff:127.0.0.1") or address.startswith("::ffff:127.")


def reference(overrides, sparsity, seed):
    spec = load_study(TINY, overrides)
    torch.set_num_threads(1)
    return run_pipeline(build_run_spec(spec.base_run(), {"pipeline.sparsity": sparsity}, seed)).final


def test_lock_loopback_ctrl_c_and_resume_of_the_same_study(tmp_path):
    results = tmp_path / "results"
    args = [str(TINY), "--results", str(results), "--no-report"] + sum((["--set", o] for o in OVERRIDES), [])
    proc, lines = start_study(args, tmp_path)
    out = results / "tiny"
    try:
        # Running: the sweep has produced results (some trials are in their S/D phases).
        wait_for(lambda: any(p.stat().st_size > 0 for p in (out / "ray" / "sweep").glob("*/result.json")), 300,
                  "sweep results")
        # A second driver on the same storage is refused, before Ray.
        second = subprocess.run([sys.executable, "-m", "dsdtune.study", *args, "--resume"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "another driver" in second.stderr and str(proc.pid) in second.stderr
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
        # Every listening socket of the study's Ray processes is on the loopback interface.
        addresses = _listening_addresses(_descendants(proc.pid))
        assert len(addresses) >= 4, addresses  # GCS, raylet, workers, dashboard (agent) at least
        assert all(_is_loopback(a) for a in addresses), addresses
        # Ctrl-C: running trials store their state, partial results are written, exit 130.
        assert proc.poll() is None, "the study ended before the Ctrl-C"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=180) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    time.sleep(0.5)
    text = "".join(lines)
    assert "Traceback" not in text, text[-3000:]
    assert "continue with: python -m dsdtune.study" in text and "--resume" in text
    partial = pd.read_csv(out / "trials.csv")
    assert len(partial) == 6 and "interrupted" in set(partial.status) and "stopped" not in set(partial.status)
    # The partial results load: every trial has its own id, a never-started one `not-started-<n>`.
    loaded = dsdtune.load_results(out)
    assert loaded.trials.trial_id.is_unique and partial.trial_id.notna().all() and loaded.meta["interrupted"]
    unstarted = loaded.trials[loaded.trials.trial_id.str.startswith("not-started-")]
    assert (unstarted.status == "interrupted").all() and (unstarted.epochs_trained == 0).all()
    assert set(loaded.history.trial_id) <= set(loaded.trials.trial_id) and loaded.history.status.notna().all()
    assert not (out / ".dsdtune" / "lock").exists()

    # A resume with a changed spec is refused, naming the field.
    changed = subprocess.run([sys.executable, "-m", "dsdtune.study", *args, "--resume", "--set", "pipeline.lr=[0.05, 0.01, null]"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2 and changed.stderr.startswith("dsdtune: --resume: pipeline.lr differs")
    assert changed.stderr.count("\n") == 1

    resumed = subprocess.run([sys.executable, "-m", "dsdtune.study", *args, "--resume"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 6 and trials.groupby(["arm", "seed"]).size().eq(1).all() and (trials.status == "ok").all()
    assert (trials.epochs_trained == 603).all()
    for _, row in trials.iterrows():
        ref = reference(OVERRIDES, row["pipeline.sparsity"], row["seed"])
        assert (row.final_test_acc, row.final_val_acc) == (ref["test_acc"], ref["val_acc"]), row.arm
    history = pd.read_csv(out / "history.csv")
    assert not history.duplicated(["trial_id", "epoch"]).any()
    for _, h in history.groupby("trial_id"):
        assert h.epoch.tolist() == list(range(1, 604))
    assert json.loads((out / "study.json").read_text())["interrupted"] is False


def test_stale_lock_is_taken_over_and_a_live_one_refuses(tmp_path, capsys):
    lock_file = tmp_path / ".dsdtune" / "lock"
    lock_file.parent.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_file.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": "then"}))
    lock = StudyLock(tmp_path)
    lock.acquire()
    assert "no longer runs" in capsys.readouterr().err
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    with pytest.raises(SpecError, match="another driver"):
        StudyLock(tmp_path).acquire()
    lock.release()
    assert not lock_file.exists()


def test_first_difference_names_the_first_changed_field():
    old = {"name": "x", "pipeline": {"flow": "DSD", "lr": [0.1, None]}, "seeds": 3}
    assert first_difference(old, old) is None
    assert first_difference(old, {**old, "pipeline": {"flow": "DSD", "lr": [0.2, None]}}) == "pipeline.lr"
    assert first_difference(old, {**old, "seeds": 4}) == "seeds"


# ---- --resume: only the same study, with this run's settings, and a failed prefix trained again ----

def _user_project(folder: Path, name: str, model_source: str, **study) -> Path:
    """A study file beside a user's model module `name` (tiny's task and flow otherwise)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(model_source)
    spec = yaml.safe_load(TINY.read_text())
    spec["name"] = name
    spec["task"]["model"] = f"{name}:net"
    spec["task"].pop("model_args", None)
    spec.update(study)
    (folder / "study.yaml").write_text(yaml.safe_dump(spec))
    return folder / "study.yaml"


PINNED_NET = '''from torch import nn


def net(input_shape, num_classes):
    return nn.Sequential(nn.Linear(input_shape[0], 16), nn.ReLU(), nn.Linear(16, num_classes))
'''


def test_resume_refuses_a_changed_checkpoint_user_module_or_dsdtune_in_one_line(tmp_path, capsys, monkeypatch):
    from dsdtune import registry
    from dsdtune.study import main
    from dsdtune.study.plan import make_plan
    from dsdtune.study.provenance import study_inputs
    from dsdtune.study.state import check_same_spec, spec_file, store_spec
    monkeypatch.setattr(registry, "_SEARCH_PATHS", [])
    monkeypatch.setattr(sys, "path", list(sys.path))
    project = tmp_path / "project"
    study = _user_project(project, "pinned_net", PINNED_NET, init={"checkpoint": "trained.pt"})
    exec(compile(PINNED_NET, "pinned_net", "exec"), namespace := {})
    torch.manual_seed(0)
    torch.save(namespace["net"]((12,), 4).state_dict(), project / "trained.pt")
    # the stored study, as the run that started it left it (its Ray state included)
    registry.add_search_paths([str(project)])
    spec = load_study(study)
    results = tmp_path / "results"
    out = results / spec.name
    (out / "ray" / "sweep").mkdir(parents=True)
    (out / "ray" / "sweep" / "experiment_state.json").write_text("{}")
    inputs = study_inputs(spec, make_plan(spec).runs)
    assert set(inputs["modules"]) == {"pinned_net"} and list(inputs["checkpoints"]) == [str(project / "trained.pt")]
    store_spec(out, spec, inputs)
    check_same_spec(out, spec, study_inputs(spec, make_plan(spec).runs))  # nothing changed: resumable
    args = [str(study), "--results", str(results), "--no-report", "--resume"]

    def refused() -> str:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("dsdtune: --resume: ") and "--fresh" in err
        return err

    original = (project / "trained.pt").read_bytes()
    torch.manual_seed(1)  # another checkpoint under the same name
    torch.save(namespace["net"]((12,), 4).state_dict(), project / "trained.pt")
    assert f"init.checkpoint {project / 'trained.pt'} changed" in refused()
    (project / "trained.pt").write_bytes(original)
    (project / "pinned_net.py").write_text(PINNED_NET.replace("ReLU", "Tanh"))  # the user's model changed
    assert f"module pinned_net ({project / 'pinned_net.py'}) changed" in refused()
    (project / "pinned_net.py").write_text(PINNED_NET)
    stored = json.loads(spec_file(out).read_text())
    stored["inputs"]["dsdtune"]["sha256"] = "0" * 64  # started by another dsdtune
    spec_file(out).write_text(json.dumps(stored))
    assert "dsdtune changed" in refused()
    del stored["inputs"]  # started before dsdtune recorded them
    spec_file(out).write_text(json.dumps(stored))
    assert "an older dsdtune" in refused()


def test_resume_with_nothing_stored_says_how_to_start_in_one_line(tmp_path, capsys):
    from dsdtune.study import main
    assert main([str(TINY), "--results", str(tmp_path / "results"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err == (f"dsdtune: --resume: nothing to resume in {(tmp_path / 'results' / 'tiny').resolve()} (no run of "
                   f"study 'tiny' is stored there); start it without --resume\n")
    assert not (tmp_path / "results").exists()


def test_a_local_ray_that_is_not_on_loopback_is_shut_down_and_refused(tmp_path):
    """Loopback-only rests on a private Ray switch: a Ray that ignored it would show another address."""
    code = ("import sys, ray\n"
            "nodes = ray.nodes\n"
            "ray.nodes = lambda: [dict(n, NodeManagerAddress='192.0.2.7') for n in nodes()]\n"
            "from dsdtune.study import main\n"
            "code = main(sys.argv[1:])\n"
            "print('ray running:', ray.is_initialized())\n"
            "sys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(TINY), "--results", str(tmp_path), "--no-report",
                           "--num-cpus", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_AUTH_MODE": "token"})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "ray running: False" in proc.stdout and "Traceback" not in proc.stderr
    ours = [line for line in proc.stderr.splitlines() if line.startswith("dsdtune:")]
    assert len(ours) == 1 and ours[0].startswith("dsdtune: Ray's local instance took the address 192.0.2.7")
    assert not (tmp_path / "tiny" / "trials.csv").exists()


FAULTY_NET = '''"""A user's model that fails in training while the file FAULT lies beside this module."""
import os

from torch import nn

FAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "FAULT")


class Net(nn.Sequential):
    def forward(self, x):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls > 5 and os.path.exists(FAULT):  # the driver's checks pass; a trial's first epoch fails
            raise RuntimeError("injected fault")
        return super().forward(x)


def net(input_shape, num_classes):
    return Net(nn.Linear(input_shape[0], 16), nn.ReLU(), nn.Linear(16, num_classes))
'''


def test_a_resume_trains_a_failed_prefix_and_its_trials_with_this_runs_settings(ray_local, tmp_path, monkeypatch):
    """Both representatives fail (max_failures 0), so their trials never start (prefix_error); the resume,
    with max_failures, max_concurrent and a tracker changed, trains the prefixes and then every trial."""
    from ray import tune
    from dsdtune import registry
    from dsdtune.study import main
    monkeypatch.setattr(registry, "_SEARCH_PATHS", [])
    monkeypatch.setattr(sys, "path", list(sys.path))
    study = _user_project(tmp_path / "project", "faulty_net", FAULTY_NET)
    (tmp_path / "project" / "FAULT").write_text("")
    results = tmp_path / "results"
    args = [str(study), "--results", str(results), "--no-report", "--set", "pipeline.epochs=[2, 1, 1]"]
    assert main(args + ["--set", "max_failures=0"]) == 1  # trials errored
    out = results / "faulty_net"
    first = pd.read_csv(out / "trials.csv")
    assert sorted(first.status) == ["error", "error", "prefix_error", "prefix_error"]
    held = first[first.status == "prefix_error"]
    assert (held.epochs_trained == 0).all() and held.trial_id.str.startswith("not-started-").all()
    assert held.prefix_id.isin(first[first.status == "error"].prefix_id).all() and held.final_val_acc.isna().all()

    (tmp_path / "project" / "FAULT").unlink()
    resume = ["--resume", "--set", "max_failures=3", "--set", "max_concurrent=1", "--log", "tensorboard"]
    assert main(args + resume) == 0
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 4 and (trials.status == "ok").all() and (trials.epochs_trained == 4).all()
    history = pd.read_csv(out / "history.csv")
    assert history.groupby("trial_id").epoch.apply(list).map(lambda e: e == [1, 2, 3, 4]).all()
    assert set(history.trial_id) == set(trials.trial_id)
    # this run's settings: the tracker logged every trial that ran, max_failures is in every trial
    runs = {p.parent for p in (out / "tensorboard").rglob("events.out.tfevents.*")}
    assert len(runs) == 4
    stage = tune.ExperimentAnalysis(str(out / "ray" / "sweep"))
    assert sorted(t.max_failures for t in stage.trials) == [3, 3, 3, 3]
