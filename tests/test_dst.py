"""The drop-and-grow rule: the peers' own vectors (recomputed), exact counts and determinism."""
import pytest
import torch

from dsdtune.sparsity.dst import drop_and_grow, drop_and_grow_layers, random_scores, swap_count
from dsdtune.sparsity.masks import Masks

OLD_MASK = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0], dtype=torch.float32)
PARAM = torch.tensor([-9, 1, 4, -1, 5, 8, -2, 3], dtype=torch.float32)


# google-research/jaxpruner, jaxpruner/algorithms/sparse_trainers_test.py, testRigLUpdateMask:
# old mask [0,1,0,1,0,1,1,0], drop score = the signed parameter, grow score = |parameter|.
# Recomputed by hand: active drop scores are 1, -1, 8, -2 (positions 1, 3, 5, 6); 0.25 swaps 1
# (drop position 6, grow position 0: |-9|), 0.5 swaps 2 (keep 5 and 1, grow 0 and 4), 0.75 swaps 3
# (keep 5, grow 0, 4, 2), 1.0 swaps all 4 (grow 0, 5, 4, 2).
@pytest.mark.parametrize("fraction, expected", [
    (0.0, [0, 1, 0, 1, 0, 1, 1, 0]),
    (0.25, [1, 1, 0, 1, 0, 1, 0, 0]),
    (0.5, [1, 1, 0, 0, 1, 1, 0, 0]),
    (0.75, [1, 0, 1, 0, 1, 1, 0, 0]),
    (1.0, [1, 0, 1, 0, 1, 1, 0, 0]),
])
def test_drop_and_grow_reproduces_jaxpruner_rigl_update_mask(fraction, expected):
    new_mask, grown = drop_and_grow(OLD_MASK, PARAM, PARAM.abs(), fraction)
    assert new_mask.tolist() == expected
    assert new_mask.dtype == OLD_MASK.dtype
    assert grown.tolist() == [bool(n and not o) for n, o in zip(expected, OLD_MASK.tolist())]


def test_a_dropped_connection_that_grows_back_keeps_its_weight_unless_asked():
    # fraction 1.0 above: position 5 (drop score 8) is dropped and grown back in one update.
    # rigl (reinit_when_same=False) and jaxpruner (masks_activated) leave it alone; rigl's
    # reinit_when_same=True restarts it.
    new_mask, grown = drop_and_grow(OLD_MASK, PARAM, PARAM.abs(), 1.0)
    assert new_mask[5] == 1 and not grown[5]
    _, grown_all = drop_and_grow(OLD_MASK, PARAM, PARAM.abs(), 1.0, reinit_regrown=True)
    assert grown_all.tolist() == [True, False, True, False, True, True, False, False]


def test_swap_count_truncates_on_the_decimal_fraction():
    # google-research/rigl, rigl/sparse_optimizers_base.py (_get_update_op): n_prune =
    # int(n_ones * drop_fraction), truncation.
    assert swap_count(4, 0.25) == 1 and swap_count(7, 0.3) == 2 and swap_count(10, 0.3) == 3
    assert int(90 * 0.7) == 62 and swap_count(90, 0.7) == 63  # float64 would lose one
    assert swap_count(100, 0.29) == 29
    assert swap_count(5, 0.0) == 0 and swap_count(5, 1.0) == 5
    with pytest.raises(ValueError):
        swap_count(5, 1.5)


# google-research/rigl, rigl/sparse_optimizers_test.py, SparseSETOptimizerTest.testNoDrop:
# drop fraction 0 never changes the mask. Also jaxpruner's testRigLUpdateMask case 0.0.
def test_fraction_zero_leaves_every_mask_unchanged():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        mask = (torch.rand(7, 9, generator=gen) < 0.4).float()
        new_mask, grown = drop_and_grow(mask, torch.randn(7, 9, generator=gen),
                                        torch.randn(7, 9, generator=gen), 0.0)
        assert torch.equal(new_mask, mask) and not grown.any()


def _random_case(gen: torch.Generator):
    shape = (int(torch.randint(1, 6, (1,), generator=gen)), int(torch.randint(1, 40, (1,), generator=gen)))
    density = float(torch.rand(1, generator=gen))
    mask = (torch.rand(shape, generator=gen) < density).float()
    # integer-valued scores: plenty of ties, so the tie rule is exercised too
    drop = torch.randint(-3, 4, shape, generator=gen).float()
    grow = torch.randint(0, 3, shape, generator=gen).float()
    fraction = float(torch.rand(1, generator=gen))
    return mask, drop, grow, fraction


def _reference_update(mask, drop, grow, fraction):
    """The rule written out with Python sorting: (score descending, flat index ascending)."""
    m, d, g = mask.reshape(-1).tolist(), drop.reshape(-1).tolist(), grow.reshape(-1).tolist()
    active = [i for i in range(len(m)) if m[i]]
    n_swap = swap_count(len(active), fraction)
    kept = sorted(active, key=lambda i: (-d[i], i))[:len(active) - n_swap]
    candidates = [i for i in range(len(m)) if i not in kept]
    grown = sorted(candidates, key=lambda i: (-g[i], i))[:n_swap]
    new = [1.0 if i in kept or i in grown else 0.0 for i in range(len(m))]
    return torch.tensor(new).reshape(mask.shape)


