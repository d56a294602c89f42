"""Retrain with a chosen config on the whole target training split; measure the held-out test once.

Beside the tuned model, two honest baselines are trained on the same split
(:func:`tlsearch.params.baseline_params`, the settings of the study's baseline trials): **plain
fine-tuning** (:data:`~tlsearch.params.PLAIN_FINETUNING` with the study's first regularizer: what a
user fine-tunes with before any search) and training **from scratch** (the same settings from a
random init, with L2: no transfer). The test split is used here and nowhere in the search. With
``seeds = N`` each model is trained N times, with seeds 0 … N−1 (seed 0 first, so one seed gives
the same numbers as before ``--seeds`` existed).

:func:`run_final` writes ``BEST.final.json`` next to ``BEST.json``. For each of ``tuned``,
``plain_finetuning`` and ``scratch``:

- ``params``: what it trained with;
- ``test_accuracy``, ``test_loss``: the mean over seeds; ``seed_accuracies``, ``seed_losses``: each
  seed's;
- ``test_interval``: a 95 % Wilson score interval for the test accuracy, computed on the
  seed-averaged accuracy with n = the number of test images. The test images are the sample:
  training on another seed re-scores the *same* images, so seeds are not more data and n is not
  multiplied by them. (Each image's seed-averaged correctness lies in [0, 1], so its variance is at
  most that of a 0/1 outcome: the interval is, if anything, wide.) The training noise is shown
  apart, as the spread of ``seed_accuracies``. With one seed this is Wilson on k/n exactly;
- ``cv_mean``, ``cv_se`` (and ``cv_std``, ``cv_trial_number``): the search's cross-validated
  estimate and its standard error where the export has one: for ``tuned`` its ``cv_se``, else
  std(fold scores, ddof=1)/√k; for the baselines, the export's ``baselines`` block (the trials of
  the study that trained them); null where there is none.

``tuned`` also has ``baseline``: the baseline whose trial the export chose (``plain_finetuning``,
``scratch``), else null. When it is ``scratch`` the tuned model trains from a random init, as that
trial did: the tuned model is then the scratch model, and the verdict says so first.

``comparisons``: tuned − plain_finetuning, tuned − scratch and plain_finetuning − scratch on the same
test images: ``difference`` (the mean over images of the seed-averaged correctness difference, which
is the difference of the mean accuracies), ``interval`` (95 %, normal approximation with the paired
standard error, :func:`tlsearch.stats.paired_difference`), and ``mcnemar_p``, the exact McNemar test
on the discordant images ``model_only`` (the model was right on more seeds than the baseline) and
``baseline_only`` (the reverse). With one seed these are the images only one of the two got right:
McNemar's test as usual. With N seeds it is the sign test of the per-image differences, which is
still exact, needs no rule for an even N's ties (as each model's majority over seeds would) and
uses the same per-image numbers as the interval.

The interval decides the sentences of ``verdict``: a model beats another "beyond the noise" when
the interval of its difference lies above 0. (The p-value can disagree with it: the sign test counts
images, the interval weighs by how many seeds differ. Both are shown; the interval is what the
sentences quote.) The tuned model's weights of seed 0 go to ``BEST.final.pt``, a plain state dict
that loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import io
import logging
import math
import os
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tlsearch._io import atomic_write, write_json
from tlsearch.config import StudyConfig
from tlsearch.data import TransferTask
from tlsearch.errors import ConfigError, TlsearchError
from tlsearch.export import BestConfig, final_paths, read_export
from tlsearch.models import create_model
from tlsearch.params import BASELINES, TrialParams, baseline_params, format_params
from tlsearch.pretrain import Checkpoint, load_checkpoint
from tlsearch.stats import format_pp, mcnemar_exact, mean_se, paired_difference, wilson_interval
from tlsearch.study import prepare
from tlsearch.threads import ThreadPolicy, thread_scope
from tlsearch.training import evaluate, finetune, to_tensors

__all__ = [
    "COMPARISONS",
    "CONFIDENCE",
    "MODELS",
    "Outcome",
    "compare",
    "evaluate_on_test",
    "format_final",
    "run_final",
    "verdict",
]

_log = logging.getLogger(__name__)

# The models, in the order final prints them, and how sentences name them.
MODELS = {
    "tuned": "the tuned model",
    "plain_finetuning": "plain fine-tuning",
    "scratch": "scratch",
}
# (model, baseline): each difference is model − baseline on the same test images.
COMPARISONS = (
    ("tuned", "plain_finetuning"),
    ("tuned", "scratch"),
    ("plain_finetuning", "scratch"),
)
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Outcome:
    """One model trained on one seed, scored on the test split."""

    name: str
    params: TrialParams
    test_accuracy: float
    test_loss: float
    # Per test image: did the model get it right.
    correct: np.ndarray
    model: torch.nn.Module


def _correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per image, whether ``model``'s top class is the label (the images :func:`evaluate` counts)."""
    model.eval()
    with torch.no_grad():
        hits = [
            (model(x[i : i + 4096]).argmax(1) == y[i : i + 4096]).cpu()
            for i in range(0, len(y), 4096)
        ]
    return torch.cat(hits).numpy().astype(bool)


