"""Bad study files, data files, storage URLs and flags, through the real ``tlsearch`` command.

Each row is one mistake a user makes, the exact line it must print and its exit code: 2 for a
config or usage error, 1 for a study whose state does not allow the command (no study, no
finished trial, a storage that is not a database). No row prints a traceback, and none leaves
anything behind: no database, no study, no checkpoint, no export, and an existing study's trials
and attributes exactly as they were.

tests/test_config.py checks every schema error through ``config_from_dict`` and tests/test_cli.py
a file with several errors at once; the rows here are other mistakes, or the same kind reached
through a different door (a flag, a data file, an existing study). Each command is a process of
its own, forked from one that imported the CLI and torch once (hostile.run_forked: a row that
loads data or opens a storage spends seconds importing torch); four rows also run as
`python -m tlsearch.cli` and must print the same.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import typing
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import optuna
import pytest
from conftest import TINY, merge, run_many, to_toml
from hostile import (
    STUDY,
    make_study,
    run_forked,
    tree,
    trials,
    unwritable,
    write_study,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from tlsearch.config import StudyConfig, config_from_dict, load_config
from tlsearch.errors import ConfigError

pytestmark = pytest.mark.slow  # the table's fixture runs 44 commands and makes a study first

Setup = Callable[[Path, Path, ExitStack], None]
SECRET = "s3cret-XYZ"


class Case(NamedTuple):
    setup: Setup
    args: list[str]
    code: int
    # The exact line on stderr ({d}: the case's directory): the only one, except that argparse
    # prints its usage first.
    line: str
    argparse: bool = False


# --- setups: each writes into the case's directory d; t is the shared study's directory ------


def study(**overrides: Any) -> Setup:
    def setup(d: Path, t: Path, stack: ExitStack) -> None:
        write_study(d / "bad.toml", **overrides)

    return setup


def toml(text: str | bytes) -> Setup:
    def setup(d: Path, t: Path, stack: ExitStack) -> None:
        (d / "bad.toml").write_bytes(text.encode() if isinstance(text, str) else text)

    return setup


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


def files(
    kind: str = "csv",
    change: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
    label: str = "label",
    **overrides: Any,
) -> Setup:
    """Source digits 0-4 in src.npz, target digits 5-9 in tgt.csv (or tgt.npz), ``change``d."""

    def setup(d: Path, t: Path, stack: ExitStack) -> None:
        x, y = _digits()
        np.savez(d / "src.npz", x=x[y < 5], y=y[y < 5])
        xt, yt = x[y >= 5], y[y >= 5]
        if change is not None:
            xt, yt = change(xt.copy(), yt.copy())
        if kind == "csv":
            import pandas as pd

            table = pd.DataFrame(xt, columns=[f"px{i}" for i in range(xt.shape[1])])
            table[label] = yt
            table.to_csv(d / "tgt.csv", index=False)
        else:
            np.savez(d / "tgt.npz", x=xt, y=yt)
        data = {"source": {"path": "src.npz"}, "target": {"path": f"tgt.{kind}"}}
        cfg = merge(STUDY, {"data": data})
        del cfg["data"]["task"]
        (d / "bad.toml").write_text(to_toml(merge(cfg, overrides)))

    return setup


def _set(i: int, j: int, value: float) -> Callable[[np.ndarray, np.ndarray], tuple]:
    def change(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x[i, j] = value
        return x, y

    return change


def _only_sevens(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x[y == 7], y[y == 7]


def _two_nines(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.concatenate([np.flatnonzero(y != 9), np.flatnonzero(y == 9)[:4]])
    return x[keep], y[keep]  # half of the four nines are held out for the test: two remain


def image_folders(change: Callable[[Path], None]) -> Setup:
    """Source digits 0-4 as PNGs in src/<digit>/, target digits 5-9 in tgt/ and tgt-test/
    (three 8×8 images per class and folder), ``change``d."""

    def setup(d: Path, t: Path, stack: ExitStack) -> None:
        from PIL import Image

        x, y = _digits()
        pixels = np.round(x * 255).astype(np.uint8).reshape(-1, 8, 8)
        splits = (("src", range(5), 0), ("tgt", range(5, 10), 0), ("tgt-test", range(5, 10), 3))
        for folder, digits, start in splits:
            for digit in digits:
                (d / folder / str(digit)).mkdir(parents=True)
                for i in np.flatnonzero(y == digit)[start : start + 3]:
                    Image.fromarray(pixels[i]).save(d / folder / str(digit) / f"{i}.png")
        change(d)
        data = {
            "source": {"image_folder": "src"},
            "target": {"image_folder": "tgt"},
            "target_test": {"image_folder": "tgt-test"},
            "images": {"channels": "grayscale"},
        }
        cfg = merge(STUDY, {"data": data})
        del cfg["data"]["task"]
        (d / "bad.toml").write_text(to_toml(cfg))

    return setup


def _no_target_folder(d: Path) -> None:
    shutil.rmtree(d / "tgt")


def _loose_images(d: Path) -> None:
    for png in (d / "src").glob("*/*.png"):
        png.rename(d / "src" / png.name)
    for digit in (d / "src").glob("[0-9]"):
        digit.rmdir()


def _empty_class(d: Path) -> None:
    for png in (d / "tgt" / "7").iterdir():
        png.unlink()


def _notes(d: Path) -> None:
    (d / "src" / "2" / "notes.txt").write_text("scanned on Monday\n")


def _truncated(d: Path) -> None:
    png = d / "tgt-test" / "6" / "58.png"
    png.write_bytes(png.read_bytes()[:-40])  # into the image data: IEND alone is not missed


def _bigger_image(d: Path) -> None:
    from PIL import Image

    Image.new("L", (10, 8)).save(d / "tgt" / "9" / "big.png")


def _extra_test_class(d: Path) -> None:
    shutil.copytree(d / "tgt-test" / "5", d / "tgt-test" / "five")


def _missing_test_class(d: Path) -> None:
    shutil.rmtree(d / "tgt-test" / "8")


def existing(then: Setup | None = None) -> Setup:
    """A copy of the shared directory (see :func:`hostile.make_study`)."""

    def setup(d: Path, t: Path, stack: ExitStack) -> None:
        shutil.copytree(t, d, dirs_exist_ok=True)
        if then is not None:
            then(d, t, stack)

    return setup


def _export(change: Callable[[dict], None]) -> Setup:
    def setup(d: Path, t: Path, stack: ExitStack) -> None:
        data = json.loads((t / "best.json").read_text())
        change(data)
        (d / "best.json").write_text(json.dumps(data))

    return setup


def _cv_k_1(data: dict) -> None:
    data["config"]["cv"]["k"] = 1


def _read_only_dir(d: Path, t: Path, stack: ExitStack) -> None:
    write_study(d / "bad.toml")
    stack.enter_context(unwritable(d / "ro"))


def _text_file(d: Path, t: Path, stack: ExitStack) -> None:
    (d / "notes.txt").write_text("not a database\n")


def _nothing(d: Path, t: Path, stack: ExitStack) -> None:
    pass


RUN = ["-q", "run", "bad.toml"]
ERR = "tlsearch: error: "
TINY_DB = ["--storage", "sqlite:///study.db", "--study-name"]
# How every "unknown name" line ends (tlsearch.registry).
PLUG_IN = "; a plug-in adds more: install its package, or pass --plugin MODULE)"

CASES: dict[str, Case] = {
    # The study file itself.
    "TOML: unclosed table header": Case(
        toml('name = "x"\n[data\ntask = "digits-noisy"\n'),
        RUN,
        2,
        ERR + "bad.toml: invalid TOML: Expected ']' at the end of a table declaration "
        "(at line 2, column 6)",
    ),
    "typo: key in a section": Case(
        study(finetune={"epoch": 3}), RUN, 2, ERR + "bad.toml: finetune.epoch: unknown key"
    ),
    "typo: section name": Case(
        study(serach={"lr": 0.01}), RUN, 2, ERR + "bad.toml: serach: unknown key"
    ),
    "typo: key of a range": Case(
        study(search={"lambda": {"low": 1e-3, "high": 1.0, "lgo": True}}),
        RUN,
        2,
        ERR + "bad.toml: search.lambda.lgo: unknown key",
    ),
    "typo: key of a data file": Case(
        files(data={"target": {"lable_column": "label"}}),
        RUN,
        2,
        ERR + "bad.toml: data.target.lable_column: unknown key",
    ),
    "type: a data source that is not a table": Case(
        study(data={"target": False}),
        RUN,
        2,
        ERR + "bad.toml: data.target: Input should be a valid dictionary or instance of "
        "FileSource",
    ),
    "type: number as a string": Case(
        study(n_trials="10"), RUN, 2, ERR + "bad.toml: n_trials: Input should be a valid integer"
    ),
    "type: string for a searched parameter": Case(
        study(search={"lambda": "0.1"}),
        RUN,
        2,
        ERR + "bad.toml: search.lambda: must be a number (fixed) or a table "
        "{low, high, log, step} (searched), got '0.1'",
    ),
    "range: inverted": Case(
        study(search={"lambda": {"low": 1.0, "high": 0.1, "log": True}}),
        RUN,
        2,
        ERR + "bad.toml: search.lambda: empty range: low 1.0 > high 0.1",
    ),
    "range: log scale from 0": Case(
        study(search={"lr": {"low": 0.0, "high": 0.1, "log": True}}),
        RUN,
        2,
        ERR + "bad.toml: search.lr: log scale needs low > 0, got 0.0",
    ),
    "range: log scale with a step": Case(
        study(search={"lambda": {"low": 0.1, "high": 1.0, "log": True, "step": 0.1}}),
        RUN,
        2,
        ERR + "bad.toml: search.lambda: 'step' cannot be combined with 'log'",
    ),
    "range: infinite bound": Case(
        study(search={"lr": {"low": 1e-4, "high": float("inf")}}),
        RUN,
        2,
        ERR + "bad.toml: search.lr.high: Input should be a finite number",
    ),
    "frozen depth beyond the CNN's blocks": Case(
        study(model={"name": "cnn"}, search={"frozen_blocks": {"low": 0, "high": 4}}),
        RUN,
        2,
        ERR + "bad.toml: search.frozen_blocks: 4 exceeds the 3 blocks of model 'cnn'",
    ),
    "unknown regularizer": Case(
        study(regularizer={"name": "bss"}),
        RUN,
        2,
        ERR + "bad.toml: regularizer.name: unknown regularizer 'bss' "
        "(choose from delta, l2, l2sp, none" + PLUG_IN,
    ),
    "unknown sampler": Case(
        study(sampler={"name": "hyperopt"}),
        RUN,
        2,
        ERR + "bad.toml: sampler.name: unknown sampler 'hyperopt' "
        "(choose from cmaes, gp, qmc, random, tpe" + PLUG_IN,
    ),
    "augmentation: a mirror image where classes do not survive one": Case(
        study(search={"augment": ["none", "hflip"]}),
        RUN,
        2,
        ERR + "bad.toml: search.augment: 'hflip' mirrors images, but data.flip_invariant is "
        "false (set it where a mirrored image keeps its class)",
    ),
    "augmentation: images asked of flat features": Case(
        files(search={"augment": ["none", "translate"]}),
        RUN,
        2,
        ERR + "search.augment: translate transform images (channels, height, width); this "
        "data's inputs have shape (64,)",
    ),
    "unknown pruner": Case(
        study(pruner={"name": "bohb"}),
        RUN,
        2,
        ERR + "bad.toml: pruner.name: unknown pruner 'bohb' "
        "(choose from hyperband, median, none, percentile, successive_halving, wilcoxon" + PLUG_IN,
    ),
    "unknown task": Case(
        study(data={"task": "cifar10"}),
        RUN,
        2,
        ERR + "bad.toml: data.task: unknown task 'cifar10' (choose from digits-noisy, "
        "digits-split, mnist-inverted, mnist-noisy, mnist-occluded, mnist-rotated, mnist-split"
        + PLUG_IN,
    ),
    "path: home of an unknown user": Case(
        study(pretrain={"cache_dir": "~no-such-user/cache"}),
        RUN,
        2,
        ERR + "bad.toml: pretrain.cache_dir: cannot expand '~no-such-user/cache': no such user",
    ),
    "path: NUL character": Case(
        toml(to_toml(STUDY).replace('cache_dir = "cache"', 'cache_dir = "ca\\u0000che"')),
        RUN,
        2,
        ERR + "bad.toml: pretrain.cache_dir: must not contain a NUL character",
    ),
    # Flags that end up in the config.
    "blank --study-name": Case(
        study(), [*RUN, "--study-name", " "], 2, ERR + "bad.toml: name: must not be empty"
    ),
    "--device tpu": Case(
        study(),
        [*RUN, "--device", "tpu"],
        2,
        ERR + "finetune.device: 'tpu' is not a device (auto, cpu, cuda, cuda:N)",
    ),
    # Data files: found before any training.
    "k-fold: more folds than the rarest class has samples": Case(
        files(change=_two_nines, cv={"k": 3}),
        RUN,
        2,
        ERR + "cv.k: 3 stratified folds need at least 3 target samples per class; the rarest "
        "class has 2 (lower cv.k or raise data.shots)",
    ),
    "CSV without the label column": Case(
        files(label="digit"),
        RUN,
        2,
        ERR + "data.target.label_column: column 'label' not in {d}/tgt.csv",
    ),
    "NaN feature in a CSV": Case(
        files(change=_set(3, 5, np.nan)),
        RUN,
        2,
        ERR + "data.target.path: {d}/tgt.csv: x holds NaN or infinite values",
    ),
    "infinite feature in an npz": Case(
        files("npz", change=_set(7, 1, np.inf)),
        RUN,
        2,
        ERR + "data.target.path: {d}/tgt.npz: x holds NaN or infinite values",
    ),
    "target with one class": Case(
        files(change=_only_sevens),
        RUN,
        2,
        ERR + "data.target: needs at least 2 classes, found 1",
    ),
    "image shape that does not hold the features": Case(
        files(data={"target": {"image_shape": [1, 7, 7]}}),
        RUN,
        2,
        ERR + "data.target.image_shape: [1, 7, 7] does not hold 64 features",
    ),
    # Folders of images: found before any training, one line naming the file or folder.
    "image folder: missing": Case(
        image_folders(_no_target_folder),
        RUN,
        2,
        ERR + "data.target.image_folder: folder not found: {d}/tgt",
    ),
    "image folder: images without class subfolders": Case(
        image_folders(_loose_images),
        RUN,
        2,
        ERR + "data.source.image_folder: {d}/src has no class subfolders (one per class: "
        "{d}/src/<class>/<image>)",
    ),
    "image folder: empty class folder": Case(
        image_folders(_empty_class),
        RUN,
        2,
        ERR + "data.target.image_folder: class folder {d}/tgt/7 holds no images",
    ),
    "image folder: a file that is not an image": Case(
        image_folders(_notes),
        RUN,
        2,
        ERR + "data.source.image_folder: not a PNG or JPEG image: {d}/src/2/notes.txt",
    ),
    "image folder: truncated PNG": Case(
        image_folders(_truncated),
        RUN,
        2,
        ERR + "data.target_test.image_folder: corrupt image {d}/tgt-test/6/58.png: image file "
        "is truncated",
    ),
    "image folder: mixed sizes without data.images.resize": Case(
        image_folders(_bigger_image),
        RUN,
        2,
        ERR + "data.target.image_folder: {d}/tgt/9/big.png is 8x10 pixels but {d}/tgt/5/15.png "
        "is 8x8 (height x width); set data.images.resize = [height, width]",
    ),
    "image folder: test class the training folder lacks": Case(
        image_folders(_extra_test_class),
        RUN,
        2,
        ERR + "data.target_test.image_folder: class 'five' ({d}/tgt-test/five) is not a class "
        "of data.target ({d}/tgt)",
    ),
    "image folder: training class the test folder lacks": Case(
        image_folders(_missing_test_class),
        RUN,
        2,
        ERR + "data.target_test.image_folder: {d}/tgt-test has no class '8' of data.target "
        "({d}/tgt/8)",
    ),
    # Storage URLs: found before any training; a password in them is never printed.
    "storage: unknown scheme": Case(
        study(),
        [*RUN, "--storage", f"mongodb://alice:{SECRET}@db.example/studies"],
        2,
        ERR + "storage: unknown scheme 'mongodb' in mongodb://alice:***@db.example/studies "
        "(use sqlite:///FILE or postgresql+psycopg://USER@HOST/DB)",
    ),
    "storage: not a URL": Case(
        study(),
        [*RUN, "--storage", "tlsearch.db"],
        2,
        ERR + "storage: not a database URL: <unparseable storage URL>",
    ),
    "storage: directory does not exist": Case(
        study(),
        [*RUN, "--storage", "sqlite:///nowhere/study.db"],
        2,
        ERR + "storage: directory {d}/nowhere does not exist",
    ),
    "storage: home of an unknown user": Case(
        study(),
        [*RUN, "--storage", "sqlite:///~no-such-user/study.db"],
        2,
        ERR + "storage: not a usable file path in sqlite:///~no-such-user/study.db: Could not "
        "determine home directory.",
    ),
    "storage: directory not writable": Case(
        _read_only_dir,
        [*RUN, "--storage", "sqlite:///ro/study.db"],
        2,
        ERR + "storage: directory {d}/ro is not writable",
    ),
    # An existing study.
    "study name taken by a different config": Case(
        existing(study(finetune={"epochs": 3})),
        RUN,
        2,
        ERR + "name: study 'tiny' already exists with a different config; choose another "
        "--study-name, or pass --allow-config-change to mix them",
    ),
    "heartbeat grace period within the interval": Case(
        existing(study()),
        [*RUN, "--study-name", "new", "--heartbeat-interval", "10", "--grace-period", "5"],
        2,
        ERR + "grace period: 5 s must be longer than the heartbeat interval (10 s), or live "
        "trials would be failed",
    ),
    "export: trials table of unknown format": Case(
        existing(),
        ["export", *TINY_DB, "tiny", "-o", "out.json", "--trials", "trials.xlsx"],
        2,
        ERR + "trials.xlsx: the trials table must end in .csv or .parquet",
    ),
    "final: export with a bad config": Case(
        _export(_cv_k_1),
        ["final", "best.json"],
        2,
        ERR + "best.json: cv.k: Input should be greater than or equal to 2",
    ),
    "report: --final file not written by final": Case(
        existing(),
        ["report", *TINY_DB, "tiny", "-o", "out", "--final", "best.json"],
        2,
        ERR + "best.json: not written by `tlsearch final` (no test_accuracy for scratch, "
        "plain_finetuning, tuned)",
    ),
    # Flags argparse refuses (it prints the usage, then this line).
    "flag: not a number": Case(
        study(),
        ["run", "bad.toml", "--n-trials", "ten"],
        2,
        "tlsearch run: error: argument --n-trials: expected a whole number, got 'ten'",
        argparse=True,
    ),
    "flag: negative --max-retry": Case(
        study(),
        ["run", "bad.toml", "--max-retry", "-1"],
        2,
        "tlsearch run: error: argument --max-retry: must be at least 0, got -1",
        argparse=True,
    ),
    # A flag's value is the flag's error, not the study file's.
    "flag: --n-trials 0": Case(
        study(),
        ["run", "bad.toml", "--n-trials", "0"],
        2,
        "tlsearch run: error: argument --n-trials: must be at least 1, got 0",
        argparse=True,
    ),
    "flag: --timeout nan": Case(
        study(),
        ["run", "bad.toml", "--timeout", "nan"],
        2,
        "tlsearch run: error: argument --timeout: must be a positive duration, got 'nan'",
        argparse=True,
    ),
    "flag: worker --timeout -5": Case(
        study(),
        ["worker", "--storage", "sqlite:///x.db", "--study-name", "s", "--timeout", "-5"],
        2,
        "tlsearch worker: error: argument --timeout: must be a positive duration, got '-5'",
        argparse=True,
    ),
    "flag: misspelt": Case(
        study(),
        ["run", "bad.toml", "--n-trails", "3"],
        2,
        "tlsearch: error: unrecognized arguments: --n-trails 3",
        argparse=True,
    ),
    # A command that reads a study, pointed at none: the study file's storage, else ./tlsearch.db.
    "reader: no study file, no --storage, no ./tlsearch.db": Case(
        _nothing,
        ["export", "--study-name", "tiny"],
        2,
        ERR + "no study file or --storage given, and no {d}/tlsearch.db: pass the study file you "
        "ran (e.g. studies/digits.toml), or --storage URL",
    ),
    "reader: study file missing": Case(
        _nothing, ["status", "study.toml"], 2, ERR + "study.toml: file not found"
    ),
    "reader: study file not TOML": Case(
        toml(b'name = "x"\nn_trials = \n'),
        ["report", "bad.toml", "-o", "out"],
        2,
        ERR + "bad.toml: invalid TOML: Invalid value (at line 2, column 12)",
    ),
    "reader: study file's database missing": Case(
        study(),
        ["export", "bad.toml", "-o", "out.json"],
        2,
        ERR + "bad.toml: no study 'tiny': {d}/study.db does not exist (`tlsearch run` makes it; "
        "a relative SQLite path is relative to the current directory)",
    ),
    "reader: study file's study not in its database": Case(
        existing(study(name="nope")),
        ["status", "bad.toml"],
        2,
        ERR + "bad.toml: no study 'nope' in {d}/study.db (studies there: tiny, empty)",
    ),
    # A study whose state does not allow the command: exit 1 (tests/test_cli.py pins it).
    "export: no finished trial": Case(
        existing(),
        ["export", *TINY_DB, "empty", "-o", "out.json"],
        1,
        ERR + "study 'empty' has no completed trial to export yet",
    ),
    "status: database file does not exist": Case(
        _nothing,
        ["status", "--storage", "sqlite:///study.db", "--study-name", "tiny"],
        1,
        ERR + "no study 'tiny' in sqlite:///study.db (it holds no study)",
    ),
    "dashboard: database file does not exist": Case(
        _nothing,
        ["dashboard", "--storage", "sqlite:///study.db", "--port", "0"],
        1,
        ERR + "sqlite:///study.db: no such SQLite file, so no study to show",
    ),
    "export: storage that is not a database": Case(
        _text_file,
        ["export", "--storage", "sqlite:///notes.txt", "--study-name", "tiny"],
        1,
        ERR + "storage sqlite:///notes.txt: cannot open: file is not a database",
    ),
}

# What an existing study is compared by: its trials, and its attributes.
_DATABASE = ("study.db", "study.db-wal", "study.db-shm")


def _study_state(d: Path) -> dict[str, Any]:
    url = f"sqlite:///{d / 'study.db'}"
    return {
        s.study_name: (trials(url, s.study_name), s.user_attrs)
        for s in optuna.get_all_study_summaries(url)
    }


class Outcome(NamedTuple):
    d: Path
    result: subprocess.CompletedProcess[str]
    before: dict[str, str]
    after: dict[str, str]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_study(tmp_path_factory.mktemp("shared").resolve())


# Run both ways, forked from one process that imported the CLI and as `python -m tlsearch.cli`:
# one command of each kind (config, argparse, data file, existing study).
BOTH_WAYS = [
    "typo: key in a section",
    "flag: misspelt",
    "CSV without the label column",
    "study name taken by a different config",
]


@pytest.fixture(scope="module")
def outcomes(
    shared: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Outcome]]:
    root = tmp_path_factory.mktemp("bad").resolve()
    with ExitStack() as stack:
        jobs, before = {}, {}
        for i, (case_id, case) in enumerate(CASES.items()):
            d = root / f"case{i:02d}"
            d.mkdir()
            case.setup(d, shared, stack)
            jobs[case_id] = (d, case.args)
            before[case_id] = tree(d)
        results = run_forked(jobs)
        yield {k: Outcome(jobs[k][0], results[k], before[k], tree(jobs[k][0])) for k in CASES}


def test_forked_commands_are_the_real_command(outcomes: dict[str, Outcome]) -> None:
    by_python = run_many({k: (outcomes[k].d, CASES[k].args) for k in BOTH_WAYS})
    for key in BOTH_WAYS:
        a, b = by_python[key], outcomes[key].result
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr), key


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert sum(c.code == 2 for c in CASES.values()) >= 30


@pytest.mark.parametrize("case_id", CASES)
def test_bad_input(outcomes: dict[str, Outcome], shared: Path, case_id: str) -> None:
    case = CASES[case_id]
    d, result, before, after = outcomes[case_id]
    expected = case.line.replace("{d}", str(d))
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == case.code, result.stderr
    assert result.stdout == ""
    if case.argparse:
        assert lines[0].startswith("usage: tlsearch") and lines[-1] == expected, lines
    else:
        assert lines == [expected]
    assert SECRET not in result.stderr

    # Nothing left behind: no new or changed file (a database opened for reading may leave
    # SQLite's -wal/-shm beside it), and an existing study exactly as it was.
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    assert changed <= set(_DATABASE), sorted(changed)
    assert "study.db" in before or "study.db" not in after, "a database was created"
    if "study.db" in before:
        assert _study_state(d) == _study_state(shared)


# --- property: any config mapping is a valid study or one ConfigError, never a crash ---------


def _schema_keys(annotation: Any, into: set[str]) -> set[str]:
    """Every field name and alias of the config's models, found through the type hints."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for name, field in annotation.model_fields.items():
            into.update({name, field.alias or name})
            _schema_keys(field.annotation, into)
    for arg in typing.get_args(annotation):
        _schema_keys(arg, into)
    return into


