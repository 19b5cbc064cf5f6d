"""study.json's provenance: the resolved spec and its hash, versions, machine, git commit, times."""
import hashlib
import json
import subprocess
from pathlib import Path

from dsdtune.config import load_study, spec_hash, study_identity
from dsdtune.study.provenance import git_commit, provenance

TINY = Path(__file__).parent / "studies" / "tiny.yaml"


def test_spec_hash_is_sha256_of_the_canonical_resolved_spec_and_changes_with_any_field():
    spec = load_study(TINY)
    canonical = json.dumps(study_identity(spec), sort_keys=True, separators=(",", ":"))
    assert spec_hash(spec) == hashlib.sha256(canonical.encode()).hexdigest()
    assert spec_hash(load_study(TINY)) == spec_hash(spec)  # stable across loads
    # a default written out explicitly is the same study; any changed value is another one
    assert spec_hash(load_study(TINY, [f"checkpoint_every_s={spec.checkpoint_every_s}"])) == spec_hash(spec)
    assert spec_hash(load_study(TINY, ["pipeline.epochs=[3, 2, 1]"])) != spec_hash(spec)
    # how a study runs is not what it computes: a resumed study may change these
    assert spec_hash(load_study(TINY, ["max_concurrent=1", "checkpoint_every_s=5"])) == spec_hash(spec)


def test_provenance_records_spec_versions_machine_git_and_times(tmp_path):
    repo = tmp_path / "project"
    repo.mkdir()
    study_file = repo / "tiny.yaml"
    study_file.write_text(TINY.read_text())
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "tiny.yaml"], check=True)
    subprocess.run(git + ["commit", "-qm", "study"], check=True)
    commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    spec = load_study(study_file)
    record = provenance(spec, study_file, started="2026-01-01T00:00:00+00:00")
    assert record["spec_hash"] == spec_hash(spec) and record["spec"]["name"] == "tiny"
    assert record["spec"]["pipeline"]["flow"] == "DSD"
    assert record["git"] == {"commit": commit, "dirty": False, "repository": str(repo.resolve())}
    assert set(record["versions"]) == {"python", "dsdtune", "torch", "ray", "optuna"}
    assert all(record["versions"].values())
    assert record["machine"]["cpu"] and isinstance(record["machine"]["gpus"], list)
    assert record["started"] == "2026-01-01T00:00:00+00:00" and record["ended"] > record["started"]
    json.dumps(record)  # study.json can hold it as it is
    study_file.write_text(TINY.read_text() + "\n# edited\n")
    assert git_commit(study_file)["dirty"] is True


def test_no_git_commit_outside_a_repository(tmp_path):
    (tmp_path / "s.yaml").write_text("name: s\n")
    assert git_commit(tmp_path / "s.yaml") is None


def test_provenance_pins_dsdtunes_own_commit_and_the_inputs_by_content():
    """study.json names the dsdtune that ran the study, not only the study file's repository."""
    import dsdtune
    from dsdtune.study.plan import make_plan
    from dsdtune.study.provenance import dsdtune_source, study_inputs
    spec = load_study(TINY)
    inputs = study_inputs(spec, make_plan(spec).runs)
    record = provenance(spec, None, inputs=inputs)
    package = Path(dsdtune.__file__).resolve().parent
    head = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout (an installed dsdtune has no commit)
        assert record["dsdtune_git"]["commit"] == head.stdout.strip()
    assert record["inputs"] == inputs == {"checkpoints": {}, "modules": {}, "dsdtune": dsdtune_source()}
    assert inputs["dsdtune"]["version"] == dsdtune.__version__ and len(inputs["dsdtune"]["sha256"]) == 64
