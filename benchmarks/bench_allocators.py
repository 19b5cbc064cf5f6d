"""What a sparse init costs: each density allocator (and each weight scheme) on ResNet-20, measured as
a ratio to one training epoch of the same model, side by side in one run. Last line: JSON.

The epoch is a dense ResNet-20 epoch on synthetic 32x32 images (`--train` samples, batch 128), the
unit a user pays anyway; SNIP/GraSP score on 10 samples per class, SynFlow runs its 100 rounds.

    python benchmarks/bench_allocators.py            # 1 thread, 1024 training images
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dsdtune.config import InitSpec
from dsdtune.data import load_dataset
from dsdtune.models import build_model
from dsdtune.sparsity.density import allocate
from dsdtune.sparsity.init import initialize, scoring_batch
from dsdtune.sparsity.masks import prunable_weights
from dsdtune.training import make_optimizer, train_epoch

ALLOCATORS = ["uniform", "erk", "snip", "grasp", "synflow"]
SCHEMES = ["base", "eoi", "ai"]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--density", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("synthetic", num_train=args.train, num_test=64, input_shape=(3, 32, 32), num_classes=10)
    torch.manual_seed(0)

    def fresh():
        model = build_model("resnet20", data.input_shape, data.num_classes)
        return model, prunable_weights(model, exclude_first=False)

    def epoch():
        model, _ = fresh()
        optimizer = make_optimizer(model.parameters(), "sgd", 0.1, 0.9, False, 5e-4)
        train_epoch(model, data.train_x, data.train_y, optimizer, 128, torch.Generator().manual_seed(0))

    batch = scoring_batch(data.train_x, data.train_y, data.num_classes, 10, torch.Generator().manual_seed(0))

    def allocator(kind):
        def run():
            model, prunable = fresh()
            options = {"input_shape": data.input_shape} if kind == "synflow" else {}
            allocate(kind, model, list(prunable), args.density, batch=batch, **options)
        return run

    def scheme(weights):
        def run():
            model, prunable = fresh()
            spec = InitSpec(density="erk", weights=weights, init_density=args.density)
            initialize(model, prunable, spec, data, seed=0)
        return run

    jobs = {"epoch": epoch, **{f"alloc:{k}": allocator(k) for k in ALLOCATORS},
            **{f"init:erk+{w}": scheme(w) for w in SCHEMES}}
    for job in jobs.values():  # warm-up
        job()
    samples: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(args.repeats):  # interleaved: each round times every job once
        for name, job in jobs.items():
            samples[name].append(timed(job))
    ratios = {}
    epoch_times = samples["epoch"]
    print(f"resnet20 on synthetic 32x32, {args.train} training images, density {args.density}, "
          f"{args.threads} thread(s), {args.repeats} interleaved rounds")
    print(f"{'what':22s} {'/ one epoch':>12s}")
    for name in jobs:
        if name == "epoch":
            continue
        ratio = statistics.median(t / e for t, e in zip(samples[name], epoch_times))
        ratios[name] = round(ratio, 3)
        print(f"{name:22s} {ratio:12.3f}")
    print(json.dumps({"time_over_one_epoch": ratios, "model": "resnet20", "train_images": args.train,
                      "threads": args.threads}))


if __name__ == "__main__":
    main()
