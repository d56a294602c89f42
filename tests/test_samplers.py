"""tlsearch.samplers: a resumed study proposes what an uninterrupted one would."""

from __future__ import annotations

import optuna
import pytest

from tlsearch.config import config_from_dict
from tlsearch.registry import SAMPLERS
from tlsearch.samplers import PerTrialSeed, make_sampler, trial_seed
from tlsearch.study import run_study


def _objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -3.0, 3.0)
    y = trial.suggest_float("y", 0.1, 10.0, log=True)
    return -((x - 1.0) ** 2) - y


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_stopped_and_resumed_proposes_the_uninterrupted_points(name: str) -> None:
    cfg = config_from_dict({"sampler": {"name": name, "n_startup_trials": 3}})
    whole = optuna.create_study(direction="maximize", sampler=make_sampler(cfg))
    whole.optimize(_objective, n_trials=8)

    # The same study stopped after 3 and 6 trials, each start building its sampler anew.
    storage = optuna.storages.InMemoryStorage()
    for total in (3, 6, 8):
        part = optuna.create_study(
            storage=storage,
            study_name="s",
            direction="maximize",
            sampler=make_sampler(cfg),
            load_if_exists=True,
        )
        part.optimize(_objective, n_trials=total - len(part.trials))

    assert [t.params for t in part.trials] == [t.params for t in whole.trials]
    # 8 distinct points: no start replays the random start-up sequence of an earlier one.
    assert len({tuple(sorted(t.params.items())) for t in part.trials}) == 8


def test_a_seeded_sampler_draws_each_trial_from_its_own_seed() -> None:
    cfg = config_from_dict({"sampler": {"name": "tpe", "seed": 3}})
    assert isinstance(make_sampler(cfg), PerTrialSeed)
    assert trial_seed(3, 0) != trial_seed(3, 1) != trial_seed(4, 1)
    # Without a seed, and in a parallel worker (reseeded from the OS), Optuna's sampler as it is.
    assert not isinstance(make_sampler(cfg, parallel=True), PerTrialSeed)
    unseeded = config_from_dict({"sampler": {"name": "tpe", "seed": None}})
    assert not isinstance(make_sampler(unseeded), PerTrialSeed)


def test_resumed_tlsearch_study_equals_an_uninterrupted_one(tiny, tmp_path) -> None:
    """README's first command, stopped and resumed: 3, then 6 trials (it gave 3 distinct points
    out of 9 in tlsearch 0.1, whose sampler restarted its random sequence at every start)."""
    whole = run_study(config_from_dict(tiny(n_trials=6, name="whole")))
    run_study(config_from_dict(tiny(n_trials=3, name="parts")))
    parts = run_study(config_from_dict(tiny(n_trials=6, name="parts")))
    assert [t.params for t in parts.trials] == [t.params for t in whole.trials]
    assert len({tuple(sorted(t.params.items())) for t in parts.trials}) == 6
