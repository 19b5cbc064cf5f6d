"""Epoch-time benchmark: what a sparse phase and dsdtune's loop cost, as ratios from one run.

(a) sparse-phase epoch / dense-phase epoch through the real `Pipeline`: flows "DS" and "DD" from
    the same seed train the same first D phase, then one starts S at sparsity 0.5 and the other a
    second D phase; `Pipeline._train_one_epoch` of that phase is timed, both as the pure training
    epoch (evaluation stubbed out) and as the full epoch the pipeline runs (training + val/test
    evaluation + measured sparsity). Goal <= 1.05.
(b) dsdtune's training epoch / a minimal hand-written PyTorch loop doing the same math on the same
    tensors (same model, SGD settings and batches from torch.randperm; the sparse loop masks the
    gradients with a plain per-tensor mul_ before each step), dense and sparse.
    Goal <= 1.05. Before timing, one epoch of each loop is run from the same state and the same
    data order, and the resulting weights are compared, so (b) provably times the same math.

The measurements of one round are interleaved (A, B, C, ... then reversed in the next round, after
a warm-up); every ratio is the median over rounds of the ratio within a round, so slow drifts of a
shared machine cancel. Usage: `python benchmarks/bench_epoch.py [--quick] [--device cpu|cuda]`.
The last line printed is one line of JSON with the ratios.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from dsdtune.data import Dataset, load_dataset
from dsdtune.pipeline import Pipeline

GOAL = 1.05
SPARSITY = 0.5
LR = 0.01  # the same LR in both phases: only the masking differs between D and S

# name -> (task section of the run spec, rounds for a full run, rounds for --quick)
CASES: dict[str, tuple[dict, int, int]] = {
    # The default study's task: MNIST-1D (4000 samples, 3600 after the validation split), MLP 256-256.
    "mlp_mnist1d": ({"dataset": "mnist1d", "model": "mlp", "batch_size": 128}, 151, 21),
    # ResNet-20 on a few hundred synthetic CIFAR-shaped images (288 train, 32 val, 128 test).
    "resnet20_synthetic": ({"dataset": "synthetic", "model": "resnet20", "batch_size": 128,
                            "dataset_args": {"input_shape": [3, 32, 32], "num_train": 320, "num_test": 128,
                                             "num_classes": 10}}, 21, 5),
}


def run_spec(task: dict, device: str, flow: str) -> dict:
    # Phase 1 is the one timed; its epoch count only has to exceed what the benchmark runs.
    return {"task": {**task, "device": device},
            "pipeline": {"flow": flow, "epochs": [1, 1_000_000], "lr": [LR, LR], "sparsity": SPARSITY},
            "seed": 0}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HandWritten:
    """The plainest PyTorch loop for the same epoch: randperm, index, forward, backward, SGD step."""

    def __init__(self, pipe: Pipeline, sparse: bool, seed: int):
        # Same model, weights, optimizer settings and momentum buffers as the pipeline right now.
        names = dict(pipe.model.named_parameters())
        self.model = copy.deepcopy(pipe.model)
        group = pipe.optimizer.param_groups[0]
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=group["lr"], momentum=group["momentum"],
                                         weight_decay=group["weight_decay"])
        for name, param in self.model.named_parameters():
            buffer = pipe.optimizer.state.get(names[name], {}).get("momentum_buffer")
            if buffer is not None:
                self.optimizer.state[param]["momentum_buffer"] = buffer.clone()
        own = dict(self.model.named_parameters())
        self.pairs = [(own[n], m.clone()) for n, m in pipe.masks.items()] if sparse else []
        self.x, self.y = pipe.data.train_x, pipe.data.train_y
        self.batch_size = pipe.spec.task.batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def epoch(self) -> float:
        model, optimizer, x, y = self.model, self.optimizer, self.x, self.y
        model.train()
        n = x.shape[0]
        order = torch.randperm(n, generator=self.generator).to(x.device)
        total = torch.zeros((), device=x.device)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            xb, yb = x[idx], y[idx]
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for param, mask in self.pairs:
                param.grad.mul_(mask)
            optimizer.step()  # masked weights and momentum are 0, masked gradients 0: they stay 0
            total += loss.detach() * yb.shape[0]
        return float(total) / n


def pipeline_epoch(pipe: Pipeline, with_eval: bool) -> Callable[[], None]:
    """One epoch through the pipeline's own `_train_one_epoch` (its hooks, its LR setting).

    Without eval, the evaluation and sparsity measurement are stubbed out on the instance for
    the call, so what is timed is exactly the pipeline's training path.
    """
    phase = pipe.phases[pipe.phase_index]

    def run() -> None:
        if not with_eval:
            pipe.evaluate = lambda: {}
            pipe.measured_sparsity = lambda: 0.0
        try:
            metrics = pipe._train_one_epoch(phase)
        finally:
            pipe.__dict__.pop("evaluate", None)
            pipe.__dict__.pop("measured_sparsity", None)
        if pipe.status != "running":
            raise RuntimeError(f"benchmark run diverged: {metrics}")

    return run


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.state_dict().values(), b.state_dict().values())
               if p.is_floating_point())


def prepare(task: dict, device: torch.device) -> tuple[dict[str, Callable[[], None]], dict]:
    data: Dataset = load_dataset(task["dataset"], device=device, **task.get("dataset_args", {}))
    # Two pipelines with the same seed, trained through the same first D phase (same weights, and
    # the same data order in phase 1); then one starts a second D phase, the other an S phase.
    pipes = {}
    for flow in ("DD", "DS"):
        pipe = Pipeline(run_spec(task, device.type, flow), dataset=data, device=device)
        pipe.run(stop_after_phase=0)
        pipe._start_phase(pipe.phases[1])  # DS: prunes to SPARSITY, masks weights and momentum
        pipes[flow] = pipe
    dense, sparse = pipes["DD"], pipes["DS"]
    info = {"params": sum(p.numel() for p in dense.model.parameters()),
            "train": data.train_x.shape[0], "steps": -(-data.train_x.shape[0] // task["batch_size"]),
            "sparsity": round(sparse.measured_sparsity(), 4)}

    # Same-math check: one epoch of each loop from the same state and data order.
    for label, pipe in (("dense", dense), ("sparse", sparse)):
        hand = HandWritten(pipe, sparse=pipe is sparse, seed=0)
        hand.generator.set_state(pipe.data_generator.get_state())
        pipeline_epoch(pipe, with_eval=False)()
        hand.epoch()
        info[f"diff_{label}"] = max_difference(pipe.model, hand.model)
        info[f"hand_{label}"] = hand

    # In this order every pair that forms a ratio is measured back to back.
    runs = {
        "hand D": info.pop("hand_dense").epoch,
        "D train": pipeline_epoch(dense, with_eval=False),
        "S train": pipeline_epoch(sparse, with_eval=False),
        "hand S": info.pop("hand_sparse").epoch,
        "S full": pipeline_epoch(sparse, with_eval=True),
        "D full": pipeline_epoch(dense, with_eval=True),
    }
    return runs, info


# ratio name -> (numerator run, denominator run)
RATIOS = {
    "sparse/dense, train epoch": ("S train", "D train"),
    "sparse/dense, full epoch (train + eval)": ("S full", "D full"),
    "dsdtune/hand-written, dense": ("D train", "hand D"),
    "dsdtune/hand-written, sparse": ("S train", "hand S"),
}


def measure(runs: dict[str, Callable[[], None]], rounds: int, warmup: int,
            device: torch.device) -> dict[str, dict[str, list[float]]]:
    """Times per run and clock ("wall": perf_counter, "cpu": this process's CPU time)."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    times: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    for r in range(rounds):
        # Alternate the order so no run always follows the same neighbour.
        for name in (names if r % 2 == 0 else names[::-1]):
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            runs[name]()
            synchronize(device)
            times["cpu"][name].append(time.process_time() - cpu)
            times["wall"][name].append(time.perf_counter() - wall)
    return times


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 4:
        return min(values), statistics.median(values), max(values)
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, q2, q3


def timing_arguments(description: str, cases: list[str]) -> argparse.ArgumentParser:
    """The options every epoch-timing benchmark takes (bench_epoch.py, bench_methods.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (noisier)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: what Ray gives a trial with resources.cpu 1; "
                             "0 keeps torch's default)")
    parser.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                        help="clock the verdict and the JSON use (auto: process CPU time on cpu, which a "
                             "shared machine's descheduling does not inflate; wall time on cuda)")
    parser.add_argument("--cases", nargs="+", choices=cases, default=cases)
    return parser


def timing_setup(args: argparse.Namespace) -> Optional[tuple[torch.device, str, str]]:
    """(device, clock, where it runs) for the parsed options; None (after one line) without the GPU asked for."""
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no GPU is visible; run with --device cpu", file=sys.stderr)
        return None
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = args.clock if args.clock != "auto" else ("cpu" if device.type == "cpu" else "wall")
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"cpu, {torch.get_num_threads()} thread(s)")
    return device, clock, where


def main(argv: Optional[list[str]] = None) -> int:
    args = timing_arguments(__doc__.split("\n")[0], list(CASES)).parse_args(argv)
    setup = timing_setup(args)
    if setup is None:
        return 2
    device, clock, where = setup
    print(f"bench_epoch: torch {torch.__version__}, {where}, sparsity {SPARSITY}, "
          f"{'quick' if args.quick else 'full'} run; verdict on the {clock} clock")

    sparse_over_dense: dict[str, float] = {}
    sparse_over_dense_full: dict[str, float] = {}
    over_handwritten: dict[str, dict[str, float]] = {}
    all_ok = True
    for name in args.cases:
        task, rounds, quick_rounds = CASES[name]
        rounds = quick_rounds if args.quick else rounds
        runs, info = prepare(task, device)
        times = measure(runs, rounds, warmup=1 if args.quick else 2, device=device)
        print(f"\n{name}: {info['params']} parameters, {info['train']} train samples, {info['steps']} "
              f"steps/epoch, measured sparsity in S {info['sparsity']}, {rounds} interleaved rounds")
        for label in ("dense", "sparse"):
            diff = info[f"diff_{label}"]
            print(f"  same-math check ({label}): max |w_dsdtune - w_hand| after one epoch = {diff:.3g}"
                  + (" (bit-identical)" if diff == 0 else ""))
        print(f"  {'epoch':<8} {'wall ms':>9} {'cpu ms':>9}   (medians)")
        for run_name in runs:
            print(f"  {run_name:<8} {1000 * statistics.median(times['wall'][run_name]):>9.1f} "
                  f"{1000 * statistics.median(times['cpu'][run_name]):>9.1f}")
        print(f"  {'ratio (median of per-round ratios)':<38} {'wall':>6} {'cpu':>6} {'q1':>6} {'q3':>6}"
              f"  ({clock} clock; goal <= {GOAL})")
        ratios = {}
        for ratio_name, (num, den) in RATIOS.items():
            per_clock = {}
            for c in ("wall", "cpu"):
                per_clock[c] = [a / b for a, b in zip(times[c][num], times[c][den])]
            q1, q2, q3 = quartiles(per_clock[clock])
            ratios[ratio_name] = round(q2, 3)
            ok = q2 <= GOAL
            all_ok &= ok
            print(f"  {ratio_name:<38} {statistics.median(per_clock['wall']):>6.3f} "
                  f"{statistics.median(per_clock['cpu']):>6.3f} {q1:>6.3f} {q3:>6.3f}  {'ok' if ok else 'MISSED'}")
        sparse_over_dense[name] = ratios["sparse/dense, train epoch"]
        sparse_over_dense_full[name] = ratios["sparse/dense, full epoch (train + eval)"]
        over_handwritten[name] = {"dense": ratios["dsdtune/hand-written, dense"],
                                  "sparse": ratios["dsdtune/hand-written, sparse"]}
    result = {"sparse_over_dense": sparse_over_dense, "sparse_over_dense_full_epoch": sparse_over_dense_full,
              "dsdtune_over_handwritten": over_handwritten, "clock": clock, "device": where, "goal": GOAL,
              "all_within_goal": all_ok}
    print()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
