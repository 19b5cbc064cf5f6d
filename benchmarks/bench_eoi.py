"""EOI generation time relative to torch.nn.init.orthogonal_ (QR), measured side by side in one run.

For each square size and density the two are timed alternately (EOI, then orthogonal_, repeated),
so load on a shared machine hits both alike; the figure reported is the ratio of the medians.
The last line printed is JSON: {"eoi_over_orthogonal": {"256@0.1": ratio, ...}, ...}.

    python benchmarks/bench_eoi.py                      # 256 .. 4096 at densities 0.1 and 0.5
    python benchmarks/bench_eoi.py --sizes 256 512      # quick
    python benchmarks/bench_eoi.py --threads 1          # steadier on a shared machine
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from dsdtune.sparsity.orthogonal import eoi_matrix, orthogonality_error


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs per cell (sizes >= 4096: 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for both methods (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"device: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads (CPU)")
    # Warm-up: first calls pay for lazy initialisation (LAPACK, allocator), not for the algorithm.
    eoi_matrix(64, 64, 0.5, torch.Generator().manual_seed(0))
    torch.nn.init.orthogonal_(torch.empty(64, 64))

    header = f"{'size':>6} {'density':>8} {'eoi_s':>9} {'orth_s':>9} {'ratio':>7} {'achieved':>9} {'orth_err':>9}"
    print(header)
    print("-" * len(header))
    ratios: dict[str, float] = {}
    for size in args.sizes:
        repeats = 1 if size >= 4096 else args.repeats
        target = torch.empty(size, size)
        for density in args.densities:
            eoi_times, orth_times = [], []
            weight = None
            for rep in range(repeats):
                generator = torch.Generator().manual_seed(rep)
                start = time.perf_counter()
                weight = eoi_matrix(size, size, density, generator)
                eoi_times.append(time.perf_counter() - start)
                orth_times.append(timed(lambda: torch.nn.init.orthogonal_(target)))
            eoi_s, orth_s = statistics.median(eoi_times), statistics.median(orth_times)
            ratio = eoi_s / orth_s
            ratios[f"{size}@{density:g}"] = round(ratio, 3)
            achieved = float((weight != 0).double().mean())
            # The float64 Gram check costs as much as the generation at 4096; skip it there.
            error = f"{orthogonality_error(weight):9.1e}" if size <= 2048 else f"{'-':>9}"
            print(f"{size:>6} {density:>8g} {eoi_s:>9.4f} {orth_s:>9.4f} {ratio:>7.3f} {achieved:>9.4f} {error}",
                  flush=True)
    print(json.dumps({"eoi_over_orthogonal": ratios, "device": cpu_name(), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
