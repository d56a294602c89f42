"""tlsearch final: retrain three models on the target training split, on one or more seeds, score
the test split once, and say what the differences mean."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, merge, run_cli

from tlsearch.config import config_from_dict
from tlsearch.data import load_task
from tlsearch.errors import ConfigError
from tlsearch.export import final_paths, write_export
from tlsearch.final import compare, run_final, verdict
from tlsearch.models import create_model
from tlsearch.params import PLAIN_FINETUNING
from tlsearch.stats import mcnemar_exact, wilson_interval
from tlsearch.study import run_study
from tlsearch.training import evaluate, to_tensors

MODELS = ("tuned", "plain_finetuning", "scratch")
PAIRS = [("tuned", "plain_finetuning"), ("tuned", "scratch"), ("plain_finetuning", "scratch")]


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


@pytest.fixture(scope="module")
def two_seeds(exported: Path) -> tuple[dict, list[str]]:
    """``tlsearch final best.json --seeds 2`` as a user runs it: BEST.final.json and stdout."""
    result = run_cli("final", "best.json", "--seeds", "2", cwd=exported.parent, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(final_paths(exported)[0].read_text()), result.stdout.splitlines()


@pytest.mark.slow
def test_final_command(exported: Path, two_seeds: tuple[dict, list[str]]) -> None:
    tmp = exported.parent
    metrics, printed = two_seeds
    # How the export chose (the rule's own line), a line per model, plain fine-tuning's
    # settings, three differences, two sentences.
    chosen = json.loads((tmp / "best.json").read_text())["selection"]
    # The rule's name once, though its reason starts with it.
    assert chosen["reason"].startswith(f"{chosen['rule']}: ")
    assert printed[0] == f"selected by {chosen['reason']}" == metrics["selection"]
    printed = printed[1:]
    assert [line.split(":")[0].strip() for line in printed[:3]] == list(MODELS)
    assert printed[3] == (
        "plain fine-tuning settings: lambda=0.01 lr=0.001 frozen_blocks=0 backbone_lr_mult=1 "
        "regularizer=l2sp"
    )
    assert [line.split(":")[0] for line in printed[4:7]] == [f"{a} − {b}" for a, b in PAIRS]
    assert printed[7:] == metrics["verdict"] and len(printed) == 9

    metrics_path, weights_path = final_paths(exported)
    assert metrics_path == tmp / "best.final.json" and weights_path == tmp / "best.final.pt"
    best = json.loads(exported.read_text())
    n = metrics["target_test_size"]
    assert metrics["seeds"] == [0, 1] and metrics["confidence"] == 0.95
    assert "default_lambda" not in metrics
    for name in MODELS:
        m = metrics[name]
        seeds = m["seed_accuracies"]
        assert len(seeds) == 2 and len(m["seed_losses"]) == 2, (name, m)
        assert all(0.0 <= a <= 1.0 and round(a * n) == pytest.approx(a * n) for a in seeds)
        assert m["test_accuracy"] == pytest.approx(statistics.fmean(seeds))
        assert m["test_loss"] == pytest.approx(statistics.fmean(m["seed_losses"]))
        assert math.isfinite(m["test_loss"]) and m["test_loss"] > 0, (name, m)
        # Wilson on the seed-averaged accuracy over the n test images.
        low, high = m["test_interval"]
        assert (low, high) == pytest.approx(wilson_interval(m["test_accuracy"] * n, n))
        assert 0.0 <= low < m["test_accuracy"] < high <= 1.0
    # The two seeds are two trainings: not the same numbers.
    assert len({tuple(metrics[n]["seed_accuracies"]) for n in MODELS}) == 3
    assert any(len(set(metrics[n]["seed_accuracies"])) == 2 for n in MODELS)

    # The CV estimate with its standard error: the search's for the tuned model, and the study's
    # baseline trials' for the baselines, which were trained with exactly final's settings.
    assert metrics["tuned"]["cv_mean"] == best["cv_mean"]
    assert metrics["tuned"]["cv_se"] == best["cv_se"] and best["cv_se"] is not None
    assert metrics["tuned"]["cv_trial_number"] == best["trial_number"]
    for name in ("plain_finetuning", "scratch"):
        block = best["baselines"][name]
        assert metrics[name]["cv_mean"] == block["cv_mean"] is not None
        assert metrics[name]["cv_se"] == block["cv_se"]
        assert metrics[name]["cv_trial_number"] == block["trial_number"]
        assert metrics[name]["params"] == block["params"]
    assert metrics["tuned"]["params"] == best["params"]
    assert metrics["plain_finetuning"]["params"] == {**PLAIN_FINETUNING, "regularizer": "l2sp"}
    assert metrics["scratch"]["params"] == {**PLAIN_FINETUNING, "regularizer": "l2"}
    assert metrics["study_name"] == "tiny" and metrics["trial_number"] == best["trial_number"]

    # Paired differences on the same images: the difference of the mean accuracies, inside its
    # interval; McNemar's p from the discordant counts.
    assert [(c["model"], c["baseline"]) for c in metrics["comparisons"]] == PAIRS
    for c in metrics["comparisons"]:
        a, b = metrics[c["model"]]["test_accuracy"], metrics[c["baseline"]]["test_accuracy"]
        assert c["difference"] == pytest.approx(a - b)
        assert c["interval"][0] <= c["difference"] <= c["interval"][1]
        assert c["interval"][0] < c["interval"][1]
        assert c["model_only"] + c["baseline_only"] <= n
        assert c["mcnemar_p"] == mcnemar_exact(c["model_only"], c["baseline_only"])
    assert metrics["tuned"]["baseline"] is None  # trial 3: a searched trial
    assert metrics["verdict"] == verdict(metrics["comparisons"])

    # The weights are a plain state dict: they load without unpickling code, and they are the
    # tuned model of seed 0.
    state = torch.load(weights_path, weights_only=True)
    cfg = config_from_dict(best["config"])
    task = load_task(cfg.data)
    model = create_model(cfg.model, task.input_shape, task.target_classes)
    model.load_state_dict(state)
    x, y = to_tensors(task.target_test.x, task.target_test.y, torch.device("cpu"))
    accuracy, _ = evaluate(model, x, y)
    assert accuracy == pytest.approx(metrics["tuned"]["seed_accuracies"][0])
    assert n == len(task.target_test)


@pytest.mark.slow
def test_one_seed_is_seed_zero_and_old_exports_still_work(
    exported: Path, two_seeds: tuple[dict, list[str]]
) -> None:
    # An export from before the baseline trials and cv_se: no baselines block, no SE stored.
    old = json.loads(exported.read_text())
    for key in ("baselines", "cv_se", "selection"):
        old.pop(key, None)
    path = exported.parent / "old.json"
    path.write_text(json.dumps(old))
    one = run_final(path)  # seeds = 1, as before --seeds existed
    assert one["seeds"] == [0]
    for name in MODELS:
        # Seed 0 comes first: one seed gives the numbers of the first seed of many.
        assert one[name]["test_accuracy"] == two_seeds[0][name]["seed_accuracies"][0], name
        assert one[name]["seed_accuracies"] == [one[name]["test_accuracy"]]
    folds = old["fold_scores"]
    assert one["tuned"]["cv_se"] == pytest.approx(statistics.stdev(folds) / math.sqrt(len(folds)))
    for name in ("plain_finetuning", "scratch"):
        assert one[name]["cv_mean"] is None and one[name]["cv_se"] is None
    # With one seed the McNemar counts are the images only one of the two models got right.
    for c in one["comparisons"]:
        assert c["difference"] == pytest.approx(
            (c["model_only"] - c["baseline_only"]) / one["target_test_size"]
        )


@pytest.mark.slow
def test_an_export_of_a_baseline_trial(exported: Path) -> None:
    # The export chose the study's scratch trial (Optuna's best can be it): the tuned model is the
    # scratch model, trained from a random init as that trial was, not fine-tuned with its settings.
    best = json.loads(exported.read_text())
    scratch = best["baselines"]["scratch"]
    best.update(
        trial_number=scratch["trial_number"],
        params=scratch["params"],
        selection={"selected": {"trial_number": scratch["trial_number"], "baseline": "scratch"}},
    )
    path = exported.parent / "scratch.json"
    path.write_text(json.dumps(best))
    out = run_final(path)
    assert out["tuned"]["baseline"] == "scratch"
    assert out["tuned"]["test_accuracy"] == out["scratch"]["test_accuracy"]
    tuned_scratch = out["comparisons"][1]
    assert (tuned_scratch["difference"], *tuned_scratch["interval"]) == (0.0, 0.0, 0.0)
    assert (tuned_scratch["model_only"], tuned_scratch["baseline_only"]) == (0, 0)
    assert out["verdict"][0] == "The search chose training from scratch, its own reference trial."
    assert out["verdict"][1:] == verdict(out["comparisons"])


def _correct(accuracy: float, n: int = 400, shift: int = 0) -> np.ndarray:
    """One seed's correctness on n images: the first accuracy·n right, rotated by ``shift``."""
    out = np.zeros(n, dtype=bool)
    out[: round(accuracy * n)] = True
    return np.roll(out, shift)[None, :]