def evaluate_on_test(
    cfg: StudyConfig,
    task: TransferTask,
    checkpoint: Checkpoint,
    tuned: TrialParams,
    device: torch.device,
    seed: int = 0,
    *,
    tuned_from_scratch: bool = False,
) -> dict[str, Outcome]:
    """Train the tuned, plain fine-tuning and scratch models with ``seed``; score them on test.

    ``tuned_from_scratch``: the tuned settings are the study's ``scratch`` baseline trial's, which
    trained from a random init; so does the tuned model then.
    """
    pretrained = load_checkpoint(checkpoint, device)
    torch.manual_seed(seed)
    # The source head is never used (fine-tuning replaces it), and there may be no source set.
    scratch = create_model(cfg.model, task.input_shape, task.target_classes)
    scratch_init = {k: v.to(device) for k, v in scratch.state_dict().items()}
    x, y = to_tensors(task.target_train.x, task.target_train.y, device)
    xt, yt = to_tensors(task.target_test.x, task.target_test.y, device)
    runs = {
        "tuned": (scratch_init if tuned_from_scratch else pretrained, tuned),
        "plain_finetuning": (pretrained, baseline_params(cfg, "plain_finetuning")),
        "scratch": (scratch_init, baseline_params(cfg, "scratch")),
    }
    out = {}
    for name, (init, params) in runs.items():
        model = finetune(init, cfg, params, x, y, task.target_classes, task.input_shape, seed)
        acc, loss = evaluate(model, xt, yt)
        correct = _correct(model, xt, yt)
        assert math.isclose(correct.mean(), acc), (name, correct.mean(), acc)
        out[name] = Outcome(name, params, acc, loss, correct, model)
    return out


