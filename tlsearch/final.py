"""Retrain with a chosen config on the whole target training split; measure the held-out test once.

Beside the tuned model, two honest baselines are trained on the same split: the model trained
from scratch (no transfer), and plain fine-tuning with the library's default λ and learning rate.
The test split is used here and nowhere in the search.

:func:`run_final` writes ``BEST.final.json`` next to ``BEST.json``: for each of ``tuned``,
``default_lambda`` and ``scratch`` its parameters, ``test_accuracy``, ``test_loss`` and the CV
estimate where there is one (``cv_mean``, ``cv_std``: the search's, for ``tuned`` only; null for
the baselines, which were never cross-validated). The tuned model's weights go to
``BEST.final.pt``, a plain state dict that loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tlsearch._io import atomic_write, write_json
from tlsearch.config import StudyConfig
from tlsearch.data import TransferTask
from tlsearch.errors import TlsearchError
from tlsearch.export import final_paths, read_export
from tlsearch.models import create_model
from tlsearch.params import PLAIN_FINETUNING, TrialParams
from tlsearch.pretrain import Checkpoint, load_checkpoint
from tlsearch.study import prepare
from tlsearch.training import evaluate, finetune, to_tensors

__all__ = [
    "Outcome",
    "default_params",
    "evaluate_on_test",
    "run_final",
    "save_outcomes",
    "scratch_params",
]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    name: str
    params: TrialParams
    test_accuracy: float
    test_loss: float
    model: torch.nn.Module
    # The search's cross-validated accuracy of these params; None for a baseline never searched.
    cv_mean: float | None = None
    cv_std: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.params.to_dict(),
            "test_accuracy": self.test_accuracy,
            "test_loss": self.test_loss,
            "cv_mean": self.cv_mean,
            "cv_std": self.cv_std,
        }


def default_params(cfg: StudyConfig) -> TrialParams:
    return TrialParams.from_dict({**PLAIN_FINETUNING, "regularizer": cfg.regularizer.names[0]})


def scratch_params() -> TrialParams:
    """Training from a random init: nothing to pull toward but zero, so plain L2."""
    return TrialParams.from_dict({**PLAIN_FINETUNING, "regularizer": "l2"})


def evaluate_on_test(
    cfg: StudyConfig,
    task: TransferTask,
    checkpoint: Checkpoint,
    tuned: TrialParams,
    device: torch.device,
    seed: int = 0,
) -> dict[str, Outcome]:
    """Train tuned, default-λ and scratch models on the target training split; score on test."""
    pretrained = load_checkpoint(checkpoint, device)
    torch.manual_seed(seed)
    scratch = create_model(cfg.model, task.input_shape, task.source_classes)
    scratch_init = {k: v.to(device) for k, v in scratch.state_dict().items()}
    x, y = to_tensors(task.target_train.x, task.target_train.y, device)
    xt, yt = to_tensors(task.target_test.x, task.target_test.y, device)
    runs = {
        "tuned": (pretrained, tuned),
        "default_lambda": (pretrained, default_params(cfg)),
        "scratch": (scratch_init, scratch_params()),
    }
    out = {}
    for name, (init, params) in runs.items():
        model = finetune(init, cfg, params, x, y, task.target_classes, task.input_shape, seed)
        acc, loss = evaluate(model, xt, yt)
        out[name] = Outcome(name, params, acc, loss, model)
    return out


def save_outcomes(
    outcomes: dict[str, Outcome], json_path: Path, weights_path: Path, extra: dict[str, Any]
) -> dict[str, Any]:
    """Write the tuned model's weights and the metrics of all models (atomically)."""
    buffer = io.BytesIO()
    torch.save({k: v.cpu() for k, v in outcomes["tuned"].model.state_dict().items()}, buffer)
    atomic_write(weights_path, lambda p: p.write_bytes(buffer.getvalue()))
    data = {**extra, "weights": str(weights_path), **{k: o.to_dict() for k, o in outcomes.items()}}
    write_json(json_path, data)
    return data


def _check_writable(directory: Path) -> None:
    """Fail before minutes of training when the results could not be written (full, read-only)."""
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".tlsearch-write-check") as f:
            f.write(b"\0")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise TlsearchError(f"cannot write in {directory}: {e.strerror}") from None


def run_final(best_path: str | Path, device: str | None = None) -> dict[str, Any]:
    """Retrain with the export at ``best_path``, score the test split once and write the results.

    Returns what ``BEST.final.json`` holds (see the module docstring).
    """
    best = read_export(best_path)
    json_path, weights_path = final_paths(best_path)
    _check_writable(json_path.parent)
    ctx = prepare(best.config, device)
    expected = (best.data.get("checkpoint") or {}).get("sha256")
    if expected and expected != ctx.checkpoint.sha256:
        _log.warning(
            "the pretrained checkpoint was rebuilt and differs from the one the search used"
        )
    outcomes = evaluate_on_test(best.config, ctx.task, ctx.checkpoint, best.params, ctx.device)
    outcomes["tuned"] = replace(
        outcomes["tuned"], cv_mean=best.data.get("cv_mean"), cv_std=best.data.get("cv_std")
    )
    extra = {
        "study_name": best.data.get("study_name"),
        "trial_number": best.data.get("trial_number"),
        "target_test_size": len(ctx.task.target_test),
        "target_train_size": len(ctx.task.target_train),
    }
    return save_outcomes(outcomes, json_path, weights_path, extra)
