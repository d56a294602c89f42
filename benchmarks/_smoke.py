"""What the benchmarks' ``--smoke`` runs share, and a runner of them all.

Every benchmark takes ``--smoke``: its own code path on a tiny budget (the study below: sklearn's
8×8 digits, an MLP of 16-16, a few trials of 5 epochs on 2 folds; a pool of one worker runs in the
benchmark's own process), printing its tables within seconds. Its numbers measure nothing: the
run shows that the benchmark still works end to end. Everything it writes (checkpoints, studies,
grids, figures) goes under ``--smoke-dir`` (default: a temporary directory, removed afterwards),
never into the repository.

tests/test_benchmarks.py runs them all in one process of this module, which pays torch's imports
once:

    python benchmarks/_smoke.py OUT [NAME ...]

For each benchmark (default: every ``benchmarks/*.py`` but this one) it calls ``main(["--help"])``
and ``main(["--smoke", "--smoke-dir", "OUT/NAME"])``, writing what each printed to
``OUT/NAME.help``, ``OUT/NAME.out`` (stdout) and ``OUT/NAME.err`` (stderr, a traceback included),
and the exit codes and seconds to ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import tomllib

HERE = Path(__file__).resolve().parent

# The smoke study, as a study file (the busy-host benchmark runs it with the CLI as it is). Every
# key not written here keeps its default: the default sampler, pruner, baselines and selection
# rule (its confirmation round) run, as in a real study, on a budget of a second or two.
STUDY_TOML = """\
name = "smoke"
n_trials = 4

[data]
task = "digits-noisy"
shots = 10

[model]
name = "mlp"
hidden = [16, 16]

[pretrain]
epochs = 2
lr = 0.01

[finetune]
epochs = 5
device = "cpu"

[search]
frozen_blocks = { low = 0, high = 2 }

[cv]
k = 2

[sampler]
seed = 0
"""


def study(cache: Path, **overrides: Any) -> dict[str, Any]:
    """The smoke study as a dict, its checkpoints cached under ``cache``. Each of ``overrides``
    updates a section (``finetune={"epochs": 5}``) or sets a top-level key (``n_trials=8``); a
    None is ignored, as ``tlsearch.load_config`` ignores it."""
    data = tomllib.loads(STUDY_TOML)
    data["pretrain"]["cache_dir"] = str(cache)
    for key, value in overrides.items():
        if isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        elif value is not None:
            data[key] = value
    return data


def study_file(directory: Path) -> Path:
    """The smoke study written to ``directory/smoke.toml``, its checkpoints cached in
    ``directory/cache`` (a study file's relative paths are relative to the file)."""
    path = directory / "smoke.toml"
    path.write_text(STUDY_TOML.replace("[pretrain]\n", '[pretrain]\ncache_dir = "cache"\n', 1))
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--smoke`` and ``--smoke-dir``, as every benchmark takes them."""
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the same code path on a tiny budget (8x8 digits, a few trials): seconds; its "
        "numbers measure nothing",
    )
    parser.add_argument(
        "--smoke-dir",
        type=Path,
        default=None,
        help="where --smoke writes (default: a temporary directory, removed afterwards)",
    )


@contextlib.contextmanager
def directory(args: argparse.Namespace) -> Iterator[Path]:
    """``--smoke-dir`` (created), or a temporary directory removed on leaving."""
    if args.smoke_dir is not None:
        args.smoke_dir.mkdir(parents=True, exist_ok=True)
        yield args.smoke_dir.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="tlsearch-smoke-") as name:
        yield Path(name)


class InProcess:
    """A pool of one worker, run in this process: what a spawned pool of one would compute, without
    the seconds a new process takes to import torch."""

    def __init__(self, initializer: Callable[..., None] | None, initargs: Iterable[Any]) -> None:
        if initializer is not None:
            initializer(*initargs)

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn: Callable[[Any], Any], jobs: Iterable[Any], chunksize: int = 1) -> list[Any]:
        return [fn(job) for job in jobs]

    def imap(self, fn: Callable[[Any], Any], jobs: Iterable[Any], chunksize: int = 1) -> Iterator:
        return (fn(job) for job in jobs)

    imap_unordered = imap

    def starmap(
        self, fn: Callable[..., Any], jobs: Iterable[Iterable[Any]], chunksize: int = 1
    ) -> list[Any]:
        return [fn(*job) for job in jobs]


def pool(
    workers: int, initializer: Callable[..., None] | None = None, initargs: Iterable[Any] = ()
) -> Any:
    """``workers`` spawned processes (a ``multiprocessing`` pool), or :class:`InProcess` for one."""
    if workers <= 1:
        return InProcess(initializer, initargs)
    return multiprocessing.get_context("spawn").Pool(workers, initializer, tuple(initargs))


# ---------------------------------------------------------------------------------------------
# The runner


def benchmarks() -> list[str]:
    """The benchmarks' module names: every ``benchmarks/*.py`` but the private helpers."""
    return sorted(p.stem for p in HERE.glob("*.py") if not p.name.startswith("_"))


def call(name: str, argv: list[str], out: Path) -> dict[str, Any]:
    """``main(argv)`` of the benchmark ``name`` as ``python benchmarks/NAME.py ARGV`` would run it,
    its stdout in ``out`` and its stderr beside it (``.err``); its exit code (``"traceback"`` for
    an uncaught exception, its import's included), seconds, and CPU seconds (its processes' too:
    steadier on a shared machine)."""
    saved = sys.argv
    sys.argv = [str(HERE / f"{name}.py"), *argv]
    cpu0 = _cpu()
    t0 = time.perf_counter()
    with (
        out.open("w") as stdout,
        out.with_suffix(".err").open("w") as stderr,
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
    ):
        try:
            code: int | str | None = importlib.import_module(name).main(argv)
        except SystemExit as e:
            code = e.code
            if isinstance(code, str):  # parser.error and SystemExit("message") print to stderr
                print(code, file=sys.stderr)
                code = 1
        except Exception:  # noqa: BLE001 - the runner goes on to the next benchmark
            traceback.print_exc()
            code = "traceback"
        finally:
            sys.argv = saved
    seconds = time.perf_counter() - t0
    return {"exit": code or 0, "seconds": round(seconds, 2), "cpu": round(_cpu() - cpu0, 2)}


def _cpu() -> float:
    """CPU seconds of this process and of its children that ended."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Every benchmark's --help and --smoke run.")
    parser.add_argument("out", type=Path, help="where the outputs and results.json go")
    parser.add_argument("names", nargs="*", help="benchmarks (default: all)")
    args = parser.parse_args(argv)
    names = args.names or benchmarks()
    args.out.mkdir(parents=True, exist_ok=True)
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    results = {}
    for name in names:
        smoke = ["--smoke", "--smoke-dir", str(args.out / name)]
        results[name] = {
            "help": call(name, ["--help"], args.out / f"{name}.help"),
            "smoke": call(name, smoke, args.out / f"{name}.out"),
        }
        print(f"{name}: {results[name]['smoke']}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all(r["smoke"]["exit"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