KEYS = sorted(_schema_keys(StudyConfig, set()))
_key = st.one_of(st.sampled_from(KEYS), st.text(max_size=6))
_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=8),
    st.sampled_from(
        ["mlp", "cnn", "l2sp", "tpe", "median", "digits-noisy", "auto", "x.npz", "t.csv", "/"]
    ),
)
_value = st.recursive(
    _scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_key, inner, max_size=5)),
    max_leaves=12,
)
_anything = st.dictionaries(_key, _value, max_size=8)
# Close to a valid study: the tiny one with a few sections' keys replaced.
_section = st.dictionaries(_key, _value, max_size=4)
_near = st.builds(merge, st.just(TINY), st.dictionaries(_key, _value | _section, max_size=4))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_anything, _near))
def test_any_config_mapping_is_valid_or_one_config_error(data: dict[str, Any]) -> None:
    try:
        cfg = config_from_dict(data, "h.toml")
    except ConfigError as e:
        lines = str(e).splitlines()
        assert lines and all(ln.startswith("h.toml: ") for ln in lines), lines
        assert e.exit_code == 2
    else:
        # A valid config survives what the study does with it: hashing and a round trip
        # through the stored form.
        cfg.search_hash()
        assert config_from_dict(cfg.to_dict()) == cfg


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_any_study_file_is_valid_or_one_config_error(content: str | bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.toml"
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_bytes(content)
        try:
            load_config(path)
        except ConfigError as e:
            assert str(e).startswith(f"{path}: "), str(e)
