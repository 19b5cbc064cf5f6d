"""GSM (phase kind G): exact top-Q selection, the update rule, passive decay, truncation, flows DG/DGD.

The update rule under test (Ding et al. 2019):  Z <- beta Z + eta W + B o dL/dW,  W <- W - alpha Z,
with B the 0/1 indicator of the global top-Q entries of |dL/dw * w|.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsdtune.config import PipelineSpec
from dsdtune.phases import expand_phases
from dsdtune.pipeline import Pipeline, run_pipeline
from dsdtune.sparsity.gsm import GlobalSparseMomentum
from dsdtune.sparsity.masks import kept_count, prunable_weights
from dsdtune.training import evaluate, make_optimizer, set_hyperparameters, set_lr
from interrupted import run_interrupted

TASK = {"dataset": "synthetic", "dataset_args": {"num_train": 320, "num_test": 100, "input_shape": [12],
                                                 "num_classes": 4},
        "model": "mlp", "model_args": {"widths": [32, 24]}, "batch_size": 32, "device": "cpu"}


def spec(**pipeline):
    base = {"flow": "DGD", "epochs": [1, 3, 1], "lr": [0.05, 0.02, 0.005], "sparsity": 0.8, "momentum": 0.9,
            "weight_decay": 1e-3, "exclude_first": True}  # GSM's own default would prune the first layer
    base.update(pipeline)
    return {"task": TASK, "pipeline": base, "seed": 3}


# ---- one step on a tiny model with hand-set weights and gradients ------------------------------

def tiny(dtype=torch.float64):
    """Two Linear layers (12 + 12 weights, both prunable here) with fixed weights; optimizer as the pipeline."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)).to(dtype)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.linspace(-1.0, 1.0, p.numel(), dtype=dtype).reshape(p.shape) * (i + 1) + 0.05)
    prunable = prunable_weights(model, exclude_first=False)
    ids = {id(p) for p in prunable.values()}
    groups = [{"params": list(prunable.values())}, {"params": [p for p in model.parameters() if id(p) not in ids]}]
    return model, prunable, groups


def gsm_for(model, prunable, groups, sparsity=0.75, lr=0.1, momentum=0.9, wd=0.01, budget=None):
    optimizer = make_optimizer(groups, "sgd", lr, momentum, False, wd)
    set_hyperparameters(optimizer, momentum, False, wd, decay_groups={0})
    return GlobalSparseMomentum(model, prunable, optimizer, sparsity, budget=budget), optimizer


def set_grads(model, grads):
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def test_selection_is_the_global_top_q_by_taylor_score():
    model, prunable, groups = tiny()
    gsm, _ = gsm_for(model, prunable, groups, sparsity=0.75)  # Q = 6 of 24
    assert gsm.q == kept_count(24, 0.25) == 6
    gen = torch.Generator().manual_seed(0)
    # Second layer's gradients are 10x larger: a global top-Q takes all 6 from it, a per-layer one would not.
    grads = [torch.rand(p.shape, generator=gen, dtype=p.dtype) * (10.0 if i == 2 else 1.0)
             for i, p in enumerate(model.parameters())]
    set_grads(model, grads)
    selected = gsm.select()
    scores = flat([(p.grad * p).abs() for p in prunable.values()])
    expected = torch.zeros_like(scores)
    expected[torch.argsort(scores, descending=True)[:6]] = 1
    assert torch.equal(selected, expected)
    assert int(selected[:12].sum()) == 0 and int(selected[12:].sum()) == 6


