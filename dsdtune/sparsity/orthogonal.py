"""Exact orthogonal initialization (EOI, random Givens rotations) and approximate isometry (AI).

EOI (Nowak et al.) for an n x m weight works in the orientation with rows <= columns (M = max(n, m)),
starts from the rectangular identity and applies random Givens rotations to pairs of columns until
the density reaches the target. A product of rotations applied to the identity is exactly
orthogonal, so W^T W = I (tall/square) or W W^T = I (wide) up to the final cast.

How it is computed (chosen by measurement, see benchmarks/bench_eoi.py):

1. The rotations (column pairs and angles) are drawn from the generator in fixed-size chunks.
2. The support is walked rotation by rotation with each column's support held as a Python int
   bitset over the rows: rotating columns i and j makes both supports the union, and the non-zero
   count grows by popcount(S_i xor S_j) (rows holding exactly one of the two). That is O(n/64)
   word operations per rotation (n = min(rows, cols)) and decides the stopping point at the
   granularity of single rotations: stop at the first rotation whose count reaches the target and
   keep whichever of the last two states is closer (ties go to the state that reaches the
   target). The values never change which entries are non-zero, except on a probability-zero event
   (an angle exactly 0 or an exact cancellation), so the walk needs no arithmetic on values.
3. The kept rotations are applied in float64 (numpy) on the transposed working matrix (a column of
   W is a contiguous row there), scheduled by dependency level: a rotation's level is one more than
   the last level of either of its columns, so rotations of one level touch disjoint columns,
   commute, and are applied in one vectorised gather/rotate/scatter (a few dozen levels for
   thousands of rotations). Each column still sees its rotations in the drawn order, so the result
   equals the one-at-a-time product bit for bit. Cost: O(k n) arithmetic for k rotations on n rows
   plus O(levels) Python calls; the walk itself is ~1 us per rotation.
4. Cast to the requested dtype after multiplying by the gain (float64 keeps float32 orthogonality
   at the rounding level, ~1e-7).

Results are computed on the CPU and returned there; random numbers are drawn on the generator's
device. The lowest representable density is 1/M (the identity); a lower target gets the identity.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

_TWO_PI = 2.0 * math.pi


# --------------------------------------------------------------------------------------------------
# Rotation stream, support walk and application
# --------------------------------------------------------------------------------------------------

def _chunk_size(num_columns: int) -> int:
    """Rotations drawn per chunk; depends on the shape only, so draws are deterministic per seed."""
    return max(1024, 4 * num_columns)


def _rotation_chunks(num_columns: int, generator: torch.Generator) -> Iterator[tuple[list, list, np.ndarray]]:
    """Endless chunks of (first columns, second columns, angles) of uniform random Givens rotations."""
    size = _chunk_size(num_columns)
    device = generator.device
    while True:
        first = torch.randint(0, num_columns, (size,), generator=generator, device=device)
        # Second column uniform over the other M - 1 columns.
        second = torch.randint(0, num_columns - 1, (size,), generator=generator, device=device)
        second = second + (second >= first).to(second.dtype)
        angles = torch.rand(size, generator=generator, device=device, dtype=torch.float64) * _TWO_PI
        yield first.cpu().tolist(), second.cpu().tolist(), angles.cpu().numpy()


class _Walk:
    """Rotations kept so far, their dependency levels and the structural non-zero count."""

    def __init__(self, rows: int, columns: int):
        self.rows = rows
        self.columns = columns
        # Column c of the working matrix (rows x columns) starts with row c only (identity).
        self.support = [1 << c if c < rows else 0 for c in range(columns)]
        self.last_level = [0] * columns
        self.nnz = rows
        self.first: list[int] = []
        self.second: list[int] = []
        self.levels: list[int] = []
        self.angles: list[np.ndarray] = []

    def run(self, chunks: Iterator, num_rotations: Optional[int] = None,
            target_nnz: Optional[float] = None, not_above: bool = False) -> None:
        """Apply exactly `num_rotations`, or rotate until the count reaches `target_nnz`.

        With a target, the last state kept is the closer of the last two, or with `not_above` the
        last one whose count does not exceed the target.
        """
        support, last, levels = self.support, self.last_level, self.levels
        append = levels.append
        nnz = self.nnz
        previous_nnz = nnz
        # With a rotation count, the count is the only stop; with a target, never stop on count.
        stop_count = num_rotations if num_rotations is not None else math.inf
        stop_nnz = target_nnz if num_rotations is None else math.inf
        while len(levels) < stop_count and nnz < stop_nnz:
            firsts, seconds, angles = next(chunks)
            if num_rotations is not None:
                firsts = firsts[:num_rotations - len(levels)]
            done_before = len(levels)
            for a, b in zip(firsts, seconds):
                if nnz >= stop_nnz:
                    break
                x = support[a]
                y = support[b]
                previous_nnz = nnz
                if x != y:
                    # Rows holding exactly one of the two columns gain the other one.
                    nnz += (x ^ y).bit_count()
                    union = x | y
                    support[a] = union
                    support[b] = union
                level_a = last[a]
                level_b = last[b]
                level = (level_a if level_a > level_b else level_b) + 1
                last[a] = level
                last[b] = level
                append(level)
            used = len(levels) - done_before
            self.first.extend(firsts[:used])
            self.second.extend(seconds[:used])
            self.angles.append(angles[:used])
        if num_rotations is None and levels and (
                nnz > target_nnz if not_above else target_nnz - previous_nnz < nnz - target_nnz):
            # The state before the last rotation is closer to the target: drop that rotation.
            # (support/last_level are not used after this, so they are left as they are.)
            levels.pop()
            self.first.pop()
            self.second.pop()
            nnz = previous_nnz
        self.nnz = nnz

    def matrix64(self) -> torch.Tensor:
        """The transposed working matrix (columns x rows) after the kept rotations, in float64."""
        rows, columns = self.rows, self.columns
        out = np.zeros((columns, rows))
        out[np.arange(rows), np.arange(rows)] = 1.0
        count = len(self.levels)
        if count:
            angles = np.concatenate(self.angles)[:count]
            levels = np.asarray(self.levels)
            order = np.argsort(levels, kind="stable")
            bounds = np.searchsorted(levels[order], np.arange(1, int(levels.max()) + 2)).tolist()
            first = np.asarray(self.first)[order]
            second = np.asarray(self.second)[order]
            cos = np.cos(angles)[order][:, None]
            sin = np.sin(angles)[order][:, None]
            # numpy, single-threaded: per level it is a handful of small ops, where numpy's call
            # overhead is a fraction of torch's, and it does not wait on a busy thread pool.
            for start, stop in zip(bounds[:-1], bounds[1:]):
                a, b = first[start:stop], second[start:stop]
                c, s = cos[start:stop], sin[start:stop]
                x = out.take(a, axis=0)
                y = out.take(b, axis=0)
                # (col_i, col_j) <- (cos col_i + sin col_j, -sin col_i + cos col_j)
                out[a] = c * x + s * y
                out[b] = c * y - s * x
        return torch.from_numpy(out)


def _finish(work_t: torch.Tensor, rows: int, cols: int, gain: float, dtype: torch.dtype) -> torch.Tensor:
    """Back to the caller's (rows, cols) orientation, times gain, cast last."""
    # work_t is (M, min) = transpose of the working (min, M) matrix.
    weight = work_t if rows > cols else work_t.t()
    return (weight * gain).to(dtype).contiguous()


