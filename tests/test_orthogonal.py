"""EOI (exact orthogonal init by Givens rotations), its density law, delta-orthogonal convs, AI."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsdtune.sparsity.orthogonal import (
    approximate_isometry,
    centre_matrix_density,
    eoi_conv,
    eoi_mask_and_weight,
    eoi_matrix,
    expected_eoi_density,
    givens_rotations,
    orthogonality_error,
    rotations_for_density,
)

SHAPES = [(64, 64), (100, 37), (37, 100), (1, 5), (5, 1), (128, 128)]
DENSITIES = [0.05, 0.2, 0.5, 0.9]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These are many small tensor ops; on a busy 2-core machine a 2-thread pool mostly waits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gram_error(w: torch.Tensor) -> float:
    """max |W^T W - I| (tall/square) or max |W W^T - I| (wide), computed here in float64."""
    w = w.double()
    gram = w.t() @ w if w.shape[0] >= w.shape[1] else w @ w.t()
    return float((gram - torch.eye(gram.shape[0], dtype=torch.float64)).abs().max())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
def test_eoi_is_orthogonal_to_float32_precision(shape, density):
    w = eoi_matrix(*shape, density, gen(3))
    assert w.shape == shape and w.dtype == torch.float32
    assert gram_error(w) < 1e-5
    assert orthogonality_error(w) < 1e-5


def test_gain_scales_the_gram_matrix():
    w = eoi_matrix(40, 24, 0.3, gen(0), gain=2.0)
    assert torch.allclose(w.double().t() @ w.double(), 4.0 * torch.eye(24, dtype=torch.float64), atol=4e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 0.33, 0.5, 0.77, 1.0])
def test_density_within_half_a_rotation_step_and_diagonal_kept(shape, density):
    rows, cols = shape
    big = max(shape)
    w = eoi_matrix(rows, cols, density, gen(1))
    achieved = float((w != 0).double().mean())
    # Floor: the identity. One rotation adds at most min(rows, cols) entries, i.e. 1/M of density,
    # and EOI keeps whichever of the last two states is closer: at most half a step off.
    assert achieved >= 1.0 / big - 1e-12
    if density >= 1.0 / big:
        assert abs(achieved - density) <= 0.5 / big + 1e-12
    else:
        assert achieved == pytest.approx(1.0 / big)
    diagonal = torch.arange(min(shape))
    assert bool((w[diagonal, diagonal] != 0).all())


def test_below_the_lowest_density_returns_the_identity():
    assert torch.equal(eoi_matrix(64, 64, 0.0, gen(0)), torch.eye(64))
    wide = eoi_matrix(10, 40, 0.01, gen(0))
    assert torch.equal(wide.abs(), torch.eye(10, 40))
    tall = eoi_matrix(40, 10, 0.02, gen(0), gain=3.0)
    assert torch.equal(tall, 3.0 * torch.eye(40, 10))


def test_full_density_is_dense_and_orthogonal():
    w = eoi_matrix(24, 24, 1.0, gen(5))
    assert bool((w != 0).all())
    assert gram_error(w) < 1e-5


def test_deterministic_for_a_seed():
    assert torch.equal(eoi_matrix(50, 70, 0.3, gen(7)), eoi_matrix(50, 70, 0.3, gen(7)))
    assert not torch.equal(eoi_matrix(50, 70, 0.3, gen(7)), eoi_matrix(50, 70, 0.3, gen(8)))
    w1, m1 = eoi_conv(8, 8, 3, 0.2, gen(7))
    w2, m2 = eoi_conv(8, 8, 3, 0.2, gen(7))
    assert torch.equal(w1, w2) and torch.equal(m1, m2)
    assert torch.equal(givens_rotations(20, 30, 77, gen(2)), givens_rotations(20, 30, 77, gen(2)))


@pytest.mark.parametrize("rows, cols, density", [(16, 16, 0.4), (6, 20, 0.37), (20, 6, 0.55), (12, 12, 0.2),
                                                 (1, 5, 0.3)])
def test_eoi_stops_at_the_closer_of_the_last_two_states(rows, cols, density):
    # EOI's matrix is a state of its own rotation stream: walk that stream one rotation at a time.
    target = density * rows * cols
    counts = []
    while not counts or counts[-1] < target:
        counts.append(int((givens_rotations(rows, cols, len(counts), gen(11)) != 0).sum()))
    first_reaching = len(counts) - 1
    below, above = counts[first_reaching - 1], counts[first_reaching]
    expected_k = first_reaching - 1 if target - below < above - target else first_reaching
    assert torch.equal(eoi_matrix(rows, cols, density, gen(11)), givens_rotations(rows, cols, expected_k, gen(11)))


def test_givens_rotations_are_exactly_orthogonal_and_counted():
    assert torch.equal(givens_rotations(6, 9, 0, gen(0)), torch.eye(6, 9))
    w = givens_rotations(30, 12, 500, gen(0))
    assert gram_error(w) < 1e-5


def test_expected_density_reference_numbers():
    # sparse_init.md, M = 100 (also confirmed by simulation: see the law test below).
    reference = {50: 0.0266, 100: 0.0672, 200: 0.3034, 300: 0.6808, 400: 0.9084}
    for k, value in reference.items():
        assert expected_eoi_density(100, k) == pytest.approx(value, abs=6e-5)
    assert expected_eoi_density(100, 0) == pytest.approx(0.01)
    assert expected_eoi_density(1, 10) == 1.0
    values = [expected_eoi_density(30, k) for k in range(0, 300, 10)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_rotations_for_density_is_the_smallest_k_reaching_the_target():
    for density in [0.05, 0.3034, 0.5, 0.9]:
        k = rotations_for_density(100, density)
        assert expected_eoi_density(100, k) >= density - 1e-12
        assert expected_eoi_density(100, k - 1) < density
    assert rotations_for_density(100, 0.01) == 0
    assert rotations_for_density(100, 0.0) == 0


@pytest.mark.parametrize("k", [50, 200, 400])
def test_mean_density_after_k_rotations_follows_the_markov_law(k):
    # Wide 20 x 100 matrices: M = 100, so the M = 100 law applies; 100 draws of 20 rows each.
    densities = [float((givens_rotations(20, 100, k, gen(1000 + s)) != 0).double().mean()) for s in range(100)]
    assert sum(densities) / len(densities) == pytest.approx(expected_eoi_density(100, k), abs=0.01)
    tall = [float((givens_rotations(100, 20, k, gen(5000 + s)) != 0).double().mean()) for s in range(100)]
    assert sum(tall) / len(tall) == pytest.approx(expected_eoi_density(100, k), abs=0.01)


def circular_conv2d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    pad = weight.shape[-1] // 2
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="circular"), weight)


@pytest.mark.parametrize("density", [0.05, 0.1, 0.3, 0.6])
def test_delta_orthogonal_conv_preserves_norms_with_circular_padding(density):
    channels, size = 16, 3
    weight, mask = eoi_conv(channels, channels, size, density, gen(4))
    assert weight.shape == mask.shape == (channels, channels, size, size)
    numel = weight.numel()
    assert int(mask.sum()) == math.ceil(density * numel)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert bool((mask[weight != 0] == 1).all())
    off_centre = weight.clone()
    off_centre[:, :, 1, 1] = 0
    assert bool((off_centre == 0).all())
    x = torch.randn(5, channels, 7, 9, generator=gen(9))
    y = circular_conv2d(x, weight)
    ratio = y.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    assert torch.allclose(ratio, torch.ones(5), atol=0, rtol=1e-4)


def test_conv_gain_and_rectangular_centre():
    weight, _ = eoi_conv(8, 8, (3, 3), 0.2, gen(1), gain=1.5)
    x = torch.randn(3, 8, 6, 6, generator=gen(2))
    ratio = circular_conv2d(x, weight).norm() / x.norm()
    assert float(ratio) == pytest.approx(1.5, rel=1e-4)
    for out_ch, in_ch in [(12, 5), (5, 12)]:
        weight, mask = eoi_conv(out_ch, in_ch, 3, 0.3, gen(3))
        assert gram_error(weight[:, :, 1, 1]) < 1e-5
        assert int(mask.sum()) == math.ceil(0.3 * weight.numel())


def test_centre_density_rules():
    assert centre_matrix_density(0.01, 9) == pytest.approx(0.09)
    assert centre_matrix_density(0.05, 9) == pytest.approx(math.sqrt(0.05))
    assert centre_matrix_density(0.5, 9) == pytest.approx(math.sqrt(0.5))
    assert centre_matrix_density(0.2, 9, "same") == 0.2
    assert centre_matrix_density(0.2, 9, 0.7) == 0.7
    with pytest.raises(ValueError):
        centre_matrix_density(0.2, 9, "bogus")
    # "same": the centre matrix is at the layer density, the rest of the mask is random zeros.
    weight, mask = eoi_conv(32, 32, 3, 0.2, gen(0), centre_density="same")
    centre_density = float((weight[:, :, 1, 1] != 0).double().mean())
    assert abs(centre_density - 0.2) <= 0.5 / 32 + 1e-12
    assert int(mask.sum()) == math.ceil(0.2 * weight.numel())
    dense_centre, _ = eoi_conv(32, 32, 3, 0.2, gen(0))
    assert float((dense_centre[:, :, 1, 1] != 0).double().mean()) == pytest.approx(math.sqrt(0.2), abs=0.5 / 32)


def test_conv1d_and_dispatch():
    weight, mask = eoi_mask_and_weight((8, 8, 5), 0.25, gen(0))
    assert weight.shape == (8, 8, 5) and int(mask.sum()) == math.ceil(0.25 * 320)
    x = torch.randn(4, 8, 11, generator=gen(1))
    y = F.conv1d(F.pad(x, (2, 2), mode="circular"), weight)
    assert float(y.norm() / x.norm()) == pytest.approx(1.0, rel=1e-4)
    weight, mask = eoi_mask_and_weight((30, 50), 0.2, gen(0), gain=0.5)
    assert torch.equal(mask, (weight != 0).float()) and mask.dtype == torch.float32
    assert abs(float(mask.mean()) - 0.2) <= 0.5 / 50 + 1e-12
    with pytest.raises(ValueError):
        eoi_mask_and_weight((10,), 0.5, gen(0))
    with pytest.raises(ValueError):
        eoi_conv(4, 4, 2, 0.5, gen(0))
    with pytest.raises(ValueError):
        eoi_matrix(4, 4, 1.5, gen(0))


def frobenius_objective(w: torch.Tensor) -> float:
    m = w.double().reshape(w.shape[0], -1)
    gram = m @ m.t() if m.shape[0] <= m.shape[1] else m.t() @ m
    return float((gram - torch.eye(gram.shape[0], dtype=torch.float64)).norm())


def test_approximate_isometry_improves_but_is_not_exact_when_sparse():
    torch.manual_seed(0)
    weights = {"fc.weight": torch.nn.Linear(48, 48).weight.detach(),
               "conv.weight": torch.nn.Conv2d(8, 16, 3).weight.detach()}
    g = gen(0)
    masks = {n: (torch.rand(w.shape, generator=g) < 0.1).float() for n, w in weights.items()}
    out = approximate_isometry(weights, masks, steps=300, lr=0.1)
    for name, w in weights.items():
        assert out[name].shape == w.shape
        assert bool((out[name][masks[name] == 0] == 0).all()), "weights stay masked"
        assert frobenius_objective(out[name]) < 0.9 * frobenius_objective(w * masks[name])
        # At 90% sparsity AI stays far from orthogonal; EOI at the same density is exact.
        assert orthogonality_error(out[name]) > 1e-2
    eoi_weight, _ = eoi_mask_and_weight((16, 8, 3, 3), 0.1, gen(0))
    assert orthogonality_error(eoi_weight[:, :, 1, 1]) < 1e-5
    assert orthogonality_error(eoi_matrix(48, 48, 0.1, gen(0))) < 1e-5
