"""DSD exactness, checkpoint/restore and determinism of the phase pipeline (no Ray)."""
import math

import pytest
import torch
import torch.nn.functional as F

from dsdtune.config import SpecError
from dsdtune.phases import expand_phases
from dsdtune.pipeline import Pipeline, run_pipeline
from dsdtune.config import PipelineSpec
from dsdtune.sparsity.masks import kept_count
from dsdtune.training import set_lr
from interrupted import run_interrupted

TASK = {"dataset": "synthetic", "dataset_args": {"num_train": 320, "num_test": 100, "input_shape": [12],
                                                 "num_classes": 4},
        "model": "mlp", "model_args": {"widths": [32, 24]}, "batch_size": 32, "device": "cpu"}


def spec(**pipeline):
    base = {"flow": "DSD", "epochs": [2, 2, 2], "lr": 0.05, "sparsity": 0.6, "momentum": 0.9, "weight_decay": 1e-3}
    base.update(pipeline)
    return {"task": TASK, "pipeline": base, "seed": 7}


def test_phase_defaults_follow_the_paper():
    phases = expand_phases(PipelineSpec(flow="DSDSD", epochs=3, lr=0.1, sparsity=[0.5, 0.25]))
    assert [p.label for p in phases] == ["D1", "S1", "D2", "S2", "D3"]
    assert [p.lr for p in phases] == pytest.approx([0.1, 0.01, 0.001, 1e-4, 1e-5])
    assert [p.sparsity for p in phases] == [0, 0.5, 0, 0.25, 0]
    assert expand_phases(PipelineSpec(flow="DSD", lr=[0.1, None, 0.5]))[1].lr == pytest.approx(0.01)
    decayed = expand_phases(PipelineSpec(flow="DSDSDSD", sparsity=0.5, sparsity_decay=0.5))
    assert [p.sparsity for p in decayed if p.kind == "S"] == [0.5, 0.25, 0.125]


@pytest.mark.parametrize("flow_lengths", [{"epochs": [1, 2]}, {"lr": [0.1, 0.1]}, {"sparsity": [0.5, 0.5, 0.5, 0.1]}])
def test_list_lengths_must_match_flow(flow_lengths):
    with pytest.raises(SpecError, match="flow"):
        Pipeline(spec(**flow_lengths))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sparse_phase_is_exact_after_every_step(optimizer):
    lr = 0.05 if optimizer == "sgd" else 3e-3
    pipe = Pipeline(spec(optimizer=optimizer, lr=[lr, lr, lr]))
    pipe.run(stop_after_phase=0)
    first = next(iter(pipe.model.state_dict()))  # first layer's weight
    pipe._start_phase(pipe.phases[1])
    pruned = {n: m == 0 for n, m in pipe.masks.items()}
    assert first not in pipe.masks
    checks = []

    def check_after_step(optimizer, args, kwargs):  # only the gradients are masked: the step keeps the zeros
        for name, w in pipe.prunable.items():
            assert (w[pruned[name]] == 0).all()
            assert int(w.count_nonzero()) == kept_count(w.numel(), 1 - 0.6)
        checks.append(1)

    pipe.optimizer.register_step_post_hook(check_after_step)
    first_before = dict(pipe.model.named_parameters())[first].detach().clone()
    pipe.run(stop_after_phase=1)
    assert len(checks) == 2 * math.ceil(pipe.data.train_x.shape[0] / 32)  # every step of 2 epochs
    first_after = dict(pipe.model.named_parameters())[first]
    assert first_after.count_nonzero() == first_after.numel()  # first layer: none pruned
    assert not torch.equal(first_before, first_after)  # ... but trained
    # Adam/SGD buffers are zero where pruned
    for name, w in pipe.prunable.items():
        for buf in pipe.optimizer.state[w].values():
            if torch.is_tensor(buf) and buf.shape == w.shape:
                assert (buf[pruned[name]] == 0).all()


def test_without_remasking_weight_decay_leaks():
    """The check above can fail: an S phase that does not mask the gradients lets pruned weights move."""
    pipe = Pipeline(spec(optimizer="adam", lr=[3e-3] * 3))
    pipe.run(stop_after_phase=0)
    pipe._start_phase(pipe.phases[1])
    pruned = {n: m == 0 for n, m in pipe.masks.items()}
    pipe.applier.apply_to_grads = lambda step=0: None
    pipe.run(stop_after_phase=1)
    assert any((w[pruned[n]] != 0).any() for n, w in pipe.prunable.items())


