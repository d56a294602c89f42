"""How soon does the CLI answer? Its first line of output against Python's own start-up.

Three commands a user runs often, each timed to its first line of output (stdout and stderr
together, unbuffered as in a terminal) beside a reference that does the least the command must:

* ``tlsearch --help`` against ``python -c pass``;
* ``tlsearch run BAD.toml``, a study file with a typo in a key (one error line, exit 2), against
  ``python -c pass``;
* ``tlsearch status`` on a finished SQLite study against a bare ``optuna.load_study`` of it
  (which prints the study's name, so both end on a line).

A command that prints nothing (``python -c pass``) counts until it exits. The study is the
benchmarks' smoke study (benchmarks/_smoke.py), run once at the start with the library in a
temporary directory. Each command runs once untimed, then ``--repeats`` times, alternating with
its reference so that other work on the machine slows both alike. Printed: the medians, the
difference, and OK where the command is within 0.5 s of its reference (the target of issue 10);
the exit status is 1 if one is not.

    python benchmarks/cli_start.py [--repeats 7]
    python benchmarks/cli_start.py --smoke   # each command once, untimed run left out: seconds

A smoke run's verdict is printed, but it exits 0: one run on a tiny budget measures nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import _smoke

TARGET_S = 0.5  # seconds a command may take beyond its reference


@dataclass
class Command:
    """One command line, what it must exit with, and its times to the first line."""

    label: str
    argv: list[str]
    exit_code: int = 0
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def first_line(cmd: Command, cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    """Seconds from starting ``cmd`` to its first line of output (or to its exit, if it prints
    nothing), and all it printed. Fails unless it exits as expected."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd.argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # returns at the first newline, or at the end of the output
    seconds = time.perf_counter() - t0
    output = (line + proc.stdout.read()).decode(errors="replace")
    code = proc.wait()
    if code != cmd.exit_code:
        raise SystemExit(
            f"{cmd.label}: exit {code}, expected {cmd.exit_code}; it printed:\n{output}"
        )
    return seconds, output


def finished_study(tmp: Path) -> tuple[str, str]:
    """A tiny study run to its end with the library, in ``tmp``: its URL and name."""
    import optuna

    import tlsearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    url = f"sqlite:///{tmp / 'study.db'}"
    study = tlsearch.run_study(tlsearch.config_from_dict(_smoke.study(tmp / "cache", storage=url)))
    return url, study.study_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed runs of each command (default 7)"
    )
    _smoke.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats = 1
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    bin_dir = Path(sys.executable).parent
    entry = bin_dir / "tlsearch"
    if not entry.is_file():
        parser.error(f"no tlsearch entry point beside {sys.executable}: pip install -e . first")
    python = sys.executable

    with _smoke.directory(args) as tmp:
        (tmp / "BAD.toml").write_text('name = "typo"\nn_trails = 3\n')
        print("running a tiny study for `tlsearch status` ...", file=sys.stderr, flush=True)
        url, name = finished_study(tmp)
        load = f"import optuna; print(optuna.load_study(study_name={name!r}, storage={url!r}).study_name)"
        pass_ = [python, "-c", "pass"]
        pairs = [
            (Command("tlsearch --help", [str(entry), "--help"]), Command("python -c pass", pass_)),
            (
                Command("tlsearch run BAD.toml (a typo)", [str(entry), "run", "BAD.toml"], 2),
                Command("python -c pass", pass_),
            ),
            (
                Command(
                    "tlsearch status (finished study)",
                    [str(entry), "status", "--storage", url, "--study-name", name],
                ),
                Command("optuna.load_study", [python, "-c", load]),
            ),
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        env.pop("TLSEARCH_PLUGINS", None)
        # Once untimed each (not in a smoke run): the first start pays for reading files into
        # the page cache.
        for cmd in [cmd for pair in pairs for cmd in pair] if not args.smoke else []:
            first_line(cmd, tmp, env)
        _, typo = first_line(pairs[1][0], tmp, env)
        for _ in range(args.repeats):
            for pair in pairs:
                for cmd in pair:
                    cmd.seconds.append(first_line(cmd, tmp, env)[0])

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    loadavg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"time to the first line of output, median of {args.repeats} runs; {platform.machine()}, "
        f"{cores} cores (load average {loadavg}), Python {platform.python_version()}"
    )
    print(f"the typo's line: {typo.strip()}")
    rows = []
    all_ok = True
    for cmd, ref in pairs:
        diff = cmd.median - ref.median
        ok = diff <= TARGET_S
        all_ok &= ok
        rows.append(
            [
                cmd.label,
                f"{cmd.median:.3f}",
                ref.label,
                f"{ref.median:.3f}",
                f"{diff:+.3f}",
                "OK" if ok else f"over {TARGET_S} s",
            ]
        )
    header = ["command", "s", "reference", "s", "difference s", f"within {TARGET_S} s"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print(
            "  ".join(
                c.ljust(w) if i in (0, 2) else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return 0 if all_ok or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
