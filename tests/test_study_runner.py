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

import dsdtune
from drivers import start_study, wait_for
from dsdtune.config import SpecError, build_run_spec, first_difference, load_study
from dsdtune.pipeline import run_pipeline
from dsdtune.study.state import StudyLock

TINY = Path(__file__).parent / "studies" / "tiny.yaml"
OVERRIDES = ["pipeline.epochs=[3, 300, 300]", "checkpoint_every_s=30",
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
