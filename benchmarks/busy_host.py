"""A study on a busy machine: the default study alone and beside other jobs, per thread policy.

Every row runs real commands as a user would (``tlsearch run studies/digits.toml`` in a fresh
SQLite database, the source checkpoint already cached) in subprocesses, and reads the search's
wall time from the ``ran for`` line. The other jobs are plain torch matrix-product loops on 1 or
2 threads, started 2 s before: a stand-in for any other work (a browser, a build, another user's
script). Thread policies, side by side in one run:

- ``main``: the code before the busy-machine issue (``--baseline``, default e1d8f2a), unpacked
  from git into a temporary folder: the cores ÷ this study's processes on this host, whatever
  else runs (2 threads alone on 2 cores);
- ``adaptive``: this tree's default (tlsearch/device.py): that share less the cores other
  processes keep busy, re-checked before each trial and between epochs;
- ``threads=1``: ``--threads 1``;
- ``passive``: main's 2 threads (``--threads 2``) with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep
  instead of spinning while they wait).

Scenarios: alone (once per ``--sampler-seeds``, the policies taking turns: README's first
command over several seeds, side by side); beside one busy 1-thread job, one busy 2-thread job,
two busy 1-thread jobs; ``run --workers 2`` alone; two studies with caches of their own at once
(each study's time).
Then pretraining (``tlsearch create`` into an empty cache; its "pretrained checkpoint ... s"
line) and ``tlsearch final`` (its wall time), alone and beside one busy 1-thread job. A command
that passes ``--timeout`` is stopped and shown as ``>T``. Ratios: to the same policy alone, and
to main alone.

    python benchmarks/busy_host.py [--policies main adaptive threads=1 passive]
        [--scenarios alone busy1 busy2t busy1x2 workers2 two] [--timeout 300]
        [--n-trials 30] [--sampler-seeds 0 1 2] [--baseline e1d8f2a] [--skip pretraining final]
        [--study studies/digits.toml]
    python benchmarks/busy_host.py --smoke   # the adaptive policy alone, on the smoke study
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import _smoke

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "studies" / "digits.toml"
POLICIES = ("main", "adaptive", "threads=1", "passive")
# key: (label, the busy jobs' thread counts, what runs: one study, --workers 2, or two studies)
SCENARIOS = {
    "alone": ("alone", (), "run"),
    "busy1": ("beside a busy 1-thread job", (1,), "run"),
    "busy2t": ("beside a busy 2-thread job", (2,), "run"),
    "busy1x2": ("beside two busy 1-thread jobs", (1, 1), "run"),
    "workers2": ("run --workers 2", (), "workers"),
    "two": ("two studies at once", (), "two"),
}
PHASES = {"pretraining": ((), (1,)), "final": ((), (1,))}
BUSY = (
    "import sys, torch\n"
    "torch.set_num_threads(int(sys.argv[1]))\n"
    "a = torch.randn(256, 256)\n"
    "while True:\n"
    "    a = (a @ a).tanh_()\n"
)
RAN_FOR = re.compile(r"ran for ([\d.]+)s")
PRETRAINED = re.compile(r"pretrained checkpoint: .*, ([\d.]+)s\)")
THREADS = re.compile(r": (\d+ thread\(s\)) \((.*)\)")


@dataclass
class Row:
    """One command's (or two at once) seconds, None where it timed out; its thread lines."""

    seconds: list[float | None] = field(default_factory=list)
    threads: list[str] = field(default_factory=list)

    def worst(self) -> float | None:
        return None if None in self.seconds else max(s for s in self.seconds if s is not None)

    def mean(self) -> float | None:
        return None if None in self.seconds else sum(self.seconds) / len(self.seconds)  # type: ignore[arg-type]


