"""tlsearch.export's trials table: a row per trial, the fold scores as columns, CSV or Parquet."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import finished_tiny_study, run_cli

from tlsearch.errors import ConfigError
from tlsearch.export import trials_frame, write_trials


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[optuna.Study, Path, str]:
    tmp = tmp_path_factory.mktemp("export_trials")
    pruned = {"fold_scores": [0.25], "fold_losses": [2.0], "fold_seconds": [0.1]}
    study, url = finished_tiny_study(tmp, pruned, 0.25)
    return study, tmp, url


def test_a_column_per_fold(study: tuple[optuna.Study, Path, str]) -> None:
    s, _, _ = study
    df = trials_frame(s)
    assert len(df) == 5
    for col in ("number", "state", "value", "params_lambda", "params_lr", "params_frozen_blocks"):
        assert col in df.columns
    for i in (0, 1):
        assert {f"fold_{i}", f"fold_{i}_loss", f"fold_{i}_seconds"} <= set(df.columns)
    assert "fold_2" not in df.columns
    assert not any(c.startswith("user_attrs_fold_") for c in df.columns)
    complete = df[df["state"] == "COMPLETE"]
    assert len(complete) == 4
    for _, row in complete.iterrows():
        assert row["user_attrs_cv_mean"] == pytest.approx((row["fold_0"] + row["fold_1"]) / 2)
        assert 0.0 <= row["fold_0"] <= 1.0
    pruned = df[df["state"] == "PRUNED"].iloc[0]
    assert pruned["fold_0"] == 0.25 and math.isnan(pruned["fold_1"])
    assert df["duration"].dtype.kind == "f"  # seconds, not a timedelta


@pytest.mark.parametrize("name", ["trials.csv", "trials.parquet"])
def test_csv_and_parquet_read_back(study: tuple[optuna.Study, Path, str], name: str) -> None:
    s, tmp, _ = study
    written = write_trials(s, tmp / name)
    read = pd.read_csv(tmp / name) if name.endswith(".csv") else pd.read_parquet(tmp / name)
    assert list(read.columns) == list(written.columns)
    assert read["fold_0"].tolist() == pytest.approx(written["fold_0"].tolist())
    # The scratch baseline trial has no λ (NaN): it is no point of the pretrained search space.
    assert read["params_lambda"].tolist() == pytest.approx(
        written["params_lambda"].tolist(), nan_ok=True
    )


def test_unknown_table_format_is_a_config_error(study: tuple[optuna.Study, Path, str]) -> None:
    s, tmp, _ = study
    with pytest.raises(ConfigError, match=r"trials\.xlsx: the trials table must end in \.csv"):
        write_trials(s, tmp / "trials.xlsx")
    assert not (tmp / "trials.xlsx").exists()


@pytest.mark.slow
def test_export_command_writes_best_and_trials(study: tuple[optuna.Study, Path, str]) -> None:
    _, tmp, url = study
    result = run_cli(
        "export", "--storage", url, "--study-name", "tiny", "-o", "best.json",
        "--trials", "all.parquet", cwd=tmp, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "5 trials written to all.parquet" in result.stderr
    df = pd.read_parquet(tmp / "all.parquet")
    assert {"fold_0", "fold_1"} <= set(df.columns) and len(df) == 5
    assert (tmp / "best.json").is_file()
    # The table describes trials, not where they are stored.
    assert "sqlite" not in (tmp / "all.parquet").read_bytes().decode("latin-1")
