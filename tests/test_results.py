"""The result files: written by the runner (study/results.py), read by `dsdtune.load_results` (the one
reader, which the report builds on), and cleared by `--fresh` only where dsdtune made the folder."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

import dsdtune
from dsdtune.config import load_study
from dsdtune.report import load_for_report
from dsdtune.results import ResultsError, load_results, result_files
from dsdtune.study import main
from dsdtune.study.plan import STAGE_SWEEP, make_plan
from dsdtune.study.results import write_results
from dsdtune.study.state import MARKER, claim_folders

TINY = Path(__file__).parent / "studies" / "tiny.yaml"


def _ray_result(trial_id, arm, seed, status=None, epochs=()):
    """What Ray's ResultGrid holds for a trial (the fields write_results reads)."""
    history = [{"epoch": e, "phase": 0, "phase_kind": "D", "phase_label": "D1", "lr": 0.05, "sparsity": 0.0,
                "train_loss": 1.0, "val_loss": 1.0, "val_acc": 0.5, "test_loss": 1.0, "test_acc": 0.5}
               for e in epochs]
    metrics = {"trial_id": trial_id, "epochs_trained": len(epochs), "val_acc": 0.5, "test_acc": 0.5,
               **({"status": status} if status else {})}
    return SimpleNamespace(config={"arm": arm, "seed": seed}, metrics=metrics, error=None, path=f"/ray/{trial_id}",
                           metrics_dataframe=pd.DataFrame([{"history_json": json.dumps(history)}]), checkpoint=None)


def test_an_interrupted_studys_partial_results_load_with_their_never_started_trials(tmp_path):
    spec = load_study(TINY)
    plan = make_plan(spec)
    (a0, a1), (s0, s1) = [a.label for a in plan.arms], plan.seeds
    stages = {STAGE_SWEEP: [_ray_result("t_00000", a0, s0, "ok", epochs=range(1, 8)),
                            _ray_result("t_00001", a1, s0, epochs=range(1, 5))]}  # running when stopped
    missing = [(STAGE_SWEEP, a0, s1), (STAGE_SWEEP, a1, s1)]  # never started
    counts = write_results(tmp_path, spec, plan, stages, plan.arms, {STAGE_SWEEP: plan.seeds}, interrupted=True,
                           missing=missing)
    assert counts == {"ok": 1, "interrupted": 3}
    results = dsdtune.load_results(tmp_path)
    trials = results.trials.set_index("trial_id")
    assert trials.index.is_unique and len(trials) == 4
    assert list(trials.loc[["not-started-1", "not-started-2"], "seed"]) == [s1, s1]
    assert (trials.loc[["not-started-1", "not-started-2"], "epochs_trained"] == 0).all()
    assert trials.loc["t_00001", "status"] == "interrupted" and trials.loc["t_00000", "status"] == "ok"
    assert set(trials.loc[trials.seed == s1, "status"]) == {"interrupted"}
    # each epoch row carries its trial's arm, factors and status
    history = results.history
    assert len(history) == 7 + 4 and set(history.trial_id) == {"t_00000", "t_00001"}
    assert list(history.groupby("trial_id").status.first()) == ["ok", "interrupted"]
    assert set(history["pipeline.sparsity"]) == {0.0, 0.5}
    assert results.meta["interrupted"] is True
    # the report counts the unfinished trials as errors, never as finished ones
    assert list(results.trials.trial_id) == ["t_00000", "not-started-1", "t_00001", "not-started-2"]  # by arm, seed
    assert list(pd.read_csv(tmp_path / "trials.csv").trial_id) == list(results.trials.trial_id)  # as written
    assert list(load_for_report(tmp_path).trials.status) == ["ok", "error", "error", "error"]


def test_trials_written_before_never_started_trials_had_ids_still_load(tmp_path):
    rows = [{"trial_id": "a_1", "stage": "sweep", "arm": "x", "seed": 0, "status": "ok"},
            {"trial_id": "", "stage": "sweep", "arm": "x", "seed": 1, "status": "interrupted"},
            {"trial_id": "", "stage": "sweep", "arm": "y", "seed": 1, "status": "interrupted"}]
    pd.DataFrame(rows).to_csv(tmp_path / "trials.csv", index=False)
    pd.DataFrame([{"trial_id": "a_1", "epoch": 1, "val_acc": 0.5}]).to_csv(tmp_path / "history.csv", index=False)
    results = load_results(tmp_path)
    assert list(results.trials.trial_id) == ["a_1", "not-started-1", "not-started-2"]
    assert list(results.history.columns[:5]) == ["trial_id", "stage", "arm", "seed", "status"]
    assert results.meta == {} and results.layers.empty and results.summary.empty


@pytest.mark.parametrize("ids", [["1e234567"], ["00123456"], ["12345678", "9e000001"]])
def test_trial_ids_that_look_like_numbers_load_as_the_ids_they_are(tmp_path, ids):
    """Tune's ids are 8 hex digits: a small study's may all look like numbers ("1e234567" is infinity to
    pandas, "00123456" loses its zeros); its masks/<id>.npz and every table must still match them."""
    pd.DataFrame([{"trial_id": t, "stage": "sweep", "arm": "x", "seed": n, "status": "ok"}
                  for n, t in enumerate(ids)]).to_csv(tmp_path / "trials.csv", index=False)
    pd.DataFrame([{"trial_id": t, "epoch": 1, "val_acc": 0.5} for t in ids]).to_csv(tmp_path / "history.csv",
                                                                                    index=False)
    pd.DataFrame([{"trial_id": t, "layer": "fc", "density": 0.5} for t in ids]).to_csv(tmp_path / "layers.csv",
                                                                                      index=False)
    results = load_results(tmp_path)
    assert list(results.trials.trial_id) == ids
    assert list(results.history.trial_id) == ids and list(results.history.seed) == list(range(len(ids)))
    assert list(results.layers.trial_id) == ids and list(results.layers.status) == ["ok"] * len(ids)


