"""The study storage over SQLite and PostgreSQL: exact budget, heartbeats, tuning, secrets."""

from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path

import optuna
import pytest
from conftest import run_cli
from optuna.trial import TrialState, create_trial
from pg import fresh_database, require_postgres, tiny_config

from tlsearch.errors import ConfigError, StorageError
from tlsearch.storage import (
    ATTR_CONFIG,
    CONFIRM_ATTR,
    AlreadyQueued,
    BudgetExhausted,
    Heartbeat,
    StudyStorage,
    create_storage,
    find_study,
    mask_url,
    storage_location,
)
from tlsearch.workers import join_study


def _study(storage: StudyStorage, name: str = "s") -> tuple[optuna.Study, int]:
    study = optuna.create_study(study_name=name, storage=storage)
    return study, storage.get_study_id_from_name(name)


def test_sqlite_is_tuned_for_several_processes(tmp_path: Path) -> None:
    storage = create_storage(f"sqlite:///{tmp_path / 'a.db'}")
    with storage.engine.connect() as conn:
        pragma = {
            p: conn.exec_driver_sql(f"PRAGMA {p}").scalar()
            for p in ("journal_mode", "busy_timeout", "synchronous")
        }
    # WAL: readers (the dashboard) never block writers; NORMAL sync is durable in WAL up to an OS
    # crash; 60 s busy timeout: writers queue instead of failing with "database is locked".
    assert pragma == {"journal_mode": "wal", "busy_timeout": 60000, "synchronous": 1}


def test_budget_is_exact_with_many_concurrent_creators(storage_url: str) -> None:
    """Eight threads (eight connections) race for 30 slots; failed trials give theirs back."""
    storage = create_storage(storage_url)
    study, study_id = _study(storage)
    storage.set_budget(study_id, 30)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while True:
                try:
                    trial_id = storage.create_new_trial(study_id)
                except BudgetExhausted:
                    done = storage.count_states(study_id)[TrialState.COMPLETE]
                    if done >= 30:
                        return
                    time.sleep(0.01)  # a running trial may still fail and free its slot
                    continue
                if rng.random() < 0.3:
                    storage.set_trial_state_values(trial_id, TrialState.FAIL)
                else:
                    storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [1.0])
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    counts = storage.count_states(study_id)
    assert counts[TrialState.COMPLETE] == 30
    assert counts[TrialState.RUNNING] == counts[TrialState.WAITING] == 0
    numbers = [t.number for t in study.get_trials(deepcopy=False)]
    assert sorted(numbers) == list(range(len(numbers)))