class Policy:
    """How one policy's commands start: which tlsearch, which flags, which environment."""

    def __init__(self, name: str, baseline: Path | None, tmp: Path, study: Path) -> None:
        self.name = name
        self.tmp = tmp
        self.study = study
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")
        }
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["TLSEARCH_CACHE"] = str(self.cache())
        self.flags: list[str] = []
        if name == "main":
            assert baseline is not None
            self.env["PYTHONPATH"] = str(baseline)
        elif name == "threads=1":
            self.flags = ["--threads", "1"]
        elif name == "passive":
            self.flags = ["--threads", "2"]
            self.env["OMP_WAIT_POLICY"] = "PASSIVE"

    def cache(self, n: int = 0) -> Path:
        return self.tmp / f"cache-{self.name}-{n}"

    def run_args(
        self, db: Path, n_trials: int, *extra: str, study: Path | None = None
    ) -> list[str]:
        return [
            sys.executable,
            "-m",
            "tlsearch.cli",
            "run",
            str(study or self.study),
            "--storage",
            f"sqlite:///{db}",
            "--n-trials",
            str(n_trials),
            *self.flags,
            *extra,
        ]

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "tlsearch.cli", *args]


def unpack(rev: str, into: Path) -> Path | None:
    """The package as of ``rev``, from this repository's history; None without git or the rev."""
    archive = into / "baseline.tar"
    try:
        with archive.open("wb") as f:
            subprocess.run(
                ["git", "-C", str(ROOT), "archive", rev, "tlsearch"],
                stdout=f,
                check=True,
                stderr=subprocess.PIPE,
            )
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"cannot unpack {rev} from git ({e}); policy 'main' left out")
        return None
    with tarfile.open(archive) as tar:
        tar.extractall(into / "baseline", filter="data")
    return into / "baseline"


def busy_jobs(threads: Sequence[int]) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", BUSY, str(n)]) for n in threads]
    if procs:
        time.sleep(2.0)  # their load shows before the study starts
    return procs