def _comparisons(runs: dict[str, np.ndarray]) -> list[dict]:
    return [{"model": a, "baseline": b, **compare(runs[a], runs[b])} for a, b in PAIRS]


def test_compare_counts_images_one_model_got_right_more_often() -> None:
    # Two seeds on five images: a is right on (2, 2, 1, 0, 1) seeds of 2, b on (0, 2, 2, 0, 1).
    a = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 1]], dtype=bool)
    b = np.array([[0, 1, 1, 0, 1], [0, 1, 1, 0, 0]], dtype=bool)
    c = compare(a, b)
    assert (c["model_only"], c["baseline_only"]) == (1, 1)
    assert c["mcnemar_p"] == 1.0
    assert c["difference"] == pytest.approx((2 + 0 - 1 + 0 + 0) / 2 / 5)
    # One seed: McNemar's discordant pairs.
    one = compare(a[:1], b[:1])
    assert (one["model_only"], one["baseline_only"]) == (1, 1)
    assert one["difference"] == 0.0
    # Three seeds on four images: a right on (3, 2, 0, 1) seeds, b on (1, 3, 0, 0).
    a = np.array([[1, 1, 0, 0], [1, 0, 0, 1], [1, 1, 0, 0]], dtype=bool)
    b = np.array([[0, 1, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0]], dtype=bool)
    three = compare(a, b)
    assert (three["model_only"], three["baseline_only"]) == (2, 1)
    assert three["mcnemar_p"] == mcnemar_exact(2, 1)
    assert three["difference"] == pytest.approx((2 - 1 + 0 + 1) / 3 / 4)


