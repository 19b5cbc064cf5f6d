"""The Tune callbacks of a stage: the console's progress display and the trackers (`--log`).

A Ray module: only `run.py` imports it. What each tracker records is decided in `tracking.py`;
here it goes through Ray Tune's own logger callbacks (MLflow, TensorBoardX, W&B), each imported
only when its tracker is asked for (the packages are optional and slow to import).
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

from ray.tune import Callback

from . import tracking
from .progress import StageProgress, StudyConsole, arm_label


class ProgressCallback(StageProgress, Callback):
    """The console's stage display, fed by Tune."""


def stage_callbacks(console: StudyConsole, stage: str, *, payload: dict, prefix_length: int, param_space: dict,
                    tune_extra: Optional[dict] = None, planned_epochs: Optional[int] = None) -> list:
    """The progress display of this stage, and the trackers the user asked for."""
    total = int((tune_extra or {}).get("num_samples", 1))
    for value in param_space.values():
        if isinstance(value, dict) and "grid_search" in value:
            total *= len(value["grid_search"])
    progress = ProgressCallback(stage, total_trials=total, epochs_of=console.epochs_of(payload, stage, prefix_length),
                                metric=console.spec.metric, mode=console.spec.mode,
                                arm_of=lambda config: arm_label(stage, config), out=console.out,
                                live=False if console.verbose else None, planned_epochs=planned_epochs)
    label_of, params_of = console.label_of(payload, stage), console.params_of(payload, stage)
    trackers = {"mlflow": _mlflow, "tensorboard": _tensorboard, "wandb": _wandb}
    return [progress] + [trackers[choice](console, stage, label_of, params_of) for choice in console.log]


def _mlflow(console: StudyConsole, stage: str, label_of: Callable, params_of: Callable):
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    study, metric = console.spec.name, console.spec.metric
    uri = tracking.ensure_mlflow_experiment(console.results_dir, study)

    class StudyMLflow(MLflowLoggerCallback):
        def log_trial_start(self, trial):
            if trial not in self._trial_runs:
                tags = {**self.tags, "trial_name": str(trial), "trial_id": trial.trial_id}
                run = self.mlflow_util.start_run(tags=tags, run_name=label_of(trial.config))
                self._trial_runs[trial] = run.info.run_id
                self.mlflow_util.log_params(run_id=run.info.run_id, params_to_log=params_of(trial.config))

        def log_trial_result(self, iteration, trial, result):
            if trial not in self._trial_runs:
                self.log_trial_start(trial)
            for epoch, values in tracking.reported_epochs(result, metric, iteration):
                self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=values, step=epoch)

    return StudyMLflow(tracking_uri=uri, experiment_name=study, tags={"study": study, "stage": stage})


def _tensorboard(console: StudyConsole, stage: str, label_of: Callable, params_of: Callable):
    from ray.tune.logger import TBXLoggerCallback

    root, metric = tracking.tensorboard_dir(console.results_dir), console.spec.metric
    records = tracking.HParams(tracking.hparam_domains(console.spec, console.factors_by_label),
                               tracking.hparams_metrics(metric))

    class StudyTensorBoard(TBXLoggerCallback):
        """One run folder per trial, named like the trial; HParams records instead of Tune's."""

        def log_trial_start(self, trial):
            if trial in self._trial_writer:
                self._trial_writer[trial].close()
            path = tracking.run_dir(root, label_of(trial.config), trial.trial_id)
            writer = self._summary_writer_cls(str(path), flush_secs=30)
            writer.file_writer.add_summary(records.experiment())
            writer.file_writer.add_summary(records.session_start(params_of(trial.config), time.time()))
            self._trial_writer[trial], self._trial_result[trial] = writer, {}

        def log_trial_result(self, iteration, trial, result):
            if trial not in self._trial_writer:
                self.log_trial_start(trial)
            writer = self._trial_writer[trial]
            for epoch, values in tracking.reported_epochs(result, metric, iteration):
                for key, value in values.items():
                    writer.add_scalar(key, value, global_step=epoch)
            writer.flush()

        def log_trial_end(self, trial, failed=False):
            writer = self._trial_writer.pop(trial, None)
            self._trial_result.pop(trial, None)
            if writer is not None:
                writer.file_writer.add_summary(records.session_end(failed, time.time()))
                writer.close()

    return StudyTensorBoard()


def _wandb(console: StudyConsole, stage: str, label_of: Callable, params_of: Callable):
    import ray
    from ray.air.integrations.wandb import WandbLoggerCallback, _QueueItem
    from ray.air.util.node import _force_on_current_node

    study, metric = console.spec.name, console.spec.metric
    directory = str(tracking.wandb_dir(console.results_dir))

    class StudyWandb(WandbLoggerCallback):
        """Ray's W&B logger (one logging actor per trial) with the study's names, params and epochs."""

        def setup(self, *args, **kwargs):
            super().setup(*args, **kwargs)
            # Ray's logging actors restart (max_restarts=-1): a restarted one starts a second W&B run of
            # its trial, and Ray prints a warning about restarting with the queue's handle on the
            # console. Ours do not restart, and take the driver's W&B settings (WANDB_MODE=offline...)
            # on a cluster too, where the worker's environment is that of `ray start`.
            env = {k: v for k, v in os.environ.items() if k.startswith("WANDB_")}
            self._remote_logger_class = ray.remote(num_cpus=0, max_restarts=0, **_force_on_current_node(),
                                                   runtime_env={"env_vars": env})(self._logger_actor_cls)

        def log_trial_start(self, trial):
            config = trial.config
            self._start_logging_actor(
                trial, self._exclude_results + self.excludes + ["config"], id=trial.trial_id,
                name=label_of(config), group=f"{study}/{arm_label(stage, config)}", job_type=stage,
                tags=[study, stage], project=self.project, config=params_of(config), dir=directory,
                resume="allow", allow_val_change=True,
                # System metrics would be the driver's machine (the logging actor's), not the trial's.
                settings={"x_disable_stats": True})

        def log_trial_result(self, iteration, trial, result):
            if trial not in self._trial_logging_actors:
                self.log_trial_start(trial)
            # The logging actor takes W&B's step from training_iteration: the epoch here. One call
            # per report; it returns once queued, so the epochs (and the end) arrive in order.
            self._trial_queues[trial].put_nowait_batch(
                [(_QueueItem.RESULT, {**values, "training_iteration": epoch})
                 for epoch, values in tracking.reported_epochs(result, metric, iteration)])

    return StudyWandb(project=tracking.wandb_project(study))