def stop(procs: Sequence[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def run_at_once(
    commands: Sequence[tuple[list[str], dict[str, str]]],
    cwd: Path,
    timeout: float,
    pattern: re.Pattern | None,
) -> Row:
    """Start the commands together (each with its environment) and wait for all; the seconds
    ``pattern`` reads from each one's output (its wall time without a pattern), None when it
    timed out or failed."""
    procs = []
    t0 = time.monotonic()
    for i, (argv, env) in enumerate(commands):
        with (cwd / f"cmd{i}.log").open("w") as out:
            procs.append(subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=out))
    row = Row()
    for i, proc in enumerate(procs):
        try:
            proc.wait(max(1.0, t0 + timeout - time.monotonic()))
            wall = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            wall = None
        text = (cwd / f"cmd{i}.log").read_text()
        if proc.returncode not in (0, -9):
            print(f"    exit {proc.returncode}: {text[-1500:]}")
        found = pattern.search(text) if pattern is not None else None
        if proc.returncode != 0:
            row.seconds.append(None)
        else:
            row.seconds.append(float(found.group(1)) if found else wall)
        row.threads += [f"{m.group(1)} ({m.group(2)})" for m in THREADS.finditer(text)]
    return row


def warm(policy: Policy, tmp: Path, caches: int) -> None:
    """Pretrain the policy's first ``caches`` checkpoint caches (untimed), so that searches find
    them."""
    for n in range(caches):
        work = Path(tempfile.mkdtemp(dir=tmp))
        env = {**policy.env, "TLSEARCH_CACHE": str(policy.cache(n))}
        argv = policy.cli("create", str(policy.study), "--storage", f"sqlite:///{work / 'w.db'}")
        subprocess.run(argv, cwd=work, env=env, check=True, capture_output=True)
        shutil.rmtree(work)


def seeded(study: Path, seed: int, tmp: Path) -> Path:
    """The study file with its sampler seeded by ``seed`` (the file itself for seed 0)."""
    if seed == 0:
        return study
    text = study.read_text()
    assert "\n[sampler]\n" in text, f"{study} has a [sampler] table"
    path = tmp / f"{study.stem}-seed{seed}.toml"
    path.write_text(text.replace("\n[sampler]\n", f"\n[sampler]\nseed = {seed}\n", 1))
    return path


def searches(
    policies: Sequence[Policy], scenarios: Sequence[str], tmp: Path, args: argparse.Namespace
) -> dict[tuple[str, str], Row]:
    """Each scenario's row per policy; "alone" once per sampler seed (its seconds in order), the
    policies taking turns seed by seed."""
    rows: dict[tuple[str, str], Row] = {}
    for key in scenarios:
        scenario, busy, how = SCENARIOS[key]
        seeds = args.sampler_seeds if key == "alone" else [0]
        for seed, policy in [(s, p) for s in seeds for p in policies]:
            if how != "run" and policy.name == "passive":
                continue
            work = Path(tempfile.mkdtemp(dir=tmp))
            if how == "two":
                commands = [
                    (
                        policy.run_args(work / f"s{n}.db", args.n_trials),
                        {**policy.env, "TLSEARCH_CACHE": str(policy.cache(n))},
                    )
                    for n in (0, 1)
                ]
            else:
                extra = ("--workers", "2") if how == "workers" else ()
                study = seeded(policy.study, seed, tmp)
                argv = policy.run_args(work / "s.db", args.n_trials, *extra, study=study)
                commands = [(argv, policy.env)]
            jobs = busy_jobs(busy)
            try:
                row = run_at_once(commands, work, args.timeout, RAN_FOR)
            finally:
                stop(jobs)
            label = f"{scenario} (sampler seed {seed})" if len(seeds) > 1 else scenario
            print(f"  {label:30} {policy.name:10} {show(row, args.timeout):>14} s", flush=True)
            mine = rows.setdefault((scenario, policy.name), Row())
            mine.seconds += row.seconds
            mine.threads += row.threads
            shutil.rmtree(work, ignore_errors=True)
    return rows


def exported(policy: Policy, tmp: Path) -> Path:
    """best.json of a short study run with the policy's code (untimed), for ``final``."""
    work = Path(tempfile.mkdtemp(dir=tmp))
    db = work / "f.db"
    for argv in (
        policy.run_args(db, 6),
        policy.cli("export", "--storage", f"sqlite:///{db}", "-o", str(work / "best.json")),
    ):
        subprocess.run(argv, cwd=work, env=policy.env, check=True, capture_output=True)
    return work / "best.json"


def phases(
    policies: Sequence[Policy], tmp: Path, args: argparse.Namespace
) -> dict[tuple[str, str], Row]:
    """Pretraining (into an empty cache) and ``final``, alone and beside one busy 1-thread job."""
    best = {p.name: exported(p, tmp) for p in policies} if "final" not in args.skip else {}
    rows: dict[tuple[str, str], Row] = {}
    for phase in [p for p in PHASES if p not in args.skip]:
        for busy in PHASES[phase]:
            label = f"{phase}, {'beside a busy 1-thread job' if busy else 'alone'}"
            for policy in policies:
                work = Path(tempfile.mkdtemp(dir=tmp))
                # --threads exists on run and worker only: the environment says it here.
                fixed = {"threads=1": "1", "passive": "2"}.get(policy.name)
                env = {**policy.env, **({"OMP_NUM_THREADS": fixed} if fixed else {})}
                pattern: re.Pattern | None = None
                if phase == "pretraining":
                    env["TLSEARCH_CACHE"] = str(work / "empty-cache")
                    db = f"sqlite:///{work}/p.db"
                    argv = policy.cli("create", str(policy.study), "--storage", db)
                    pattern = PRETRAINED
                else:
                    shutil.copy(best[policy.name], work / "best.json")
                    argv = policy.cli("final", str(work / "best.json"))
                jobs = busy_jobs(busy)
                try:
                    row = run_at_once([(argv, env)], work, args.timeout, pattern)
                finally:
                    stop(jobs)
                rows[label, policy.name] = row
                print(f"  {label:30} {policy.name:10} {show(row, args.timeout):>14} s", flush=True)
                shutil.rmtree(work, ignore_errors=True)
    return rows


def show(row: Row, timeout: float) -> str:
    return " / ".join(f">{timeout:.0f}" if s is None else f"{s:.1f}" for s in row.seconds)


def table(
    title: str, rows: dict[tuple[str, str], Row], policies: Sequence[str], timeout: float
) -> None:
    """Markdown: each row's seconds per policy, × the same policy's run alone (the first row of
    its phase: "alone", "pretraining, alone", "final, alone")."""
    print(f"\n{title}\n")
    print(f"| scenario | {' | '.join(policies)} |")
    print("|---|" + "---:|" * len(policies))
    labels = list(dict.fromkeys(s for s, _ in rows))

    def phase(label: str) -> str:
        return label.split(",")[0] if "," in label else ""

    for label in labels:
        alone = next(a for a in labels if phase(a) == phase(label))
        cells = []
        for name in policies:
            row, base = rows.get((label, name)), rows.get((alone, name))
            if row is None:
                cells.append("—")
                continue
            cell = show(row, timeout)
            ref = base.mean() if base is not None else None  # over the sampler seeds run alone
            if label != alone and ref:
                worst = row.worst()
                cell += f" ({worst / ref:.1f}×)" if worst else f" (>{timeout / ref:.0f}×)"
            cells.append(cell)
        print(f"| {label} | {' | '.join(cells)} |")


# --smoke: the adaptive policy alone, on the smoke study (its pretraining within the search); no
# phases.
SMOKE = {
    "policies": ["adaptive"],
    "scenarios": ["alone"],
    "skip": list(PHASES),
    "n_trials": 4,
    "timeout": 120.0,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per command")
    parser.add_argument("--n-trials", type=int, default=30, help="trials per study (default 30)")
    parser.add_argument(
        "--sampler-seeds",
        type=int,
        nargs="+",
        default=[0],
        help="the study alone once per sampler seed (default 0), the policies side by side",
    )
    parser.add_argument("--baseline", default="e1d8f2a", help="main's commit (policy 'main')")
    parser.add_argument(
        "--skip", nargs="*", choices=list(PHASES), default=[], help="leave out these phases"
    )
    parser.add_argument(
        "--study", type=Path, default=STUDY, help="the study file every command runs"
    )
    _smoke.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    with _smoke.directory(args) as tmp:
        if args.smoke:
            args.study = tmp / "smoke.toml"
            args.study.write_text(_smoke.STUDY_TOML)
        measure(args, tmp)


def measure(args: argparse.Namespace, tmp: Path) -> None:
    """Every policy's searches and phases, and their tables."""
    baseline = unpack(args.baseline, tmp) if "main" in args.policies else None
    names = [p for p in args.policies if p != "main" or baseline is not None]
    policies = [Policy(p, baseline, tmp, args.study) for p in names]
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
        f"average {os.getloadavg()[0]:.1f}; pretraining each policy's caches (untimed) ..."
    )
    # The smoke study's pretraining takes no time worth keeping out of a search's: no warm-up.
    caches = 0 if args.smoke else 2 if "two" in args.scenarios else 1
    for policy in policies:
        warm(policy, tmp, caches)
    print("searches, the `ran for` line (two at once: each one's):")
    rows = searches(policies, args.scenarios, tmp, args)
    more = phases(policies, tmp, args) if len(args.skip) < len(PHASES) else {}
    table("Search wall time, s (× the same policy alone)", rows, names, args.timeout)
    if more:
        table("Pretraining and final, s (× alone)", more, names, args.timeout)
    main_alone = rows.get(("alone", "main"))
    if main_alone is not None and main_alone.mean():
        ratios = [
            f"{p} {rows[('alone', p)].mean() / main_alone.mean():.2f}×"  # type: ignore[operator]
            for p in names
            if ("alone", p) in rows and rows[("alone", p)].mean()
        ]
        seeds = " ".join(map(str, args.sampler_seeds))
        print(f"\nalone (mean over sampler seeds {seeds}), to main alone: {', '.join(ratios)}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print("\nthread lines of the adaptive policy:")
    for (scenario, policy), row in rows.items():
        if policy == "adaptive":
            print(f"  {scenario}: {'; '.join(sorted(set(row.threads))[:3])}")


if __name__ == "__main__":
    main()
