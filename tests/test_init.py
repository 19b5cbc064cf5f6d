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


INIT_FIELDS = ("positions", "base", "control", "floors", "gain", "bias", "bias_std")


def spec(density="erk", weights="base", flow="S", init_density=0.2, **options):
    fields = {k: options.pop(k) for k in INIT_FIELDS if k in options}
    return {"task": TASK, "init": {"density": density, "weights": weights, "init_density": init_density,
                                   "options": {"ai_steps": 50, **options}, **fields},
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


# ---- like with like: one allocation for every weight scheme ---------------------------------------

CONV_TASK = {"dataset": "synthetic", "dataset_args": {"num_train": 200, "num_test": 50, "input_shape": [40],
                                                      "num_classes": 10},
             "model": "conv1d", "batch_size": 50, "device": "cpu"}


def conv_spec(weights, **init):
    return {"task": CONV_TASK, "init": {"density": "erk", "weights": weights, "init_density": 0.02,
                                        "options": {"ai_steps": 20}, **init},
            "pipeline": {"flow": "S", "epochs": 1, "lr": 0.05, "exclude_first": False}, "seed": 0}


def test_base_eoi_and_ai_arms_of_one_allocator_get_identical_per_layer_densities():
    """ERK at density 0.02 on conv1d: EOI's floors bind for the head and features.2 (the case where
    only EOI arms used to be floored: head 0.085 base vs 0.041 EOI)."""
    arms = {w: Pipeline(conv_spec(w)) for w in ("base", "eoi", "ai")}
    allocated = {w: p.init_result.allocated for w, p in arms.items()}
    assert allocated["base"] == allocated["eoi"] == allocated["ai"]
    counts = {w: p.init_masks.kept_counts() for w, p in arms.items()}
    assert counts["base"] == counts["eoi"] == counts["ai"]
    assert arms["base"].layer_densities == arms["eoi"].layer_densities
    assert arms["base"].extra["init_floored_layers"] == arms["eoi"].extra["init_floored_layers"]
    assert arms["base"].extra["init_floored_layers"]  # the floors do bind here, for every arm
    assert arms["ai"].phase_end["init_floored_layers"] == len(arms["base"].extra["init_floored_layers"])
    for name, weight in arms["eoi"].prunable.items():  # ... and EOI stays orthogonal at those counts
        if weight.dim() == 2:
            assert orthogonality_error(weight) < 1e-5, name


def test_floors_none_is_refused_for_eoi_and_changes_base():
    with pytest.raises(SpecError, match="init.floors"):
        Pipeline(conv_spec("eoi", floors="none"))
    unfloored = Pipeline(conv_spec("base", floors="none")).init_result.allocated
    assert unfloored != Pipeline(conv_spec("base")).init_result.allocated


# ---- positions: the pruner's own mask, random positions, sanity controls -------------------------

def snip_spec(**init):
    return spec("snip", init_density=0.2, **init)


def test_snip_pruner_mask_is_the_top_k_of_g_times_w_on_its_scoring_batch():
    from dsdtune.models import build_model
    from dsdtune.sparsity.density import snip_scores
    from dsdtune.sparsity.topk import top_k_mask
    from dsdtune.seeding import seed_everything

    pipe = Pipeline(snip_spec())
    assert pipe.init_result.positions == "pruner" and not pipe.init_result.floored
    seed_everything(3)  # the pipeline's model before the init: same seed, same default weights
    fresh = build_model("mlp", pipe.data.input_shape, pipe.data.num_classes, widths=[64, 48])
    names = list(pipe.prunable)
    scores = snip_scores(fresh, names, *pipe.init_result.scoring_batch)
    flat = torch.cat([scores[n].flatten() for n in names])
    expected = top_k_mask(flat, kept_count(flat.numel(), 0.2))
    got = torch.cat([pipe.init_masks[n].flatten().bool() for n in names])
    assert torch.equal(got, expected)
    params = dict(fresh.named_parameters())
    for name in names:  # kept weights keep their initial values
        mask = pipe.init_masks[name].bool()
        assert torch.equal(pipe.prunable[name][mask], params[name].detach()[mask])


def test_pruner_positions_keep_larger_weights_than_random_positions_at_the_same_densities():
    pruner, random = Pipeline(snip_spec()), Pipeline(snip_spec(positions="random"))
    assert pruner.init_masks.kept_counts() == random.init_masks.kept_counts()
    for name in pruner.prunable:
        kept_pruner = pruner.prunable[name].abs().sum() / pruner.init_masks[name].sum()
        kept_random = random.prunable[name].abs().sum() / random.init_masks[name].sum()
        assert kept_pruner > 1.2 * kept_random, name


def test_shuffle_control_keeps_every_layer_count_and_changes_positions():
    plain, shuffled = Pipeline(snip_spec()), Pipeline(snip_spec(control="shuffle"))
    assert plain.init_masks.kept_counts() == shuffled.init_masks.kept_counts()
    for name in plain.prunable:
        assert not torch.equal(plain.init_masks[name], shuffled.init_masks[name]), name
        assert (shuffled.prunable[name][shuffled.init_masks[name] == 0] == 0).all()


def test_reinit_control_keeps_the_mask_and_redraws_the_kept_weights():
    plain, reinit = Pipeline(snip_spec()), Pipeline(snip_spec(control="reinit"))
    for name in plain.prunable:
        assert torch.equal(plain.init_masks[name], reinit.init_masks[name]), name
        mask = plain.init_masks[name].bool()
        assert not torch.equal(plain.prunable[name][mask], reinit.prunable[name][mask]), name
        assert (reinit.prunable[name][~mask] == 0).all()


def test_orthogonal_base_weights_are_orthogonal_before_the_mask():
    dense = Pipeline(spec("dense", "base", flow="D", base="orthogonal", gain=1.0))
    assert dense.init_masks is None
    assert all(orthogonality_error(w) < 1e-5 for w in dense.prunable.values())


@pytest.mark.parametrize("init,words", [
    ({"density": "erk", "positions": "pruner"}, "init.positions: 'erk' is not a pruner"),
    ({"density": "snip", "weights": "eoi", "positions": "pruner"}, "init.positions: EOI chooses its own"),
    ({"density": "snip", "weights": "eoi", "control": "shuffle"}, "init.control"),
    ({"density": "uniform", "bias": "normal"}, "init.bias_std"),
])
def test_meaningless_init_combinations_are_refused(init, words):
    with pytest.raises(SpecError, match=words):
        Pipeline({"task": TASK, "init": init, "pipeline": {"flow": "S"}, "seed": 0})


# ---- biases, semantic traps -----------------------------------------------------------------------

def test_bias_init_zero_and_normal_for_every_arm():
    zero = Pipeline(spec("uniform", bias="zero"))
    assert all(bool((p == 0).all()) for n, p in zero.model.named_parameters() if n.endswith("bias"))
    normal = Pipeline(spec("dense", "base", flow="D", bias="normal", bias_std=0.01))
    biases = torch.cat([p.detach().flatten() for n, p in normal.model.named_parameters() if n.endswith("bias")])
    assert 0.007 < float(biases.std()) < 0.013 and abs(float(biases.mean())) < 0.003


def test_sparse_init_phase_takes_its_sparsity_from_the_init_and_refuses_another():
    pipe = Pipeline(spec("erk", init_density=0.2))
    assert pipe.phases[0].sparsity == pytest.approx(0.8)
    same = spec("erk", init_density=0.2)
    same["pipeline"]["sparsity"] = 0.8
    Pipeline(same)  # consistent: accepted
    other = spec("erk", init_density=0.2)
    other["pipeline"]["sparsity"] = 0.5
    with pytest.raises(SpecError, match="pipeline.sparsity: the first S phase trains the sparse init's mask"):
        Pipeline(other)


@pytest.mark.parametrize("overrides,words", [
    (["init.density=erk", "init.init_density=0.2"], "needs a flow that starts with S"),
    (["init.density=erk", "pipeline.flow=SDS", "pipeline.epochs=[1,1,1]", "pipeline.sparsity=0.5"],
     "pipeline.sparsity: the first S phase"),
    (["init.density=uniform", "init.positions=pruner"], "not a pruner"),
    (["pipeline.flow=DXD"], "unknown phase kind X"),
])
def test_refused_combinations_are_one_line_and_exit_2(tmp_path, capsys, overrides, words):
    from pathlib import Path

    from dsdtune.study import main
    tiny = Path(__file__).parent / "studies" / "tiny.yaml"
    results = tmp_path / "results"
    args = [str(tiny), "--results", str(results)]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    assert not results.exists()


# ---- the deep-network protocol --------------------------------------------------------------------

def test_deep_mlp_eoi_study_eoi_arm_is_near_isometry_at_init_and_base_is_not():
    """The study's own settings: the EOI arm's median largest input-to-logits singular value >= 0.2,
    the base arm's (orthogonal, then masked) vanishes through the depth."""
    from dsdtune.config import build_run_spec, load_study
    study = load_study("deep_mlp_eoi")
    values = {}
    for arm in ("sparse_base", "sparse_eoi"):
        run = build_run_spec(study.base_run(), study.variants[arm], seed=0)
        run.task.device = "cpu"
        values[arm] = Pipeline(run).phase_end["jacobian_sv_max_init"]
    assert values["sparse_eoi"] >= 0.2
    assert values["sparse_base"] < 0.01 * values["sparse_eoi"]


def test_allocator_options_reach_only_the_allocator_that_takes_them():
    """A study sets GraSP's sign once for every allocator it sweeps; uniform/SNIP ignore it."""
    for density in ("uniform", "erk", "snip", "synflow"):
        Pipeline(spec(density, sign="flipped", temperature=100.0, rounds=5))
    flipped, original = Pipeline(spec("grasp", sign="flipped")), Pipeline(spec("grasp", sign="original"))
    assert flipped.init_masks.kept_counts() != original.init_masks.kept_counts() or any(
        not torch.equal(flipped.init_masks[n], original.init_masks[n]) for n in flipped.prunable)
