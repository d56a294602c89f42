"""Folders of images (one subfolder per class) read into uint8 arrays, decoded once per content.

A folder ``train/`` with ``train/cat/1.png``, ``train/dog/7.jpg`` … is a labelled set: each
subfolder is a class, every PNG or JPEG file below it (subfolders included) an image of that class.
Class names are sorted, so a folder's labels are 0..C-1 in name order; :mod:`tlsearch.data` maps a
test folder's classes onto its training folder's by name. Files and folders whose names start with
``.`` (``.DS_Store``, ``.ipynb_checkpoints``) are skipped, as are files beside the class folders;
any other file that is not a PNG or JPEG image is an error, never silently left out.

Decoding is the slow part (Pillow, one file at a time), and every worker of a study loads the same
folders: the decoded images are stored once under ``<cache>/images/<key>.npz``, where the key is
the SHA-256 of each file's relative path and bytes and of the options that change the pixels
(resize, channels). A changed, added or renamed file gives a new key, so a cached file is never
stale; a damaged one is decoded again. Every problem is one :class:`~tlsearch.errors.DataError`
line that names the field and the file or folder.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlsearch._io import atomic_write
from tlsearch.config.schema import ImageOptions
from tlsearch.errors import DataError, TlsearchError

__all__ = ["IMAGE_SUFFIXES", "Images", "load_folder", "save_to_cache"]

_log = logging.getLogger(__name__)

# What Pillow is asked to decode; other formats are refused rather than guessed at.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_FORMATS = ("PNG", "JPEG")
# Bump when decoding changes in a way the key does not show (resampling, conversion).
_FORMAT = 1


@dataclass(frozen=True)
class Images:
    """Decoded images ``x`` (uint8, ``(n, channels, height, width)``), labels ``y`` (int64, indices
    into ``classes``, which are the sorted subfolder names) and the cache ``key`` of the folder."""

    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    key: str
    # Whether x and y came from the cache (then there is nothing to save).
    cached: bool = False


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _list_images(folder: Path, where: str) -> list[tuple[str, list[Path]]]:
    """Each class (sorted by name) with its image files (sorted), every problem one line."""
    if not folder.exists():
        raise DataError(f"{where}: folder not found: {folder}")
    if not folder.is_dir():
        raise DataError(f"{where}: not a folder: {folder}")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"{where}: {folder} has no class subfolders (one per class: {folder}/<class>/<image>)"
        )
    classes = []
    for class_dir in class_dirs:
        files = sorted(
            p for p in class_dir.rglob("*") if p.is_file() and not _is_hidden(p, class_dir)
        )
        for p in files:
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{where}: not a PNG or JPEG image: {p}")
        if not files:
            raise DataError(f"{where}: class folder {class_dir} holds no images")
        classes.append((class_dir.name, files))
    return classes


def _key(folder: Path, classes: list[tuple[str, list[Path]]], options: ImageOptions) -> str:
    """SHA-256 of what the decoded arrays depend on: relative paths, file bytes, options."""
    h = hashlib.sha256()
    h.update(repr((_FORMAT, options.resize, options.channels)).encode())
    for _, files in classes:
        for p in files:
            rel = p.relative_to(folder).as_posix().encode()
            h.update(len(rel).to_bytes(8, "little") + rel)
            data = p.read_bytes()
            h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def _decode(path: Path, options: ImageOptions, where: str) -> np.ndarray:
    """One image as uint8 ``(channels, height, width)``, converted and resized as asked."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path, formats=_FORMATS) as img:
            img = img.convert("L" if options.channels == "grayscale" else "RGB")
            if options.resize is not None:
                height, width = options.resize
                img = img.resize((width, height), Image.Resampling.BILINEAR)
            a = np.asarray(img, dtype=np.uint8)
    except UnidentifiedImageError:
        raise DataError(f"{where}: not a PNG or JPEG image: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # Pillow reports a truncated or damaged file with any of these.
        raise DataError(f"{where}: corrupt image {path}: {e}") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "images" / f"{key}.npz"


def _from_cache(path: Path, n: int, classes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The cached arrays, or ValueError/OSError if the file is missing, damaged or not these."""
    with np.load(path, allow_pickle=False) as f:
        x, y, names = f["x"], f["y"], tuple(f["classes"].tolist())
    if x.dtype != np.uint8 or x.ndim != 4 or len(x) != n or y.shape != (n,) or names != classes:
        raise ValueError(f"{path} does not hold these images")
    return x, y.astype(np.int64)


def load_folder(
    folder: Path, field: str, options: ImageOptions, cache_dir: Path | None = None
) -> Images:
    """The images in ``folder`` (the study file's ``data.<field>.image_folder``).

    With ``cache_dir``, decoded images cached there by any process are used instead of decoding
    again; new ones are not written here but by :func:`save_to_cache`, once the whole task has
    loaded, so a task that fails to load leaves nothing behind.
    """
    where = f"data.{field}.image_folder"
    listing = _list_images(folder, where)
    classes = tuple(name for name, _ in listing)
    key = _key(folder, listing, options)
    n = sum(len(files) for _, files in listing)
    if cache_dir is not None:
        try:
            x, y = _from_cache(_cache_path(cache_dir, key), n, classes)
            return Images(x, y, classes, key, cached=True)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # not cached yet, or a damaged file: decode (and save_to_cache replaces it)
    images, labels, first = [], [], None
    for label, (_, files) in enumerate(listing):
        for p in files:
            a = _decode(p, options, where)
            if first is None:
                first = (p, a.shape)
            elif a.shape != first[1]:
                raise DataError(
                    f"{where}: {p} is {a.shape[1]}x{a.shape[2]} pixels but {first[0]} is "
                    f"{first[1][1]}x{first[1][2]} (height x width); set data.images.resize = "
                    "[height, width]"
                )
            images.append(a)
            labels.append(label)
    return Images(np.stack(images), np.asarray(labels, dtype=np.int64), classes, key)


def save_to_cache(images: Images, cache_dir: Path) -> None:
    """Store decoded images under ``cache_dir`` (atomically) unless they came from there.

    A cache that cannot be written only costs decoding again next time: a warning, not an error.
    """
    if images.cached:
        return
    path = _cache_path(cache_dir, images.key)

    def write(tmp: Path) -> None:
        # A file object: np.savez would append ".npz" to the temporary file's name.
        with tmp.open("wb") as f:
            np.savez(f, x=images.x, y=images.y, classes=np.asarray(images.classes, dtype=str))

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write, what="pretrain.cache_dir: ")
    except (OSError, TlsearchError) as e:
        _log.warning("decoded images not cached (they are decoded again next time): %s", e)
