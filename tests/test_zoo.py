"""Models from timm by name (`timm:<name>`), the adapter rule for a user's factories, and one-line errors
for whatever a model's construction raises: on a small image folder the tests write, through the
dry-run, real Ray and the result files."""
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from dsdtune import registry
from dsdtune.config import SpecError
from dsdtune.models import build_model
from dsdtune.sparsity.masks import prunable_weights
from dsdtune.results import load_results
from dsdtune.study import main

timm = pytest.importorskip("timm")  # the [zoo] extra; [dev] installs it

# timm's test_resnet: 0.37M parameters, a forward and backward pass of 16 32x32 images in ~15 ms
MODEL = "timm:test_resnet"
# Its 16 convolution and linear weights; every other tensor belongs to BatchNorm or is a bias.
TEST_RESNET_WEIGHTS = [
    "conv1.0.weight", "conv1.3.weight", "conv1.6.weight", "layer1.0.conv1.weight", "layer1.0.conv2.weight",
    "layer2.0.conv1.weight", "layer2.0.conv2.weight", "layer2.0.downsample.1.weight", "layer3.0.conv1.weight",
    "layer3.0.conv2.weight", "layer3.0.conv3.weight", "layer3.0.downsample.1.weight", "layer4.0.conv1.weight",
    "layer4.0.conv2.weight", "layer4.0.downsample.1.weight", "fc.weight",
]