def _check_shape(rows: int, cols: int) -> None:
    if rows < 1 or cols < 1:
        raise ValueError(f"EOI needs a positive shape, got ({rows}, {cols})")


def givens_rotations(rows: int, cols: int, num_rotations: int, generator: torch.Generator,
                     gain: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (rows, cols) rectangular identity after exactly `num_rotations` random Givens rotations.

    Rotations act on the columns of the rows <= columns orientation. Uses the same random stream as
    `eoi_matrix`, so `eoi_matrix` with a seed equals this with the same seed and the number of
    rotations EOI kept.
    """
    _check_shape(rows, cols)
    if num_rotations < 0:
        raise ValueError(f"num_rotations must be >= 0, got {num_rotations}")
    small, big = min(rows, cols), max(rows, cols)
    walk = _Walk(small, big)
    if big > 1 and num_rotations > 0:
        walk.run(_rotation_chunks(big, generator), num_rotations=num_rotations)
    return _finish(walk.matrix64(), rows, cols, gain, dtype)


def _eoi_walk(rows: int, cols: int, density: float, generator: torch.Generator, not_above: bool = False) -> _Walk:
    _check_shape(rows, cols)
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    small, big = min(rows, cols), max(rows, cols)
    walk = _Walk(small, big)
    target_nnz = density * small * big
    if big > 1 and target_nnz > small:
        walk.run(_rotation_chunks(big, generator), target_nnz=target_nnz, not_above=not_above)
    return walk


def eoi_matrix(rows: int, cols: int, density: float, generator: torch.Generator,
               gain: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Exactly orthogonal (rows, cols) matrix with density closest to `density` (EOI).

    W^T W = gain^2 I when rows >= cols, W W^T = gain^2 I when rows <= cols. The density is within half
    of the last rotation's step (<= 1/(2 max(rows, cols))) of the target; it is never below
    1/max(rows, cols): a lower target returns the identity. Deterministic for a generator state.
    """
    walk = _eoi_walk(rows, cols, density, generator)
    return _finish(walk.matrix64(), rows, cols, gain, dtype)


# --------------------------------------------------------------------------------------------------
# Convolutions and dispatch
# --------------------------------------------------------------------------------------------------

def _conv_kept_count(numel: int, density: float) -> int:
    """ceil(d * N), ignoring float noise like 0.1 * 120 = 12.000000000000002."""
    return min(numel, math.ceil(numel * density - 1e-9))


def centre_matrix_density(density: float, kernel_numel: int,
                          rule: Union[None, str, float] = None) -> float:
    """Density of the centre matrix H of a delta-orthogonal kernel.

    rule None, "cifar" or "sqrt": min(d * K, 1, sqrt(d)) with K kernel positions (the reference's
    CIFAR setting); "same": d (its 1000-layer CNN); a float: that density.
    """
    if rule is None or rule in ("cifar", "sqrt"):
        return min(density * kernel_numel, 1.0, math.sqrt(density))
    if rule == "same":
        return density
    if isinstance(rule, (int, float)) and not isinstance(rule, bool) and 0.0 <= rule <= 1.0:
        return float(rule)
    raise ValueError(f"centre_density must be None, 'cifar', 'sqrt', 'same' or a float in [0, 1], got {rule!r}")


def eoi_conv(out_channels: int, in_channels: int, kernel_size: Union[int, Sequence[int]],
             density: float, generator: torch.Generator,
             centre_density: Union[None, str, float] = None, gain: float = 1.0,
             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Delta-orthogonal sparse conv kernel (out, in, *kernel) and its 0/1 mask.

    An EOI matrix H (out, in) at the centre density (see `centre_matrix_density`) sits at the
    kernel centre, every other position is zero; then zero positions chosen uniformly at random
    become trainable (mask 1, value 0) until the mask holds ceil(density * N) entries, or nnz(H) if
    H alone holds more (H cannot be sparser than the identity). An int kernel_size means a square
    2-D kernel. With circular padding and out == in the conv is orthogonal (norm preserving):
    y[:, p] = gain * H x[:, p] at every position p.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    kernel = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(int(k) for k in kernel_size)
    if not kernel or any(k < 1 or k % 2 == 0 for k in kernel):
        raise ValueError(f"delta-orthogonal EOI needs odd kernel sizes, got {kernel_size}")
    kernel_numel = math.prod(kernel)
    centre = eoi_matrix(out_channels, in_channels, centre_matrix_density(density, kernel_numel, centre_density),
                        generator, dtype=torch.float64)
    weight = torch.zeros((out_channels, in_channels) + kernel, dtype=torch.float64)
    weight[(slice(None), slice(None)) + tuple(k // 2 for k in kernel)] = centre
    mask = (weight != 0).reshape(-1)  # before the gain, so gain 0 still keeps the support
    missing = _conv_kept_count(mask.numel(), density) - int(mask.sum())
    if missing > 0:
        free = torch.nonzero(~mask).squeeze(1)
        pick = torch.randperm(free.numel(), generator=generator, device=generator.device)[:missing].cpu()
        mask[free[pick]] = True
    return (weight * gain).to(dtype), mask.reshape(weight.shape).to(dtype)


def _top_up(mask: torch.Tensor, kept: int, generator: torch.Generator) -> torch.Tensor:
    """Make zero positions trainable (mask 1, value 0) at random until the mask holds `kept`."""
    flat = mask.reshape(-1).clone()
    missing = kept - int(flat.sum())
    if missing > 0:
        free = torch.nonzero(~flat).squeeze(1)
        pick = torch.randperm(free.numel(), generator=generator, device=generator.device)[:missing].cpu()
        flat[free[pick]] = True
    return flat.reshape(mask.shape)


def eoi_exact_count(shape: Sequence[int], kept: int, generator: torch.Generator, gain: float = 1.0,
                    centre_density: Union[None, str, float] = None,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, 0/1 mask) whose mask holds exactly `kept` entries (or the EOI minimum if more).

    The rotations stop at the last state not above `kept` non-zeros (for a conv: the centre matrix
    at its centre density, not above), then zero positions become trainable at random, as the EOI
    reference does for conv kernels. So an EOI layer keeps exactly as many weights as a base layer
    of the same allocated density: arms that differ in the weight scheme differ in nothing else.
    """
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if len(shape) == 2:
        walk = _eoi_walk(shape[0], shape[1], kept / numel, generator, not_above=True)
        weight = _finish(walk.matrix64(), shape[0], shape[1], 1.0, torch.float64)
    elif len(shape) >= 3:
        kernel = shape[2:]
        if any(k % 2 == 0 for k in kernel):
            raise ValueError(f"delta-orthogonal EOI needs odd kernel sizes, got {kernel}")
        kernel_numel = math.prod(kernel)
        centre_d = centre_matrix_density(kept / numel, kernel_numel, centre_density)
        walk = _eoi_walk(shape[0], shape[1], centre_d, generator, not_above=True)
        centre = _finish(walk.matrix64(), shape[0], shape[1], 1.0, torch.float64)
        weight = torch.zeros(shape, dtype=torch.float64)
        weight[(slice(None), slice(None)) + tuple(k // 2 for k in kernel)] = centre
    else:
        raise ValueError(f"EOI needs a 2-D (Linear) or conv weight shape, got {shape}")
    mask = _top_up(weight != 0, kept, generator)  # before the gain, so gain 0 still keeps the support
    return (weight * gain).to(dtype), mask.to(dtype)


def eoi_mask_and_weight(shape: Sequence[int], density: float, generator: torch.Generator,
                        gain: float = 1.0, centre_density: Union[None, str, float] = None,
                        dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, 0/1 mask) for a Linear (2-D) or conv (out, in, *kernel) weight shape.

    For a matrix the mask is the EOI support (weight != 0); for a conv see `eoi_conv`.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        # The mask is taken before the gain, so even gain 0 keeps the EOI support.
        weight = eoi_matrix(shape[0], shape[1], density, generator, dtype=torch.float64)
        return (weight * gain).to(dtype), (weight != 0).to(dtype)
    if len(shape) >= 3:
        return eoi_conv(shape[0], shape[1], shape[2:], density, generator,
                        centre_density=centre_density, gain=gain, dtype=dtype)
    raise ValueError(f"EOI needs a 2-D (Linear) or conv weight shape, got {shape}")


# --------------------------------------------------------------------------------------------------
# Expected density law
# --------------------------------------------------------------------------------------------------

def _expected_densities(num_columns: int) -> Iterator[float]:
    """E[density] after 0, 1, 2, ... rotations, by propagating the row support-size distribution.

    A row's support size s starts at 1 and grows by one when exactly one of the two rotated columns
    is in it: p(s) = 2 s (M - s) / (M (M - 1)). E[density] = E[s] / M.
    """
    m = num_columns
    if m == 1:
        while True:
            yield 1.0
    sizes = np.arange(m + 1, dtype=np.float64)
    grow = 2.0 * sizes * (m - sizes) / (m * (m - 1))
    dist = np.zeros(m + 1)
    dist[1] = 1.0
    while True:
        yield float(dist @ sizes) / m
        moved = dist * grow
        dist -= moved
        dist[1:] += moved[:-1]


def expected_eoi_density(M: int, k: int) -> float:
    """Expected EOI density of a matrix with M = max(rows, cols) columns after k rotations (O(k M))."""
    if M < 1 or k < 0:
        raise ValueError(f"need M >= 1 and k >= 0, got M={M}, k={k}")
    for step, value in enumerate(_expected_densities(M)):
        if step == k:
            return value
    raise AssertionError("unreachable")


def rotations_for_density(M: int, density: float, max_rotations: int = 10**8) -> int:
    """Smallest k whose expected density reaches `density` (within 1e-12)."""
    if M < 1 or not 0.0 <= density <= 1.0:
        raise ValueError(f"need M >= 1 and density in [0, 1], got M={M}, density={density}")
    for step, value in enumerate(_expected_densities(M)):
        if value >= density - 1e-12:
            return step
        if step >= max_rotations:
            raise ValueError(f"density {density} not reached within {max_rotations} rotations")
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------------
# Approximate isometry and the orthogonality measure
# --------------------------------------------------------------------------------------------------

def _as_matrix(w: torch.Tensor) -> torch.Tensor:
    """Conv kernels (out, in, *k) -> (out, in * prod(k)); matrices unchanged."""
    return w.reshape(w.shape[0], -1)


def _gram_minus_identity(w: torch.Tensor) -> torch.Tensor:
    """W W^T - I or W^T W - I, whichever Gram matrix is smaller."""
    matrix = _as_matrix(w)
    gram = matrix @ matrix.t() if matrix.shape[0] <= matrix.shape[1] else matrix.t() @ matrix
    return gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


def orthogonality_error(w: torch.Tensor) -> float:
    """max |W^T W - I| (tall/square) or max |W W^T - I| (wide); convs as (out, in * k...), in float64."""
    return float(_gram_minus_identity(w.detach().to(torch.float64)).abs().max())


def approximate_isometry(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                         steps: int = 1000, lr: float = 0.1) -> dict[str, torch.Tensor]:
    """AI baseline (Lee et al. 2020): plain SGD on sum_l ||(C_l o W_l)^T (C_l o W_l) - I||_F.

    The mask of each layer stays fixed (a weight without a mask is dense); returns the new masked
    weights. Only approximately orthogonal: a sparse random mask rarely admits an orthogonal matrix.
    """
    params = {n: w.detach().clone().requires_grad_(True) for n, w in weights.items()}
    fixed = {n: (masks[n].to(w) if n in masks else torch.ones_like(w)) for n, w in params.items()}
    with torch.enable_grad():
        for _ in range(steps):
            # sqrt of a clamped sum: the Frobenius norm without a NaN gradient at an exact optimum.
            loss = sum(_gram_minus_identity(w * fixed[n]).square().sum().clamp_min(1e-30).sqrt()
                       for n, w in params.items())
            grads = torch.autograd.grad(loss, list(params.values()))
            with torch.no_grad():
                for w, g in zip(params.values(), grads):
                    w -= lr * g
    return {n: (w * fixed[n]).detach() for n, w in params.items()}
