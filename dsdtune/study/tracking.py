"""What `--log mlflow / tensorboard / wandb` record, and where (no Ray here: `callbacks.py` feeds Tune).

Every tracker gets one run per trial, named like the trial in the dashboard (`study/arm/seed=N`,
`study/<stage>/arm/seed=N` outside the sweep), with the arm's factors and the seed as its params
and the per-epoch values as its metrics, stepped by the epoch (a sweep trial that starts from a
shared prefix begins at the prefix's last epoch + 1; the prefix's epochs are in the run of the
trial that trained it).

- MLflow: `MLFLOW_TRACKING_URI`, else a SQLite store in the results folder; one experiment per study.
- TensorBoard: `results/<study>/tensorboard/<run name>/`; its HParams tab gets the factors and the
  seed as discrete values (where the study enumerates them) and the validation/test metrics first.
- W&B: project `WANDB_PROJECT` or the study's name, one group per arm, run files (offline runs too)
  under `results/<study>/wandb/`.

`check_tracking` runs before Ray and before `--dry-run` returns: one line saying what to install.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from ..config import SpecError
from .results import epochs_in_report

CHOICES = ("mlflow", "tensorboard", "wandb")
_NEEDS = {"mlflow": "mlflow", "tensorboard": "tensorboardX", "wandb": "wandb"}
EPOCH_METRICS = ("phase", "lr", "sparsity", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc")
# TensorBoard's HParams table shows the first five metrics of its list unless asked for more.
HPARAMS_METRICS = ("val_acc", "test_acc", "val_loss", "test_loss", "sparsity", "train_loss")
_OFFLINE_MODES = ("offline", "disabled", "dryrun")


def check_tracking(choices: list[str]) -> None:
    """Every chosen tracker is known, importable and (W&B online) logged in; else a SpecError."""
    for choice in choices:
        if choice not in CHOICES:
            raise SpecError(f"--log {choice}: unknown; allowed: {', '.join(CHOICES)}")
        module = _NEEDS[choice]
        if importlib.util.find_spec(module) is None:
            raise SpecError(f"--log {choice} needs the {module} package: pip install 'dsdtune[tracking]' "
                            f"(or pip install {module})")
        if choice == "wandb" and os.environ.get("WANDB_MODE") not in _OFFLINE_MODES and not _wandb_logged_in():
            raise SpecError("--log wandb: no W&B login; run `wandb login` (or set WANDB_API_KEY), or log "
                            "locally with WANDB_MODE=offline and upload later with `wandb sync`")


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import wandb
    return bool(wandb.login(prompt=False, verify=False))  # reads the stored key; no network


# ---- MLflow ----

def mlflow_tracking_uri(results_dir: Path) -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite store in the study's results folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(results_dir).resolve() / 'mlflow.db'}"


def ensure_mlflow_experiment(results_dir: Path, study: str) -> str:
    """The study's experiment in the store; in a local store its artifacts stay in the results folder too."""
    uri = mlflow_tracking_uri(results_dir)
    if "MLFLOW_TRACKING_URI" not in os.environ:
        from mlflow.tracking import MlflowClient
        client = MlflowClient(uri)
        if client.get_experiment_by_name(study) is None:
            artifacts = (Path(results_dir).resolve() / "mlflow-artifacts").as_uri()
            client.create_experiment(study, artifact_location=artifacts)
    return uri


def epoch_metrics(result: dict, metric: str) -> dict[str, float]:
    """The per-epoch numbers of one report (and phase-end accuracies), without Tune's bookkeeping."""
    keys = list(EPOCH_METRICS) + ([metric] if metric not in EPOCH_METRICS else [])
    keys += [k for k in result if k.startswith(("acc_after_", "val_acc_after_"))]
    values = {}
    for key in keys:
        value = result.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            values[key] = float(value)
    return values


def reported_epochs(result: dict, metric: str, iteration: int) -> list[tuple[int, dict[str, float]]]:
    """(epoch, its numbers) for every epoch a Tune report carries."""
    return [(int(e.get("epoch", iteration)), epoch_metrics(e, metric)) for e in epochs_in_report(result)]


# ---- TensorBoard ----

def tensorboard_dir(results_dir: Path) -> Path:
    return Path(results_dir) / "tensorboard"


def run_dir(root: Path, label: str, trial_id: str) -> Path:
    """The trial's run folder under `root`: its label as a path, claimed by the trial.

    A folder is one run to TensorBoard: two trials with the same label (an Optuna search may
    suggest a config twice) must not share one, so the second gets its trial id appended. The
    claim is a file in the folder, so a resumed trial finds its own folder again.
    """
    parts = [part.replace("\\", "_").strip() for part in label.split("/")]
    parts = [("_" if part in ("", ".", "..") else part if len(part.encode()) <= 200 else part[:180] + "...")
             for part in parts]
    path = Path(root, *parts)
    for candidate in (path, path.with_name(f"{path.name} ({trial_id})")):
        claim = candidate / ".dsdtune-trial"
        if not claim.exists():
            candidate.mkdir(parents=True, exist_ok=True)
            claim.write_text(trial_id)
            return candidate
        if claim.read_text() == trial_id:
            return candidate
    raise RuntimeError(f"{path}: claimed by two trials")  # trial ids are unique: cannot happen


