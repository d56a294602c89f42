"""The example plug-in ``examples/tlsearch-resnet`` (model ``resnet``), as its users get it.

End to end: the package installed by pip (offline, into a temporary ``--target``, never into this
environment) and found through its entry point by a ``tlsearch run`` subprocess; and the same
package without its distribution metadata, named with ``--plugin tlsearch_resnet``. Each runs a
real tiny study on the 8×8 digits.

In this process: the network itself (block count per option, output shapes, frozen BatchNorm)
and the key adapter that loads checkpoints saved under torchvision's ResNet names. Importing the
package registers ``resnet`` in tlsearch's model registry; :func:`resnet` undoes that afterwards,
since other tests expect the built-in models alone.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import optuna
import pytest
import torch
from conftest import TINY, merge, run_many, write_toml
from optuna.trial import TrialState
from torch import nn

from tlsearch.config import ModelConfig, config_from_dict
from tlsearch.errors import ConfigError
from tlsearch.models import backbone_state, create_model
from tlsearch.registry import MODELS
from tlsearch.storage import ATTR_CHECKPOINT, ATTR_CONFIG, CONFIRM_ATTR

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tlsearch-resnet"
# The [model] table of the studies below, and what the study stores: every option, defaults in.
MODEL = {"name": "resnet", "width": 8}
STORED = {"name": "resnet", "width": 8, "stages": 3, "blocks_per_stage": 1, "stem": "small"}


# --- end to end: installed, and as a --plugin -----------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example installed by pip into a folder of its own: the package and its ``.dist-info``.

    pip builds from a copy, so the build's ``build/`` and ``.egg-info`` land in the temporary
    folder, not in the working tree (an ``.egg-info`` beside the package would carry the entry
    point into the ``--plugin`` run).
    """
    src = tmp_path_factory.mktemp("src") / "tlsearch-resnet"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    target = tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
    options = ["--no-index", "--no-cache-dir", "--disable-pip-version-check", "--quiet"]
    out = subprocess.run(
        [*pip, *options, "--target", str(target), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return target


def _on_path(folder: Path) -> dict[str, str]:
    paths = [str(folder)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    return {"PYTHONPATH": os.pathsep.join(paths)}


def test_a_study_of_the_resnet_runs_installed_and_as_a_plugin(site: Path, tmp_path: Path) -> None:
    dist_info = [p.name for p in site.glob("*.dist-info")]
    assert dist_info == ["tlsearch_resnet-0.1.0.dist-info"], dist_info
    assert (site / dist_info[0] / "entry_points.txt").read_text().split() == [
        "[tlsearch.models]",
        "resnet",
        "=",
        "tlsearch_resnet",
    ]
    # The package alone, as a user's checkout without installing it: no metadata, no entry point.
    bare = tmp_path / "bare"
    shutil.copytree(
        EXAMPLE / "tlsearch_resnet",
        bare / "tlsearch_resnet",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    jobs = {}
    for how, env, extra in [
        ("installed", _on_path(site), []),
        ("plugin", _on_path(bare), ["--plugin", "tlsearch_resnet"]),
    ]:
        cwd = tmp_path / how
        cwd.mkdir()
        study = merge(
            TINY,
            {
                # The two baselines (frozen_blocks 0; scratch), then two sampled depths.
                "n_trials": 4,
                "storage": f"sqlite:///{cwd / 'study.db'}",
                # One checkpoint for both (the same key): the second run waits on its lock.
                "pretrain": {"epochs": 1, "batch_size": 512, "cache_dir": str(tmp_path / "cache")},
                "finetune": {"epochs": 2, "threads": 1},
                # Up to the whole backbone: the entry's block count (stages + 1) allows 4.
                "search": {"frozen_blocks": {"low": 0, "high": 4}},
            },
        )
        study["model"] = MODEL
        write_toml(cwd / "study.toml", study)
        jobs[how] = (cwd, ["-q", "run", "study.toml", *extra], env)

    # Both at once: two cores, two processes.
    results = run_many(jobs, limit=2)
    for how, result in results.items():
        assert result.returncode == 0, f"{how}: {result.stderr}"
        assert "Traceback" not in result.stderr, result.stderr
        url = f"sqlite:///{tmp_path / how / 'study.db'}"
        study = optuna.load_study(study_name="tiny", storage=url)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        assert states == [TrialState.COMPLETE] * 4, (how, states)
        # The sampler (random, seed 0) after the baselines: the whole backbone frozen (the head
        # trains on cached pooled features), then the stem and stage 1 frozen.
        depths = [t.params.get("frozen_blocks") for t in study.trials]
        assert depths == [0, None, 4, 2], (how, depths)
        assert study.user_attrs[ATTR_CONFIG]["model"] == STORED, how
        # The checkpoint is the ResNet's: stage 3 of width 8 has 32 channels, from 16.
        state = torch.load(study.user_attrs[ATTR_CHECKPOINT]["path"], weights_only=True)
        assert state["blocks.3.0.conv1.weight"].shape == (32, 16, 3, 3), how
        assert state["blocks.3.0.downsample.0.weight"].shape == (32, 16, 1, 1), how


# --- the network and its key adapter, in this process ---------------------------------------------


@pytest.fixture(scope="module")
def resnet() -> Iterator[ModuleType]:
    """The package imported here (registering ``resnet``), unregistered and unimported afterwards.

    The registry has no public way to remove a name, and other tests in this process expect the
    built-in models alone ("choose from cnn, mlp"): the entries are restored as they were.
    """
    MODELS.names()  # installed entry points load now, so the snapshot holds them
    before = dict(MODELS._entries)
    sys.path.insert(0, str(EXAMPLE))
    try:
        import tlsearch_resnet

        yield tlsearch_resnet
    finally:
        sys.path.remove(str(EXAMPLE))
        MODELS._entries.clear()
        MODELS._entries.update(before)
        for name in [m for m in sys.modules if m.split(".")[0] == "tlsearch_resnet"]:
            del sys.modules[name]


def _cfg(**options: object) -> ModelConfig:
    """The model section a loaded study file holds: the entry's defaults filled in."""
    return ModelConfig(name="resnet", **MODELS.get("resnet").validate_options(options, "model"))


@pytest.mark.parametrize(
    "options",
    [{}, {"stages": 1}, {"stages": 4, "blocks_per_stage": 2}, {"stem": "imagenet", "width": 4}],
    ids=str,
)
def test_the_block_count_follows_the_options(resnet: ModuleType, options: dict) -> None:
    cfg = _cfg(**options)
    n = MODELS.get("resnet").blocks(cfg.options)
    assert n == cfg.options["stages"] + 1
    model = create_model(cfg, (1, 8, 8), 10)
    assert len(model.blocks) == n
    basic = importlib.import_module("tlsearch_resnet.net").BasicBlock
    per_stage = [sum(isinstance(m, basic) for m in stage) for stage in model.blocks[1:]]
    assert per_stage == [cfg.options["blocks_per_stage"]] * cfg.options["stages"]


def test_a_study_file_is_checked_against_the_resnets_options(resnet: ModuleType) -> None:
    study = merge(TINY, {"search": {"frozen_blocks": {"low": 0, "high": 4}}})
    study["model"] = {"name": "resnet", "stages": 2, "depth": 3}
    with pytest.raises(ConfigError) as info:
        config_from_dict(study)
    assert str(info.value).splitlines() == [
        "config: model.depth: unknown option for model 'resnet'"
    ]
    study["model"] = {"name": "resnet", "stages": 2}
    with pytest.raises(ConfigError) as info:
        config_from_dict(study)
    assert str(info.value) == (
        "config: search.frozen_blocks: 4 exceeds the 3 blocks of model 'resnet'"
    )
    study["model"] = {"name": "resnet", "stages": 3}
    assert config_from_dict(study).model.options["stages"] == 3


@pytest.mark.parametrize(
    ("shape", "stem"), [((1, 8, 8), "small"), ((3, 32, 32), "small"), ((3, 32, 32), "imagenet")]
)
def test_output_shape_for_small_and_larger_images(
    resnet: ModuleType, shape: tuple[int, int, int], stem: str
) -> None:
    model = create_model(_cfg(stem=stem), shape, 7)
    x = torch.randn(3, *shape)
    out = model(x)
    assert out.shape == (3, 7)
    out.sum().backward()
    # The pooled features are what the head sees, and what a fully frozen backbone caches.
    assert model.features(x).shape == (3, 64)
    with pytest.raises(ConfigError, match=r"^model\.name: 'resnet' needs image inputs"):
        create_model(_cfg(), (64,), 7)


def test_a_torchvision_named_checkpoint_loads_through_the_key_adapter(resnet: ModuleType) -> None:
    cfg = _cfg(stages=2, blocks_per_stage=2)
    source = create_model(cfg, (3, 16, 16), 10)
    source(torch.randn(4, 3, 16, 16))  # BatchNorm statistics that differ from a fresh model's
    state = source.state_dict()
    saved = resnet.torchvision_names(state)
    assert {k.split(".")[0] for k in saved} == {"conv1", "bn1", "layer1", "layer2", "fc"}
    assert "layer2.0.downsample.1.running_var" in saved and "fc.weight" in saved

    # tlsearch's path: the entry's key adapter, the head dropped; a new model for 3 classes.
    target = create_model(cfg, (3, 16, 16), 3)
    backbone = backbone_state(saved, cfg)
    assert set(backbone) == {k for k in state if not k.startswith("head.")}
    target.blocks.load_state_dict({k.removeprefix("blocks."): v for k, v in backbone.items()})
    for name, value in target.blocks.state_dict().items():
        assert torch.equal(value, state[f"blocks.{name}"]), name
    # A checkpoint tlsearch pretrained has the BlockNet's names already: kept as they are.
    assert MODELS.get("resnet").adapt_keys(state) == state
    assert resnet.from_torchvision(saved).keys() == state.keys()


def test_resnet18s_layout_is_torchvisions(resnet: ModuleType) -> None:
    """Every tensor of torchvision's ``resnet18`` (11,689,512 parameters, 122 tensors with the
    BatchNorm buffers) has its place, so its checkpoints load; torchvision itself is not used."""
    cfg = _cfg(stem="imagenet", width=64, stages=4, blocks_per_stage=2)
    model = create_model(cfg, (3, 224, 224), 1000)
    names = resnet.torchvision_names(model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == 11_689_512
    assert len(names) == 122
    assert names["conv1.weight"].shape == (64, 3, 7, 7)
    assert names["layer4.0.downsample.0.weight"].shape == (512, 256, 1, 1)
    assert names["fc.weight"].shape == (1000, 512)


def test_frozen_stages_keep_their_batchnorm_statistics(resnet: ModuleType) -> None:
    model = create_model(_cfg(), (1, 8, 8), 10)
    model.freeze(2)  # the stem and stage 1
    model.train()
    bns = {
        i: [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
        for i, block in enumerate(model.blocks)
    }
    assert [all(not m.training for m in bns[i]) for i in range(4)] == [True, True, False, False]
    before = {i: [m.running_mean.clone() for m in bns[i]] for i in bns}
    model(torch.randn(8, 1, 8, 8)).sum().backward()
    for i in range(4):
        same = [torch.equal(a, m.running_mean) for a, m in zip(before[i], bns[i], strict=True)]
        assert all(same) if i < 2 else not any(same), i
        grads = [p.grad is not None for p in model.blocks[i].parameters()]
        assert all(grads) if i >= 2 else not any(grads), i


def _png_folders(root: Path, classes: int, per_class: int, size: int, seed: int) -> None:
    """``root/<class>/<i>.png``: grayscale images whose mean brightness depends on the class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"c{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.normal(40 + 60 * c, 30, (size, size)).clip(0, 255).astype("uint8")
            Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")


def test_readme_path_resnet_from_a_checkpoint_on_image_folders(site: Path, tmp_path: Path) -> None:
    """README's bring-your-own commands at small scale: the installed plug-in, image folders, a
    torchvision-named source checkpoint written by ``examples/train_source.py``, then run,
    export, final and report."""
    _png_folders(tmp_path / "src", classes=3, per_class=8, size=12, seed=0)
    _png_folders(tmp_path / "tgt" / "train", classes=3, per_class=6, size=12, seed=1)
    _png_folders(tmp_path / "tgt" / "test", classes=3, per_class=6, size=12, seed=2)
    study = {
        "name": "byo",
        "n_trials": 3,
        "storage": "sqlite:///study.db",
        "data": {
            "source": {"image_folder": "src"},
            "target": {"image_folder": "tgt/train"},
            "target_test": {"image_folder": "tgt/test"},
            "images": {"channels": "grayscale"},
        },
        "model": {"name": "resnet", "width": 4, "stages": 2},
        "pretrain": {"checkpoint": "source.pt", "cache_dir": "cache"},
        "finetune": {"epochs": 2, "threads": 1},
        "search": {"frozen_blocks": {"low": 0, "high": 3}},
        "cv": {"k": 2},
        "sampler": {"name": "random"},
    }
    write_toml(tmp_path / "study.toml", study)
    env = _on_path(site)
    train = subprocess.run(
        [sys.executable, str(EXAMPLE.parent / "train_source.py"), "study.toml", "--epochs", "1"],
        cwd=tmp_path,
        env={**os.environ, **env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert train.returncode == 0, train.stderr
    saved = torch.load(tmp_path / "source.pt", weights_only=True)
    assert "layer1.0.conv1.weight" in saved and "fc.weight" in saved, "torchvision's names"

    steps = [
        ["-q", "run", "study.toml"],
        ["export", "--storage", "sqlite:///study.db", "-o", "best.json"],
        ["final", "best.json", "--seeds", "1"],
        ["report", "--storage", "sqlite:///study.db", "--final", "best.final.json", "-o", "rep"],
    ]
    for args in steps:
        result = run_many({"": (tmp_path, args, env)})[""]
        assert result.returncode == 0, f"{args[0:2]}: {result.stderr}"
        assert "Traceback" not in result.stderr
    stored = optuna.load_study(study_name="byo", storage=f"sqlite:///{tmp_path / 'study.db'}")
    # Three trials of the search, then the confirmation round: its winner and plain fine-tuning
    # trained again on fresh folds.
    assert [t.state for t in stored.trials] == [TrialState.COMPLETE] * 5
    assert sum(CONFIRM_ATTR in t.user_attrs for t in stored.trials) == 2
    source = stored.user_attrs["tlsearch_source"]
    assert source["model_origin"] == "tlsearch-resnet 0.1.0"
    assert source["checkpoint"]["path"] == str(tmp_path / "source.pt")
    assert source["normalization"]["from"] == "source"
    assert not list((tmp_path / "cache").glob("source-[0-9a-f]*.pt")), "nothing pretrained"
    assert (tmp_path / "best.final.json").is_file() and (
        tmp_path / "rep" / "report.html"
    ).is_file()


@pytest.mark.parametrize(("width", "layout"), [(4, "nchw"), (8, "channels_last")])
def test_a_narrow_resnet_stays_in_nchw_on_the_cpu(
    resnet: ModuleType, width: int, layout: str
) -> None:
    """torch 2.13's CPU backward of a strided 1×1 convolution with fewer than 8 input channels
    corrupts the heap in channels-last layout (a width-4 ResNet's shortcut): tlsearch keeps such
    a model in NCHW. The end-to-end test above trains one (width 4)."""
    from tlsearch.training import channels_last

    model = channels_last(create_model(_cfg(width=width), (1, 12, 12), 3))
    # (with one input channel both layouts are the same strides: look at a later convolution)
    weight = next(
        m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1
    )
    assert weight.is_contiguous(memory_format=torch.channels_last) == (layout != "nchw")
