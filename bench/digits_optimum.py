"""How far is each trainer from the best trade-off possible on the digits task?

    python bench/digits_optimum.py                                   # frontier + the latest digits_trainers record
    python bench/digits_optimum.py --runs logs/<run> ...             # + each run's path-KL bound

The KL-regularised objective ``E[r] - beta KL(pi || pi_ref)`` has the optimum ``pi_ref exp(r / beta) / Z``
(:mod:`diffrl.evaluate.optimum`). From ``--samples`` base-model samples (the evaluation's sampler: 20 DDIM steps,
eta 1) the script estimates, for each ``beta``, the optimum's expected reward (the digit-3 log-probability the
trainers maximise), digit-3 share, diversity (mean pairwise RMS pixel distance, the trainers' ``eval/diversity``)
and KL from the base model. It then reads the trainers' evaluations from a ``digits_trainers`` record and, for each
method, compares its diversity with the optimum's at the same share (interpolated along the frontier): the
fraction of the attainable diversity it kept. For run folders given with ``--runs`` it also estimates the trained
policy's path KL from the base model (an upper bound of its KL; :func:`diffrl.evaluate.optimum.step_kl` at every
step of its own eta-1 trajectories) and the lower bound ``E[r] - beta * path KL`` of its objective.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import common

BETAS = (64.0, 32.0, 16.0, 8.0, 4.0, 2.0, 1.0, 0.5, 0.25)


def base_samples(count: int, batch: int):
    import torch

    from diffrl.digits import load_digit_classifier, load_digits_ddpm_path
    from diffrl.pipelines.auto import load_policy
    from diffrl.recipes.evaluation import evaluate
    from diffrl.rewards import load

    policy = load_policy(str(load_digits_ddpm_path()), use_lora=False)
    result = evaluate(policy, load("digit", digit=3), [""] * count, seed=100_000, num_inference_steps=20,
                      guidance_scale=1.0, eta=1.0, batch_size=batch, progress=None)
    classifier = load_digit_classifier()
    with torch.no_grad():
        threes = classifier(result.images).argmax(dim=1) == 3
    return result.images, result.rewards.double(), threes


def interpolate(points, share: float) -> float | None:
    """The frontier's diversity at ``share`` (linear between the two betas around it; past its highest share, that
    point's: the optimum cannot exceed it), or None below the frontier's lowest share."""
    ordered = sorted(points, key=lambda p: p.share)
    if share >= ordered[-1].share:
        return ordered[-1].diversity
    for low, high in zip(ordered, ordered[1:]):
        if low.share <= share <= high.share:
            t = 0.0 if high.share == low.share else (share - low.share) / (high.share - low.share)
            return low.diversity + t * (high.diversity - low.diversity)
    return None


def method_curves(record: dict) -> list[tuple[str, list[float], list[float]]]:
    """Each method's evaluations as ``(label, shares, diversities)``: per epoch, the mean over its seeds (the epochs
    every seed ran)."""
    curves = []
    for method in record["settings"]["methods"]:
        runs = [r["rows"] for r in record["runs"] if r["method"] == method and "rows" in r]
        if not runs:
            continue
        epochs = min(len(rows) for rows in runs)
        share = [sum(rows[e]["eval/target_share"] for rows in runs) / len(runs) for e in range(epochs)]
        diversity = [sum(rows[e]["eval/diversity"] for rows in runs) / len(runs) for e in range(epochs)]
        curves.append((method, share, diversity))
    return curves


def frontier_plot(frontier, record: dict, path: Path) -> Path:
    """The optimum's share-diversity frontier (black) and every method's evaluations, epoch by epoch (seed mean)."""
    from diffrl.evaluate.plots import curves_plot

    ordered = sorted(frontier, key=lambda p: p.share)
    series = [("KL optimum (beta sweep)", [p.share for p in ordered], [p.diversity for p in ordered])]
    series += method_curves(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    return curves_plot(series, path, title="digit-3 share vs diversity: the KL optimum and each method (seed mean)",
                       xlabel="digit-3 share", ylabel="diversity")


def path_kl(run: Path, samples: int, batch: int, beta: float) -> dict:
    """The run's ``final/`` policy against the base model: its reward and path KL on its own trajectories."""
    import torch

    from diffrl.digits import load_digits_ddpm_path
    from diffrl.evaluate.optimum import step_kl
    from diffrl.pipelines.auto import load_policy
    from diffrl.rewards import load

    trained = load_policy(str(run / "final"), use_lora=False)
    base = load_policy(str(load_digits_ddpm_path()), use_lora=False)
    reward_fn = load("digit", digit=3)
    kls, rewards = [], []
    for start in range(0, samples, batch):
        n = min(batch, samples - start)
        with torch.no_grad():
            out = trained.sample([""] * n, num_inference_steps=20, guidance_scale=1.0, eta=1.0,
                                 generator=torch.Generator().manual_seed(200_000 + start))
            t = out.trajectory
            total = torch.zeros(n, dtype=torch.float64)
            for j in range(t.timesteps.shape[1]):
                args = (t.latents[:, j], t.timesteps[:, j], t.prev_timesteps[:, j], t.latents[:, j + 1])
                ours = trained.step_log_prob(*args, eta=1.0, guidance_scale=1.0)
                theirs = base.step_log_prob(*args, eta=1.0, guidance_scale=1.0)
                if float(ours.std.max()) > 0:
                    total += step_kl(ours.mean, theirs.mean, ours.std)
            r, _ = reward_fn(t.images, [""] * n, [{}] * n)
        kls.append(total)
        rewards.append(r.double())
    kl, reward = torch.cat(kls).mean().item(), torch.cat(rewards).mean().item()
    return {"run": str(run), "reward": reward, "path_kl": kl, "beta": beta, "objective_lower_bound": reward - beta * kl}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4096, help="base-model samples (default %(default)d)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--record", default=None, help="a digits_trainers record (default: the newest with AWM)")
    parser.add_argument("--runs", nargs="*", default=[], help="run folders with final/ for the path-KL bound")
    parser.add_argument("--beta", type=float, default=4.0, help="beta of the objective bound for --runs")
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", default=None, help="where the share-diversity PNG goes (default beside the "
                                                     "records, named after the trainers record)")
    args = parser.parse_args()

    import torch

    from diffrl.evaluate.optimum import kl_regularised_optimum

    torch.set_num_threads(2)
    start_machine = common.machine()
    images, rewards, threes = base_samples(args.samples, args.batch)
    frontier = kl_regularised_optimum(rewards, images, BETAS, indicator=threes)
    print(f"base model: share {float(threes.float().mean()):.3f}, reward {float(rewards.mean()):.2f} "
          f"({args.samples} samples)")
    print(f"{'beta':>6} {'E[r]':>8} {'share':>6} {'diversity':>9} {'KL nats':>8} {'ESS':>7}")
    for p in frontier:
        print(f"{p.beta:>6g} {p.reward:>8.3f} {p.share:>6.3f} {p.diversity:>9.3f} {p.kl:>8.2f} {p.ess:>7.0f}")

    records = sorted((common.RESULTS / "digits_trainers").glob("*.json"))
    chosen = Path(args.record) if args.record else next(
        (r for r in reversed(records) if '"awm"' in r.read_text()), records[-1] if records else None)
    placed = []
    if chosen is not None:
        record = json.loads(chosen.read_text())
        print(f"\ntrained runs from {chosen.name}: diversity kept, as a fraction of the optimum's at the same share")
        for run in record["runs"]:
            if "rows" not in run:
                continue
            at80 = next((r for r in run["rows"] if r["eval/target_share"] >= 0.8), None)
            for label, row in (("at 80%", at80), ("final", run["rows"][-1])):
                if row is None:
                    continue
                best = interpolate(frontier, row["eval/target_share"])
                kept = row["eval/diversity"] / best if best else None
                placed.append({"method": run["method"], "seed": run["seed"], "point": label,
                               "share": row["eval/target_share"], "diversity": row["eval/diversity"],
                               "optimum_diversity": best, "kept": kept})
        methods = sorted({p["method"] for p in placed})
        for method in methods:
            for label in ("at 80%", "final"):
                rows = [p for p in placed if p["method"] == method and p["point"] == label and p["kept"] is not None]
                if rows:
                    mean = sum(p["kept"] for p in rows) / len(rows)
                    kept = ", ".join(f"{p['kept']:.2f}" for p in rows)
                    shares = ", ".join(f"{p['share']:.2f}" for p in rows)
                    print(f"  {method:<10} {label:<7} kept {mean:.2f} of the optimum's diversity ({kept}; shares "
                          f"{shares})")
    plot = None
    if chosen is not None:
        plot = frontier_plot(frontier, record, Path(args.plot) if args.plot else common.RESULTS / "digits_optimum" /
                             f"{chosen.stem}-frontier.png")
        print(f"plot: {plot}")
    bounds = [path_kl(Path(run), min(args.samples, 1024), args.batch, args.beta) for run in args.runs]
    for b in bounds:
        print(f"  {b['run']}: E[r] {b['reward']:.3f}, path KL {b['path_kl']:.2f} nats, "
              f"objective >= {b['objective_lower_bound']:.2f} at beta {b['beta']:g}")
    record = {"benchmark": "digits_optimum", "command": common.command_line(), "machine": start_machine,
              "samples": args.samples, "base_share": float(threes.float().mean()),
              "frontier": [p._asdict() for p in frontier], "trainers_record": chosen.name if chosen else None,
              "placed": placed, "path_kl": bounds, "plot": str(plot) if plot else None}
    path = common.save_record(record, args.out or common.result_path("digits_optimum"))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
