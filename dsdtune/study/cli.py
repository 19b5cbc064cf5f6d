"""`python -m dsdtune.study NAME|PATH`: a study file -> Ray Tune trials -> result files and a report.

Exit codes: 0 every trial ended (ok, diverged or stopped by a scheduler); 1 some trials errored;
2 a mistake in the study or the command line (one line, before Ray starts, nothing written);
3 the study finished and its results are written, but the report failed; 130 / 143 stopped by
Ctrl-C / SIGTERM (partial results written, the command to resume printed).
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from .. import registry
from ..config import SpecError, default_studies_dir, load_study, resolve_study_path
from .plan import STAGE_CONFIRM, STAGE_SEARCH, STAGE_SWEEP, confirm_arms, describe_plan, make_plan
from .state import (StudyLock, check_fresh, check_same_spec, claim_folders, holds_ray_state, nothing_to_resume,
                    spec_file, start_fresh, store_spec)
from .tasks import describe_tasks, distinct_runs
from .tracking import check_tracking
from .validate import check_control, check_gpu, check_search, check_storage, check_tasks

EXIT_OK, EXIT_TRIAL_ERRORS, EXIT_USAGE, EXIT_REPORT_FAILED = 0, 1, 2, 3


def _list_studies() -> None:
    import yaml
    for path in sorted(default_studies_dir().glob("*.yaml")):
        description = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        first = " ".join(str(description).split())
        print(f"{path.stem:22s} {first}")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dsdtune.study", description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", help="a shipped study name (see --list) or a path to a .yaml file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any field by dotted path, value in YAML (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the shipped studies")
    parser.add_argument("--dry-run", action="store_true", help="print the trial plan without starting Ray")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted study from its storage")
    parser.add_argument("--fresh", action="store_true",
                        help="start over: remove the previous run's Ray state, result files, report and masks "
                             "(in folders dsdtune made; your own files there stay)")
    parser.add_argument("--address", default=None, help="Ray cluster to join ('auto' or host:port); "
                        "default: start a local Ray instance")
    parser.add_argument("--dashboard-host", default="127.0.0.1", help="dashboard bind address (local instance)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray instance")
    parser.add_argument("--results", default="results", help="root folder of the results (default: results/)")
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own tables and logs (default: in ray.log)")
    parser.add_argument("--log", action="append", default=[], metavar="TRACKER",
                        help="also log every trial to mlflow, tensorboard or wandb (repeatable; "
                        "pip install 'dsdtune[tracking]')")
    args = parser.parse_args(argv)
    if not args.list and not args.study:
        parser.error("name a study (see --list)")
    return args


def resume_command(argv: list[str]) -> str:
    """The command that continues this study: the same arguments, --resume instead of --fresh."""
    kept = [a for a in argv if a not in ("--fresh", "--resume")]
    return shlex.join(["python", "-m", "dsdtune.study", *kept, "--resume"])


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.list:
        _list_studies()
        return EXIT_OK
    lock = None
    try:
        check_tracking(args.log)  # also before --dry-run: the plan a dry run approves must run
        spec = load_study(args.study, args.set)
        # A user's model / dataset modules are imported from the study file's folder and the cwd.
        registry.add_search_paths(registry.study_search_paths(resolve_study_path(args.study)))
        results_dir, ray_storage = check_storage(spec, Path(args.results))
        plan = make_plan(spec)
        check_control(spec)
        check_search(spec)
        check_tasks(plan)
        if args.dry_run:
            print(describe_plan(spec, plan))
            print(describe_tasks(plan))
            return EXIT_OK
        check_gpu(spec, args.address)
        ray_state = Path(ray_storage) if "://" not in ray_storage else None
        has_state = ray_state is not None and holds_ray_state(ray_state)
        if has_state and not (args.resume or args.fresh):
            raise SpecError(f"{results_dir} already holds a run of this study: add --resume to continue it, or "
                            f"--fresh to remove it and start over")
        if args.resume and not args.fresh and not has_state and not spec_file(results_dir).exists():
            raise nothing_to_resume(results_dir, spec.name)
        if args.fresh:
            check_fresh(results_dir, ray_state, spec.name)
        from .provenance import study_inputs
        inputs = study_inputs(spec, plan.runs)  # checkpoints, user modules, dsdtune: pinned by content
        lock = StudyLock(results_dir)
        lock.acquire()
        if args.resume and not args.fresh:
            check_same_spec(results_dir, spec, inputs)
        runtime_env = registry.runtime_env([name for run in distinct_runs(plan)
                                            for name in (run.task.model, run.task.dataset)], bool(args.address))
    except SpecError as err:
        if lock is not None:
            lock.release()
        print(f"dsdtune: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _run(args, argv, spec, plan, results_dir, ray_storage, runtime_env, inputs)
    except SpecError as err:  # refused once Ray ran (e.g. a local Ray not on loopback): Ray is shut down
        print(f"dsdtune: {err}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        lock.release()


def _import_report() -> None:
    try:
        import importlib
        for module in ("dsdtune.report.output", "dsdtune.report.figures"):  # the analysis; matplotlib
            importlib.import_module(module)
    except Exception:  # raised again where the report runs, and reported there
        pass


def _run(args, argv: list[str], spec, plan, results_dir: Path, ray_storage: str, runtime_env, inputs: dict) -> int:
    print(describe_plan(spec, plan), flush=True)
    ray_state = Path(ray_storage) if "://" not in ray_storage else None
    if args.fresh:
        start_fresh(results_dir, ray_state)
    claim_folders(results_dir, ray_state, spec.name)
    store_spec(results_dir, spec, inputs)
    hint = f"continue with: {resume_command(argv)}"
    from .progress import StudyConsole
    from .provenance import now, provenance
    from .run import SignalState, connect, optuna_stages, shutdown, sweep_stage, unstarted_trials
    signals = SignalState(spec.name, hint)
    started, started_at = time.monotonic(), now()
    console = StudyConsole(spec, results_dir, verbose=args.verbose, log=tuple(args.log),
                           factors_by_label={a.label: a.factors for a in plan.arms})
    owned = False
    report_import = None
    try:
        console.__enter__()
        ray, owned = connect(args.address, args.dashboard_host, args.num_cpus, runtime_env)
        console.connected()
        signals.install()  # after ray.init, which sets a SIGTERM handler of its own
        arms = list(plan.arms)
        seeds_by_stage = {STAGE_SWEEP: plan.seeds, STAGE_SEARCH: plan.seeds}
        if spec.search.algorithm == "optuna":
            stages, best, confirm_seeds, missing = optuna_stages(spec, plan, ray_storage, args.resume, signals)
            if best is not None:
                arms += confirm_arms(spec, best)
                print(f"dsdtune: best config by mean {spec.metric}: {best}", flush=True)
            seeds_by_stage[STAGE_CONFIRM] = confirm_seeds
        else:
            stages = {STAGE_SWEEP: sweep_stage(spec, plan, plan.arms, ray_storage, args.resume, signals)}
            missing = unstarted_trials(STAGE_SWEEP, plan, plan.arms, stages[STAGE_SWEEP], ray_storage,
                                       signals.signum is not None)
        interrupted = signals.signum is not None
        from .results import write_results
        if not (args.no_report or interrupted):
            # The report's libraries (scipy.stats, statsmodels, matplotlib) load while the result
            # files are written and Ray shuts down, most of which is waiting for Ray's processes.
            report_import = threading.Thread(target=_import_report, name="dsdtune-report-import", daemon=True)
            report_import.start()
        counts = write_results(results_dir, spec, plan, stages, arms, seeds_by_stage, interrupted=interrupted,
                               missing=missing, provenance=provenance(spec, resolve_study_path(args.study),
                                                                      started_at, inputs=inputs))
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signals.close()
        if owned:
            shutdown()
        console.__exit__(None, None, None)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    if interrupted:
        print(f"dsdtune: {spec.name} stopped by {signal.Signals(signals.signum).name} after "
              f"{time.monotonic() - started:.0f} s: {summary}; partial results in {results_dir}; {hint}",
              file=sys.stderr, flush=True)
        return 128 + signals.signum
    print(f"dsdtune: {spec.name} finished in {time.monotonic() - started:.0f} s: {summary}; "
          f"results in {results_dir}", flush=True)
    code = EXIT_TRIAL_ERRORS if counts.get("error") else EXIT_OK
    if not args.no_report:
        try:
            if report_import is not None:  # a process with one thread can draw its figures in forked ones
                report_import.join()
            from ..report import write_report
            written = write_report(results_dir)
        except Exception as err:  # the results are written: a failing report must not hide them
            print(f"dsdtune: the report failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                  f"the results in {results_dir} are complete - re-run it with: "
                  f"python -m dsdtune.report {shlex.quote(str(results_dir))}", file=sys.stderr, flush=True)
            return EXIT_REPORT_FAILED
        print(f"dsdtune: report written to {written.get('report.md', results_dir / 'report.md')}")
    return code