@pytest.mark.parametrize("case", ["all_tied", "mostly_zero", "tie_at_the_boundary"])
def test_exactly_q_selected_with_ties_and_zero_scores(case):
    model, prunable, groups = tiny()
    gsm, _ = gsm_for(model, prunable, groups, sparsity=0.75)  # Q = 6
    grads = [torch.zeros_like(p) for p in model.parameters()]
    if case == "all_tied":
        with torch.no_grad():
            for w in prunable.values():
                w.fill_(0.5)
        grads = [torch.full_like(p, 2.0) for p in model.parameters()]
    elif case == "mostly_zero":  # only 2 non-zero scores: a `> 0` or `>= kth` threshold keeps 2 or 24
        grads[0].view(-1)[[1, 7]] = torch.tensor([3.0, -4.0], dtype=torch.float64)
    else:  # 4 clear winners, then 5 equal scores competing for the last 2 places
        with torch.no_grad():
            for w in prunable.values():
                w.fill_(1.0)
        grads[2].view(-1)[:4] = 9.0
        grads[2].view(-1)[4:9] = 1.0
    set_grads(model, grads)
    selected = gsm.select()
    assert int(selected.sum()) == 6
    assert set(selected.unique().tolist()) <= {0.0, 1.0}
    if case == "mostly_zero":
        assert selected[1] == 1 and selected[7] == 1
    if case == "tie_at_the_boundary":
        assert int(selected[12:16].sum()) == 4 and int(selected[16:21].sum()) == 2


def test_two_steps_follow_the_gsm_formula():
    """Selected entries: momentum + decay + gradient; unselected: momentum + decay only; biases: full grad, no decay."""
    model, prunable, groups = tiny()
    alpha, beta, eta = 0.1, 0.9, 0.01
    gsm, _ = gsm_for(model, prunable, groups, sparsity=0.75, lr=alpha, momentum=beta, wd=eta)
    names = [n for n, _ in model.named_parameters()]
    is_weight = [n in prunable for n in names]
    W = [p.detach().clone() for p in model.parameters()]
    Z = [torch.zeros_like(w) for w in W]
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        grads = [torch.randn(w.shape, generator=gen, dtype=w.dtype) for w in W]
        scores = flat([(g * w).abs() for g, w, pw in zip(grads, W, is_weight) if pw])
        top = torch.zeros_like(scores)
        top[torch.argsort(scores, descending=True)[:gsm.q]] = 1
        B, start = [], 0
        for w, pw in zip(W, is_weight):
            if pw:
                B.append(top[start:start + w.numel()].view(w.shape))
                start += w.numel()
            else:
                B.append(torch.ones_like(w))  # biases are never masked ...
        Z = [beta * z + (eta * w if pw else 0.0) + b * g  # ... and never decayed
             for z, w, g, b, pw in zip(Z, W, grads, B, is_weight)]
        W = [w - alpha * z for w, z in zip(W, Z)]
        set_grads(model, grads)
        gsm.step()
        assert torch.equal(gsm.selected, top)
        for name, p, w in zip(names, model.parameters(), W):
            torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-14, msg=name)
    # the second step really had unselected entries with large gradients that must not leak in
    unselected = top == 0
    assert unselected.sum() == 18 and flat(grads[i] for i in (0, 2)).abs()[unselected].max() > 1.0


def test_truncation_keeps_exactly_q_largest_and_budget_sets_q():
    model, prunable, groups = tiny()
    gsm, _ = gsm_for(model, prunable, groups, sparsity=0.0, budget=5)
    assert gsm.q == 5  # a parameter budget overrides the sparsity
    before = flat([w.detach().abs() for w in prunable.values()])
    gsm.truncate()
    after = flat([w.detach() for w in prunable.values()])
    assert int(after.count_nonzero()) == 5
    assert before[after != 0].min() >= before[after == 0].max()
    masks = gsm.final_masks()
    assert sum(masks.kept_counts().values()) == 5


# ---- the G phase inside the pipeline -------------------------------------------------------