def test_kept_count_is_exact_and_grown_connections_were_not_kept():
    # google-research/rigl, rigl/sparse_optimizers_test.py, testUpdateIterations and jaxpruner
    # sparse_trainers_test.py, testDynamicSparseUpdateStateConstantSparsity: the number of
    # connections never changes. Here over 500 random masks, scores (with ties) and fractions,
    # each also checked against the rule written out with Python sorting.
    gen = torch.Generator().manual_seed(0)
    for _ in range(500):
        mask, drop, grow, fraction = _random_case(gen)
        new_mask, grown = drop_and_grow(mask, drop, grow, fraction)
        active, new_active = mask.bool(), new_mask.bool()
        assert int(new_active.sum()) == int(active.sum())
        assert torch.equal(grown, new_active & ~active)  # grown: on now, off before
        assert torch.equal(new_mask, _reference_update(mask, drop, grow, fraction))


def test_ties_go_to_the_lower_flat_index():
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0.])
    drop = torch.tensor([2, 2, 2, 2, 0, 0, 0, 0.])  # all active tied: the two lowest indices stay
    grow = torch.zeros(8)  # all tied: positions 2 and 3 (not kept, lowest) come back first
    new_mask, grown = drop_and_grow(mask, drop, grow, 0.5)
    assert new_mask.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert not grown.any()
    grow[6] = 1.0  # one real gradient outranks the ties
    new_mask, grown = drop_and_grow(mask, drop, grow, 0.5)
    assert new_mask.tolist() == [1, 1, 1, 0, 0, 0, 1, 0] and grown.tolist()[6]


def test_masked_out_positions_never_survive_the_drop_even_with_large_scores():
    mask = torch.tensor([0, 1, 0, 1.])
    drop = torch.tensor([100, 1, 100, 2.])
    new_mask, _ = drop_and_grow(mask, drop, torch.zeros(4), 0.5)
    # keep position 3; the grown one is the lowest not-kept index, 0 (grow scores tie)
    assert new_mask.tolist() == [1, 0, 0, 1]


def test_bool_masks_and_mismatched_shapes():
    new_mask, _ = drop_and_grow(OLD_MASK.bool(), PARAM, PARAM.abs(), 0.5)
    assert new_mask.dtype == torch.bool and new_mask.tolist() == [True, True, False, False, True, True, False, False]
    with pytest.raises(ValueError, match="shape"):
        drop_and_grow(OLD_MASK, PARAM[:4], PARAM.abs(), 0.5)


def test_set_growth_is_deterministic_for_a_seeded_generator_and_layer_order():
    torch.manual_seed(3)
    weights = {"a": torch.randn(6, 5), "b": torch.randn(4, 3, 2)}
    masks = Masks({n: (torch.rand(w.shape) < 0.5).float() for n, w in weights.items()})
    drop = {n: w.abs() for n, w in weights.items()}

    def run(seed):
        return drop_and_grow_layers(masks, drop, None, 0.3, generator=torch.Generator().manual_seed(seed))

    (m1, g1), (m2, g2), (m3, _) = run(7), run(7), run(8)
    assert all(torch.equal(m1[n], m2[n]) and torch.equal(g1[n], g2[n]) for n in weights)
    assert any(not torch.equal(m1[n], m3[n]) for n in weights)
    assert m1.kept_counts() == masks.kept_counts()
    # one generator per call, layers drawn in the masks' order
    gen = torch.Generator().manual_seed(7)
    expected = {n: drop_and_grow(masks[n], drop[n], random_scores(masks[n], gen), 0.3)[0] for n in weights}
    assert all(torch.equal(m1[n], expected[n]) for n in weights)


def test_rigl_layers_grow_where_the_gradient_is_largest():
    mask = {"w": torch.tensor([[1, 1, 0], [0, 1, 0.]])}
    weight = {"w": torch.tensor([[0.5, -0.1, 0.0], [0.0, 2.0, 0.0]])}
    grad = {"w": torch.tensor([[0.0, 0.0, -3.0], [1.0, 0.0, 0.5]])}
    new_masks, grown = drop_and_grow_layers(mask, {"w": weight["w"].abs()}, {"w": grad["w"].abs()}, 0.34)
    # 3 active, swap int(3 * 0.34) = 1: drop -0.1 (position (0, 1)), grow |-3.0| at (0, 2)
    assert new_masks["w"].tolist() == [[1, 0, 1], [0, 1, 0]]
    assert grown["w"].tolist() == [[False, False, True], [False, False, False]]
    with pytest.raises(ValueError, match="Generator"):
        drop_and_grow_layers(mask, {"w": weight["w"].abs()}, None, 0.3)