def hparams_metrics(metric: str) -> list[str]:
    """The HParams metric list: the study's metric first, then validation and test (shown by default)."""
    return list(dict.fromkeys([metric, *HPARAMS_METRICS]))


def hparam_domains(spec, factors_by_label: dict[str, dict]) -> dict[str, Optional[list]]:
    """Every factor the study varies and the seed, with its values where the study enumerates them.

    One list for the whole study (every stage writes the same experiment, TensorBoard reads one):
    the sweep's arms, an Optuna study's grid/choice axes and its confirm control, every seed. A
    sampled axis has no list (None): HParams shows its range from the runs.
    """
    domains: dict[str, Optional[list]] = {}

    def add(name: str, values: Optional[list]) -> None:
        if values is None or (name in domains and domains[name] is None):
            domains[name] = None
            return
        known = domains.setdefault(name, [])
        known.extend(v for v in values if v not in known)

    for factors in factors_by_label.values():
        for name, value in factors.items():
            add(name, [value])
    if spec.search.algorithm == "optuna":
        for path, axis in spec.search.space.items():
            add(path, list(axis.grid if axis.grid is not None else axis.choice)
                if axis.kind in ("grid", "choice") else None)
        for path, value in (spec.confirm.control if spec.confirm else {}).items():
            add(path, [value])
    seeds = list(spec.seed_list)
    if spec.confirm is not None and spec.search.algorithm == "optuna":
        seeds += range(spec.confirm.first_seed, spec.confirm.first_seed + spec.confirm.seeds)
    add("seed", seeds)
    return domains


def _kind(values: list) -> str:
    if all(isinstance(v, bool) for v in values):
        return "bool"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "number"
    return "string"


def _as_kind(value: Any, kind: str):
    if kind == "string" and not isinstance(value, str):
        return json.dumps(value, sort_keys=True, default=str)
    return value


class HParams:
    """TensorBoard's HParams records for one study (tensorboardX's protos, which it writes).

    tensorboardX's own `hparams()` writes no value lists and takes its metric list from each run's
    last values; the plugin then treats numbers (the seed) as continuous and shows the first five
    metrics alphabetically, hiding `val_acc`. These records carry the lists and the order.
    """

    def __init__(self, domains: dict[str, Optional[list]], metrics: list[str]):
        self.domains, self.metrics = domains, metrics
        self.kinds = {name: _kind(values) if values else None for name, values in domains.items()}
        if "seed" in self.kinds:  # a seed names a repeat: a category ("3"), not a quantity ("3.0000")
            self.kinds["seed"] = "string"

    def _plain(self, name: str, value: Any):
        """The value as the hparam's type (numbers as floats: protobuf's Value has no ints)."""
        kind = self.kinds.get(name) or _kind([value])
        return float(value) if kind == "number" else _as_kind(value, kind)

    @staticmethod
    def _summary(**data):
        from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData
        from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
        (tag, message), = data.items()
        content = HParamsPluginData(version=0, **{tag: message}).SerializeToString()
        metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="hparams", content=content))
        return Summary(value=[Summary.Value(tag=f"_hparams_/{tag}", metadata=metadata)])

    def experiment(self):
        from tensorboardX.proto.api_pb2 import DataType, DatasetType, Experiment, HParamInfo, MetricInfo, MetricName
        types = {"bool": "DATA_TYPE_BOOL", "number": "DATA_TYPE_FLOAT64", "string": "DATA_TYPE_STRING", None: "DATA_TYPE_FLOAT64"}
        infos = []
        for name, values in self.domains.items():
            info = HParamInfo(name=name, type=DataType.Value(types[self.kinds[name]]))
            if values:
                info.domain_discrete.extend(self._plain(name, v) for v in values)
            infos.append(info)
        datasets = {"val": "DATASET_VALIDATION", "train": "DATASET_TRAINING"}
        metrics = [MetricInfo(name=MetricName(tag=m), dataset_type=DatasetType.Value(
            datasets.get(m.split("_")[0], "DATASET_UNKNOWN"))) for m in self.metrics]
        return self._summary(experiment=Experiment(hparam_infos=infos, metric_infos=metrics))

    def session_start(self, params: dict, start_time_secs: float):
        """A run's values of the study's factors and seed (of all its params)."""
        from tensorboardX.proto.plugin_hparams_pb2 import SessionStartInfo
        info = SessionStartInfo(start_time_secs=start_time_secs)  # no group: one row per run, seeds apart
        for name, value in params.items():
            if name not in self.domains or value is None:
                continue
            value = self._plain(name, value)
            field = "bool_value" if isinstance(value, bool) else "number_value" if isinstance(value, float) else "string_value"
            setattr(info.hparams[name], field, value)
        return self._summary(session_start_info=info)

    def session_end(self, failed: bool, end_time_secs: float):
        from tensorboardX.proto.api_pb2 import Status
        from tensorboardX.proto.plugin_hparams_pb2 import SessionEndInfo
        status = Status.Value("STATUS_FAILURE" if failed else "STATUS_SUCCESS")
        return self._summary(session_end_info=SessionEndInfo(status=status, end_time_secs=end_time_secs))


# ---- W&B ----

def wandb_project(study: str) -> str:
    return os.environ.get("WANDB_PROJECT") or study


def wandb_dir(results_dir: Path) -> Path:
    """wandb.init's `dir`: it keeps its run folders (`offline-run-*` for `wandb sync`) in `wandb/` there."""
    return Path(results_dir).resolve()