def test_redense_restarts_pruned_weights_from_zero():
    pipe = Pipeline(spec(weight_decay=1e-3))
    pipe.run(stop_after_phase=1)
    pruned = {n: m == 0 for n, m in pipe.masks.items()}
    redense = pipe.phases[2]
    pipe._start_phase(redense)
    assert pipe.masks is None
    for name, w in pipe.prunable.items():
        assert (w[pruned[name]] == 0).all()
        assert (pipe.optimizer.state[w]["momentum_buffer"][pruned[name]] == 0).all()
    set_lr(pipe.optimizer, redense.lr)
    x, y = pipe.data.train_x[:32], pipe.data.train_y[:32]
    pipe.optimizer.zero_grad()
    F.cross_entropy(pipe.model(x), y).backward()
    grads = {n: w.grad.detach().clone() for n, w in pipe.prunable.items()}
    pipe.optimizer.step()
    for name, w in pipe.prunable.items():
        expected = -redense.lr * grads[name][pruned[name]]
        assert torch.equal(w[pruned[name]], expected)
        assert expected.abs().sum() > 0


@pytest.mark.parametrize("stop_epoch", [3, 4])  # mid-S and at the S -> D boundary
def test_restore_mid_run_is_bit_identical(tmp_path, stop_epoch):
    full = run_pipeline(spec())
    result = run_interrupted(spec(), stop_epoch, tmp_path / "state.pt")
    for (name, a), b in zip(full.model.state_dict().items(), result.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert result.history == full.history


def test_same_seed_same_history_other_seed_differs():
    a, b = run_pipeline(spec()), run_pipeline(spec())
    assert a.history == b.history
    other = spec()
    other["seed"] = 8
    assert run_pipeline(other).history != a.history


def test_metrics_and_phase_end_accuracies():
    seen = []
    result = run_pipeline(spec(), on_epoch=lambda m, p: seen.append(m))
    assert [m["epoch"] for m in seen] == [1, 2, 3, 4, 5, 6]
    assert [m["phase_kind"] for m in seen] == list("DDSSDD")
    assert seen[3]["sparsity"] == pytest.approx(0.6, abs=0.01)
    assert seen[5]["sparsity"] < 0.6  # re-dense: pruned weights grow back
    assert {"acc_after_D1", "acc_after_S1", "acc_after_D2"} <= set(result.final)
    assert seen[1]["acc_after_D1"] == seen[1]["test_acc"]
    assert result.status == "ok" and result.final["epochs_trained"] == 6
    assert [m["lr"] for m in seen] == pytest.approx([0.05, 0.05, 0.005, 0.005, 5e-4, 5e-4])


def test_sparsity_zero_is_the_fine_tune_control():
    """DSD at sparsity 0 = dense training with the same LRs and epochs."""
    a = run_pipeline(spec(sparsity=0.0))
    b = run_pipeline(spec(flow="DDD", sparsity=0.0))
    assert [h["val_acc"] for h in a.history] == [h["val_acc"] for h in b.history]


def test_divergence_is_reported():
    result = run_pipeline(spec(lr=1e4, momentum=0.0))
    assert result.status == "diverged"
    assert not math.isfinite(result.history[-1]["train_loss"])
    assert len(result.history) < 6


def test_static_sparse_and_prune_only_phase():
    result = run_pipeline(spec(flow="DS", epochs=[2, 0]))
    assert result.final["sparsity"] == pytest.approx(0.6, abs=0.01)
    assert "acc_after_S1" in result.final


def test_an_empty_split_scores_nan_not_zero():
    """A split of no samples has no loss or accuracy; 0 would make every configuration look perfect (loss)."""
    from dsdtune.training import evaluate, evaluate_batches
    model = torch.nn.Linear(3, 2)
    loss, acc = evaluate(model, torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 8)
    assert math.isnan(loss) and math.isnan(acc)
    assert all(math.isnan(v) for v in evaluate_batches(model, iter(())))
    loss, acc = evaluate(model, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), 8)
    assert math.isfinite(loss) and acc in (0.0, 1.0)


def test_a_random_criterion_leaves_its_seeds_data_order_alone(monkeypatch):
    """Arms of one seed see the same batches in every phase whatever their criterion draws: the
    random criterion draws its mask from its own generator, never the data order's (the report's
    paired tests rest on it)."""
    import dsdtune.data.tensors as tensors

    orders: list[list[torch.Tensor]] = []
    real = tensors.batch_indices

    def recorded(n, batch_size, generator, device="cpu"):
        batches = real(n, batch_size, generator, device)
        orders[-1].append(torch.cat(batches))
        return batches

    monkeypatch.setattr(tensors, "batch_indices", recorded)
    for criterion in ("layerwise_magnitude", "random"):
        orders.append([])
        run_pipeline(spec(criterion=criterion))
    assert len(orders[0]) == len(orders[1]) == 6
    assert all(torch.equal(a, b) for a, b in zip(*orders))
    assert not torch.equal(orders[0][2], orders[0][3])  # the order is drawn anew each epoch
