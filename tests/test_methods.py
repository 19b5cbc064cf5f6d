"""The baselines as phase kinds: gradual magnitude pruning (M), RigL (R), SET (E), lottery tickets (L).

Exact per-layer kept counts, grown weights and their optimizer state exactly 0, the rewind point's
weights, iterative magnitude pruning's global levels, bit-identical resume inside each phase,
training FLOPs from what each kind recorded, and settings refused in one line.
"""
from __future__ import annotations

import pytest
import torch

from dsdtune.config import PipelineSpec, SpecError, load_study
from dsdtune.cost import samples_between, trial_cost
from dsdtune.phases import GradualState, RigLState, expand_phases
from dsdtune.pipeline import Pipeline, run_pipeline
from dsdtune.sparsity.schedules import gmp_sparsity, phase_step
from dsdtune.sparsity.topk import kept_count

from interrupted import run_interrupted

# 540 training rows (600 minus the 10% validation split) in batches of 50: 11 steps per epoch.
TASK = {"dataset": "synthetic", "dataset_args": {"num_train": 600, "num_test": 100, "input_shape": [12],
                                                 "num_classes": 3},
        "model": "mlp", "model_args": {"widths": [32, 24]}, "batch_size": 50, "device": "cpu"}
STEPS_PER_EPOCH = 11


def spec(flow, epochs, seed=0, init=None, **pipeline):
    base = {"flow": flow, "epochs": epochs, "lr": 0.05, "sparsity": 0.8, "momentum": 0.9}
    base.update(pipeline)
    out = {"task": TASK, "pipeline": base, "seed": seed}
    if init:
        out["init"] = init
    return out


class SpyMasks:
    """Records a copy of every mask set the pipeline binds (monkeypatched onto Pipeline.set_masks)."""

    def __init__(self, monkeypatch):
        self.calls: list[dict[str, torch.Tensor]] = []
        original = Pipeline.set_masks
        spy = self

        def set_masks(pipe, masks):
            spy.calls.append({n: m.detach().clone() for n, m in masks.items()})
            original(pipe, masks)

        monkeypatch.setattr(Pipeline, "set_masks", set_masks)


# ---- M: gradual magnitude pruning --------------------------------------------------------------

def test_gmp_kept_counts_exact_at_every_pruning_step_and_at_its_end(monkeypatch):
    spy = SpyMasks(monkeypatch)
    gradual = {"initial_sparsity": 0.1, "begin": 0.1, "end": 0.6, "every_steps": 4}
    pipe = Pipeline(spec("DM", [1, 3], gradual=gradual))
    result = pipe.run()
    total = 3 * STEPS_PER_EPOCH
    begin, end = phase_step(0.1, total), phase_step(0.6, total)
    assert (begin, end) == (3, 20)
    steps = [0] + [t for t in range(begin, end + 1) if (t - begin) % 4 == 0 or t == end]
    assert len(spy.calls) == len(steps)  # step 0: every weight kept; then one mask per ramp step
    changes = dict((s, d) for s, d in result.extra["phase_costs"]["M1"]["density_changes"])
    numel = {n: w.numel() for n, w in pipe.prunable.items()}
    for t, masks in zip(steps[1:], spy.calls[1:]):
        target = gmp_sparsity(t, begin=begin, end=end, final=0.8, initial=0.1)
        for name, mask in masks.items():
            assert int(mask.sum()) == kept_count(numel[name], 1 - target), (t, name)
            if t in changes:  # the cost record keeps the steps where a density changed
                assert changes[t][name] == kept_count(numel[name], 1 - target) / numel[name]
    assert set(changes) <= set(steps) and len(changes) >= 4
    for before, after in zip(spy.calls, spy.calls[1:]):  # pruned weights stay pruned
        assert all(bool((after[n] <= before[n]).all()) for n in before)
    for name, weight in pipe.prunable.items():  # the end: exactly the final sparsity, momentum zeroed
        assert int(weight.count_nonzero()) <= kept_count(numel[name], 0.2)
        assert int(result.masks[name].sum()) == kept_count(numel[name], 0.2)
        buffer = pipe.optimizer.state[weight]["momentum_buffer"]
        assert bool((buffer[result.masks[name] == 0] == 0).all())


def test_gmp_global_criterion_keeps_an_exact_total():
    result = run_pipeline(spec("DM", [1, 2], criterion="global_magnitude",
                               gradual={"end": 0.5, "every_steps": 5}))
    counts = sum(int(m.sum()) for m in result.masks.tensors.values())
    assert counts == kept_count(sum(m.numel() for m in result.masks.tensors.values()), 0.2)


