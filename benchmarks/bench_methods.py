"""What each sparse-training method's training costs in wall time, over a dense phase, measured side by side.

For every kind X in S (fixed mask), M (gradual magnitude pruning), R (RigL), E (SET) and L (lottery
ticket), flows "DD" and "DX" from the same seed train the same first D phase; then each starts its
second phase and the benchmark times blocks of that phase's training steps through the real
`Pipeline` (evaluation stubbed out, as in bench_epoch.py), interleaved with the dense phase's blocks.
A block holds at least `every_steps` (100) steps, so it includes the kinds' periodic work (M's
mask recomputation, R's dense-gradient copy and drop/grow, E's random growth) at the rate a study
runs it. The goal is M, E, L <= 1.05 and R <= 1.15 over dense (S for reference).

Cases: the MLP on MNIST-1D (batch 128: 29 steps per epoch, blocks of 4 epochs = 116 steps) and
ResNet-20 on synthetic CIFAR-sized images (3,200 of 3x32x32, batch 32: blocks of one 100-step epoch).
Usage: `python benchmarks/bench_methods.py [--quick] [--device cpu|cuda]`; the last line is JSON.
"""
from __future__ import annotations

import json
import statistics
import sys
from typing import Callable, Optional

import torch

from bench_epoch import measure, pipeline_epoch, quartiles, timing_arguments, timing_setup  # the same folder
from dsdtune.data import load_dataset
from dsdtune.pipeline import Pipeline

EVERY_STEPS = 100
GOALS = {"S": 1.05, "M": 1.05, "E": 1.05, "L": 1.05, "R": 1.15}
SETTINGS = {"gradual": {"every_steps": EVERY_STEPS}, "dst": {"every_steps": EVERY_STEPS}, "rewind": {"step": 0}}

# name -> (task section, epochs per block, rounds, rounds with --quick)
CASES: dict[str, tuple[dict, int, int, int]] = {
    "mlp_mnist1d": ({"dataset": "mnist1d", "model": "mlp", "batch_size": 128}, 4, 15, 5),
    "resnet20_synthetic": ({"dataset": "synthetic", "model": "resnet20", "batch_size": 32,
                            "dataset_args": {"input_shape": [3, 32, 32], "num_train": 3556, "num_test": 64,
                                             "num_classes": 10}}, 1, 5, 2),
}


def run_spec(task: dict, device: str, flow: str) -> dict:
    pipeline = {"flow": flow, "epochs": [1, 1_000_000], "lr": [0.01, 0.01], "sparsity": 0.9, "exclude_first": True}
    for kind, (key, block) in {"M": ("gradual", SETTINGS["gradual"]), "R": ("dst", SETTINGS["dst"]),
                               "E": ("dst", SETTINGS["dst"]), "L": ("rewind", SETTINGS["rewind"])}.items():
        if kind in flow:
            pipeline[key] = block
    return {"task": {**task, "device": device}, "pipeline": pipeline, "seed": 0}


def prepare(task: dict, device: torch.device, epochs_per_block: int) -> tuple[dict[str, Callable[[], None]], dict]:
    data = load_dataset(task["dataset"], device=device, **task.get("dataset_args", {}))
    runs, info = {}, {}
    for kind in ("D", "S", "M", "R", "E", "L"):
        pipe = Pipeline(run_spec(task, device.type, "D" + kind), dataset=data, device=device)
        pipe.run(stop_after_phase=0)
        pipe._start_phase(pipe.phases[1])
        epoch = pipeline_epoch(pipe, with_eval=False)

        def block(epoch=epoch) -> None:
            for _ in range(epochs_per_block):
                epoch()

        runs[kind] = block
        info["steps_per_block"] = epochs_per_block * pipe.steps_per_epoch
    return runs, info


def main(argv: Optional[list[str]] = None) -> int:
    args = timing_arguments(__doc__.split("\n")[0], list(CASES)).parse_args(argv)
    setup = timing_setup(args)
    if setup is None:
        return 2
    device, clock, where = setup
    print(f"bench_methods: torch {torch.__version__}, {where}, sparsity 0.9, every_steps {EVERY_STEPS}; "
          f"verdict on the {clock} clock")
    result: dict[str, dict[str, float]] = {}
    all_ok = True
    for name in args.cases:
        task, epochs_per_block, rounds, quick_rounds = CASES[name]
        rounds = quick_rounds if args.quick else rounds
        runs, info = prepare(task, device, epochs_per_block)
        times = measure(runs, rounds, warmup=1, device=device)
        print(f"\n{name}: blocks of {info['steps_per_block']} steps, {rounds} interleaved rounds")
        print(f"  {'phase':<6} {'wall ms':>9} {'cpu ms':>9}   {'over D (' + clock + ')':>14} {'q1':>6} {'q3':>6}  goal")
        result[name] = {}
        for kind in runs:
            ratios = [a / b for a, b in zip(times[clock][kind], times[clock]["D"])]
            q1, q2, q3 = quartiles(ratios)
            goal = GOALS.get(kind)
            ok = goal is None or q2 <= goal
            all_ok &= ok
            if kind != "D":
                result[name][kind] = round(q2, 3)
            print(f"  {kind:<6} {1000 * statistics.median(times['wall'][kind]):>9.1f} "
                  f"{1000 * statistics.median(times['cpu'][kind]):>9.1f}   {q2:>14.3f} {q1:>6.3f} {q3:>6.3f}  "
                  + (f"<= {goal} {'ok' if ok else 'MISSED'}" if goal else ""))
    print()
    print(json.dumps({"over_dense": result, "every_steps": EVERY_STEPS, "clock": clock, "device": where,
                      "goals": GOALS, "all_within_goal": all_ok}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