def test_gsm_momentum_default_is_098_and_g_phase_decays_only_weights():
    phases = expand_phases(PipelineSpec(flow="DGD", momentum=0.9))
    assert [p.momentum for p in phases] == [0.9, 0.98, 0.9]
    pipe = Pipeline(spec(weight_decay=0.05))
    pipe.run(stop_after_phase=0)
    g_phase = pipe.phases[1]
    pipe._start_phase(g_phase)
    groups = pipe.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0] and groups[0]["momentum"] == 0.98

    # One real minibatch step: every parameter moves exactly as the GSM rule says.
    set_lr(pipe.optimizer, g_phase.lr)
    params = dict(pipe.model.named_parameters())
    pipe.optimizer.zero_grad()
    F.cross_entropy(pipe.model(pipe.data.train_x[:32]), pipe.data.train_y[:32]).backward()
    before = {n: p.detach().clone() for n, p in params.items()}
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    bufs = {n: pipe.optimizer.state[p]["momentum_buffer"].clone() for n, p in params.items()}
    pipe.phase_state.gsm.step()
    selected = {n: v for n, v in zip(pipe.phase_state.gsm.names, pipe.phase_state.gsm.selected_views)}
    lr, beta, eta = g_phase.lr, 0.98, 0.05
    for name, p in params.items():
        if name in pipe.prunable:
            z = beta * bufs[name] + eta * before[name] + selected[name] * grads[name]
        elif name.endswith("weight"):  # the dense first layer: full gradient, decayed like every weight
            z = beta * bufs[name] + eta * before[name] + grads[name]
        else:  # biases: full gradient, no decay
            z = beta * bufs[name] + grads[name]
        torch.testing.assert_close(p.detach(), before[name] - lr * z, rtol=1e-6, atol=1e-7, msg=name)
        if name.endswith("bias"):
            with_decay = before[name] - lr * (z + eta * before[name])
            assert not torch.allclose(with_decay, before[name] - lr * z, rtol=1e-6, atol=1e-7)
    assert 0 < sum(int(s.sum()) for s in selected.values()) == pipe.phase_state.gsm.q


def test_passive_decay_matches_lr_wd_over_one_minus_momentum():
    """Loss gradient forced to 0: after 300 warm-up steps (beta^300 ~ 2e-3 of the momentum transient left)
    every weight shrinks by (1 - lr*wd/(1-beta))^T over T = 2000 steps, within 1%.

    Regime: lr*wd/(1-beta)^2 = 0.0125 << 1; the formula is a first-order approximation of the
    recurrence's dominant root (at lr 0.1 the exact decay is ~17% faster per step).
    """
    lr, wd, beta, warmup, steps = 0.01, 5e-4, 0.98, 300, 2000
    pipe = Pipeline({"task": TASK, "pipeline": {"flow": "G", "epochs": 1, "lr": lr, "sparsity": 0.8,
                                                 "weight_decay": wd, "exclude_first": True}, "seed": 0})
    pipe._start_phase(pipe.phases[0])  # fresh optimizer: Z starts at 0
    set_lr(pipe.optimizer, lr)
    params = list(pipe.model.parameters())
    biases = {n: p.detach().clone() for n, p in pipe.model.named_parameters() if n.endswith("bias")}

    def run(n):
        for _ in range(n):
            for p in params:
                p.grad = torch.zeros_like(p)
            pipe.phase_state.gsm.step()

    run(warmup)
    start = flat([w.detach() for w in pipe.prunable.values()]).clone()
    run(steps)
    ratio = flat([w.detach() for w in pipe.prunable.values()]) / start
    predicted = (1 - lr * wd / (1 - beta)) ** steps
    assert predicted < 0.65  # the decay is large enough to measure
    assert ((ratio / predicted - 1).abs() < 0.01).all()
    assert ((ratio / (1 - lr * wd) ** steps - 1).abs() > 0.3).all()  # momentum amplifies the decay 1/(1-beta)
    for name, b in biases.items():
        assert torch.equal(dict(pipe.model.named_parameters())[name], b)  # no decay on biases