def test_gmp_training_flops_follow_the_density_of_every_step():
    pipe = Pipeline(spec("DM", [1, 2], gradual={"end": 0.5, "every_steps": 3}))
    pipe.run()
    model_cost = pipe.measure()
    cost = pipe.cost(model_cost)
    record = pipe.extra["phase_costs"]["M1"]["density_changes"]
    per_step = {}
    for (start, densities), stop in zip(record, [s for s, _ in record[1:]] + [2 * STEPS_PER_EPOCH]):
        for t in range(start, stop):
            per_step[t] = densities
    by_hand = sum(3 * model_cost.forward_flops_at(per_step[t]) * samples_between(t, t + 1, 540, 50)
                  for t in range(2 * STEPS_PER_EPOCH))
    assert cost.phases[1].training_flops == pytest.approx(by_hand, rel=1e-12)
    assert cost.phases[0].training_flops == 3 * model_cost.forward_flops * 540
    assert samples_between(0, 2 * STEPS_PER_EPOCH, 540, 50) == 2 * 540  # the last batch of an epoch is 40


# ---- R and E: dynamic sparse training ------------------------------------------------------------

ERK = {"density": "erk", "init_density": 0.25}


@pytest.mark.parametrize("flow", ["R", "E"])
def test_dst_counts_unchanged_while_masks_move_grown_weights_and_state_exactly_zero(flow, monkeypatch):
    updates = []
    original = RigLState.update

    def update(state, step):
        before = {n: m.detach().clone() for n, m in state.ctx.masks.items()}
        original(state, step)
        masks, optimizer = state.ctx.masks, state.ctx.optimizer
        for name, weight in state.ctx.prunable.items():
            grown = (masks[name] > 0) & (before[name] == 0)
            assert bool((weight[grown] == 0).all())
            assert bool((optimizer.state[weight]["momentum_buffer"][grown] == 0).all())
            dropped = (masks[name] == 0) & (before[name] > 0)
            assert bool((weight[dropped] == 0).all())
        updates.append((step, before, {n: m.detach().clone() for n, m in masks.items()}))

    monkeypatch.setattr(RigLState, "update", update)
    pipe = Pipeline(spec(flow, 3, init=ERK, dst={"every_steps": 4, "drop_fraction": 0.5}, sparsity=None))
    init_counts = pipe.init_masks.kept_counts()
    init_masks = {n: m.clone() for n, m in pipe.init_masks.items()}
    result = pipe.run()
    update_end = phase_step(0.75, 3 * STEPS_PER_EPOCH)
    assert [s + 1 for s, _, _ in updates] == list(range(4, update_end, 4))
    for _, before, after in updates:
        assert {n: int(m.sum()) for n, m in after.items()} == init_counts
    assert result.masks.kept_counts() == init_counts
    moved = sum(int((result.masks[n] != init_masks[n]).sum()) for n in init_masks)
    assert moved > 0  # the masks left the init's
    work = result.extra["phase_costs"][f"{flow}1"]["work"]
    assert len(work) == (2 * len(updates) if flow == "R" else 0)  # RigL's dense gradients, SET's none


def test_rigl_and_set_differ_only_in_growth():
    rigl = run_pipeline(spec("R", 2, init=ERK, dst={"every_steps": 4}, sparsity=None))
    set_ = run_pipeline(spec("E", 2, init=ERK, dst={"every_steps": 4}, sparsity=None))
    assert rigl.masks.kept_counts() == set_.masks.kept_counts()
    assert any(not torch.equal(rigl.masks[n], set_.masks[n]) for n in rigl.masks)


def test_rigl_after_a_dense_phase_prunes_to_its_sparsity_by_magnitude():
    pipe = Pipeline(spec("DR", [1, 1], dst={"every_steps": 5}))
    result = pipe.run()
    for name, weight in pipe.prunable.items():
        assert int(result.masks[name].sum()) == kept_count(weight.numel(), 0.2)


def test_rigl_cost_adds_a_dense_gradient_per_update():
    pipe = Pipeline(spec("R", 2, init=ERK, dst={"every_steps": 4}, sparsity=None))
    pipe.run()
    model_cost = pipe.measure()
    cost = pipe.cost(model_cost)
    densities = pipe.init_masks.layer_densities()
    sparse = model_cost.forward_flops_at(densities)
    updates = [t for t in range(4, phase_step(0.75, 22), 4)]
    extra = sum((model_cost.forward_flops - sparse) * samples_between(t - 1, t, 540, 50) for t in updates)
    assert cost.training_flops == pytest.approx(3 * sparse * 2 * 540 + extra, rel=1e-12)


