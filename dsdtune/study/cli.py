"""`python -m dsdtune.study NAME|PATH`: a study file -> Ray Tune trials -> result files and a report."""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from ..config import SpecError, default_studies_dir, load_study, resolve_study_path
from .plan import confirm_arms, describe_plan, make_plan
from .results import write_results
from .tracking import check_tracking
from .validate import check_control, check_gpu, check_storage, prepare_datasets



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
    parser.add_argument("--fresh", action="store_true", help="discard the study's previous Ray state and start over")
    parser.add_argument("--address", default=None, help="Ray cluster to join ('auto' or host:port); "
                        "default: start a local Ray instance")
    parser.add_argument("--dashboard-host", default="127.0.0.1", help="dashboard bind address (local instance)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray instance")
    parser.add_argument("--results", default="results", help="root folder of the results (default: results/)")
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own tables and logs (default: in ray.log)")
    parser.add_argument("--log", action="append", default=[], metavar="TRACKER",
                        help="also log every trial to mlflow or tensorboard (repeatable; pip install 'dsdtune[tracking]')")
    args = parser.parse_args(argv)
    if not args.list and not args.study:
        parser.error("name a study (see --list)")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.list:
        _list_studies()
        return 0
    try:
        spec = load_study(args.study, args.set)
        results_dir, ray_storage = check_storage(spec, Path(args.results))
        plan = make_plan(spec)
        check_control(spec)
        if args.dry_run:
            print(describe_plan(spec, plan))
            return 0
        check_gpu(spec, args.address)
        check_tracking(args.log)
        state_dir = Path(ray_storage) if "://" not in ray_storage else None
        if state_dir is not None and state_dir.exists() and any(state_dir.iterdir()) and not (args.resume or args.fresh):
            raise SpecError(f"{results_dir} already holds a run of this study: add --resume to continue it, or "
                            f"--fresh to discard its Ray state and start over")
        prepare_datasets(spec, plan)
    except SpecError as err:
        print(f"dsdtune: {err}", file=sys.stderr)
        return 2
    print(describe_plan(spec, plan), flush=True)
    if args.fresh and state_dir is not None and state_dir.exists():
        shutil.rmtree(state_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    from .provenance import now, provenance
    started_at = now()
    from .run import STAGE_CONFIRM, STAGE_PREFIX, STAGE_SEARCH, STAGE_SWEEP, connect, grid_stages, optuna_stages
    from .progress import StudyConsole
    console = StudyConsole(spec, results_dir, verbose=args.verbose, log=tuple(args.log),
                           factors_by_label={a.label: a.factors for a in plan.arms}).__enter__()
    ray, owned = connect(args.address, args.dashboard_host, args.num_cpus)
    console.connected()
    try:
        stages: dict[str, list] = {}
        arms = list(plan.arms)
        seeds_by_stage = {STAGE_PREFIX: plan.seeds, STAGE_SWEEP: plan.seeds, STAGE_SEARCH: plan.seeds}
        if spec.search.algorithm == "optuna":
            prefix, search, confirm, best = optuna_stages(spec, plan, ray_storage, args.resume)
            stages = {STAGE_PREFIX: prefix, STAGE_SEARCH: search, STAGE_CONFIRM: confirm}
            if best is not None:
                arms += confirm_arms(spec, best)
            if spec.confirm:
                seeds_by_stage[STAGE_CONFIRM] = list(range(spec.confirm.first_seed,
                                                           spec.confirm.first_seed + spec.confirm.seeds))
            if best is not None:
                print(f"dsdtune: best config by mean {spec.metric}: {best}", flush=True)
        else:
            prefix, sweep = grid_stages(spec, plan, plan.arms, ray_storage, args.resume, STAGE_SWEEP, STAGE_PREFIX)
            stages = {STAGE_PREFIX: prefix, STAGE_SWEEP: sweep}
        counts = write_results(results_dir, spec, plan, stages, arms, seeds_by_stage,
                               provenance=provenance(spec, resolve_study_path(args.study), started_at))
    finally:
        if owned:
            ray.shutdown()
        console.__exit__(None, None, None)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"dsdtune: {spec.name} finished in {time.monotonic() - started:.0f} s: {summary}; "
          f"results in {results_dir}", flush=True)
    if not args.no_report:
        try:
            from ..report import write_report
        except ImportError:
            write_report = None
        if write_report is not None:
            written = write_report(results_dir)
            print(f"dsdtune: report written to {written.get('report.md', results_dir / 'report.md')}")
    return 1 if counts.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