def test_the_readers_rules_are_one_line_errors(tmp_path):
    with pytest.raises(ResultsError, match="is not a folder"):
        load_results(tmp_path / "absent")
    with pytest.raises(ResultsError, match="trials.csv is missing"):
        load_results(tmp_path)
    (tmp_path / "trials.csv").write_text("trial_id,x\na,0\na,1\n")
    with pytest.raises(ResultsError, match="lists trial a more than once"):
        load_results(tmp_path)
    (tmp_path / "trials.csv").write_text("trial_id,x\na,0\nb,1\n")
    (tmp_path / "layers.csv").write_text("trial_id,density\na,0.5\n")  # no layer column
    with pytest.raises(ResultsError, match="layers.csv has no layer column"):
        load_results(tmp_path)
    (tmp_path / "layers.csv").unlink()
    with pytest.raises(ResultsError, match="study.json is missing"):
        load_results(tmp_path, require_meta=True)
    (tmp_path / "study.json").write_text("[1, 2]")
    with pytest.raises(ResultsError, match="must hold a JSON object"):
        load_results(tmp_path)
    (tmp_path / "study.json").write_text(json.dumps({"name": "s", "factors": ["x", "absent"]}))
    assert load_results(tmp_path / "study.json").factors == ["x"]  # a file in the folder names it too


def test_result_files_are_dsdtunes_own_and_nothing_else(tmp_path):
    ours = ["trials.csv", "history.csv", "layers.csv", "weights.csv", "study.json", "summary.csv",
            "comparisons.csv", "costs.csv", "ranks.csv", "report.md", "fig_metric_by_arm.png",
            ".trials.csv.k2j4_x9a.tmp", "masks/abc_00001.npz"]
    theirs = ["notes.md", "report.txt", "figure.png", "trials.csv.bak", "masks/readme.txt", "ray/sweep/x.json"]
    for name in ours + theirs:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert sorted(result_files(tmp_path)) == sorted(tmp_path / name for name in ours)


# ------------------------------------------------------------------------------------ --fresh, without Ray


def test_fresh_removes_the_previous_runs_files_and_keeps_the_users(tmp_path, no_ray):
    out = tmp_path / "tiny"
    claim_folders(out, out / "ray", "tiny")  # as the previous run did
    previous = ["trials.csv", "history.csv", "study.json", "summary.csv", "comparisons.csv", "costs.csv",
                "report.md", "fig_metric_by_arm.png", "fig_learning_curves.png", "masks/old_00000.npz",
                "ray/sweep/experiment_state.json", ".dsdtune/spec.json"]
    for name in previous + ["notes.md"]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("previous run")
    with pytest.raises(AssertionError, match="reached Ray"):
        main([str(TINY), "--results", str(tmp_path), "--fresh", "--no-report"])
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == [".dsdtune-made", ".dsdtune/spec.json", "notes.md", "ray/.dsdtune-made"]
    assert (out / "notes.md").read_text() == "previous run"
    assert json.loads((out / ".dsdtune" / "spec.json").read_text())["spec"]["name"] == "tiny"  # this run's


def _refused(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dsdtune: --fresh: "), err
    return err


def test_fresh_deletes_nothing_in_folders_dsdtune_did_not_make(tmp_path, capsys, no_ray):
    # storage: a folder of the user's, with a `ray` folder of their own in it
    mine = tmp_path / "mine"
    (mine / "ray").mkdir(parents=True)
    (mine / "ray" / "keep.txt").write_text("mine")
    (mine / "report.md").write_text("mine")
    before = sorted(mine.rglob("*"))
    err = _refused([str(TINY), "--results", str(tmp_path), "--set", f"storage={mine}", "--fresh"], capsys)
    assert str(mine) in err and "not made by dsdtune" in err
    assert sorted(mine.rglob("*")) == before  # nothing removed, nothing written (no lock, no marker)
    # a results folder dsdtune made, whose Ray folder it did not (an older dsdtune's, or the user's)
    out = tmp_path / "results" / "tiny"
    claim_folders(out, None, "tiny")
    (out / "ray" / "sweep").mkdir(parents=True)
    err = _refused([str(TINY), "--results", str(tmp_path / "results"), "--fresh"], capsys)
    assert str(out / "ray") in err and (out / "ray" / "sweep").is_dir() and not (out / ".dsdtune").exists()


def test_results_of_this_study_from_before_markers_may_be_cleared(tmp_path, no_ray):
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "study.json").write_text(json.dumps({"name": "tiny", "factors": ["pipeline.sparsity"]}))
    (out / "report.md").write_text("old")
    with pytest.raises(AssertionError, match="reached Ray"):
        main([str(TINY), "--results", str(tmp_path), "--fresh", "--no-report"])
    assert not (out / "report.md").exists() and (out / MARKER).is_file()


def test_the_name_dot_dot_is_refused_before_anything_is_written(tmp_path):
    """`name: ".."` would make the results folder the current one (and --fresh clear its `ray`)."""
    (tmp_path / "ray").mkdir()
    proc = subprocess.run([sys.executable, "-m", "dsdtune.study", str(TINY), "--set", "name=..", "--fresh",
                           "--results", "."], capture_output=True, text=True, cwd=tmp_path / "ray", timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("dsdtune: name: '..' is not a plain folder name")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert list(tmp_path.rglob("*")) == [tmp_path / "ray"]