def compare(
    model: np.ndarray, baseline: np.ndarray, confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """``model − baseline`` from per-seed, per-image correctness (arrays of seeds × test images).

    The difference and its interval come from each image's seed-averaged correctness; McNemar's
    exact test from the images where one model was right on more seeds than the other.
    """
    a = np.asarray(model, dtype=float).mean(axis=0)
    b = np.asarray(baseline, dtype=float).mean(axis=0)
    diff, low, high = paired_difference(a, b, confidence)
    model_only, baseline_only = int((a > b).sum()), int((b > a).sum())
    return {
        "difference": diff,
        "interval": [low, high],
        "mcnemar_p": mcnemar_exact(model_only, baseline_only),
        "model_only": model_only,
        "baseline_only": baseline_only,
    }


def _difference(c: Mapping[str, Any]) -> str:
    low, high = c["interval"]
    return (
        f"{format_pp(c['difference'])} pp, 95 % interval {format_pp(low)} … {format_pp(high)} pp"
    )


def verdict(comparisons: Sequence[Mapping[str, Any]], chose: str | None = None) -> list[str]:
    """Plain sentences: did the search beat plain fine-tuning, and does transfer pay.

    ``comparisons`` as :func:`run_final` stores them (with ``model`` and ``baseline`` names);
    "beat" means beyond the noise: the difference's interval lies above 0. ``chose``: the
    baseline whose trial the search chose as its answer (``plain_finetuning``, ``scratch``), if any.
    """
    by = {(c["model"], c["baseline"]): c for c in comparisons}
    search = by["tuned", "plain_finetuning"]
    if chose == "plain_finetuning":
        first = (
            "The search did not beat plain fine-tuning here: it kept plain fine-tuning's own "
            "settings, no configuration having shown an advantage beyond the noise in the study."
        )
    elif search["interval"][0] > 0:
        first = f"The search beat plain fine-tuning here (difference {_difference(search)})."
    elif search["interval"][1] < 0:
        first = (
            "The search did not beat plain fine-tuning here; plain fine-tuning was better "
            f"(difference {_difference(search)})."
        )
    else:
        first = (
            f"The search did not beat plain fine-tuning here (difference {_difference(search)})."
        )

    transfer = [by["tuned", "scratch"], by["plain_finetuning", "scratch"]]
    winners = [c for c in transfer if c["interval"][0] > 0]
    if not winners:
        second = (
            "Transfer does not pay here: neither fine-tuned model beat training from scratch "
            f"beyond the noise (tuned − scratch {_difference(transfer[0])}; plain fine-tuning − "
            f"scratch {_difference(transfer[1])})."
        )
    else:
        said = [
            f"{MODELS[c['model']]} beat training from scratch ({_difference(c)})" for c in winners
        ]
        if len(winners) == 1:
            loser = next(c for c in transfer if c is not winners[0])
            how = "did worse" if loser["interval"][1] < 0 else "did not beat it beyond the noise"
            said.append(f"{MODELS[loser['model']]} {how} ({_difference(loser)})")
        second = "Transfer pays here: " + "; ".join(said) + "."
    if chose == "scratch":
        return ["The search chose training from scratch, its own reference trial.", first, second]
    return [first, second]


def _chosen_baseline(data: Mapping[str, Any], plain: TrialParams) -> str | None:
    """The baseline whose trial the export holds, if any: as the export's selection says, else
    (an export from before baseline trials) plain fine-tuning when its settings are the same."""
    selected = (data.get("selection") or {}).get("selected") or {}
    if selected.get("trial_number") == data.get("trial_number") and selected.get("baseline"):
        return str(selected["baseline"])
    return "plain_finetuning" if data.get("params") == plain.to_dict() else None


def _cv_se(data: Mapping[str, Any]) -> float | None:
    """The export's standard error of its CV accuracy, else that of its fold scores."""
    if data.get("cv_se") is not None:
        return float(data["cv_se"])
    return mean_se(data.get("fold_scores") or [])


def _cv_estimates(data: Mapping[str, Any], params: Mapping[str, TrialParams]) -> dict[str, dict]:
    """Each model's CV estimate from the export: the tuned trial's, and the baselines' block's."""
    out = {
        "tuned": {
            "cv_mean": data.get("cv_mean"),
            "cv_std": data.get("cv_std"),
            "cv_se": _cv_se(data),
            "cv_trial_number": data.get("trial_number"),
        }
    }
    baselines = data.get("baselines")
    for name in BASELINES:
        block = baselines.get(name) if isinstance(baselines, Mapping) else None
        if not isinstance(block, Mapping):
            out[name] = {"cv_mean": None, "cv_std": None, "cv_se": None, "cv_trial_number": None}
            continue
        trained = params[name].to_dict()
        searched = block.get("params") or {}
        differ = [k for k in trained if k in searched and searched[k] != trained[k]]
        if differ:
            _log.warning(
                "the export's %s trial used other settings than final trains it with (%s): "
                "its CV estimate is of those settings",
                name,
                ", ".join(f"{k} {searched[k]} vs {trained[k]}" for k in differ),
            )
        out[name] = {
            "cv_mean": block.get("cv_mean"),
            "cv_std": block.get("cv_std"),
            "cv_se": _cv_se(block),
            "cv_trial_number": block.get("trial_number"),
        }
    return out


def _summary(
    runs: Sequence[Mapping[str, Outcome]],
    cv: Mapping[str, Mapping[str, Any]],
    chose: str | None,
) -> dict[str, Any]:
    """Per model: the means, the seeds, the Wilson interval, the CV estimate; then comparisons."""
    out: dict[str, Any] = {}
    correct: dict[str, np.ndarray] = {}
    for name in MODELS:
        seeds = [r[name] for r in runs]
        correct[name] = np.stack([o.correct for o in seeds])
        n = correct[name].shape[1]
        accuracy = statistics.fmean(o.test_accuracy for o in seeds)
        out[name] = {
            "params": seeds[0].params.to_dict(),
            "test_accuracy": accuracy,
            "test_loss": statistics.fmean(o.test_loss for o in seeds),
            "test_interval": list(wilson_interval(accuracy * n, n, CONFIDENCE)),
            "seed_accuracies": [o.test_accuracy for o in seeds],
            "seed_losses": [o.test_loss for o in seeds],
            **cv[name],
        }
    comparisons = [
        {"model": a, "baseline": b, **compare(correct[a], correct[b])} for a, b in COMPARISONS
    ]
    out["tuned"]["baseline"] = chose
    return {
        **out,
        "confidence": CONFIDENCE,
        "comparisons": comparisons,
        "verdict": verdict(comparisons, chose),
    }


def _check_writable(directory: Path) -> None:
    """Fail before minutes of training when the results could not be written (full, read-only)."""
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".tlsearch-write-check") as f:
            f.write(b"\0")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise TlsearchError(f"cannot write in {directory}: {e.strerror}") from None