# Asking outside optimize() on purpose: a worker that dies between ask and its objective.
def test_each_candidate_is_confirmed_once_outside_the_budget(storage_url: str) -> None:
    """The confirmation round's trials: workers that queue the round at once queue it once, the
    budget does not count them, and a failed one may be queued again (a retry)."""
    storage = create_storage(storage_url)
    study, study_id = _study(storage)
    storage.set_budget(study_id, 1)
    study.tell(study.ask(), 1.0)
    with pytest.raises(BudgetExhausted):
        study.ask()
    study.enqueue_trial({}, user_attrs={CONFIRM_ATTR: 0})
    with pytest.raises(AlreadyQueued):
        create_storage(storage_url).create_new_trial(
            study_id, create_trial(state=TrialState.WAITING, user_attrs={CONFIRM_ATTR: 0})
        )
    confirming = study.ask()
    assert confirming.user_attrs == {CONFIRM_ATTR: 0}
    study.tell(confirming, state=TrialState.FAIL)
    study.enqueue_trial({}, user_attrs={CONFIRM_ATTR: 0})  # the retry
    counts = storage.count_states(study_id, confirmations=True)
    assert (counts[TrialState.FAIL], counts[TrialState.WAITING]) == (1, 1)
    assert storage.count_states(study_id, confirmations=False)[TrialState.COMPLETE] == 1


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_queued_and_retried_trials_count_toward_the_budget(storage_url: str) -> None:
    storage = create_storage(storage_url, Heartbeat(interval=1, grace_period=2, max_retry=1))
    study, study_id = _study(storage)
    storage.set_budget(study_id, 2)
    study.enqueue_trial({"x": 1.0})
    first = study.ask()
    assert first.params == {} and storage.count_states(study_id)[TrialState.RUNNING] == 1
    study.ask()  # the second slot
    with pytest.raises(BudgetExhausted):
        study.enqueue_trial({"x": 2.0})
    # A retry whose slot was taken by a newer trial is dropped quietly.
    study.tell(first, state=TrialState.FAIL)
    study.ask()
    storage.requeue()(study, storage.get_trial(first._trial_id))
    assert storage.count_states(study_id)[TrialState.WAITING] == 0


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_trial_is_heartbeated_from_birth(storage_url: str) -> None:
    """A worker killed right after creating a trial leaves no trial that is RUNNING forever."""
    storage = create_storage(storage_url, Heartbeat(interval=1, grace_period=2, max_retry=1))
    study, study_id = _study(storage)
    trial = study.ask(fixed_distributions={"x": optuna.distributions.FloatDistribution(0, 1)})
    # ... and nobody runs it: no objective, no heartbeat thread.
    time.sleep(3.5)
    optuna.storages.fail_stale_trials(study)
    assert storage.get_trial(trial._trial_id).state == TrialState.FAIL
    (retry,) = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert retry.params == trial.params
    assert retry.system_attrs["failed_trial"] == trial.number


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_failed_heartbeat_is_logged_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    storage = create_storage(f"sqlite:///{tmp_path / 'a.db'}", Heartbeat(1, 2))
    study, _ = _study(storage)
    trial = study.ask()

    def down(self: object, trial_id: int) -> None:
        raise optuna.exceptions.StorageInternalError("server closed the connection")

    monkeypatch.setattr(optuna.storages.RDBStorage, "record_heartbeat", down)
    with caplog.at_level(logging.WARNING, logger="tlsearch"):
        storage.record_heartbeat(trial._trial_id)
        storage.record_heartbeat(trial._trial_id)
    warnings = [r for r in caplog.records if "heartbeat" in r.getMessage()]
    assert len(warnings) == 1  # once per outage, not once per beat


def test_heartbeat_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="grace period: 10 s must be longer"):
        Heartbeat(interval=10, grace_period=10)
    assert Heartbeat.from_dict({"interval": 2, "grace_period": 9, "unknown": 1}).max_retry == 3


def test_password_never_shown_or_stored(tmp_path: Path) -> None:
    """Local PostgreSQL trusts any password, so a URL with one works and shows where it leaks."""
    with fresh_database() as url:
        secret_url = url.replace("postgres@", "postgres:s3cret-pw@")
        assert mask_url(secret_url) == url.replace("postgres@", "postgres:***@")
        created = run_cli("create", str(tiny_config(tmp_path, secret_url)), cwd=tmp_path)
        assert created.returncode == 0, created.stderr
        assert "s3cret" not in created.stdout + created.stderr
        # The command to start workers with: they take the password from the environment.
        assert created.stdout.strip() == f"tlsearch worker --storage '{url}' --study-name 'tiny'"
        # The study is readable by anyone with the dashboard: its attributes hold no password.
        study = optuna.load_study(study_name="tiny", storage=url)
        assert study.user_attrs[ATTR_CONFIG]["storage"] == mask_url(secret_url)
        assert "s3cret" not in str(study.user_attrs)


def test_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with fresh_database() as url:
        monkeypatch.setenv("TLSEARCH_DB_PASSWORD", "env-s3cret")
        storage = create_storage(url)
        assert "env-s3cret" in str(storage.engine.url.password)  # what the driver gets
        assert "env-s3cret" not in mask_url(storage.url)
        storage.engine.dispose()


def test_unreachable_database_is_one_clear_line(tmp_path: Path) -> None:
    url = "postgresql+psycopg://tl:s3cret@127.0.0.1:1/nowhere"
    result = run_cli("worker", "--storage", url, "--study-name", "x", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "tlsearch: error: storage postgresql+psycopg://tl:***@127.0.0.1:1/nowhere: cannot open: "
    )
    assert "s3cret" not in result.stderr and "Traceback" not in result.stderr


