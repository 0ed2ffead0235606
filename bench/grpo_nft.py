"""DDPO-IS against GRPO (with and without the reference KL, with SDE windows of 1, 2 and 4 steps) and DiffusionNFT
on the digits task: digit-3 share, diversity and brightness against reward queries and training seconds.

    python bench/grpo_nft.py                                          # every method x 3 seeds, 1,920 queries each
    python bench/grpo_nft.py --methods ddpo_is grpo --seeds 0 --queries 512 --eval-samples 64   # a quick look
    python bench/grpo_nft.py --summarize                              # reprint the table, redraw the plot

Every run fine-tunes the project's 8x8 digits DDPM toward digit 3 from a shipped preset plus the method's
overrides (:data:`METHODS`: a method is one entry, a function that builds a trainer from the common overrides),
for the same number of reward queries (``--queries``; one query = one sample scored during training). The trainer
evaluates after every epoch (``eval_every=1``: ``--eval-samples`` images from the fixed seeds of the quickstart,
eval seed 650, with the training reward) and logs ``eval/target_share``, ``eval/diversity`` (``diffrl
evaluate``'s pixel diversity) and, added here to the evaluation reward's metadata, ``eval/brightness`` (the mean
pixel of the evaluation images: dimming raises the classifier's confidence); ``perf/wall_s`` (cumulative
training seconds, evaluation excluded) and ``perf/reward_queries`` come from the trainer lifecycle. Each
(method, seed) runs in its own process with ``OMP_NUM_THREADS=--threads``; ``--jobs`` runs several at once.

Writes JSON (``--out``), a markdown table (``--table``) and a plot (``--plot``: share against queries and
against seconds, diversity against queries; mean over seeds, band min..max) under ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

HERE = Path(__file__).resolve().parent
TARGET, LEVEL = 3, 0.8


class Method(NamedTuple):
    """One row of the comparison: its label, plot colour, and ``build(overrides, queries) -> trainer``, which
    returns a trainer whose ``config.num_epochs`` covers ``queries`` reward queries."""

    label: str
    color: tuple[int, int, int]
    build: Callable[[Sequence[str], int], object]


def from_preset(preset: str, *overrides: str) -> Callable[[Sequence[str], int], object]:
    """A builder: the shipped ``preset`` with the method's ``overrides``, then the run's common ones, trained for
    the epochs that make ``queries`` (the config's ``samples_per_epoch()`` per epoch)."""

    def build(common: Sequence[str], queries: int):
        from diffrl.commands.train import make_trainer
        from diffrl.config import load_config
        from diffrl.presets import preset_path

        config = load_config(preset_path(preset), [*overrides, *common])
        config.num_epochs = -(-queries // config.samples_per_epoch(1))
        return make_trainer(config)

    build.overrides = (preset, *overrides)  # type: ignore[attr-defined]
    return build


METHODS: dict[str, Method] = {
    "ddpo_is": Method("DDPO-IS", (31, 119, 180), from_preset("quickstart")),
    "grpo_full": Method("GRPO all steps", (140, 86, 75),
                        from_preset("quickstart_grpo", "sde_window_size=0", "sde_window_schedule=fixed",
                                    "train_learning_rate=1e-3")),
    "grpo_w1": Method("GRPO window 1", (255, 127, 14), from_preset("quickstart_grpo", "sde_window_size=1",
                                                                               "sde_window_schedule=random")),
    "grpo_w2": Method("GRPO window 2", (44, 160, 44), from_preset("quickstart_grpo", "sde_window_size=2",
                                                                               "sde_window_schedule=random")),
    "grpo": Method("GRPO w4 sliding (preset)", (214, 39, 40), from_preset("quickstart_grpo")),
    "grpo_random": Method("GRPO w4 random", (23, 190, 207), from_preset("quickstart_grpo",
                                                                     "sde_window_schedule=random")),
    "grpo_kl": Method("GRPO w4 random + KL 0.04", (148, 103, 189), from_preset("quickstart_grpo", "kl_coef=0.04",
                                                                                  "sde_window_schedule=random")),
    "nft_ddim": Method("NFT DDIM eta=0", (188, 189, 34), from_preset("quickstart_nft")),
    "nft_dpm10": Method("NFT DPM++ 10", (227, 119, 194), from_preset("quickstart_nft", "nft_sampler=dpmsolver++",
                                                                     "sample_num_steps=10")),
    "nft_dpm20": Method("NFT DPM++ 20", (127, 127, 127), from_preset("quickstart_nft", "nft_sampler=dpmsolver++",
                                                                     "sample_num_steps=20")),
}
"""Method name -> :class:`Method`; add a row to compare another trainer (``from_preset("quickstart_nft")``)."""


# ---------------------------------------------------------------------------------------------- one run (child)


def with_brightness(reward: Callable) -> Callable:
    """``reward`` whose metadata also carries ``brightness``, the batch's mean pixel (logged as eval/brightness)."""

    def scored(images, prompts, metadata):
        rewards, meta = reward(images, prompts, metadata)
        meta = dict(meta) if isinstance(meta, dict) else {}
        return rewards, {**meta, "brightness": float(images.float().mean())}

    scored.__name__ = getattr(reward, "__name__", type(reward).__name__)
    return scored


def child(args) -> None:
    """One (method, seed): ``--queries`` reward queries, evaluated after every epoch; one JSON line on stdout."""
    import torch

    torch.set_num_threads(args.threads)
    from diffrl.recipes.evaluation import metadata_means, prompt_diversity

    with tempfile.TemporaryDirectory() as logdir:
        common = [f"seed={args.seed}", f"logdir={logdir}", f"run_name={args.method}_{args.seed}",
                  "save_freq=100000", "num_checkpoint_limit=1", "eval_every=1",
                  f"eval_num_samples={args.eval_samples}", f"eval_seed={args.eval_seed}"]
        trainer = METHODS[args.method].build(common, args.queries)
        trainer.run.evaluator.reward_fn = with_brightness(trainer.run.evaluator.reward_fn)
        base = trainer.run.evaluator.run()
        meta = metadata_means(base.metadata)
        rows = [{"epoch": -1, "queries": 0, "wall_s": 0.0, "target_share": meta["eval/target_share"],
                 "diversity": prompt_diversity(base.images, base.prompts), "brightness": meta["eval/brightness"],
                 "reward_mean": base.reward_mean}]
        for epoch in range(trainer.config.num_epochs):
            trainer.global_step = trainer.step(epoch, trainer.global_step)
            m = trainer.last_metrics
            rows.append({"epoch": epoch, "queries": m["perf/reward_queries"], "wall_s": m["perf/wall_s"],
                         "target_share": m["eval/target_share"], "diversity": m["eval/diversity"],
                         "brightness": m["eval/brightness"], "reward_mean": m["eval/reward_mean"],
                         "train_reward_mean": m["reward/mean"], "epoch_s": m.get("perf/epoch_s")})
            print(f"[{args.method} seed {args.seed}] epoch {epoch}: {m['perf/reward_queries']:.0f} queries, "
                  f"{m['perf/wall_s']:.0f} s, digit-{TARGET} share {100 * m['eval/target_share']:.1f}%",
                  file=sys.stderr, flush=True)
    print(json.dumps({"method": args.method, "seed": args.seed, "build": list(METHODS[args.method].build.overrides),
                      "rows": rows, "load_average_at_end": os.getloadavg(), "torch": torch.__version__}))


# ---------------------------------------------------------------------------------------------- summary


def first_reach(rows: list[dict], key: str, level: float = LEVEL) -> float | None:
    """The ``key`` (queries or wall_s) at which the share first reaches ``level`` (linear interpolation)."""
    for a, b in zip(rows, rows[1:]):
        if a["target_share"] >= level:
            return float(a[key])
        if b["target_share"] >= level:
            frac = (level - a["target_share"]) / (b["target_share"] - a["target_share"])
            return a[key] + frac * (b[key] - a[key])
    return None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = _mean(values)
    return (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per method: mean over seeds of queries/seconds to 80% (over the seeds that got there), final figures."""
    out = {}
    for name in METHODS:
        mine = [r for r in runs if r.get("method") == name and "rows" in r]
        if not mine:
            continue
        q80 = [first_reach(r["rows"], "queries") for r in mine]
        s80 = [first_reach(r["rows"], "wall_s") for r in mine]
        last = [r["rows"][-1] for r in mine]
        out[name] = {"seeds": [r["seed"] for r in mine], "reached": sum(q is not None for q in q80),
                     "queries_to_80": _mean([q for q in q80 if q is not None]),
                     "seconds_to_80": _mean([s for s in s80 if s is not None]),
                     "final_share": _mean([x["target_share"] for x in last]),
                     "final_share_std": _std([x["target_share"] for x in last]),
                     "final_diversity": _mean([x["diversity"] for x in last]),
                     "final_brightness": _mean([x["brightness"] for x in last]),
                     "train_s": _mean([x["wall_s"] for x in last]), "queries": _mean([x["queries"] for x in last])}
    return out


def _cell(value: float, fmt: str) -> str:
    return "-" if value != value else format(value, fmt)


def table(summary: dict[str, dict]) -> str:
    lines = [f"| method | reached 80% | queries to 80% | train s to 80% | final digit-{TARGET} share | "
             "final diversity | final brightness | train s / run |", "|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {METHODS[name].label} | {s['reached']}/{len(s['seeds'])} | {_cell(s['queries_to_80'], '.0f')} "
                     f"| {_cell(s['seconds_to_80'], '.1f')} | {100 * s['final_share']:.1f} ± "
                     f"{100 * s['final_share_std']:.1f}% | {s['final_diversity']:.3f} | "
                     f"{s['final_brightness']:.3f} | {s['train_s']:.1f} |")
    return "\n".join(lines)


def verdict(summary: dict[str, dict]) -> str:
    """Does GRPO's fastest setting reach 80% in at most half of DDPO-IS's seconds with >= 0.9x its diversity?"""
    ddpo = summary.get("ddpo_is")
    grpo = {k: v for k, v in summary.items() if k.startswith("grpo") and v["reached"] == len(v["seeds"])}
    if ddpo is None or not grpo:
        return "not decidable: DDPO-IS missing, or no GRPO setting reached 80% on every seed"
    name, best = min(grpo.items(), key=lambda kv: kv[1]["seconds_to_80"])
    if ddpo["reached"] < len(ddpo["seeds"]):
        return f"DDPO-IS did not reach 80% on every seed; fastest GRPO setting {name}: {best['seconds_to_80']:.1f} s"
    time_ratio = best["seconds_to_80"] / ddpo["seconds_to_80"]
    div_ratio = best["final_diversity"] / ddpo["final_diversity"]
    ok = time_ratio <= 0.5 and div_ratio >= 0.9
    return (f"fastest GRPO setting {METHODS[name].label}: {time_ratio:.2f}x DDPO-IS's seconds to 80% "
            f"({best['seconds_to_80']:.1f} s vs {ddpo['seconds_to_80']:.1f} s), {div_ratio:.2f}x its final diversity: "
            f"target (<= 0.5x time, >= 0.9x diversity) {'met' if ok else 'NOT met'}")


def plot(runs: list[dict], path: Path) -> Path:
    """Share against queries, share against seconds, diversity against queries (mean of seeds, band min..max)."""
    from PIL import Image

    sys.path.insert(0, str(HERE))
    from algorithms import multi_line_plot

    panels = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (x, key, title, ylabel, scale, y_range) in enumerate((
                ("queries", "target_share", f"digit-{TARGET} share vs reward queries", "share %", 100.0, (0, 100)),
                ("wall_s", "target_share", f"digit-{TARGET} share vs training seconds", "share %", 100.0, (0, 100)),
                ("queries", "diversity", "eval diversity vs reward queries", "diversity", 1.0, (0.0, None)))):
            series = []
            for name, method in METHODS.items():
                mine = [r["rows"] for r in runs if r.get("method") == name and "rows" in r]
                if not mine:
                    continue
                n = min(len(rows) for rows in mine)
                xs = [_mean([rows[j][x] for rows in mine]) for j in range(n)]
                values = [[scale * rows[j][key] for rows in mine] for j in range(n)]
                series.append({"label": method.label, "color": method.color, "xs": xs,
                               "ys": [_mean(v) for v in values], "lo": [min(v) for v in values],
                               "hi": [max(v) for v in values]})
            panels.append(Image.open(multi_line_plot(series, Path(tmp) / f"{i}.png", title=title,
                                                     xlabel="reward queries" if x == "queries" else "seconds",
                                                     ylabel=ylabel, y_range=y_range, size=(600, 380))).copy())
    canvas = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
    for j, p in enumerate(panels):
        canvas.paste(p, (sum(q.width for q in panels[:j]), 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def report(record: dict, args) -> str:
    ok = [r for r in record["runs"] if "rows" in r]
    summary = summarize(ok)
    text = "\n".join([f"`{record['command']}`", "", table(summary), "", verdict(summary), ""])
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    Path(args.table).write_text(text, encoding="utf-8")
    plot(ok, Path(args.plot))
    return text


# ---------------------------------------------------------------------------------------------- driver


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--queries", type=int, default=1920,
                        help="reward queries per run (default 1920: the DDPO quickstart's 15 epochs x 128 samples)")
    parser.add_argument("--eval-samples", type=int, default=256, help="evaluation samples per epoch (default 256)")
    parser.add_argument("--eval-seed", type=int, default=650, help="evaluation seed (default 650, the quickstart's)")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per run (default 1)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    parser.add_argument("--out", default=str(HERE / "results" / "grpo_nft.json"))
    parser.add_argument("--table", default=str(HERE / "results" / "grpo_nft.md"))
    parser.add_argument("--plot", default=str(HERE / "results" / "grpo_nft.png"))
    parser.add_argument("--summarize", action="store_true", help="no runs: table and plot from the JSON at --out")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.summarize:
        print(report(json.loads(Path(args.out).read_text(encoding="utf-8")), args))
        return 0

    sys.path.insert(0, str(HERE))
    from common import machine, save_record

    started, info = time.time(), machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, load average {info['load_average_at_start']}", flush=True)

    def one(job: tuple[str, int]) -> dict:
        method, seed = job
        cmd = [sys.executable, __file__, "--child", "--method", method, "--seed", str(seed), "--queries",
               str(args.queries), "--eval-samples", str(args.eval_samples), "--eval-seed", str(args.eval_seed),
               "--threads", str(args.threads)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
        t0, load0 = time.time(), os.getloadavg()
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        if out.returncode != 0:
            print(f"{method} seed {seed} failed:\n{out.stderr[-3000:]}", file=sys.stderr, flush=True)
            return {"method": method, "seed": seed, "error": out.stderr[-3000:]}
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result.update(process_s=round(time.time() - t0, 1), load_average_at_start=load0)
        first, last = result["rows"][0], result["rows"][-1]
        print(f"{METHODS[method].label:16s} seed {seed}: digit-{TARGET} share {100 * first['target_share']:.1f}% -> "
              f"{100 * last['target_share']:.1f}% after {last['queries']:.0f} queries, {last['wall_s']:.0f} s "
              f"training; reached 80% at {first_reach(result['rows'], 'wall_s')} s (load {load0[0]:.2f})", flush=True)
        return result

    jobs = [(m, s) for s in args.seeds for m in args.methods]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        runs = list(pool.map(one, jobs))
    command = " ".join(["python", "bench/grpo_nft.py"] + list(argv if argv is not None else sys.argv[1:]))
    record = {"command": command,
              "settings": {"model": "diffrl's 8x8 digits DDPM (shipped)", "reward": f"log p({TARGET} | image)",
                           "queries": args.queries, "eval_samples": args.eval_samples, "eval_seed": args.eval_seed,
                           "threads": args.threads, "jobs": args.jobs, "seeds": args.seeds,
                           "methods": {m: list(METHODS[m].build.overrides) for m in args.methods}},
              "machine": dict(info, load_average_at_end=os.getloadavg()), "wall_s": round(time.time() - started, 1),
              "runs": runs}
    path = save_record(record, args.out)
    print("\n" + report(record, args) + f"\nJSON: {path}\ntable: {args.table}\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
