"""Experiment tracking through Ray Tune's own logger callbacks: `--log mlflow`, `--log tensorboard`.

One run per trial, named like the trial in the dashboard (`study/arm/seed=N`); its params are the
arm's factors (dotted paths as in the study file), the seed, the study and the stage; its metrics
are the per-epoch values, stepped by the epoch (a sweep trial that starts from a shared prefix
begins at the prefix's last epoch + 1; the prefix's epochs are in the run of the trial that
trained it). MLflow groups
the runs of a study in one experiment named after it; TensorBoard reads the event files Tune
writes into each trial's folder (`tensorboard --logdir results/<study>/ray`).

`check_tracking` runs before Ray (one line naming what to install); the callbacks import Ray.
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Callable

from ..config import SpecError
from .results import epochs_in_report

CHOICES = ("mlflow", "tensorboard")
_NEEDS = {"mlflow": ("mlflow", "mlflow-skinny"), "tensorboard": ("tensorboardX", "tensorboardX")}
EPOCH_METRICS = ("phase", "lr", "sparsity", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc")


def check_tracking(choices: list[str]) -> None:
    """Every chosen tracker is known and importable; else SpecError saying what to install."""
    for choice in choices:
        if choice not in CHOICES:
            raise SpecError(f"--log {choice}: unknown; allowed: {', '.join(CHOICES)}")
        module, package = _NEEDS[choice]
        if importlib.util.find_spec(module) is None:
            raise SpecError(f"--log {choice} needs the {module} package: pip install 'dsdtune[tracking]' "
                            f"(or pip install {package})")


def mlflow_tracking_uri(results_dir: Path) -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite store in the study's results folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(results_dir).resolve() / 'mlflow.db'}"


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


def tracking_callbacks(choices: list[str], *, study: str, stage: str, results_dir: Path, metric: str,
                       label_of: Callable[[dict], str], params_of: Callable[[dict], dict]) -> list:
    callbacks = []
    if "mlflow" in choices:
        callbacks.append(_mlflow_callback(study, stage, results_dir, metric, label_of, params_of))
    if "tensorboard" in choices:
        callbacks.append(_tensorboard_callback(metric, params_of))
    return callbacks


def _mlflow_callback(study, stage, results_dir, metric, label_of, params_of):
    from mlflow.tracking import MlflowClient
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    uri = mlflow_tracking_uri(results_dir)
    if "MLFLOW_TRACKING_URI" not in os.environ:  # local store: its artifacts stay in the results folder too
        client = MlflowClient(uri)
        if client.get_experiment_by_name(study) is None:
            client.create_experiment(study, artifact_location=(Path(results_dir).resolve() / "mlflow-artifacts").as_uri())

    class StudyMLflow(MLflowLoggerCallback):
        def log_trial_start(self, trial):
            if trial not in self._trial_runs:
                tags = {**self.tags, "trial_name": str(trial), "trial_id": trial.trial_id}
                run = self.mlflow_util.start_run(tags=tags, run_name=label_of(trial.config))
                self._trial_runs[trial] = run.info.run_id
                self.mlflow_util.log_params(run_id=run.info.run_id, params_to_log=params_of(trial.config))

        def log_trial_result(self, iteration, trial, result):
            for epoch in epochs_in_report(result):
                self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=epoch_metrics(epoch, metric),
                                             step=int(epoch.get("epoch", iteration)))

    return StudyMLflow(tracking_uri=uri, experiment_name=study, tags={"study": study, "stage": stage})


def _tensorboard_callback(metric, params_of):
    from ray.tune.logger import TBXLoggerCallback

    class StudyTensorBoard(TBXLoggerCallback):
        def log_trial_result(self, iteration, trial, result):
            if trial not in self._trial_writer:
                self.log_trial_start(trial)
            writer = self._trial_writer[trial]
            for epoch in epochs_in_report(result):
                values = epoch_metrics(epoch, metric)
                for key, value in values.items():
                    writer.add_scalar(key, value, global_step=int(epoch.get("epoch", iteration)))
                self._trial_result[trial] = values
            writer.flush()

        def log_trial_end(self, trial, failed=False):
            if trial not in self._trial_writer:
                return
            writer = self._trial_writer[trial]
            if self._trial_result[trial]:  # the hyperparameters view: the arm's factors against the last values
                from tensorboardX.summary import hparams
                params = {k: v for k, v in params_of(trial.config).items() if isinstance(v, (int, float, str, bool))}
                for summary in hparams(hparam_dict=params, metric_dict=self._trial_result[trial]):
                    writer.file_writer.add_summary(summary)
            writer.close()
            del self._trial_writer[trial], self._trial_result[trial]

    return StudyTensorBoard()
