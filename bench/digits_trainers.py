"""Which trainer reaches 80% digit-3 share first on the digits task, and how much diversity does it keep there?

    python bench/digits_trainers.py --jobs 2                   # every method x 3 seeds, 1,920 reward queries each
    python bench/digits_trainers.py --methods ddpo_is grpo --seeds 0 --queries 512    # a quicker look
    python bench/digits_trainers.py --summarize bench/results/digits_trainers/<file>.json   # reprint a table

Every run is ``diffrl train <shipped preset>.yaml`` (the command a user types, in a fresh process with
``OMP_NUM_THREADS=--threads``) plus the method's overrides and the common ones: the seed, the epochs that make
``--queries`` reward queries (one query = one sample scored during training), and ``eval_every=1``, so the trainer
itself evaluates after every epoch on ``--eval-samples`` fixed-seed images and logs ``eval/target_share`` (the
digit classifier's share of 3s), ``eval/diversity`` (``diffrl evaluate``'s pixel diversity: the mean pairwise RMS
distance of the images; ~0 under mode collapse) and ``eval/reward_mean``. The harness only reads the run's own
``metrics.jsonl`` (``perf/wall_s``: training seconds, evaluation and checkpoints excluded;
``perf/reward_queries``). Hyperparameters are the presets', not tuned per method.

Per method: the first epoch whose evaluation reaches ``--level`` (queries, training seconds, diversity there) and
the last epoch's share, diversity and reward; mean over seeds with the range. The record (command, machine, every
run's metric rows) goes to ``bench/results/digits_trainers/<date>-<commit>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import common

BENCHMARK = "digits_trainers"
ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "src" / "diffrl" / "presets"


class Method(NamedTuple):
    label: str
    preset: str
    overrides: tuple[str, ...] = ()


METHODS: dict[str, Method] = {
    "ddpo_is": Method("DDPO-IS", "quickstart"),
    "ddpo_sf": Method("DDPO-SF", "quickstart", ("algorithm=ddpo_sf",)),
    "rwr": Method("RWR", "quickstart", ("algorithm=rwr",)),
    "rwr_sparse": Method("RWR-sparse", "quickstart", ("algorithm=rwr_sparse",)),
    "alignprop": Method("AlignProp (DRaFT-2)", "quickstart_alignprop"),
    "grpo": Method("GRPO-Guard (window 4, sliding)", "quickstart_grpo"),
    "grpo_clip": Method("GRPO, plain PPO clip (window 4, sliding)", "quickstart_grpo", ("ratio_norm=false",)),
    "nft": Method("DiffusionNFT (DDIM)", "quickstart_nft"),
    "awm": Method("AWM (DDIM, on-policy)", "quickstart_awm"),
    "dgpo": Method("DGPO (DDIM, on-policy)", "quickstart_dgpo"),
    "grpo_kl": Method("GRPO, KL trust region (mask 1e-3)", "quickstart_grpo",
                      ("ratio_norm=false", "trust_region=kl_mask", "trust_region_max_kl=1e-3")),
    "ddpo_is_kl": Method("DDPO-IS, KL trust region (mask 1e-3)", "quickstart",
                         ("trust_region=kl_mask", "trust_region_max_kl=1e-3")),
    "ddpo_is_guard": Method("DDPO-IS + GRPO-Guard's ratio (ratio_norm=true)", "quickstart", ("ratio_norm=true",)),
    "ddpo_is_ratio_only": Method("DDPO-IS + RatioNorm, no 1/gain weights", "quickstart",
                                 ("ratio_norm=true", "ratio_norm_reweight=false")),
}
KEYS = ("epoch", "perf/reward_queries", "perf/wall_s", "eval/target_share", "eval/diversity", "eval/reward_mean")


def epochs_for(method: Method, queries: int) -> int:
    from diffrl.config import load_config  # config only: no torch

    config = load_config(PRESETS / f"{method.preset}.yaml", list(method.overrides))
    return -(-queries // config.samples_per_epoch(1))


def run_one(name: str, seed: int, args: argparse.Namespace, logdir: Path) -> dict:
    method = METHODS[name]
    run_name = f"{name}_{seed}"
    overrides = [*method.overrides, f"seed={seed}", f"num_epochs={epochs_for(method, args.queries)}",
                 "eval_every=1", f"eval_num_samples={args.eval_samples}", "save_freq=100000",
                 "num_checkpoint_limit=1", f"logdir={logdir}", f"run_name={run_name}"]
    command = [sys.executable, "-m", "diffrl", "train", str(PRESETS / f"{method.preset}.yaml"), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        return {"method": name, "seed": seed, "error": done.stderr[-2000:]}
    rows = [json.loads(line) for line in (logdir / run_name / "metrics.jsonl").read_text().splitlines()]
    print(f"  {name} seed {seed}: {len(rows)} epochs, share {rows[-1]['eval/target_share']:.3f}", flush=True)
    return {"method": name, "seed": seed, "overrides": overrides,
            "rows": [{k: row[k] for k in KEYS if k in row} for row in rows]}


def first_reaching(rows: list[dict], level: float) -> dict | None:
    return next((r for r in rows if r["eval/target_share"] >= level), None)


def summarize(record: dict) -> list[dict]:
    level, table = record["settings"]["level"], []
    for name in record["settings"]["methods"]:
        runs = [r for r in record["runs"] if r["method"] == name and "rows" in r]
        if not runs:
            continue
        reached = [first_reaching(r["rows"], level) for r in runs]
        hit = [r for r in reached if r is not None]
        last = [r["rows"][-1] for r in runs]

        def stats(values: list[float]) -> tuple[float, float, float] | None:
            return (sum(values) / len(values), min(values), max(values)) if values else None

        table.append({
            "method": name, "label": METHODS[name].label, "seeds": len(runs), "reached": len(hit),
            "queries_to_level": stats([r["perf/reward_queries"] for r in hit]),
            "seconds_to_level": stats([r["perf/wall_s"] for r in hit]),
            "diversity_at_level": stats([r["eval/diversity"] for r in hit]),
            "final_share": stats([r["eval/target_share"] for r in last]),
            "final_diversity": stats([r["eval/diversity"] for r in last]),
            "final_reward": stats([r["eval/reward_mean"] for r in last]),
            "seconds_total": stats([r["perf/wall_s"] for r in last]),
        })
    return table


def markdown(table: list[dict], level: float) -> str:
    def cell(value, fmt: str) -> str:
        if value is None:
            return "not reached"
        mean, low, high = value
        return f"{mean:{fmt}} ({low:{fmt}}-{high:{fmt}})"

    lines = [f"| method | reached {level:.0%} | queries to {level:.0%} | training s to {level:.0%} | diversity there "
             "| final share | final diversity | final reward | training s, whole run |", "|---" * 9 + "|"]
    for t in table:
        lines.append(f"| {t['label']} | {t['reached']}/{t['seeds']} | {cell(t['queries_to_level'], '.0f')} | "
                     f"{cell(t['seconds_to_level'], '.1f')} | {cell(t['diversity_at_level'], '.3f')} | "
                     f"{cell(t['final_share'], '.3f')} | {cell(t['final_diversity'], '.3f')} | "
                     f"{cell(t['final_reward'], '.3f')} | {cell(t['seconds_total'], '.1f')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--queries", type=int, default=1920, help="reward queries per run (default %(default)d)")
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--level", type=float, default=0.8, help="the digit-3 share to reach (default %(default)g)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", default=None, help="record path (default bench/results/digits_trainers/"
                                                    "<date>-<commit>.json)")
    parser.add_argument("--summarize", metavar="RECORD", help="reprint the table of a saved record; run nothing")
    args = parser.parse_args()
    if args.summarize:
        record = json.loads(Path(args.summarize).read_text())
        print(markdown(summarize(record), record["settings"]["level"]))
        return
    machine = common.machine()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        jobs = [(m, s) for m in args.methods for s in args.seeds]
        runs = list(pool.map(lambda job: run_one(*job, args, Path(tmp)), jobs))
    settings = {"methods": args.methods, "seeds": args.seeds, "queries": args.queries,
                "eval_samples": args.eval_samples, "level": args.level, "jobs": args.jobs, "threads": args.threads}
    record = {"benchmark": BENCHMARK, "command": common.command_line(), "machine": machine, "settings": settings,
              "runs": runs}
    record["summary"] = summarize(record)
    path = common.save_record(record, args.out or common.result_path(BENCHMARK))
    for failed in (r for r in runs if "error" in r):
        print(f"FAILED {failed['method']} seed {failed['seed']}:\n{failed['error']}", file=sys.stderr)
    print(markdown(record["summary"], args.level))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