# ---- L: lottery tickets --------------------------------------------------------------------------

def test_lottery_ticket_at_zero_epochs_is_mask_times_the_rewind_point():
    pipe = Pipeline(spec("DL", [2, 0], exclude_first=True))
    initial = {n: w.detach().clone() for n, w in pipe.model.named_parameters()}
    result = pipe.run()
    for name, weight in pipe.prunable.items():
        assert torch.equal(weight.detach(), result.masks[name] * initial[name])
    for name, param in pipe.model.named_parameters():  # biases and the dense first layer rewound too
        if name not in pipe.prunable:
            assert torch.equal(param.detach(), initial[name])


def test_late_rewinding_returns_to_the_weights_after_k_steps():
    k = 5
    pipe = Pipeline(spec("DL", [2, 0], rewind={"step": k}))
    result = pipe.run()
    reference = Pipeline(spec("D", [2]))
    initial = {n: w.detach().clone() for n, w in reference.model.named_parameters()}
    after_k = {}
    original = reference._epoch_hooks

    def hooks(phase, first_step):
        out = original(phase, first_step)

        def after_step(step):
            if step + 1 == k:
                after_k.update({n: w.detach().clone() for n, w in reference.model.named_parameters()})
        out["after_step"] = after_step
        return out

    reference._epoch_hooks = hooks
    reference.run()
    for name, weight in pipe.prunable.items():
        assert torch.equal(weight.detach(), result.masks[name] * after_k[name])
    assert not torch.equal(after_k["layers.0.weight"], initial["layers.0.weight"])  # k steps did train


def test_iterative_magnitude_pruning_levels_are_global_and_nested(monkeypatch):
    spy = SpyMasks(monkeypatch)
    pipe = Pipeline(spec("DLLL", [1, 1, 1, 1], sparsity=[0.2, 0.36, 0.488]))
    pipe.run()
    total = sum(w.numel() for w in pipe.prunable.values())  # L prunes the first layer too (open_lth)
    assert "layers.0.weight" in pipe.prunable
    levels = [sum(int(m.sum()) for m in masks.values()) for masks in spy.calls]
    assert levels == [kept_count(total, 0.8), kept_count(total, 0.64), kept_count(total, 0.512)]
    for before, after in zip(spy.calls, spy.calls[1:]):
        assert all(bool((after[n] <= before[n]).all()) for n in before)


# ---- every kind: resume inside the phase, shared prefixes ----------------------------------------

@pytest.mark.parametrize("flow,pipeline,init", [
    ("DM", {"gradual": {"every_steps": 3, "end": 0.8}}, None),
    ("R", {"dst": {"every_steps": 3}, "sparsity": None}, ERK),
    ("E", {"dst": {"every_steps": 3}, "sparsity": None}, ERK),
    ("DLL", {"sparsity": [0.5, 0.75], "rewind": {"step": 4}}, None),
])
def test_checkpoint_inside_each_kind_resumes_bit_identically(tmp_path, flow, pipeline, init):
    epochs = [1] + [3] * (len(flow) - 1) if flow.startswith("D") else 3
    run = spec(flow, epochs, init=init, **pipeline)
    whole = run_pipeline(run)
    stop = 2 if flow.startswith("D") else 1  # an epoch inside the first non-dense phase
    resumed = run_interrupted(run, stop, tmp_path / "state.pt")
    assert resumed.history == whole.history
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.extra["phase_costs"] == whole.extra["phase_costs"]


def test_a_dense_prefix_stored_by_another_arm_serves_a_lottery_ticket():
    """The trial that trains a shared prefix keeps the rewind point its lottery-ticket arms need."""
    common = {"exclude_first": True, "criterion": None}
    rep = Pipeline(spec("DSD", [2, 1, 1], **common), snapshots=[(0, 0)])
    rep.run(stop_after_phase=0)
    dependent = Pipeline(spec("DLL", [2, 1, 1], sparsity=[0.5, 0.75], **common))
    dependent.load_state_dict(rep.state_dict())
    solo = run_pipeline(spec("DLL", [2, 1, 1], sparsity=[0.5, 0.75], **common))
    shared = dependent.run()
    assert shared.history == solo.history


