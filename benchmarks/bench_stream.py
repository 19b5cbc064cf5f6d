"""Streaming benchmark: a training epoch through the DataLoader path over the same epoch from tensors.

The same CIFAR-sized data (5,000 training images 3x32x32 after the validation split, from the
`synthetic` dataset) and the same small conv net, trained one epoch at a time (batch 128, SGD)
either from tensors (index slicing, the default path) or streamed (`stream: true`: a DataLoader
over per-sample items, with 0 or 2 loader workers). Both paths give bit-identical batches in the
same order (tests/test_streaming.py), so the ratio is the loader's overhead alone. Goal with
workers: <= 1.3.

Rounds are interleaved (tensor, stream-0, stream-2, then reversed in the next round) after a
warm-up round (which also starts the persistent workers); each figure is the median over rounds
of the ratio within a round, with the quartiles. Times are wall-clock: the loader's work happens
partly in other processes, which the main process's CPU time would not see. The training
process uses one thread (`--threads`), as a Ray trial with `resources.cpu: 1` does.

Usage: `python benchmarks/bench_stream.py [--rounds 5] [--quick]`; the last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from dsdtune.data import load_dataset
from dsdtune.training import train_batches

GOAL_WITH_WORKERS = 1.3
DATA = {"num_train": 5556, "num_test": 100, "input_shape": [3, 32, 32], "num_classes": 10}  # 5,000 after val


def small_cnn(num_classes: int = 10, width: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    torch.set_num_threads(args.threads)

    paths = {"tensor": load_dataset("synthetic", **DATA),
             "stream_0": load_dataset("synthetic", stream=True, loader_workers=0, **DATA),
             "stream_2": load_dataset("synthetic", stream=True, loader_workers=2, **DATA)}
    assert paths["tensor"].num_train == 5000
    torch.manual_seed(0)
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def epoch(name: str, seed: int) -> float:
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        train_batches(model, paths[name].train_batches(128, generator), optimizer)
        return time.perf_counter() - start

    names = list(paths)
    for name in names:  # warm-up: allocator, persistent workers started
        epoch(name, 0)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(epoch(name, r + 1))  # the same data order for every path of a round
        print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names), flush=True)

    ratios = {}
    for name in ("stream_0", "stream_2"):
        per_round = [s / t for s, t in zip(times[name], times["tensor"])]
        quartiles = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else [per_round[0]] * 3
        ratios[f"{name}_over_tensor"] = round(statistics.median(per_round), 3)
        print(f"{name} epoch / tensor epoch: median {statistics.median(per_round):.3f} "
              f"(quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}) over {rounds} rounds")
    verdict = "met" if ratios["stream_2_over_tensor"] <= GOAL_WITH_WORKERS else "missed"
    print(f"goal stream_2 <= {GOAL_WITH_WORKERS}: {verdict}")
    print(json.dumps({**ratios, "goal_with_workers": GOAL_WITH_WORKERS, "rounds": rounds,
                      "threads": args.threads, "train_images": 5000}))


if __name__ == "__main__":
    main()
