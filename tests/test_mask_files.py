"""A trial's final masks: saved compressed, loaded back bit for bit, matching the trial's sparsity."""
import io

import torch

from dsdtune.config import build_run_spec, load_study
from dsdtune.pipeline import Pipeline
from dsdtune.sparsity.mask_files import load_masks, nonzero_masks, save_masks
from dsdtune.sparsity.masks import Masks

from pathlib import Path

TINY = Path(__file__).parent / "studies" / "tiny.yaml"


def test_masks_round_trip_bit_for_bit_and_are_smaller_than_torch_save(tmp_path):
    g = torch.Generator().manual_seed(0)
    masks = Masks({"fc1.weight": (torch.rand(300, 70, generator=g) < 0.1).float(),
                   "conv.weight": (torch.rand(16, 3, 3, 3, generator=g) < 0.5).float(),
                   "odd.weight": torch.ones(7)})  # a size that is not a multiple of 8
    path = save_masks(masks, tmp_path / "masks.npz")
    loaded = load_masks(path)
    assert list(loaded) == list(masks)
    for name in masks:
        assert loaded[name].shape == masks[name].shape and loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], masks[name])
    assert loaded.sparsity() == masks.sparsity()
    as_bool = io.BytesIO()
    torch.save({n: m.bool() for n, m in masks.items()}, as_bool)
    assert path.stat().st_size < as_bool.tell() / 4  # 1 bit per weight, compressed


def test_a_trials_final_masks_load_back_and_match_its_measured_sparsity(tmp_path):
    spec = load_study(TINY, ["pipeline.flow=DS", "pipeline.epochs=[1, 1]", "pipeline.lr=[0.05, 0.005]"])
    torch.set_num_threads(1)
    pipeline = Pipeline(build_run_spec(spec.base_run(), {"pipeline.sparsity": 0.75}, 0))
    result = pipeline.run()
    path = save_masks(nonzero_masks(pipeline.prunable), tmp_path / "final_masks.npz")
    loaded = load_masks(path)
    assert set(loaded) == set(pipeline.prunable)
    assert loaded.sparsity() == result.final["sparsity"]
    assert abs(loaded.sparsity() - 0.75) < 0.01
    for name, mask in result.masks.items():  # the ending S phase's masks are the nonzero pattern
        assert torch.equal(loaded[name], mask.cpu())
