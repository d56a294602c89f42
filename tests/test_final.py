"""tlsearch final: retrain three models on the target training split, score the test split once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, merge, run_cli

from tlsearch.config import config_from_dict
from tlsearch.data import load_task
from tlsearch.errors import ConfigError
from tlsearch.export import final_paths, write_export
from tlsearch.final import run_final
from tlsearch.models import create_model
from tlsearch.study import run_study
from tlsearch.training import evaluate, to_tensors

MODELS = ("tuned", "default_lambda", "scratch")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``best.json`` of a real tiny study (4 trials, 2 folds)."""
    tmp = tmp_path_factory.mktemp("final")
    overrides = {
        "n_trials": 4,
        "storage": f"sqlite:///{tmp / 'study.db'}",
        "model": {"hidden": [16, 16]},
        "pretrain": {"epochs": 1, "cache_dir": str(tmp / "cache")},
        "finetune": {"epochs": 3},
    }
    study = run_study(config_from_dict(merge(TINY, overrides)))
    write_export(study, tmp / "best.json")
    return tmp / "best.json"


@pytest.mark.slow
def test_final_command(exported: Path) -> None:
    tmp = exported.parent
    result = run_cli("final", "best.json", cwd=tmp, timeout=300)
    assert result.returncode == 0, result.stderr
    printed = [line.split(":")[0].strip() for line in result.stdout.splitlines()]
    assert printed == list(MODELS)

    metrics_path, weights_path = final_paths(exported)
    assert metrics_path == tmp / "best.final.json" and weights_path == tmp / "best.final.pt"
    metrics = json.loads(metrics_path.read_text())
    best = json.loads(exported.read_text())
    for name in MODELS:
        m = metrics[name]
        assert 0.0 <= m["test_accuracy"] <= 1.0, (name, m)
        assert math.isfinite(m["test_loss"]) and m["test_loss"] > 0, (name, m)
    # The CV estimate where there is one: the search's, for the tuned model only.
    assert metrics["tuned"]["cv_mean"] == best["cv_mean"]
    assert metrics["tuned"]["cv_std"] == best["cv_std"]
    assert metrics["default_lambda"]["cv_mean"] is None and metrics["scratch"]["cv_mean"] is None
    assert metrics["tuned"]["params"] == best["params"]
    assert metrics["default_lambda"]["params"]["lambda"] == 0.01
    assert metrics["scratch"]["params"]["regularizer"] == "l2"
    assert metrics["study_name"] == "tiny" and metrics["trial_number"] == best["trial_number"]

    # The weights are a plain state dict: they load without unpickling code, and they are the
    # model that was scored.
    state = torch.load(weights_path, weights_only=True)
    cfg = config_from_dict(best["config"])
    task = load_task(cfg.data)
    model = create_model(cfg.model, task.input_shape, task.target_classes)
    model.load_state_dict(state)
    x, y = to_tensors(task.target_test.x, task.target_test.y, torch.device("cpu"))
    accuracy, _ = evaluate(model, x, y)
    assert accuracy == pytest.approx(metrics["tuned"]["test_accuracy"])
    assert metrics["target_test_size"] == len(task.target_test)


def test_final_needs_an_export(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.json: file not found"):
        run_final(tmp_path / "nope.json")
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(ConfigError, match="not a tlsearch export"):
        run_final(tmp_path / "other.json")