def test_arms_of_one_seed_share_the_dense_prefix(tmp_path):
    study = tmp_path / "methods.yaml"
    study.write_text("""
name: methods
task: {dataset: synthetic, model: mlp, model_args: {widths: [16]}, batch_size: 50}
pipeline: {flow: DSD, epochs: [2, 1, 1], lr: 0.05, sparsity: 0.8, exclude_first: true,
           gradual: {every_steps: 5}, rewind: {step: 3}}
variants:
  dsd: {pipeline.flow: DSD}
  gmp: {pipeline.flow: DMD}
  lth: {pipeline.flow: DLD}
  static: {pipeline.flow: S, pipeline.epochs: [4], init.density: erk, init.init_density: 0.2}
seeds: 2
""")
    from dsdtune.study.plan import make_plan
    plan = make_plan(load_study(study))
    assert len(plan.prefixes) == 2  # one dense prefix per seed, shared by the dense-start arms
    assert plan.arm_prefix_length == {"variant=dsd": 1, "variant=gmp": 1, "variant=lth": 1, "variant=static": 0}
    assert len({pid for (arm, _), pid in plan.trial_prefix.items() if arm != "variant=static"}) == 2
    assert all(points == [(0, 3)] for points in plan.prefix_snapshots.values())  # the ticket's rewind point
    assert plan.epochs_with_sharing == plan.epochs_without_sharing - 2 * 2 * 2  # 2 seeds x 2 dependents x 2


# ---- settings refused in one line ----------------------------------------------------------------

@pytest.mark.parametrize("pipeline,message", [
    ({"flow": "DM", "gradual": {"every_steps": 0}}, "pipeline.gradual.every_steps"),
    ({"flow": "DM", "gradual": {"begin": 0.8, "end": 0.5}}, "pipeline.gradual.begin"),
    ({"flow": "DM", "gradual": {"initial_sparsity": 0.9}, "sparsity": 0.5}, "pipeline.gradual.initial_sparsity"),
    ({"flow": "DM", "gradual": {"evry_steps": 10}}, "pipeline.gradual.evry_steps: unknown key"),
    ({"flow": "DM", "gradul": {}}, "pipeline.gradul: unknown key"),
    ({"flow": "DM", "criterion": "random"}, "pipeline.criterion"),
    ({"flow": "DR", "dst": {"drop_fraction": 1.5}}, "pipeline.dst.drop_fraction"),
    ({"flow": "DR", "dst": {"every_steps": 500}}, "pipeline.dst.every_steps"),
    ({"flow": "DL", "rewind": {"step": 999}}, "pipeline.rewind.step: 999 is beyond"),
    ({"flow": "LD", "rewind": {"step": 2}}, "pipeline.rewind.step: 2 is inside L1"),
    ({"flow": "DGD", "gsm_momentum": 0.9}, "pipeline.gsm_momentum: is now pipeline.gsm.momentum"),
])
def test_a_kinds_settings_are_refused_in_one_line(pipeline, message):
    run = {"task": TASK, "pipeline": {"epochs": 1, "lr": 0.05, **pipeline}, "seed": 0}
    with pytest.raises(SpecError, match=message.replace(".", r"\.")) as err:
        Pipeline(run)
    assert "\n" not in str(err.value)


def test_a_block_no_arm_uses_is_refused(tmp_path):
    study = tmp_path / "unused.yaml"
    study.write_text("name: unused\ntask: {dataset: synthetic}\npipeline: {flow: DSD, gradual: {every_steps: 5}}\n")
    from dsdtune.study.plan import make_plan
    with pytest.raises(SpecError, match=r"pipeline\.gradual: sets M \(gradual magnitude pruning\), which no arm"):
        make_plan(load_study(study))


def test_kinds_defaults_expand_per_phase():
    phases = expand_phases(PipelineSpec(flow="DMRLE", epochs=1, lr=0.1))
    assert [p.criterion for p in phases] == ["", "layerwise_magnitude", "layerwise_magnitude", "global_magnitude",
                                             "layerwise_magnitude"]
    assert phases[1].settings == {"initial_sparsity": 0.0, "begin": 0.0, "end": 0.75, "every_steps": 100}
    assert phases[2].settings == phases[4].settings == {"drop_fraction": 0.3, "every_steps": 100, "end": 0.75}
    assert phases[3].settings == {"step": 0}
    assert [p.sparsity for p in phases] == [0.0, 0.5, 0.5, 0.5, 0.5]


def test_a_block_read_by_several_kinds_is_used_by_any_of_them(tmp_path):
    """R and E both read pipeline.dst: a study with only RigL arms uses it."""
    study = tmp_path / "rigl.yaml"
    study.write_text("name: rigl\ntask: {dataset: synthetic}\ninit: {density: erk, init_density: 0.2}\n"
                     "pipeline: {flow: R, epochs: 2, dst: {every_steps: 2}}\n")
    from dsdtune.study.plan import make_plan
    assert make_plan(load_study(study)).runs[0].pipeline.model_extra == {"dst": {"every_steps": 2}}
