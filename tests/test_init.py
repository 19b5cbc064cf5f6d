"""Init schemes wired into the pipeline: exact masks, EOI support and orthogonality, static sparse training."""
import pytest
import torch

from dsdtune.config import SpecError
from dsdtune.pipeline import Pipeline, run_pipeline
from dsdtune.sparsity.masks import kept_count
from dsdtune.sparsity.orthogonal import orthogonality_error

TASK = {"dataset": "synthetic", "dataset_args": {"num_train": 300, "num_test": 100, "input_shape": [16],
                                                 "num_classes": 4},
        "model": "mlp", "model_args": {"widths": [64, 48]}, "batch_size": 50, "device": "cpu"}


def spec(density="erk", weights="base", flow="S", init_density=0.2, **options):
    return {"task": TASK, "init": {"density": density, "weights": weights, "init_density": init_density,
                                   "options": {"ai_steps": 50, **options}},
            "pipeline": {"flow": flow, "epochs": 2, "lr": 0.05, "exclude_first": False}, "seed": 3}


@pytest.mark.parametrize("density", ["uniform", "erk", "snip", "grasp", "synflow"])
def test_base_init_masks_have_exact_counts_and_budget(density):
    pipe = Pipeline(spec(density))
    total = sum(p.numel() for p in pipe.prunable.values())
    kept = 0
    for name, weight in pipe.prunable.items():
        d = pipe.layer_densities[name]
        assert int(pipe.init_masks[name].sum()) == kept_count(weight.numel(), d)
        assert int(weight.count_nonzero()) <= int(pipe.init_masks[name].sum())
        assert (weight[pipe.init_masks[name] == 0] == 0).all()
        kept += int(pipe.init_masks[name].sum())
    assert abs(kept - round(0.2 * total)) <= len(pipe.prunable)  # rounding per layer


def test_eoi_weights_are_orthogonal_on_their_support_with_exact_counts():
    pipe = Pipeline(spec("uniform", "eoi", init_density=0.3))
    for name, weight in pipe.prunable.items():
        assert orthogonality_error(weight) < 1e-5, name
        mask = pipe.init_masks[name]
        assert bool((mask[weight != 0] == 1).all()), name  # the EOI support is in the mask ...
        assert int(mask.sum()) == kept_count(weight.numel(), pipe.init_result.allocated[name])  # ... topped up


def test_ai_is_only_approximately_orthogonal():
    pipe = Pipeline(spec("uniform", "ai", init_density=0.3, ai_steps=200))
    errors = [orthogonality_error(w) for w in pipe.prunable.values()]
    assert max(errors) > 1e-3  # a random sparse mask rarely admits an orthogonal matrix


def test_static_sparse_training_keeps_the_init_mask():
    seen = []
    result = run_pipeline(spec("erk", "eoi"), on_epoch=lambda m, p: seen.append(m["sparsity"]))
    expected = 1 - sum(int(m.sum()) for m in result.masks.tensors.values()) / sum(
        m.numel() for m in result.masks.tensors.values())
    assert seen == pytest.approx([expected] * 2, abs=1e-9)
    assert result.layer_densities and set(result.layer_densities) == set(result.masks.tensors)


def test_sparse_init_with_a_flow_not_starting_with_s_is_refused():
    with pytest.raises(SpecError, match="pipeline.flow: a sparse init .* needs a flow that starts with S"):
        Pipeline(spec("uniform", "base", flow="D"))


def test_dense_orthogonal_init_has_no_mask():
    pipe = Pipeline(spec("dense", "eoi"))
    assert pipe.init_masks is None
    assert all(orthogonality_error(w) < 1e-5 for w in pipe.prunable.values())


def test_init_is_deterministic_per_seed():
    a, b = Pipeline(spec("snip", "eoi")), Pipeline(spec("snip", "eoi"))
    for (name, wa), wb in zip(a.prunable.items(), b.prunable.values()):
        assert torch.equal(wa, wb), name
    other = spec("snip", "eoi")
    other["seed"] = 4
    c = Pipeline(other)
    assert any(not torch.equal(wa, wc) for wa, wc in zip(a.prunable.values(), c.prunable.values()))
