"""Study runner overhead: a sweep through Ray vs the same pipelines run in-process.

Every side does the same work (each shared prefix trained once, then every arm x seed restored from
its prefix), so the difference is what Ray costs: start-up, actors, reports, checkpoints. Ray runs
with one CPU so that both sides are serial (the per-trial overhead is then a plain difference), and
again with all CPUs. The machine's limit is the same work in as many plain processes as CPUs (one
thread each, the seeds dealt out among them, nothing else running): `ray_over_parallel_limit` is
the study's wall time through Ray with all CPUs over that.

The whole command as a user times it: `python -m dsdtune.study STUDY` run from a shell (a fresh
interpreter: imports, validation, Ray's start, the sweep, the result files, the report, Ray's
shutdown), its wall time over the same limit measured beside it (`whole_command_over_limit`; the
rounds alternate limit and command); and `python -m dsdtune.report` on the results it wrote, over
a fresh interpreter importing only the libraries the report needs (`report_over_imports`; rounds
alternate the two). Last line: JSON.

    python benchmarks/bench_study.py            # sparsity_sweep with 2 seeds and short phases
    python benchmarks/bench_study.py --seeds 8 --epochs 30 15 15    # the default study's size
    python benchmarks/bench_study.py --seeds 8 --epochs 30 15 15 --only whole --whole-rounds 3
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

import dsdtune
from bench_epoch import quartiles  # the same folder
from dsdtune.config import build_run_spec, load_study
from dsdtune.pipeline import Pipeline
from dsdtune.study import main as study_main, make_plan


def overrides(args) -> list[str]:
    return [f"seeds={args.seeds}", f"pipeline.epochs=[{', '.join(map(str, args.epochs))}]"]


def run_in_process(study: str, sets: list[str], seeds: Optional[list[int]] = None) -> tuple[float, int]:
    """Prefixes once, then every trial from its prefix (of `seeds`, default all); (seconds, epochs trained)."""
    spec = load_study(study, sets)
    plan = make_plan(spec)
    seeds = plan.seeds if seeds is None else seeds
    torch.set_num_threads(1)  # as a Ray trial with cpu: 1
    started = time.perf_counter()
    epochs = 0
    states = {}
    for pid, (label, seed) in plan.prefixes.items():
        if seed not in seeds:
            continue
        arm = next(a for a in plan.arms if a.label == label)
        pipe = Pipeline(build_run_spec(spec.base_run(), arm.assign, seed))
        pipe.run(stop_after_phase=plan.prefix_length - 1)
        states[pid] = pipe.state_dict()
        epochs += pipe.global_epoch
    for arm in plan.arms:
        for seed in seeds:
            pipe = Pipeline(build_run_spec(spec.base_run(), arm.assign, seed))
            state = states.get(plan.trial_prefix.get((arm.label, seed)))
            if state is not None:
                pipe.load_state_dict(state)
            before = pipe.global_epoch
            pipe.run()
            epochs += pipe.global_epoch - before
    return time.perf_counter() - started, epochs


def _worker(args: tuple) -> tuple[float, int]:
    return run_in_process(*args)


def run_parallel_limit(study: str, sets: list[str], processes: int) -> tuple[float, int]:
    """The same work in `processes` plain processes, seeds dealt round-robin: (wall seconds, epochs)."""
    seeds = make_plan(load_study(study, sets)).seeds
    shares = [seeds[i::processes] for i in range(processes)]
    context = multiprocessing.get_context("spawn")  # fresh interpreters, as Ray's workers are
    with context.Pool(processes) as pool:
        pool.map(_worker, [(study, sets, []) for _ in range(processes)])  # start-up and imports, not timed
        started = time.perf_counter()
        done = pool.map(_worker, [(study, sets, share) for share in shares])
        return time.perf_counter() - started, sum(epochs for _, epochs in done)


def run_through_ray(study: str, sets: list[str], num_cpus: int) -> tuple[float, int, int]:
    """(seconds including Ray start/stop, epochs trained, trials) of `python -m dsdtune.study`."""
    with tempfile.TemporaryDirectory() as results:
        args = [study, "--results", results, "--no-report", "--num-cpus", str(num_cpus)]
        for s in sets:
            args += ["--set", s]
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            code = study_main(args)
        seconds = time.perf_counter() - started
        if code != 0:
            sys.exit(f"the study failed with exit code {code}")
        name = load_study(study, sets).name
        trials = pd.read_csv(Path(results) / name / "trials.csv")
        return seconds, int(trials.epochs_trained.sum()), int((trials.stage != "prefix").sum())


# What `python -m dsdtune.report` cannot do without: the libraries it analyzes, plots and reads the
# study's spec with (a fresh interpreter importing them is the floor of the report's wall time).
REPORT_LIBRARIES = ("numpy", "pandas", "scipy.stats", "statsmodels.stats.multitest", "statsmodels.stats.power",
                    "statsmodels.stats.weightstats", "matplotlib.figure", "matplotlib.backends.backend_agg",
                    "pydantic", "yaml")


# The ratios the goals were set against (a 2-core machine, the default study's size), printed beside
# today's: the command took 56-59 s for a 34 s limit, the report 7.7 s for 3.6 s of imports.
OLD_RATIOS = {"whole_command_over_limit": "1.66-1.74", "report_over_imports": "2.1"}

ROOT = Path(dsdtune.__file__).resolve().parents[1]  # the dsdtune this benchmark imports


def _env() -> dict:
    """The environment of a command: this dsdtune first on the path, as the benchmark imports it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_command(args: list[str]) -> float:
    """Wall seconds of `python ARGS` in a fresh interpreter, from its start to its exit (as a shell times it).

    It runs in the folder above the dsdtune this benchmark imports: `python -m` puts the working
    folder first on the path, so that is the dsdtune the command runs."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *args], env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"python {' '.join(args)} failed with exit code {done.returncode}: {done.stderr.strip()[-2000:]}")
    return seconds


def whole_command(study: str, sets: list[str], results: str) -> list[str]:
    args = ["-m", "dsdtune.study", study, "--results", results]
    for s in sets:
        args += ["--set", s]
    return args


def measure_whole(study: str, sets: list[str], rounds: int, report_rounds: int) -> dict:
    """The command's wall time over the limit, and the report's over its libraries' imports (medians
    of per-round ratios; the order within a round alternates)."""
    cpus = os.cpu_count() or 1
    name = load_study(study, sets).name
    command_s, limit_s, over_limit = [], [], []
    report_s, imports_s, over_imports = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            results = os.path.join(tmp, f"round{r}")
            pair = {}
            for side in (("limit", "command") if r % 2 == 0 else ("command", "limit")):
                if side == "limit":
                    pair[side] = run_parallel_limit(study, sets, cpus)[0]
                else:
                    pair[side] = run_command(whole_command(study, sets, results))
            command_s.append(pair["command"])
            limit_s.append(pair["limit"])
            over_limit.append(pair["command"] / pair["limit"])
        folder = os.path.join(tmp, f"round{rounds - 1}", name)
        imports = ["-c", "import " + ", ".join(REPORT_LIBRARIES)]
        for r in range(report_rounds + 1):  # the first round warms the file cache, untimed
            pair = {}
            for side in (("imports", "report") if r % 2 == 0 else ("report", "imports")):
                if side == "imports":
                    pair[side] = run_command(imports)
                else:
                    pair[side] = run_command(["-m", "dsdtune.report", folder, "--out", os.path.join(tmp, "report")])
            if r:
                report_s.append(pair["report"])
                imports_s.append(pair["imports"])
                over_imports.append(pair["report"] / pair["imports"])
    return {"cpus": cpus, "command_s": command_s, "limit_s": limit_s, "over_limit": over_limit,
            "report_s": report_s, "imports_s": imports_s, "over_imports": over_imports}


def print_whole(study: str, whole: dict) -> dict:
    print(f"whole command: python -m dsdtune.study {study} from a fresh interpreter (report included) "
          f"over the limit ({whole['cpus']} plain processes), {len(whole['over_limit'])} round(s)")
    print(f"  command s (median) {statistics.median(whole['command_s']):.1f}, limit s "
          f"{statistics.median(whole['limit_s']):.1f}; ratio per round: "
          f"{', '.join(f'{x:.3f}' for x in whole['over_limit'])}")
    q1, q2, q3 = quartiles(whole["over_limit"])
    print(f"  whole_command_over_limit {q2:.3f} (quartiles {q1:.3f} .. {q3:.3f}; goal <= 1.3, "
          f"{OLD_RATIOS['whole_command_over_limit']} when it was set)")
    q1, q2r, q3 = quartiles(whole["over_imports"])
    print(f"report: python -m dsdtune.report over importing {', '.join(REPORT_LIBRARIES)}; "
          f"{len(whole['over_imports'])} rounds")
    print(f"  report s (median) {statistics.median(whole['report_s']):.2f}, imports s "
          f"{statistics.median(whole['imports_s']):.2f}")
    print(f"  report_over_imports {q2r:.3f} (quartiles {q1:.3f} .. {q3:.3f}; goal <= 1.5, "
          f"{OLD_RATIOS['report_over_imports']} when it was set)")
    return {"whole_command_over_limit": round(q2, 3), "report_over_imports": round(q2r, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="sparsity_sweep")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 5, 5])
    parser.add_argument("--only", choices=("stage", "whole"), default=None,
                        help="stage: the sweep in-process and through Ray; whole: the whole command and the report")
    parser.add_argument("--whole-rounds", type=int, default=1, help="rounds of (limit, whole command)")
    parser.add_argument("--report-rounds", type=int, default=5, help="rounds of (report, its imports)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    sets = overrides(args)
    plan = make_plan(load_study(args.study, sets))
    figures = {}

    if args.only != "whole":
        figures.update(measure_stage(args, sets, plan))
    if args.only != "stage":
        figures.update(print_whole(args.study, measure_whole(args.study, sets, args.whole_rounds,
                                                             args.report_rounds)))
    print(json.dumps(figures))


def measure_stage(args, sets: list[str], plan) -> dict:
    local_s, local_epochs = run_in_process(args.study, sets)
    ray1_s, ray1_epochs, trials = run_through_ray(args.study, sets, 1)
    # epochs_trained counts a trial's whole flow; the shared prefix was trained once, by one trial of each
    sharing = sum(1 for pid in plan.trial_prefix.values() if pid in plan.prefixes)
    ray1_epochs -= plan.prefix_epochs * (sharing - len(plan.prefixes))
    cpus = os.cpu_count() or 1
    rayn_s, _, _ = run_through_ray(args.study, sets, cpus)
    limit_s, limit_epochs = run_parallel_limit(args.study, sets, cpus)

    rows = [
        ("in-process, serial (reference)", local_s, local_epochs),
        ("Ray, 1 CPU (serial trials)", ray1_s, ray1_epochs),
        (f"Ray, {cpus} CPUs", rayn_s, ray1_epochs),
        (f"{cpus} plain processes (the limit)", limit_s, limit_epochs),
    ]
    print(f"study {args.study}: {len(plan.arms)} arms x {args.seeds} seeds = {trials} trials, "
          f"{len(plan.prefixes)} shared prefixes, epochs {args.epochs}")
    print(f"{'run':34s} {'wall s':>9s} {'epochs':>7s} {'/ reference':>12s}")
    for name, seconds, epochs in rows:
        print(f"{name:34s} {seconds:9.1f} {epochs:7d} {seconds / local_s:12.2f}")
    overhead = (ray1_s - local_s) / trials
    print(f"Ray overhead per trial (1 CPU, serial): {overhead:.2f} s, including Ray's start and shutdown")
    print(f"epochs trained with shared prefixes: {plan.epochs_with_sharing}, without: {plan.epochs_without_sharing} "
          f"(measured through Ray: {ray1_epochs})")
    return {
        "ray_1cpu_over_in_process": round(ray1_s / local_s, 3),
        f"ray_{cpus}cpu_over_in_process": round(rayn_s / local_s, 3),
        "ray_overhead_per_trial_s": round(overhead, 3),
        "epochs_shared_over_unshared": round(plan.epochs_with_sharing / plan.epochs_without_sharing, 3),
        "ray_over_parallel_limit": round(rayn_s / limit_s, 3),
    }


if __name__ == "__main__":
    main()