def write_images(root: Path, train: int = 12, val: int = 4, size: int = 32) -> Path:
    """Two classes of PNGs: a bright disk or a bright square on dark noise, one folder per class."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for split, count in (("train", train), ("val", val)):
        for shape in ("disk", "square"):
            folder = root / split / shape
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
                cx, cy, r = (int(v) for v in rng.integers(10, 22, 2).tolist() + [rng.integers(5, 9)])
                inside = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r) if shape == "disk" else \
                    (abs(xx - cx) <= r) & (abs(yy - cy) <= r)
                pixels[inside] = rng.integers(150, 256, 3, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def study_file(tmp_path: Path, model: str = MODEL, model_args: dict | None = None, **task) -> str:
    images = tmp_path / "images"
    if not images.exists():
        write_images(images)
    spec = {
        "name": "zoo",
        "task": {"dataset": "imagefolder", "data_dir": "images", "dataset_args": {"image_size": 32, "resize": 32},
                 "model": model, "model_args": model_args or {}, "batch_size": 8, "loader_workers": 0,
                 "device": "cpu", **task},
        "pipeline": {"flow": "DS", "epochs": [1, 1], "lr": [0.05, 0.005]},
        "search": {"space": {"pipeline.sparsity": {"grid": [0.5]}}},
        "seeds": 1, "resources": {"cpu": 1},
    }
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def refused(args, capsys) -> str:
    """The one stderr line of a refused study (exit 2), also with --dry-run; nothing written."""
    results = Path(args[0]).parent / "results"
    assert main([*args, "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dsdtune: "), err
    assert "Traceback" not in err and "build_model" not in err  # never an internal dsdtune function
    assert main([*args, "--results", str(results), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == err
    assert not results.exists()
    return err


# ---------------------------------------------------------------------------------------------
# timm:<name>


def test_timm_model_by_name_gets_the_datas_classes_and_channels():
    torch.manual_seed(0)
    model = build_model(MODEL, (1, 24, 24), 3)
    assert model(torch.randn(2, 1, 24, 24)).shape == (2, 3)
    assert model.conv1[0].in_channels == 1 and model.fc.out_features == 3
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in timm.create_model("test_resnet", num_classes=3, in_chans=1).parameters())
    # Only convolution and linear weights are prunable, the stem's first conv stays dense: BatchNorm never.
    assert list(prunable_weights(model, exclude_first=False)) == TEST_RESNET_WEIGHTS
    assert list(prunable_weights(model)) == TEST_RESNET_WEIGHTS[1:]
    # timm's own entry point with the name in model_args is the same model; the data's counts may be repeated
    same = build_model("timm:create_model", (1, 24, 24), 3, model_name="test_resnet", num_classes=3, in_chans=1)
    assert [(k, v.shape) for k, v in same.state_dict().items()] == [(k, v.shape) for k, v in model.state_dict().items()]
    # model_args reach timm.create_model; a tagged name picks the architecture
    assert build_model(MODEL, (3, 32, 32), 2, drop_rate=0.25).drop_rate == 0.25
    assert type(build_model("timm:test_resnet.r160_in1k", (3, 32, 32), 2)).__name__ == "ResNet"


@pytest.mark.parametrize("name,args,words", [
    ("timm:test_resnt", {}, ["task.model: 'timm:test_resnt' is not a timm model", "close matches: timm:test_resnet",
                             "timm.list_models('*test*')"]),
    ("timm:create_modle", {}, ["task.model", "close matches: timm:create_model"]),
    ("timm:test_resnet.in1k_nope", {}, ["task.model", "close matches: timm:test_resnet.r160_in1k"]),
    ("timm:create_model", {"model_name": "test_resnt"}, ["task.model_args.model_name", "test_resnet"]),
    ("timm:create_model", {}, ["task.model_args.model_name", "timm:resnet10t"]),
    (MODEL, {"num_classes": 5}, ["task.model_args.num_classes: 5", "class count is 2"]),
    (MODEL, {"in_chans": 1}, ["task.model_args.in_chans", "3 channels"]),
    (MODEL, {"pretrained": "yes"}, ["task.model_args.pretrained", "true or false"]),
])
def test_timm_mistakes_are_one_line_exit_2(tmp_path, capsys, no_ray, name, args, words):
    err = refused([study_file(tmp_path, model=name, model_args=args)], capsys)
    for word in words:
        assert word in err, err


def test_dry_run_lists_a_timm_models_prunable_layers(tmp_path, capsys):
    assert main([study_file(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"task {MODEL} on imagefolder (22 training samples of shape [3, 32, 32], 2 classes, streamed):" in out
    listed = [line.split()[0] for line in out.splitlines() if line.split()[1:2] in (["Conv2d"], ["Linear"])]
    assert listed == TEST_RESNET_WEIGHTS  # convolutions and the classifier, no BatchNorm, no bias
    assert re.search(r"\n  conv1\.0\.weight +Conv2d +16x3x3x3 +432  dense \(first layer\)\n", out)
    assert re.search(r"\n  fc\.weight +Linear +2x96 +192  pruned\n", out)
    assert "15 of 16 layer weights prunable: 370,368 of 370,800 weights (432 stay dense)" in out


def test_a_timm_study_on_ray(ray_local, tmp_path):
    """One DS trial of timm:test_resnet on the image folder: it trains, prunes exactly half of each conv and
    linear weight but the stem's first, and leaves BatchNorm alone; the report is written."""
    assert main([study_file(tmp_path), "--results", str(tmp_path / "results")]) == 0
    out = tmp_path / "results" / "zoo"
    trials = load_results(out).trials  # the one reader: an id like "1e234567" stays text
    assert len(trials) == 1 and trials.status.iloc[0] == "ok" and trials.epochs_trained.iloc[0] == 2
    layers = pd.read_csv(out / "layers.csv")
    s1 = layers[layers.phase_label == "S1"]
    assert s1.layer.tolist() == TEST_RESNET_WEIGHTS[1:] and (s1.density == 0.5).all()
    from dsdtune.sparsity.mask_files import load_masks
    masks = load_masks(out / "masks" / f"{trials.trial_id.iloc[0]}.npz")
    assert sorted(masks) == sorted(TEST_RESNET_WEIGHTS[1:])
    assert trials.params.iloc[0] == sum(p.numel() for p in timm.create_model("test_resnet", num_classes=2).parameters())
    assert (out / "report.md").exists() and "| pipeline.sparsity=0.5 | 1 | 1 |" in (out / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# Pretrained weights come from the Hugging Face cache timm uses


def fake_hub_cache(root: Path, repo: str, state: dict) -> Path:
    """The Hugging Face cache layout (refs/main -> snapshots/<commit>/model.safetensors) holding `state`."""
    from safetensors.torch import save_file
    folder = root / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")
    return root


def offline_hub(monkeypatch, cache: Path):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_timm_pretrained_weights_from_the_cache(tmp_path, monkeypatch):
    torch.manual_seed(7)
    zoo = timm.create_model("test_resnet")  # 1000 ImageNet classes, like the published weights
    repo = timm.models.get_pretrained_cfg("test_resnet").hf_hub_id
    offline_hub(monkeypatch, fake_hub_cache(tmp_path / "hub", repo, zoo.state_dict()))
    model = build_model(MODEL, (3, 32, 32), 2, pretrained=True)
    mine, theirs = model.state_dict(), zoo.state_dict()
    assert torch.equal(mine["conv1.0.weight"], theirs["conv1.0.weight"])
    assert torch.equal(mine["layer4.0.bn2.running_var"], theirs["layer4.0.bn2.running_var"])
    assert mine["fc.weight"].shape == (2, 96)  # a fresh head for the data's 2 classes


def test_timm_pretrained_offline_without_the_weights_is_one_line(tmp_path, capsys, monkeypatch, no_ray):
    offline_hub(monkeypatch, tmp_path / "empty-hub")
    err = refused([study_file(tmp_path, model_args={"pretrained": True})], capsys)
    assert "task.model_args.pretrained: the weights of timm:test_resnet (Hugging Face repo timm/test_resnet" in err
    assert str(tmp_path / "empty-hub") in err and "models--timm--test_resnet" in err


def test_timm_missing_is_one_line(tmp_path, capsys, monkeypatch, no_ray):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    err = refused([study_file(tmp_path)], capsys)
    assert "task.model: timm models need the timm package; pip install 'dsdtune[zoo]'" in err


# ---------------------------------------------------------------------------------------------
# A user's factory: the adapter rule, and whatever it raises


FACTORIES = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, width=4, classes=2):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, width), nn.ReLU(), nn.Linear(width, classes))

    def forward(self, x):
        return self.body(x)

