"""DDPO-IS, DDPO-SF, RWR, RWR-sparse and AlignProp on the digits task: reward and digit-3 share per reward query.

    python bench/algorithms.py                                       # 5 algorithms x 3 seeds, 1,920 queries each
    python bench/algorithms.py --algorithms ddpo_is alignprop --seeds 0 --queries 768   # a quicker look

The DDPO paper's comparison (Black et al. 2023, fig. 4: reward against reward queries for DDPO-IS, DDPO-SF,
RWR and RWR-sparse), in miniature, plus reward backpropagation: every run fine-tunes the project's 8x8
digits DDPM toward digit 3 with the shipped presets (``quickstart`` for the DDPO family, switched with
``algorithm=...``; ``quickstart_alignprop`` for AlignProp, i.e. DRaFT-K with K=2 at lr 1e-4), for the same
number of reward queries (``--queries``; one query = one sample scored by the reward during training:
DDPO's 128 samples per epoch, AlignProp's 2 x 32 per epoch). Hyperparameters are the presets', not tuned per
algorithm.

At the query counts of ``--eval-at`` (and before training) the harness calls
``diffrl.recipes.evaluation.evaluate`` between ``trainer.step`` calls: ``--eval-samples`` images from fixed
seeds (the quickstart's: eval seed 650, 20 DDIM steps, eta 1), scored by the training reward and classified by
the digit classifier (the share of digit 3). Two more numbers expose reward hacking: the images' mean pixel
value (brightness: dimming raises the classifier's confidence) and their diversity, the mean pairwise pixel
distance over all images and over those classified as 3 (about zero under mode collapse). Each (algorithm,
seed) runs in a fresh process with ``OMP_NUM_THREADS=--threads``; ``--jobs`` runs several at once.

Prints a table, saves JSON to ``--out`` (default ``bench/results/algorithms.json``), a plot of the share,
the reward and the diversity of the 3s against queries (mean over seeds, band = min..max) to ``--plot``, and
a grid of the final samples of the first seed from the same noise, one row per algorithm, to ``--grid``.
``--summarize`` reprints the table and redraws the plot from the JSON without running anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALGORITHMS = ("ddpo_is", "ddpo_sf", "rwr", "rwr_sparse", "alignprop")
LABELS = {"ddpo_is": "DDPO-IS", "ddpo_sf": "DDPO-SF", "rwr": "RWR", "rwr_sparse": "RWR-sparse",
          "alignprop": "AlignProp"}
COLORS = {"ddpo_is": (31, 119, 180), "ddpo_sf": (44, 160, 44), "rwr": (255, 127, 14), "rwr_sparse": (214, 39, 40),
          "alignprop": (148, 103, 189)}
TARGET = 3


# ---------------------------------------------------------------------------------------------- one run (child)


def _overrides(algorithm: str, seed: int, logdir: str) -> tuple[str, list[str]]:
    common = [f"seed={seed}", f"logdir={logdir}", f"run_name={algorithm}_{seed}", "save_freq=100000",
              "num_checkpoint_limit=1", "eval_every=0"]
    if algorithm == "alignprop":
        return "quickstart_alignprop", common
    return "quickstart", [f"algorithm={algorithm}"] + common


def diversity(images) -> float:
    """Mean pairwise Euclidean distance between images ``[n, H, W]`` in ``[0, 1]`` (pixels); NaN for n < 2.
    About zero when every seed gives the same image (mode collapse)."""
    import torch

    n = images.shape[0]
    if n < 2:
        return float("nan")
    flat = images.reshape(n, -1).double()
    distances = torch.cdist(flat, flat)
    return float(distances.sum() / (n * (n - 1)))


def queries_per_epoch(config) -> int:
    """Samples the reward scores in one training epoch (one process)."""
    if hasattr(config, "samples_per_epoch"):
        return config.samples_per_epoch(1)
    draws = config.draft_lv_draws if config.truncation_strategy == "draft_lv" else 1
    return config.train_batch_size * config.train_gradient_accumulation_steps * draws


def child(args) -> None:
    """One (algorithm, seed): train for ``--queries`` reward queries, evaluating along the way; one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from diffrl.config import load_config
    from diffrl.digits import digit_shares, load_digit_classifier
    from diffrl.presets import preset_path
    from diffrl.recipes.evaluation import evaluate
    from diffrl.commands.train import make_trainer

    with tempfile.TemporaryDirectory() as logdir:
        preset, overrides = _overrides(args.algorithm, args.seed, logdir)
        config = load_config(preset_path(preset), overrides)
        per_epoch = queries_per_epoch(config)
        epochs = -(-args.queries // per_epoch)
        config.num_epochs = epochs
        trainer = make_trainer(config)
        classifier = load_digit_classifier()

        def measure(queries: int) -> dict:
            start = time.perf_counter()
            result = evaluate(trainer.policy, trainer.reward_fn, [""] * args.eval_samples, seed=args.eval_seed,
                              num_inference_steps=config.sample_num_steps, guidance_scale=1.0, eta=1.0,
                              batch_size=128)
            shares = digit_shares(result.images, classifier)
            with torch.no_grad():
                is_target = classifier(result.images).argmax(dim=1) == TARGET
            return {"queries": queries, "reward_mean": result.reward_mean,
                    "reward_sem": float(result.rewards.std() / len(result.rewards) ** 0.5),
                    "target_share": float(shares[TARGET]), "brightness": float(result.images.mean()),
                    "diversity": diversity(result.images.mean(dim=1)),
                    "diversity_target": diversity(result.images.mean(dim=1)[is_target]),
                    "eval_s": time.perf_counter() - start}, result.images

        first, base_images = measure(0)
        evals, images = [first], base_images
        train_rewards, epoch_s, global_step, queries, done = [], [], 0, 0, 0
        for epoch in range(epochs):
            global_step = trainer.step(epoch, global_step)
            queries += per_epoch
            train_rewards.append(trainer.last_metrics["reward/mean"])
            epoch_s.append(trainer.last_metrics["perf/epoch_s"])
            if any(done < point <= queries for point in args.eval_at) or epoch == epochs - 1:
                done = queries
                point, images = measure(queries)
                evals.append(point)
                print(f"[{args.algorithm} seed {args.seed}] {queries:5d} queries: digit-{TARGET} share "
                      f"{100 * point['target_share']:5.1f}%  eval reward {point['reward_mean']:.3f}",
                      file=sys.stderr, flush=True)
        if args.images_out:
            torch.save({"base": base_images[:16].clone(), "final": images[:16].clone()}, args.images_out)
    print(json.dumps({"algorithm": args.algorithm, "seed": args.seed, "preset": preset, "overrides": overrides,
                      "queries_per_epoch": per_epoch, "epochs": epochs, "evals": evals,
                      "train_reward_mean": train_rewards, "epoch_s": epoch_s, "train_s": sum(epoch_s),
                      "load_average_at_end": os.getloadavg(), "torch": torch.__version__}))


# ---------------------------------------------------------------------------------------------- summary


def real_digits() -> dict[str, dict[str, float]] | None:
    """Brightness and diversity of scikit-learn's digits (the DDPM's training data, scaled /16 as in
    pretraining), all of them and the real 3s: what honest digits look like, to read those columns against."""
    try:
        import torch
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0)
    threes = images[torch.tensor(digits.target == TARGET)]
    return {"brightness": {"all": float(images.mean()), str(TARGET): float(threes.mean())},
            "diversity": {"all": diversity(images), str(TARGET): diversity(threes)}}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = _mean(values)
    return (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def curves(runs: list[dict], key: str) -> dict[str, dict]:
    """Per algorithm: the query points and, at each, the mean, std, min and max of ``key`` over seeds."""
    out: dict[str, dict] = {}
    for algorithm in ALGORITHMS:
        mine = [r for r in runs if r["algorithm"] == algorithm and "evals" in r]
        if not mine:
            continue
        points = sorted({e["queries"] for r in mine for e in r["evals"]})
        rows = []
        for q in points:
            values = [e[key] for r in mine for e in r["evals"] if e["queries"] == q]
            rows.append({"queries": q, "mean": _mean(values), "std": _std(values), "min": min(values),
                         "max": max(values), "n": len(values)})
        out[algorithm] = {"points": rows, "seeds": [r["seed"] for r in mine]}
    return out


def queries_to_reach(points: list[dict], level: float) -> float | None:
    """First query count at which the mean curve reaches ``level`` (linear interpolation), or None."""
    for a, b in zip(points, points[1:]):
        if a["mean"] >= level:
            return float(a["queries"])
        if b["mean"] >= level:
            return a["queries"] + (level - a["mean"]) / (b["mean"] - a["mean"]) * (b["queries"] - a["queries"])
    return float(points[0]["queries"]) if points and points[0]["mean"] >= level else None


def table(runs: list[dict]) -> str:
    share, reward, bright = curves(runs, "target_share"), curves(runs, "reward_mean"), curves(runs, "brightness")
    div, div3 = curves(runs, "diversity"), curves(runs, "diversity_target")
    any_alg = next(iter(share.values()))
    qs = [p["queries"] for p in any_alg["points"]]
    head = "| algorithm | " + " | ".join(f"share @ {q}" for q in qs) + \
        f" | eval reward @ end | brightness @ end | diversity @ end | diversity of {TARGET}s @ end | " \
        "queries to 50% | queries to 80% | train s / run |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for algorithm, data in share.items():
        cells = [f"{100 * p['mean']:.1f} ± {100 * p['std']:.1f}" for p in data["points"]]
        cells += [""] * (len(qs) - len(cells))
        r, b = reward[algorithm]["points"][-1], bright[algorithm]["points"][-1]
        d, d3 = div[algorithm]["points"][-1], div3[algorithm]["points"][-1]
        to50, to80 = (queries_to_reach(data["points"], lvl) for lvl in (0.5, 0.8))
        train_s = _mean([x["train_s"] for x in runs if x["algorithm"] == algorithm and "train_s" in x])
        lines.append(f"| {LABELS[algorithm]} | " + " | ".join(cells) +
                     f" | {r['mean']:.3f} ± {r['std']:.3f} | {b['mean']:.3f} | {d['mean']:.2f} | {d3['mean']:.2f} | "
                     f"{'-' if to50 is None else f'{to50:.0f}'} | {'-' if to80 is None else f'{to80:.0f}'} | "
                     f"{train_s:.0f} |")
    return "\n".join(lines)


def _finite_points(s: dict) -> dict:
    """``s`` without the points where the value or its band is not finite."""
    keys = ("xs", "ys", "lo", "hi")
    kept = [p for p in zip(*(s[k] for k in keys)) if all(math.isfinite(v) for v in p)]
    return {**s, **{k: [p[i] for p in kept] for i, k in enumerate(keys)}}


def multi_line_plot(series: list[dict], path: Path, *, title: str, xlabel: str, ylabel: str,
                    y_range: tuple[float | None, float | None] | None = None, size: tuple[int, int] = (560, 360)) -> Path:
    """Several lines (``{"label", "color", "xs", "ys", "lo", "hi"}``, band lo..hi) with a legend, via Pillow;
    the y axis spans ``y_range`` (``None`` at either end: the data's)."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 58, 120, 28, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), title, fill="black")
    # Undefined points (nan: e.g. the diversity of the 3s when a run drew fewer than two) are left out.
    series = [_finite_points(s) for s in series]
    xs = [x for s in series for x in s["xs"]] or [0.0]
    lo, hi = y_range or (None, None)
    lo = min((v for s in series for v in s["lo"]), default=0.0) if lo is None else lo
    hi = max((v for s in series for v in s["hi"]), default=1.0) if hi is None else hi
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right), top + (hi - y) / (hi - lo) * (h - top - bottom))

    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = lo + frac * (hi - lo)
        yy = px(x0, y)[1]
        d.line([left, yy, w - right, yy], fill=(230, 230, 230))
        d.text((4, yy - 5), f"{y:.3g}", fill="black")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for frac in (0.0, 0.5, 1.0):
        x = x0 + frac * (x1 - x0)
        d.text((px(x, lo)[0] - 12, h - bottom + 5), f"{x:g}", fill="black")
    d.text(((w - right + left) // 2 - 30, h - 16), xlabel, fill="black")
    d.text((4, top - 16), ylabel, fill="black")
    for s in series:  # bands first, lightened, so every line stays visible
        light = tuple(int(c + (255 - c) * 0.8) for c in s["color"])
        upper = [px(x, y) for x, y in zip(s["xs"], s["hi"])]
        lower = [px(x, y) for x, y in zip(s["xs"], s["lo"])]
        if len(upper) > 1:
            d.polygon(upper + lower[::-1], outline=light)
    for i, s in enumerate(series):
        points = [px(x, y) for x, y in zip(s["xs"], s["ys"])]
        if len(points) > 1:
            d.line(points, fill=s["color"], width=2)
        for p in points:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=s["color"])
        ly = top + 6 + 16 * i
        d.line([w - right + 8, ly + 6, w - right + 28, ly + 6], fill=s["color"], width=3)
        d.text((w - right + 32, ly), s["label"], fill="black")
    img.save(path)
    return path


def plot(runs: list[dict], path: Path) -> Path:
    """Three panels side by side: digit-3 share, eval reward and diversity of the 3s against reward queries."""
    from PIL import Image

    panels = []
    with tempfile.TemporaryDirectory() as tmp:
        for key, title, ylabel, scale, y_range in (
                ("target_share", f"digit-{TARGET} share on fixed seeds (mean of seeds, band min..max)", "share %",
                 100.0, (0.0, 100.0)),
                ("reward_mean", f"eval reward: log p({TARGET} | image) (mean of seeds)", "reward", 1.0, None),
                ("diversity_target", f"diversity of the {TARGET}s: mean pairwise pixel distance", "distance", 1.0,
                 (0.0, None))):
            series = [{"label": LABELS[a], "color": COLORS[a], "xs": [p["queries"] for p in c["points"]],
                       "ys": [scale * p["mean"] for p in c["points"]], "lo": [scale * p["min"] for p in c["points"]],
                       "hi": [scale * p["max"] for p in c["points"]]} for a, c in curves(runs, key).items()]
            panels.append(Image.open(multi_line_plot(series, Path(tmp) / f"{key}.png", title=title,
                                                     xlabel="reward queries", ylabel=ylabel,
                                                     y_range=y_range)).copy())
    canvas = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# ---------------------------------------------------------------------------------------------- driver


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--queries", type=int, default=1920,
                        help="reward queries per run (default 1920: the quickstart's 15 epochs x 128 samples)")
    parser.add_argument("--eval-at", nargs="+", type=int, default=[128, 256, 384, 768, 1152, 1536, 1920],
                        help="evaluate after the epoch that reaches each of these query counts (and before "
                             "training, and at the end)")
    parser.add_argument("--eval-samples", type=int, default=256, help="fixed-seed evaluation samples (default 256)")
    parser.add_argument("--eval-seed", type=int, default=650, help="evaluation seed (default 650, the quickstart's)")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per run (default 1)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    parser.add_argument("--out", default=str(HERE / "results" / "algorithms.json"))
    parser.add_argument("--plot", default=str(HERE / "results" / "algorithms.png"))
    parser.add_argument("--grid", default=str(HERE / "results" / "algorithms_grid.png"))
    parser.add_argument("--summarize", action="store_true",
                        help="no runs: print the table of the JSON at --out and redraw --plot from it")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--algorithm", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--images-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.summarize:
        record = json.loads(Path(args.out).read_text(encoding="utf-8"))
        ok = [r for r in record["runs"] if "evals" in r]
        plot(ok, Path(args.plot))
        print(f"{record['command']}\n{record['machine']}\n\n{table(ok)}\n\nreal digits: {record.get('real_digits')}")
        return 0

    sys.path.insert(0, str(HERE))
    from common import machine, save_record

    started, info = time.time(), machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, load average {info['load_average_at_start']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        def one(job: tuple[str, int]) -> dict:
            algorithm, seed = job
            images = Path(tmp) / f"{algorithm}_{seed}.pt"
            cmd = [sys.executable, __file__, "--child", "--algorithm", algorithm, "--seed", str(seed),
                   "--queries", str(args.queries), "--eval-at", *map(str, args.eval_at),
                   "--eval-samples", str(args.eval_samples), "--eval-seed", str(args.eval_seed),
                   "--threads", str(args.threads), "--images-out", str(images)]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TRANSFORMERS_VERBOSITY="error",
                       HF_HUB_OFFLINE="1")
            t0, load0 = time.time(), os.getloadavg()
            out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            if out.returncode != 0:
                print(f"{algorithm} seed {seed} failed:\n{out.stderr[-3000:]}", file=sys.stderr, flush=True)
                return {"algorithm": algorithm, "seed": seed, "error": out.stderr[-3000:]}
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result.update(wall_s=round(time.time() - t0, 1), load_average_at_start=load0, images=str(images))
            first, last = result["evals"][0], result["evals"][-1]
            print(f"{LABELS[algorithm]:10s} seed {seed}: digit-{TARGET} share {100 * first['target_share']:5.1f}% -> "
                  f"{100 * last['target_share']:5.1f}% after {last['queries']} queries, eval reward "
                  f"{first['reward_mean']:.3f} -> {last['reward_mean']:.3f}, brightness {first['brightness']:.3f} -> "
                  f"{last['brightness']:.3f}, diversity of {TARGET}s {first['diversity_target']:.2f} -> "
                  f"{last['diversity_target']:.2f} ({result['wall_s']:.0f} s, load {load0[0]:.2f})", flush=True)
            return result

        jobs = [(a, s) for s in args.seeds for a in args.algorithms]
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            runs = list(pool.map(one, jobs))
        ok = [r for r in runs if "evals" in r]
        if ok:
            _grid(ok, Path(args.grid), min(args.seeds))
    for r in runs:
        r.pop("images", None)
    reference = real_digits()
    if ok:
        plot(ok, Path(args.plot))
        print("\n" + table(ok))
    if reference:
        b, d = reference["brightness"], reference["diversity"]
        print(f"real digits (training data): brightness all {b['all']:.3f}, {TARGET}s {b[str(TARGET)]:.3f}; "
              f"diversity all {d['all']:.2f}, {TARGET}s {d[str(TARGET)]:.2f}")
    record = {"command": " ".join([Path(sys.executable).name, "bench/algorithms.py"] + (argv or sys.argv[1:])),
              "settings": {"model": "diffrl's 8x8 digits DDPM (shipped)", "reward": f"log p({TARGET} | image), digit "
                           "classifier", "queries": args.queries, "eval_at": args.eval_at,
                           "eval_samples": args.eval_samples, "eval_seed": args.eval_seed, "threads": args.threads,
                           "jobs": args.jobs, "seeds": args.seeds},
              "machine": dict(info, load_average_at_end=os.getloadavg()), "wall_s": round(time.time() - started, 1),
              "real_digits": reference,
              "curves": {k: curves(ok, k) for k in ("target_share", "reward_mean", "brightness", "diversity",
                                                   "diversity_target")} if ok else {},
              "runs": runs}
    path = save_record(record, args.out)
    print(f"saved {path}" + (f", {args.plot}, {args.grid}" if ok else ""))
    return 0


def _grid(runs: list[dict], path: Path, seed: int) -> None:
    """Base model, then each algorithm's final samples for ``seed``: the same evaluation noise in every row."""
    import torch

    from diffrl.evaluate.plots import image_grid

    mine = [r for r in runs if r["seed"] == seed and Path(r["images"]).is_file()]
    if not mine:
        return
    data = {r["algorithm"]: torch.load(r["images"], weights_only=True) for r in mine}
    first = next(iter(data.values()))
    rows = [first["base"]] + [data[a]["final"] for a in ALGORITHMS if a in data]
    labels = ["base"] + [LABELS[a] for a in ALGORITHMS if a in data]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, path, cell=32, labels=labels)


if __name__ == "__main__":
    sys.exit(main())