def test_unknown_study_names_the_ones_there(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    _study(create_storage(url), "digits")
    with pytest.raises(StorageError) as e:
        join_study(url, "digts")
    assert str(e.value) == f"no study 'digts' in {url} (studies there: digits)"


def test_sqlite_in_memory_is_refused() -> None:
    with pytest.raises(ConfigError, match="in-memory SQLite database cannot be shared"):
        create_storage("sqlite://")


def test_storage_error_translation_keeps_the_driver_reason() -> None:
    require_postgres()
    with pytest.raises(
        StorageError, match=r"\*\*\*@127\.0\.0\.1:5432/no_such_db_x: cannot open: "
    ):
        create_storage("postgresql+psycopg://postgres:pw@127.0.0.1:5432/no_such_db_x")


def test_the_checkpoint_copy_is_kept_once_and_checked(
    storage_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """What a worker on another host takes instead of pretraining (storage/checkpoints.py)."""
    import hashlib

    import sqlalchemy

    from tlsearch.storage import checkpoints, fetch_checkpoint, store_checkpoint

    storage = create_storage(storage_url)
    file = tmp_path / "source.pt"
    file.write_bytes(b"\x00checkpoint bytes" * 100)
    sha = hashlib.sha256(file.read_bytes()).hexdigest()
    assert fetch_checkpoint(storage, sha) is None, "no table yet: nothing kept"
    assert store_checkpoint(storage, sha, file) and store_checkpoint(storage, sha, file)
    assert fetch_checkpoint(create_storage(storage_url), sha) == file.read_bytes()
    assert fetch_checkpoint(storage, "0" * 64) is None

    # Damaged in the database: refused (logged), never handed to torch.load.
    with storage.engine.begin() as conn:
        conn.execute(sqlalchemy.update(checkpoints._TABLE).values(data=b"tampered"))
    with caplog.at_level(logging.WARNING, logger="tlsearch"):
        assert fetch_checkpoint(storage, sha) is None
    assert f"not {sha[:12]}…; not used" in caplog.text

    monkeypatch.setattr(checkpoints, "MAX_SHARED_BYTES", 100)
    assert not store_checkpoint(storage, "1" * 64, file), "too large: the file is shared instead"
    assert fetch_checkpoint(storage, "1" * 64) is None


def test_find_study_reads_the_study_file_then_the_flags(
    storage_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """What `status`, `export` and `report` open: the study file's storage and name, each
    overridden by its flag; one log line names the study and the database (password masked)."""
    # Local PostgreSQL trusts any password: one in the study file shows whether it leaks.
    url = storage_url.replace("postgres@", "postgres:s3cret-pw@")
    storage = create_storage(url)
    for name in ("tiny", "other"):
        _study(storage, name)
    storage.engine.dispose()
    path = tiny_config(tmp_path, url)
    where = storage_location(url)
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="tlsearch")

    study, found = find_study(path)
    assert (study.study_name, found) == ("tiny", url)
    assert find_study(path, study_name="other")[0].study_name == "other"
    assert [r.getMessage() for r in caplog.records] == [
        f"reading study 'tiny' in {where}",
        f"reading study 'other' in {where}",
    ]
    assert "s3cret" not in caplog.text and "s3cret" not in where
    caplog.clear()
    # Both flags: as before the study file existed, and no line (the user named it).
    assert find_study(storage=url, study_name="other")[0].study_name == "other"
    assert caplog.records == []
    with pytest.raises(ConfigError) as e:
        find_study(path, study_name="nope")
    assert str(e.value) == f"{path}: no study 'nope' in {where} (studies there: tiny, other)"
    # Neither: ./tlsearch.db, which is not there, and is not made.
    with pytest.raises(ConfigError, match=r"^no study file or --storage given, and no "):
        find_study()
    assert not (tmp_path / "tlsearch.db").exists()
