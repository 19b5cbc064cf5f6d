"""Study runner overhead: a sweep through Ray vs the same pipelines run in-process.

Every side does the same work (each shared prefix trained once, then every arm x seed restored from
its prefix), so the difference is what Ray costs: start-up, actors, reports, checkpoints. Ray runs
with one CPU so that both sides are serial (the per-trial overhead is then a plain difference), and
again with all CPUs. The machine's limit is the same work in as many plain processes as CPUs (one
thread each, the seeds dealt out among them, nothing else running): `ray_over_parallel_limit` is
the study's wall time through Ray with all CPUs over that. Last line: JSON.

    python benchmarks/bench_study.py            # sparsity_sweep with 2 seeds and short phases
    python benchmarks/bench_study.py --seeds 8 --epochs 30 15 15
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="sparsity_sweep")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 5, 5])
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    sets = overrides(args)
    plan = make_plan(load_study(args.study, sets))

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
    print(json.dumps({
        "ray_1cpu_over_in_process": round(ray1_s / local_s, 3),
        f"ray_{cpus}cpu_over_in_process": round(rayn_s / local_s, 3),
        "ray_overhead_per_trial_s": round(overhead, 3),
        "epochs_shared_over_unshared": round(plan.epochs_with_sharing / plan.epochs_without_sharing, 3),
        "ray_over_parallel_limit": round(rayn_s / limit_s, 3),
    }))


if __name__ == "__main__":
    main()
