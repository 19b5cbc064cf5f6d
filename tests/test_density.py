import math

import pytest
import torch
from torch import nn

from dsdtune.sparsity.density import (
    ALLOCATORS,
    allocate,
    eoi_min_density,
    erk,
    erk_solve,
    grasp_scores,
    keep_masks,
    synflow_scores,
    uniform,
)
from dsdtune.sparsity.masks import kept_count, prunable_weights

LENET = {"fc1": (300, 784), "fc2": (100, 300), "fc3": (10, 100)}
CONV_SHAPES = {"c1": (16, 3, 3, 3), "c2": (32, 16, 3, 3), "c3": (64, 32, 3, 3), "fc": (10, 64)}


@pytest.fixture(autouse=True)
def one_thread():
    # The models here are tiny: a thread pool only adds overhead (and contention on shared CPUs).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def kept_total(shapes_or_numels, densities):
    numels = {n: (math.prod(s) if isinstance(s, tuple) else s) for n, s in shapes_or_numels.items()}
    return sum(kept_count(numels[n], densities[n]) for n in numels)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def batch(shape, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(40, *shape, generator=generator), torch.arange(40) % 4  # 10 per class


# ---------------------------------------------------------------------------------------------
# ERK / ER / uniform


def test_erk_reproduces_reference_vector():
    densities, eps = erk_solve(LENET, 0.1)
    # By hand: raw_l * N_l = sum(shape_l) = 1084, 400, 110; budget 0.1 * 266200 = 26620.
    assert eps[0] == pytest.approx(26620 / 1594) == pytest.approx(16.700125, abs=1e-6)
    assert eps[0] * 110 / 1000 > 1  # fc3 over 1 -> dense, leaves 25620 for 1084 + 400
    assert eps[1] == pytest.approx(25620 / 1484) == pytest.approx(915 / 53)
    assert len(eps) == 2
    assert densities["fc1"] == pytest.approx(0.0795678, abs=1e-7)
    assert densities["fc2"] == pytest.approx(0.2301887, abs=1e-7)
    assert densities["fc3"] == 1.0
    assert kept_total(LENET, densities) == 26620


def test_er_uses_channel_dims_only_and_meets_budget():
    total = sum(math.prod(s) for s in CONV_SHAPES.values())
    er, er_k = erk(CONV_SHAPES, 0.2, variant="er"), erk(CONV_SHAPES, 0.2)
    assert er != pytest.approx(er_k)
    for densities in (er, er_k):
        assert sum(densities[n] * math.prod(s) for n, s in CONV_SHAPES.items()) == pytest.approx(0.2 * total)
        assert all(0 < d <= 1 for d in densities.values())
    # On 2-D weights both variants use the same dims, so an MLP cannot tell them apart.
    assert erk(LENET, 0.1, variant="er") == pytest.approx(erk(LENET, 0.1))
    with pytest.raises(ValueError, match="'erk', 'er'"):
        erk(LENET, 0.1, variant="erx")


def test_uniform_every_layer_at_target_and_floor_rebalances():
    assert uniform(LENET, 0.3) == pytest.approx({"fc1": 0.3, "fc2": 0.3, "fc3": 0.3})
    # A 2x2 layer at 0.1 would hold 0.4 weights: raised to one weight, the big layer pays for it.
    densities = uniform({"big": (100, 100), "tiny": (2, 2)}, 0.1)
    assert densities["tiny"] == 0.25
    assert densities["big"] == pytest.approx((0.1 * 10004 - 1) / 10000)
    with pytest.raises(ValueError):
        uniform(LENET, 0.0)


def test_min_density_floor_for_eoi_keeps_budget():
    shapes = {"wide": (8, 4000), "mid": (200, 200), "head": (10, 200)}
    floors = eoi_min_density(shapes)
    assert floors == {"wide": 1 / 4000, "mid": 1 / 200, "head": 1 / 200}
    plain = erk(shapes, 0.01)
    assert plain["mid"] < floors["mid"]  # the test case really needs the floor
    guarded = erk(shapes, 0.01, min_density=floors)
    assert guarded["mid"] == floors["mid"]
    assert guarded["head"] / guarded["wide"] == pytest.approx(plain["head"] / plain["wide"])  # ERK shape kept
    total = sum(math.prod(s) for s in shapes.values())
    assert sum(guarded[n] * math.prod(s) for n, s in shapes.items()) == pytest.approx(0.01 * total)
    # When the floors alone exceed the budget, every layer sits at its floor.
    assert erk(shapes, 0.002, min_density=floors) == floors


# ---------------------------------------------------------------------------------------------
# Global top-K


def test_keep_masks_exact_count_and_deterministic_ties():
    scores = {"a": torch.zeros(3, 4), "b": torch.zeros(5)}
    masks = keep_masks(scores, 0.5)  # 17 entries, K = 8, all tied: the first ones by position...
    assert masks["a"].flatten().tolist() == [True] * 7 + [False] * 5
    assert masks["b"].tolist() == [True, False, False, False, False]  # ...but "b" keeps one
    # The one weight "b" must keep is its best one, and "a" gives up its worst kept one.
    scores = {"a": torch.arange(12.0).reshape(3, 4) + 10, "b": torch.tensor([0.0, 2.0, 1.0, 0.0, 0.0])}
    masks = keep_masks(scores, 0.3)  # K = 5
    assert masks["b"].tolist() == [False, True, False, False, False]
    assert masks["a"].flatten().tolist() == [False] * 8 + [True] * 4


# ---------------------------------------------------------------------------------------------
# Score-based allocators


def score_options(kind, shape):
    inputs, targets = batch(shape)
    return {"batch": (inputs, targets)} if kind != "synflow" else {"input_shape": shape, "rounds": 10}


@pytest.mark.parametrize("make, shape", [(mlp, (16,)), (cnn, (1, 8, 8))])
@pytest.mark.parametrize("kind", ["snip", "grasp", "synflow"])
@pytest.mark.parametrize("density", [0.05, 0.3])
def test_score_allocators_keep_requested_overall_density(make, shape, kind, density):
    model = make()
    weights = prunable_weights(model, exclude_first=False)
    densities = allocate(kind, model, weights, density, **score_options(kind, shape))
    numels = {n: w.numel() for n, w in weights.items()}
    assert set(densities) == set(weights)
    assert all(0 < d <= 1 for d in densities.values())
    assert abs(kept_total(numels, densities) - round(density * sum(numels.values()))) <= 1


@pytest.mark.parametrize("kind", ["snip", "grasp", "synflow"])
def test_score_allocators_leave_callers_model_untouched_and_are_deterministic(kind):
    model = cnn(seed=3)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = list(prunable_weights(model))
    first = allocate(kind, model, weights, 0.2, **score_options(kind, (1, 8, 8)))
    assert model.training
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    again = allocate(kind, cnn(seed=3), weights, 0.2, **score_options(kind, (1, 8, 8)))
    assert again == first


def test_grasp_default_sign_is_the_papers():
    """GraSP removes the top fraction of S = -w * Hg (paper, Algorithm 1; authors' code keeps
    `score <= threshold`), i.e. keeps the lowest S. Checked against a full Hessian."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    inputs, targets = torch.randn(12, 4, dtype=torch.float64), torch.arange(12) % 3
    names = ["0.weight", "2.weight"]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    theta = torch.cat([params[n].detach().flatten() for n in names])

    def loss(flat):
        w1, w2 = torch.split(flat, [math.prod(s) for s in shapes])
        hidden = torch.tanh(inputs @ w1.reshape(shapes[0]).T + params["0.bias"].detach())
        logits = hidden @ w2.reshape(shapes[1]).T + params["2.bias"].detach()
        return nn.functional.cross_entropy(logits / 200.0, targets)

    hessian = torch.autograd.functional.hessian(loss, theta)
    gradient = torch.autograd.functional.jacobian(loss, theta)
    paper_score = -theta * (hessian @ gradient)
    k = round(0.4 * theta.numel())
    order = torch.argsort(paper_score)
    assert paper_score[order[k]] - paper_score[order[k - 1]] > 1e-9 * paper_score.abs().max()  # no tie
    expected_original = torch.zeros_like(theta, dtype=torch.bool)
    expected_original[order[:k]] = True
    expected_flipped = torch.zeros_like(theta, dtype=torch.bool)
    expected_flipped[order[-k:]] = True

    for sign, expected in [("original", expected_original), ("flipped", expected_flipped)]:
        masks = keep_masks(grasp_scores(model, names, inputs, targets, sign=sign), 0.4)
        assert torch.equal(torch.cat([masks[n].flatten() for n in names]), expected), sign
    assert not torch.equal(expected_original, expected_flipped)
    default = allocate("grasp", model, names, 0.4, batch=(inputs, targets))
    counts = torch.split(expected_original, [math.prod(s) for s in shapes])
    assert default == {n: int(c.sum()) / c.numel() for n, c in zip(names, counts)}


# ---------------------------------------------------------------------------------------------
# SynFlow


def test_synflow_scores_finite_and_nonzero_on_200_layer_tanh_mlp():
    torch.manual_seed(0)
    layers = [nn.Linear(64, 64)]
    for _ in range(199):
        layers += [nn.Tanh(), nn.Linear(64, 64)]
    model = nn.Sequential(*layers)
    names = list(prunable_weights(model, exclude_first=False))
    plain = synflow_scores(model, names, (64,), rescale="never")
    assert any(float(s.max()) == 0.0 for s in plain.values())  # the plain pass underflows here
    scores = synflow_scores(model, names, (64,))
    assert all(torch.isfinite(s).all() and float(s.min()) > 0 for s in scores.values())


def test_synflow_rescaling_changes_scores_by_one_common_factor_on_homogeneous_net():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10, bias=False))
    names = list(prunable_weights(model, exclude_first=False))
    plain = synflow_scores(model, names, (3, 8, 8), rescale="never")
    rescaled = synflow_scores(model, names, (3, 8, 8), rescale="always")
    ratio = torch.cat([(rescaled[n] / plain[n]).flatten() for n in names])
    assert float(ratio[0]) != pytest.approx(1.0)  # the rescaled pass really is rescaled...
    assert float(ratio.max() / ratio.min()) == pytest.approx(1.0, abs=1e-9)  # ...by one factor


def test_synflow_scores_in_eval_mode():
    # Unpadded conv on the all-ones input: each channel is constant, so train-mode batch norm
    # would map it to exactly 0 and no flow would reach the first conv.
    model = cnn()
    names = list(prunable_weights(model, exclude_first=False))
    scores = synflow_scores(model, names, (1, 8, 8), rescale="never")
    assert all(float(s.max()) > 0 for s in scores.values())


def test_synflow_overflow_safe_on_deep_relu_net():
    layers = []
    for _ in range(400):
        layers += [nn.Linear(32, 32, bias=False), nn.ReLU()]
    torch.manual_seed(0)
    model = nn.Sequential(*layers)
    names = list(prunable_weights(model, exclude_first=False))
    with torch.no_grad():  # row sums of |W| around 8: 8**400 overflows float64
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
    assert not all(torch.isfinite(s).all() for s in synflow_scores(model, names, (32,), rescale="never").values())
    densities = allocate("synflow", model, names, 0.1, input_shape=(32,), rounds=2)
    assert kept_total({n: 1024 for n in names}, densities) == round(0.1 * 1024 * 400)


# ---------------------------------------------------------------------------------------------
# Registry


def test_allocate_dispatch_and_errors():
    model = mlp()
    names = list(prunable_weights(model))
    assert set(ALLOCATORS) == {"uniform", "erk", "er", "snip", "grasp", "synflow"}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in names}
    assert allocate("erk", model, names, 0.2) == erk(shapes, 0.2)
    assert allocate("uniform", model, names, 0.2) == uniform(shapes, 0.2)
    with pytest.raises(ValueError, match="allowed: uniform, erk, er, snip, grasp, synflow"):
        allocate("magic", model, names, 0.2)
    with pytest.raises(ValueError, match="batch"):
        allocate("snip", model, names, 0.2)
    with pytest.raises(ValueError, match="input_shape"):
        allocate("synflow", model, names, 0.2)
    with pytest.raises(ValueError, match="not parameters"):
        allocate("snip", model, ["nope.weight"], 0.2, batch=batch((16,)))
    # SynFlow takes the per-sample shape from a batch when one is given.
    from_batch = allocate("synflow", model, names, 0.2, batch=batch((16,)), rounds=5)
    assert from_batch == allocate("synflow", model, names, 0.2, input_shape=(16,), rounds=5)


def test_erk_with_floors_reconsiders_a_layer_made_dense_early():
    """8x8 and 100x100, floor 0.1 for both, target 0.1: the first pass makes 8x8 dense (eps*raw > 1),
    then the floor of 100x100 lowers eps, so 8x8 must come back down: exactly 0.1 / 0.1."""
    shapes = {"small": (8, 8), "big": (100, 100)}
    densities = erk(shapes, 0.1, min_density=0.1)
    assert densities == pytest.approx({"small": 0.1, "big": 0.1}, abs=1e-12)
    assert kept_total(shapes, densities) == round(0.1 * (64 + 10000))


@pytest.mark.parametrize("target", [0.02, 0.05, 0.1, 0.3])
def test_erk_with_floors_is_clip_of_one_eps_and_meets_the_budget(target):
    shapes = {"a": (8, 8), "b": (100, 100), "c": (10, 300), "d": (64, 32, 3, 3)}
    floors = {"a": 0.3, "b": 0.05, "c": 0.02, "d": 0.01}
    densities = erk(shapes, target, min_density=floors)
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    free = [n for n in shapes if floors[n] < densities[n] < 1.0]
    eps = {densities[n] / raw[n] for n in free}
    assert len({round(e, 9) for e in eps}) <= 1  # one eps for every layer between its bounds
    e = next(iter(eps)) if eps else None
    for n in shapes:
        assert floors[n] - 1e-12 <= densities[n] <= 1.0
        if e is not None and n not in free:  # a bound holds only where eps*raw is past it
            assert (densities[n] == 1.0 and e * raw[n] >= 1.0 - 1e-9) or (
                densities[n] == pytest.approx(floors[n]) and e * raw[n] <= floors[n] + 1e-9)
    total = sum(math.prod(s) for s in shapes.values())
    kept = sum(densities[n] * math.prod(shapes[n]) for n in shapes)
    assert kept == pytest.approx(max(target * total, sum(floors[n] * math.prod(shapes[n]) for n in shapes)))