def test_flow_dg_end_to_end():
    result = run_pipeline(spec(flow="DG", epochs=[1, 3], lr=[0.05, 0.02]))
    pipe_total = 32 * 24 + 24 * 4  # prunable: every Linear weight but the first
    q = kept_count(pipe_total, 1 - 0.8)
    weights = prunable_weights(result.model)
    assert sum(int(w.count_nonzero()) for w in weights.values()) == q
    assert result.final["sparsity"] == pytest.approx(1 - q / pipe_total, abs=1e-12)
    # acc_after_G1 is measured after truncation (the model as returned)
    data = Pipeline(spec(flow="DG", epochs=[1, 3], lr=[0.05, 0.02])).data
    assert result.final["acc_after_G1"] == evaluate(result.model, data.test_x, data.test_y, 2048)[1]
    assert result.final["val_acc_after_G1"] == evaluate(result.model, data.val_x, data.val_y, 2048)[1]
    assert [h["phase_kind"] for h in result.history] == list("DGGG")
    densities = result.extra["gsm_layer_densities"]
    assert list(densities) == list(weights)
    assert sum(d * weights[n].numel() for n, d in densities.items()) == pytest.approx(q)
    assert densities == {n: int(w.count_nonzero()) / w.numel() for n, w in weights.items()}
    overlap = result.extra["gsm_overlap"]
    assert len(overlap) == 2 and all(0.0 <= o <= 1.0 for o in overlap)  # epochs 2 and 3 vs the previous
    assert result.status == "ok"


def test_flow_dgd_redense_restarts_pruned_weights_from_zero():
    pipe = Pipeline(spec())
    pipe.run(stop_after_phase=1)
    q = kept_count(32 * 24 + 24 * 4, 1 - 0.8)
    pruned = {n: w.detach() == 0 for n, w in pipe.prunable.items()}
    assert sum(int((~m).sum()) for m in pruned.values()) == q
    redense = pipe.phases[2]
    pipe._start_phase(redense)
    assert pipe.masks is None and not hasattr(pipe.phase_state, "gsm")  # the GSM state ended with its phase
    assert all(g["weight_decay"] == 1e-3 for g in pipe.optimizer.param_groups)  # decay back on biases
    for name, w in pipe.prunable.items():
        assert (pipe.optimizer.state[w]["momentum_buffer"][pruned[name]] == 0).all()
    set_lr(pipe.optimizer, redense.lr)
    pipe.optimizer.zero_grad()
    F.cross_entropy(pipe.model(pipe.data.train_x[:32]), pipe.data.train_y[:32]).backward()
    grads = {n: w.grad.detach().clone() for n, w in pipe.prunable.items()}
    pipe.optimizer.step()
    moved = 0
    for name, w in pipe.prunable.items():
        expected = -redense.lr * grads[name][pruned[name]]  # from 0, zero momentum, decay of 0 is 0
        assert torch.equal(w[pruned[name]], expected)
        moved += int(expected.count_nonzero())
    assert moved > 0
    result = pipe.run()
    assert result.final["sparsity"] < 0.8 and "acc_after_D2" in result.final


def test_parameter_budget_gives_exactly_that_many_nonzeros():
    result = run_pipeline(spec(flow="DG", epochs=[1, 2], lr=[0.05, 0.02], gsm={"budget": 37}))
    weights = prunable_weights(result.model)
    assert sum(int(w.count_nonzero()) for w in weights.values()) == 37
    assert sum(d * weights[n].numel() for n, d in result.extra["gsm_layer_densities"].items()) == pytest.approx(37)


@pytest.fixture(scope="module")
def full_dgd():
    return run_pipeline(spec())


@pytest.mark.parametrize("stop_epoch", [2, 3, 4])  # mid-G (twice) and at the G -> D boundary
def test_restore_mid_g_phase_is_bit_identical(tmp_path, stop_epoch, full_dgd):
    full = full_dgd
    result = run_interrupted(spec(), stop_epoch, tmp_path / "state.pt")
    for (name, a), b in zip(full.model.state_dict().items(), result.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert result.history == full.history
    assert result.extra == full.extra
    assert not math.isnan(result.final["acc_after_G1"])