def fixed(width=4):                   # knows its input and class count itself
    return Net(width)

def forwarding(**kwargs):             # hands every keyword to a constructor, as timm.create_model does
    return Net(**kwargs)

def shaped(input_shape, width=4):     # takes the input shape but not the class count
    assert tuple(input_shape) == (3, 32, 32)
    return Net(width)

def needs(depth, num_classes):
    return Net(depth, num_classes)

def raises(kind):
    errors = {"runtime": RuntimeError("no kernel for this layer\\nsecond line"), "key": KeyError("relu6"),
              "attribute": AttributeError("'NoneType' object has no attribute 'shape'"), "assertion": AssertionError()}
    raise errors[kind]
"""


@pytest.fixture
def factories(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_SEARCH_PATHS", [])
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "ufactories.py").write_text(textwrap.dedent(FACTORIES))
    registry.add_search_paths([str(tmp_path)])
    yield tmp_path
    sys.modules.pop("ufactories", None)


def test_factories_get_input_shape_and_num_classes_only_as_parameters_they_name(factories):
    x = torch.randn(2, 3, 32, 32)
    assert build_model("ufactories:fixed", (3, 32, 32), 2, width=6)(x).shape == (2, 2)
    assert build_model("ufactories:shaped", (3, 32, 32), 2)(x).shape == (2, 2)
    # **kwargs gets what the user wrote, nothing of dsdtune's: the constructor never sees input_shape
    assert build_model("ufactories:forwarding", (3, 32, 32), 2, width=5).body[1].out_features == 5
    assert build_model("ufactories:forwarding", (3, 32, 32), 2, classes=2)(x).shape == (2, 2)
    with pytest.raises(SpecError, match=r"^task.model_args: model 'ufactories:fixed' got unknown model_args "
                                        r"\['depth'\]; allowed: \['width'\]$"):
        build_model("ufactories:fixed", (3, 32, 32), 2, depth=3)
    with pytest.raises(SpecError, match=r"^task.model_args: model 'ufactories:needs' needs depth"):
        build_model("ufactories:needs", (3, 32, 32), 2)
    assert build_model("ufactories:needs", (3, 32, 32), 2, depth=3, num_classes=2)(x).shape == (2, 2)
    with pytest.raises(SpecError, match=r"^task.model_args.num_classes: 10, but the data's class count is 2; "
                                        r"leave num_classes out"):
        build_model("ufactories:needs", (3, 32, 32), 2, depth=3, num_classes=10)
    with pytest.raises(SpecError, match=r"^task.model_args.input_shape: \[1, 32, 32\], but the data's one sample's "
                                        r"shape is \(3, 32, 32\)"):
        build_model("ufactories:shaped", (3, 32, 32), 2, input_shape=[1, 32, 32])
    # the model's own name and the data's counts never collide with dsdtune's arguments
    with pytest.raises(SpecError, match="unknown model_args \\['name'\\]"):
        build_model("ufactories:fixed", (3, 32, 32), 2, name="x")


def test_a_forwarding_factory_runs_as_a_study(factories, capsys):
    assert main([study_file(factories, model="ufactories:forwarding"), "--dry-run"]) == 0
    assert "task ufactories:forwarding on imagefolder" in capsys.readouterr().out


@pytest.mark.parametrize("model,args,expected", [
    ("ufactories:raises", {"kind": "runtime"},
     'task.model: building ufactories:raises with model_args {"kind": "runtime"} raised RuntimeError: '
     'no kernel for this layer'),
    ("ufactories:raises", {"kind": "key"}, "raised KeyError: 'relu6'"),
    ("ufactories:raises", {"kind": "attribute"}, "raised AttributeError: 'NoneType' object has no attribute 'shape'"),
    ("ufactories:raises", {"kind": "assertion"},  # no message: the type alone, once
     'dsdtune: task.model: building ufactories:raises with model_args {"kind": "assertion"} raised AssertionError'),
    # the same from inside timm
    (MODEL, {"act_layer": "bogus"}, 'task.model: building timm:test_resnet with model_args {"act_layer": "bogus"} '
                                    "raised KeyError: 'bogus'"),
    (MODEL, {"global_pool": "bogus"}, "task.model: building timm:test_resnet with model_args "
                                      '{"global_pool": "bogus"} raised AssertionError: Invalid pool type: bogus'),
    (MODEL, {"dropp_rate": 0.1}, "task.model_args: building timm:test_resnet with model_args "
                                 "{\"dropp_rate\": 0.1} raised TypeError: ResNet.__init__() got an unexpected "
                                 "keyword argument 'dropp_rate'"),
])
def test_whatever_building_a_model_raises_is_one_line(factories, capsys, no_ray, model, args, expected):
    err = refused([study_file(factories, model=model, model_args=args)], capsys)
    assert err == expected if expected.startswith("dsdtune: ") else expected in err, err


def test_a_factory_returning_the_wrong_class_count_is_told_so(factories, capsys, no_ray):
    """A factory that forwards **kwargs gets no num_classes from dsdtune; the batch check says what it returned."""
    err = refused([study_file(factories, model="ufactories:forwarding", model_args={"classes": 3})], capsys)
    assert err == ("dsdtune: task.model: ufactories:forwarding returns [2, 3] for a batch of shape [2, 3, 32, 32]; "
                   "it must return logits of shape [2, 2] (batch, classes)")


def test_the_zoo_example_dry_runs_on_its_generated_images(tmp_path, capsys):
    """examples/zoo as the README runs it, on a few of its images: make_images.py, then the study's plan."""
    import subprocess
    root = Path(__file__).resolve().parent.parent / "examples" / "zoo"
    subprocess.run([sys.executable, str(root / "make_images.py"), "--out", str(tmp_path), "--train", "4", "--val", "2"],
                   check=True, capture_output=True)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["disk", "ring", "square"]
    assert Image.open(next((tmp_path / "val" / "ring").iterdir())).size == (48, 48)
    assert main([str(root / "study.yaml"), "--dry-run", "--set", f"task.data_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "task timm:resnet10t on imagefolder (11 training samples of shape [3, 48, 48], 3 classes, streamed):" in out
    assert "14 of 15 layer weights prunable: 4,917,504 of 4,918,152 weights (648 stay dense)" in out
