"""Does augmentation in the search space pay where penalties cannot? Real studies, with and without.

For each task (the selection benchmark's four families, `mnist-split`, `-rotated`, `-inverted`,
`-occluded`, and the default task `mnist-noisy`), data seed and sampler seed, the default study
runs end to end twice: **off**, ``search.augment = "none"`` (tlsearch 0.3's space, the two
baselines; still the default), and **on**, ``search.augment = "auto"`` (the standard
augmentation's reference trial joins the baselines). Each is exported with the default rule and scored by
``tlsearch final`` on the target's held-out test split beside plain fine-tuning (no augmentation,
the same baseline for both). Printed per task: selected − plain fine-tuning, the median over data
seeds of the mean over sampler seeds, for the seeds the default was chosen on (0-2) and the
held-out ones (3-4) apart; what the exports chose; and the search's seconds, on / off side by side.

    python benchmarks/augmentation.py [--tasks mnist-split ...] [--shots 5] [--data-seeds 0 1 2 3 4]
        [--sampler-seeds 0] [--out benchmarks/augmentation/results.json]
    python benchmarks/augmentation.py --smoke   # the smoke study (benchmarks/_smoke.py), one seed
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import _smoke

import tlsearch

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("mnist-split", "mnist-rotated", "mnist-inverted", "mnist-occluded", "mnist-noisy")
# The seeds the "auto" set and the standard augmentation were chosen on, and the rest.
CHOOSING_SEEDS = (0, 1, 2)
VARIANTS = {
    "off": {"search": {"augment": "none"}},
    "on": {"search": {"augment": "auto"}},
}


def study(
    task: str,
    shots: int,
    data_seed: int,
    sampler_seed: int,
    variant: str,
    root: Path,
    base: dict[str, Any],
) -> dict[str, Any]:
    """One real study end to end, exported and scored by ``final``; its row."""
    cfg = _merge(
        base,
        {
            "name": f"{task}-{data_seed}-{sampler_seed}-{variant}",
            "storage": f"sqlite:///{root / 'augmentation.db'}",
            "data": {"task": task, "shots": shots, "seed": data_seed},
            "sampler": {"seed": sampler_seed},
        },
    )
    cfg = _merge(cfg, VARIANTS[variant])
    config = tlsearch.config_from_dict(cfg)
    t0 = time.perf_counter()
    result = tlsearch.run_study(config)
    seconds = time.perf_counter() - t0
    best = root / f"{config.name}.json"
    export = tlsearch.write_export(result, best)
    final = tlsearch.run_final(best)
    return {
        "task": task,
        "shots": shots,
        "data_seed": data_seed,
        "sampler_seed": sampler_seed,
        "variant": variant,
        "tuned": final["tuned"]["test_accuracy"],
        "plain": final["plain_finetuning"]["test_accuracy"],
        "augment": export["params"].get("augment", "none"),
        "reason": export["selection"]["reason"],
        "seconds": round(seconds, 2),
    }


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Per task and seed group: selected − plain fine-tuning off and on (pp), the exports'
    augmentations, and the search's seconds."""
    lines = [
        f"{'task':16s}  {'seeds':9s}  {'off: sel−plain':>14s}  {'on: sel−plain':>13s}  "
        f"{'on chose':24s}  {'search s off/on':>15s}"
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        for group, seeds in (("choosing", CHOOSING_SEEDS), ("held-out", None)):
            mine = [r for r in rows if r["task"] == task]
            mine = [r for r in mine if (r["data_seed"] in CHOOSING_SEEDS) == (seeds is not None)]
            if not mine:
                continue
            off, on = (_gain(mine, v) for v in VARIANTS)
            chose = sorted({r["augment"] for r in mine if r["variant"] == "on"})
            s_off = statistics.fmean(r["seconds"] for r in mine if r["variant"] == "off")
            s_on = statistics.fmean(r["seconds"] for r in mine if r["variant"] == "on")
            lines.append(
                f"{task:16s}  {group:9s}  {off:+14.1f}  {on:+13.1f}  {','.join(chose):24s}  "
                f"{f'{s_off:.1f}/{s_on:.1f}':>15s}"
            )
    return lines


def _gain(rows: list[dict[str, Any]], variant: str) -> float:
    """Median over data seeds of the mean over sampler seeds of selected − plain, in pp."""
    by_seed: dict[int, list[float]] = {}
    for r in rows:
        if r["variant"] == variant:
            by_seed.setdefault(r["data_seed"], []).append(100 * (r["tuned"] - r["plain"]))
    return statistics.median(statistics.fmean(v) for v in by_seed.values()) if by_seed else 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--data-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--sampler-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--config", type=Path, default=ROOT / "studies" / "digits.toml")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    _smoke.add_arguments(parser)
    args = parser.parse_args(argv)
    with _smoke.directory(args) if args.smoke else tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.smoke:
            base = _smoke.study(root / "cache")
            tasks, seeds, samplers = ["digits-noisy"], [0], [0]
            shots = base["data"]["shots"]
        else:
            base = tlsearch.load_config(args.config).to_dict()
            tasks, seeds, samplers, shots = (
                args.tasks,
                args.data_seeds,
                args.sampler_seeds,
                args.shots,
            )
        rows = []
        for task in tasks:
            for seed in seeds:
                for sampler in samplers:
                    for variant in VARIANTS:
                        row = study(task, shots, seed, sampler, variant, root, base)
                        rows.append(row)
                        print(
                            f"{task} seed {seed} sampler {sampler} {variant}: selected "
                            f"{row['tuned']:.3f}, plain {row['plain']:.3f} ({row['augment']}), "
                            f"{row['seconds']:.1f} s",
                            flush=True,
                        )
        print()
        print("\n".join(table(rows)))
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