def _seed_run(
    best: BestConfig,
    task: TransferTask,
    checkpoint: Checkpoint,
    device: torch.device,
    seed: int,
    tuned_from_scratch: bool,
) -> dict[str, Outcome]:
    """The three models of one seed, trained and scored (logged on one line)."""
    run = evaluate_on_test(
        best.config,
        task,
        checkpoint,
        best.params,
        device,
        seed,
        tuned_from_scratch=tuned_from_scratch,
    )
    _log.info("seed %d: %s", seed, ", ".join(f"{n} {o.test_accuracy:.4f}" for n, o in run.items()))
    return run


def run_final(best_path: str | Path, device: str | None = None, seeds: int = 1) -> dict[str, Any]:
    """Retrain with the export at ``best_path`` on ``seeds`` seeds, score the test split, write.

    Returns what ``BEST.final.json`` holds (see the module docstring).
    """
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, not {seeds}")
    best = read_export(best_path)
    json_path, weights_path = final_paths(best_path)
    _check_writable(json_path.parent)
    # Shares the cores with other work as a study's trials do (tlsearch.threads.ThreadPolicy).
    policy = ThreadPolicy(best.config.finetune.threads)
    with thread_scope(policy):
        policy.apply()
        ctx = prepare(best.config, device)
        expected = (best.data.get("checkpoint") or {}).get("sha256")
        if expected and expected != ctx.checkpoint.sha256:
            _log.warning(
                "the pretrained checkpoint was rebuilt and differs from the one the search used"
            )
        chose = _chosen_baseline(best.data, baseline_params(best.config, "plain_finetuning"))
        runs = [
            _seed_run(best, ctx.task, ctx.checkpoint, ctx.device, seed, chose == "scratch")
            for seed in range(seeds)
        ]
    buffer = io.BytesIO()
    torch.save({k: v.cpu() for k, v in runs[0]["tuned"].model.state_dict().items()}, buffer)
    atomic_write(weights_path, lambda p: p.write_bytes(buffer.getvalue()))
    cv = _cv_estimates(best.data, {n: o.params for n, o in runs[0].items()})
    data = {
        "study_name": best.data.get("study_name"),
        "trial_number": best.data.get("trial_number"),
        "target_test_size": len(ctx.task.target_test),
        "target_train_size": len(ctx.task.target_train),
        "seeds": list(range(seeds)),
        "weights": str(weights_path),
        # How the export chose its trial, in the rule's own words (tlsearch.selection).
        "selection": _selection_line(best.data),
        **_summary(runs, cv, chose),
    }
    write_json(json_path, data)
    return data


def _selection_line(export: Mapping[str, Any]) -> str | None:
    """``selected by RULE: REASON`` from the export (a reason that starts with its rule's name
    says it once), or None (an export from before rules said why)."""
    selection = export.get("selection") or {}
    if not selection.get("reason"):
        return None
    rule = selection.get("rule")
    return f"selected by {rule}: {selection['reason'].removeprefix(f'{rule}: ')}"


def format_final(data: Mapping[str, Any]) -> list[str]:
    """``tlsearch final``'s printed lines: how the export chose, a line per model, plain
    fine-tuning's settings, the paired differences and the verdict."""
    lines = [data["selection"]] if data.get("selection") else []
    for name in MODELS:
        m = data[name]
        low, high = m["test_interval"]
        text = f"{name:>16}: test accuracy {m['test_accuracy']:.4f} (95 % {low:.4f}–{high:.4f}"
        if len(m["seed_accuracies"]) > 1:
            text += "; seeds " + " ".join(f"{a:.4f}" for a in m["seed_accuracies"])
        text += f")  loss {m['test_loss']:.4f}"
        if m.get("cv_mean") is not None:
            se = f" ± {m['cv_se']:.4f} SE" if m.get("cv_se") is not None else ""
            text += f"  CV {m['cv_mean']:.4f}{se}"
        lines.append(text)
    lines.append(
        f"plain fine-tuning settings: {format_params(data['plain_finetuning']['params'])}"
    )
    for c in data["comparisons"]:
        lines.append(
            f"{c['model']} − {c['baseline']}: {_difference(c)}; McNemar p = {c['mcnemar_p']:.3g} "
            f"({c['model_only']} images {c['model']} got right more often, "
            f"{c['baseline_only']} {c['baseline']})"
        )
    return lines + list(data["verdict"])