def test_verdict_sentences() -> None:
    # The sentence of the issue, from its numbers.
    stated = [
        {"model": "tuned", "baseline": "plain_finetuning", "difference": 0.004,
         "interval": [-0.011, 0.019]},
        {"model": "tuned", "baseline": "scratch", "difference": 0.1, "interval": [0.07, 0.13]},
        {"model": "plain_finetuning", "baseline": "scratch", "difference": 0.096,
         "interval": [0.066, 0.126]},
    ]  # fmt: skip
    assert verdict(stated) == [
        "The search did not beat plain fine-tuning here (difference +0.4 pp, 95 % interval "
        "−1.1 … +1.9 pp).",
        "Transfer pays here: the tuned model beat training from scratch (+10.0 pp, 95 % interval "
        "+7.0 … +13.0 pp); plain fine-tuning beat training from scratch (+9.6 pp, 95 % interval "
        "+6.6 … +12.6 pp).",
    ]
    assert verdict(stated, chose="plain_finetuning")[0] == (
        "The search did not beat plain fine-tuning here: it kept plain fine-tuning's own "
        "settings, no configuration having shown an advantage beyond the noise in the study."
    )

    # From per-image correctness: tuned right on 80 % of 400 images, plain on 70 %, scratch on
    # 69 %, the images each gets right mostly the same ones.
    runs = {
        "tuned": _correct(0.80),
        "plain_finetuning": _correct(0.70),
        "scratch": _correct(0.69, shift=50),
    }
    search, transfer = verdict(_comparisons(runs))
    assert search.startswith("The search beat plain fine-tuning here (difference +10.0 pp, 95 %")
    assert transfer.startswith("Transfer pays here: the tuned model beat training from scratch")
    assert (
        "plain fine-tuning did not beat it beyond the noise (+1.0 pp, 95 % interval −" in transfer
    )

    # Neither fine-tuned model beats scratch beyond the noise; the search is worse than plain.
    runs = {
        "tuned": _correct(0.60),
        "plain_finetuning": _correct(0.70),
        "scratch": _correct(0.69, shift=50),
    }
    search, transfer = verdict(_comparisons(runs))
    assert search.startswith(
        "The search did not beat plain fine-tuning here; plain fine-tuning was better "
        "(difference −10.0 pp"
    )
    assert transfer.startswith(
        "Transfer does not pay here: neither fine-tuned model beat training from scratch beyond "
        "the noise (tuned − scratch −9.0 pp, 95 % interval −"
    )


def test_final_needs_an_export(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.json: file not found"):
        run_final(tmp_path / "nope.json")
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(ConfigError, match="not a tlsearch export"):
        run_final(tmp_path / "other.json")
    with pytest.raises(ConfigError, match="--seeds must be at least 1, not 0"):
        run_final(tmp_path / "other.json", seeds=0)
