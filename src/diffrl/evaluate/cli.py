"""``diffrl sample``, ``diffrl evaluate`` and ``diffrl report``: argument parsers and the commands behind them.

Heavy imports (torch, diffusers) happen inside the commands, so ``diffrl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable

SAMPLE_HELP = """Generate images from a base model or a fine-tuned result (LoRA or full) and save them.

Each image (prompt, seed) starts from the noise of its seed alone, so the same seed gives the same
starting noise for every prompt and every model of the same architecture. Writes one PNG per image
(p<prompt>_s<seed>.png), grid.png (prompts down, seeds across) and index.json (prompt, seed, file).

examples:
  diffrl sample stable-diffusion-v1-5/stable-diffusion-v1-5 --prompts "a cat" "a dog" --seeds 0 1 2 --out samples/
  diffrl sample logs/run1/final --prompt-source simple_animals --num 8 --num-seeds 4 --out samples/run1
  diffrl sample logs/run1/final --base /new/path/to/base --prompts "a horse" --out samples/moved
"""

EVALUATE_HELP = """Compare a base model with fine-tuned results on the same prompts and the same noise.

Every model samples every (prompt, seed) from the same initial noise and per-step noise; every image is
scored by every reward (the one trained on and held-out ones: a trained reward that rises while the others
fall is reward hacking). Reports mean ± standard error per reward, per prompt and per split (train and
--heldout-* prompts), the paired difference to the base model, and the diversity of each prompt's images
(mean pairwise distance of CLIP image embeddings -- those of --clip-model, or by default of the CLIP model of
an evaluated aesthetic/clip_score/pickscore reward -- and of pixels otherwise; 0 = mode collapse).
Writes results.json, report.html (self-contained) and images/<model>/p<prompt>_s<seed>.png to --out.

examples:
  diffrl evaluate --base stable-diffusion-v1-5/stable-diffusion-v1-5 --model logs/aesthetic/final \\
      --reward aesthetic --reward clip_score --trained-reward aesthetic \\
      --prompt-source simple_animals --num 16 --heldout-prompt-source imagenet_animals --heldout-num 16 \\
      --num-seeds 4 --out eval/aesthetic
  diffrl evaluate --base src/diffrl/assets/digits/ddpm --model logs/quickstart/final --reward digit \\
      --reward jpeg_compressibility --reward-option digit.digit=3 --num-seeds 32 --out eval/digits
"""

REPORT_HELP = """Write one self-contained HTML report for a training run folder: samples of the base model and
the final model from the same noise (unless --no-samples), scored by the trained reward; the training
curves from metrics.jsonl; the last logged metrics; the run's config.yaml. Opens in a browser, no server.

examples:
  diffrl report logs/ddpo_2024.01.01_10.00.00
  diffrl report logs/run1 --no-samples --out run1.html
"""


def _seeds(args: argparse.Namespace) -> list[int]:
    from diffrl.evaluate.inputs import EvaluationError

    if args.num_seeds is not None:
        if args.num_seeds < 1:
            raise EvaluationError(f"--num-seeds={args.num_seeds} must be at least 1")
        return list(range(args.num_seeds))
    return list(args.seeds)


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _options(items: list[str], setting: str) -> dict[str, Any]:
    from diffrl.evaluate.inputs import parse_key_value

    return dict(parse_key_value(item, setting) for item in items)


def _settings(args: argparse.Namespace):
    from diffrl.evaluate.sample import SampleSettings

    return SampleSettings(num_inference_steps=args.steps, guidance_scale=args.guidance, eta=args.eta,
                          batch_size=args.batch_size, height=args.height, width=args.width)


def _check_source(source: str, setting: str) -> None:
    """A missing local path is an error now, before any model loads (Hub ids ``owner/name`` pass)."""
    from diffrl.evaluate.inputs import EvaluationError

    hub_id = source.count("/") == 1 and not source.startswith(("/", ".", "~")) and "\\" not in source
    if not Path(source).expanduser().exists() and not hub_id:
        raise EvaluationError(f"{setting} {source!r}: no such file or folder; check the path, or give a Hugging Face "
                              "Hub id (owner/name)")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run(command: str, body: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run ``body``; a bad setting or a model that cannot load prints one line and exits with status 2."""

    def handler(args: argparse.Namespace) -> int:
        try:
            return body(args)
        except (ValueError, OSError) as err:  # EvaluationError, RewardError, PromptError, ModelLoadError, ...
            print(f"diffrl {command}: error: {err}", file=sys.stderr)
            return 2

    return handler


# --------------------------------------------------------------------------------------------- sample
def _sample(args: argparse.Namespace) -> int:
    import torch

    from diffrl.evaluate.inputs import EvaluationError, collect_prompts
    from diffrl.evaluate.loading import load_model
    from diffrl.evaluate.sample import check_prompts_fit, generate, make_jobs, thumbnails, write_images, write_index
    from diffrl.evaluate.plots import image_grid

    settings = _settings(args)
    prompts = collect_prompts(args.prompts, args.prompt_source, args.num,
                              _options(args.prompt_option, "--prompt-option"))
    seeds = _seeds(args)
    jobs = make_jobs(prompts, seeds)
    _check_source(args.model, "MODEL")
    loaded = load_model(args.model, revision=args.revision, base=args.base, base_revision=args.base_revision,
                        device=_device(args.device), mixed_precision=args.mixed_precision)
    if args.height is None and args.width is None:  # a training checkpoint samples at its run's size
        settings = dataclasses.replace(settings, height=loaded.info.get("sample_height"),
                                       width=loaded.info.get("sample_width"))
    if loaded.policy.is_conditional and not (args.prompts or args.prompt_source):
        raise EvaluationError(f"'{args.model}' is a text-to-image model; give --prompts or --prompt-source "
                              "(--prompts '' samples without a prompt)")
    check_prompts_fit(loaded.policy, prompts, args.model)
    out = Path(args.out)
    files: list[str] = []
    grid_rows: dict[int, list[torch.Tensor]] = {}
    for batch in generate(loaded.policy, jobs, settings, progress="sampling"):
        files += write_images(batch, out)
        for image, job in zip(thumbnails(batch.images, 128), batch.jobs):
            if job.prompt_index < 16 and len(grid_rows.setdefault(job.prompt_index, [])) < 16:
                grid_rows[job.prompt_index].append(image)
        _log(f"{len(files)}/{len(jobs)} images")
    rows = [torch.stack(grid_rows[i]).float() / 255 for i in sorted(grid_rows)]
    cell = max(48, min(128, max(rows[0].shape[-2:])))
    labels = [prompts[i].text[:10] for i in sorted(grid_rows)] if any(p.text for p in prompts) else []
    image_grid(rows, out / "grid.png", cell=cell, labels=labels)
    write_index(out / "index.json", {"model": args.model, **loaded.info}, settings, jobs, files)
    print(f"wrote {len(files)} images, grid.png and index.json to {out}")
    return 0


def _add_sampling_args(parser: argparse.ArgumentParser, *, from_config: bool = False) -> None:
    """Seeds, steps, guidance, eta, batch size, device, precision; ``from_config``: steps, guidance and eta default
    to the training run's sampling settings."""
    run = "the run's sample_num_steps"
    group = parser.add_argument_group("sampling")
    group.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], metavar="SEED",
                       help="seeds of the initial and per-step noise, one image per prompt and seed (default: 0 1 2 3)")
    group.add_argument("--num-seeds", type=int, default=None, metavar="N", help="seeds 0 .. N-1 (instead of --seeds)")
    group.add_argument("--steps", type=int, default=None if from_config else 50,
                       help=f"denoising steps (default: {run if from_config else 50})")
    group.add_argument("--guidance", type=float, default=None if from_config else 5.0,
                       help="classifier-free guidance scale (default: "
                            f"{'the run' + chr(39) + 's sample_guidance_scale' if from_config else 5.0}; "
                            "unconditional models ignore it)")
    group.add_argument("--eta", type=float, default=None if from_config else 1.0,
                       help="DDIM eta: 0 deterministic, 1 DDPM-like (default: "
                            f"{'the run' + chr(39) + 's sample_eta' if from_config else 1.0})")
    group.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    if not from_config:  # diffrl report's compare_run takes no image size (yet): the model's native size
        group.add_argument("--height", type=int, default=None, metavar="PIXELS",
                           help="image height, a multiple of 8 (default: the model's native size; not for DDPMs)")
        group.add_argument("--width", type=int, default=None, metavar="PIXELS",
                           help="image width, a multiple of 8 (default: the model's native size; not for DDPMs)")
    group.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    group.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                       help="half-precision weights and autocast (default: no)")


def _add_prompt_args(parser: argparse.ArgumentParser, *, heldout: bool) -> None:
    group = parser.add_argument_group("prompts (none: one empty prompt, for unconditional models)")
    group.add_argument("--prompts", nargs="+", default=None, metavar="PROMPT", help="prompts, each given once")
    group.add_argument("--prompt-source", default=None, metavar="NAME",
                       help="registered prompt source (diffrl.prompts.available(): simple_animals, imagenet_animals, "
                            "nouns_activities, counting, from_file, ...)")
    group.add_argument("--prompt-option", action="append", default=[], metavar="KEY=VALUE",
                       help="prompt-source option, repeatable (e.g. path=prompts.txt, seed=1)")
    group.add_argument("--num", type=int, default=8, help="distinct prompts to draw from --prompt-source (default: 8)")
    if heldout:
        group.add_argument("--heldout-prompts", nargs="+", default=None, metavar="PROMPT",
                           help="held-out prompts (not seen in training), reported as their own split")
        group.add_argument("--heldout-prompt-source", default=None, metavar="NAME",
                           help="prompt source of the held-out split")
        group.add_argument("--heldout-prompt-option", action="append", default=[], metavar="KEY=VALUE",
                           help="held-out prompt-source option, repeatable")
        group.add_argument("--heldout-num", type=int, default=None,
                           help="distinct held-out prompts to draw (default: --num)")


def add_sample_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``diffrl sample`` to an argparse ``subparsers`` object."""
    parser = subparsers.add_parser("sample", help="generate images from a base model or a fine-tuned result",
                                   description=SAMPLE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL",
                        help="Hub id, diffusers folder, single-file checkpoint, diffrl result (LoRA or full), "
                             "run folder (its final/) or training checkpoint (RUN/checkpoints/checkpoint_N)")
    parser.add_argument("--base", default=None,
                        help="base model for a LoRA result (default: the base it records)")
    parser.add_argument("--revision", default="main", help="Hub revision of MODEL (default: main)")
    parser.add_argument("--base-revision", default="main", help="Hub revision of --base (default: main)")
    parser.add_argument("--out", required=True, help="output folder")
    _add_prompt_args(parser, heldout=False)
    _add_sampling_args(parser)
    parser.set_defaults(func=_run("sample", _sample))
    return parser


# --------------------------------------------------------------------------------------------- evaluate
def _default_name(source: str) -> str:
    path = Path(source)
    if path.name in ("final", "best", "final_merged") and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        return f"{path.parent.parent.name}/{path.name}"
    return path.name or source


def _unique(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        candidate, k = name, 2
        while candidate in out:
            candidate, k = f"{name}#{k}", k + 1
        out.append(candidate)
    return out


def _evaluate(args: argparse.Namespace) -> int:
    from diffrl.checkpoint import write_text_atomically
    from diffrl.evaluate.compare import ModelSource, evaluate_models
    from diffrl.evaluate.features import image_features
    from diffrl.evaluate.inputs import EvaluationError, build_rewards, collect_prompts, reward_options
    from diffrl.evaluate.loading import load_model, resolve_model_path, run_folder_of
    from diffrl.evaluate.report import text_summary, write_report
    from diffrl.evaluate.sample import safe_name, sample_filename, write_images

    # Every setting is checked before the first model loads.
    settings = _settings(args)
    prompts = collect_prompts(
        args.prompts, args.prompt_source, args.num, _options(args.prompt_option, "--prompt-option"),
        heldout=args.heldout_prompts, heldout_source=args.heldout_prompt_source, heldout_num=args.heldout_num,
        heldout_options=_options(args.heldout_prompt_option, "--heldout-prompt-option"))
    seeds = _seeds(args)
    options = reward_options(args.reward, args.reward_option)
    rewards = build_rewards(args.reward, options)
    features = image_features(args.clip_model, rewards)
    sources = [args.base, *args.model]
    for setting, source in zip(["--base"] + ["--model"] * len(args.model), sources):
        _check_source(source, setting)
    if args.name and len(args.name) != len(args.model):
        raise EvaluationError(f"--name gives {len(args.name)} names for {len(args.model)} --model results; "
                              "give one name per --model, in the same order")
    names = _unique([args.base_name, *(args.name or [_default_name(m) for m in args.model])])
    device = _device(args.device)
    conditional_checked: list[bool] = []

    def loader(source: str, info: dict[str, Any], base: str | None) -> Callable[[], Any]:
        def get() -> Any:
            loaded = load_model(source, revision=args.revision if base is None else "main", base=base,
                                base_revision=args.revision, device=device, mixed_precision=args.mixed_precision,
                                strict_base=False)
            info.update(loaded.info)
            if not conditional_checked and loaded.policy.is_conditional and not (args.prompts or args.prompt_source):
                raise EvaluationError(f"'{source}' is a text-to-image model; give --prompts or --prompt-source "
                                      "(--prompts '' samples without a prompt)")
            conditional_checked.append(True)
            _log(f"loaded {source}")
            return loaded.policy
        return get

    models = []
    for i, (name, source) in enumerate(zip(names, sources)):
        info: dict[str, Any] = {"source": source, "role": "base" if i == 0 else "fine-tuned"}
        models.append(ModelSource(name, loader(source, info, None if i == 0 else args.base), info))
    out = Path(args.out)
    files: dict[str, list[str | None]] = {n: [] for n in names}

    def save(model: str, batch, _scores) -> None:
        folder = Path("images") / safe_name(model)
        if args.no_images:
            files[model] += [None] * len(batch.jobs)
            return
        write_images(batch, out / folder)
        files[model] += [str(folder / sample_filename(job)) for job in batch.jobs]

    evaluation = evaluate_models(models, rewards, prompts, seeds, settings, features=features,
                                 trained_reward=args.trained_reward, reward_options=options,
                                 preview_prompts=args.grid_prompts, preview_seeds=args.grid_seeds, on_batch=save,
                                 log=_log)
    runs = {}
    for name, source in zip(names[1:], args.model):
        run = run_folder_of(resolve_model_path(source))
        if run is not None and run not in runs.values():  # a run's final/ and its checkpoints share one curve
            runs[name] = run
    for run in args.run_dir:
        runs[Path(run).name] = Path(run)
    results = evaluation.to_dict(files)
    results["run_dirs"] = {k: str(v) for k, v in runs.items()}
    write_text_atomically(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    arguments = {k: v for k, v in vars(args).items() if k not in ("func", "command", "num_seeds")}
    config = {"arguments": {**arguments, "seeds": seeds}, "models": results["models"], "rewards": results["rewards"],
              "settings": results["settings"]}
    report = write_report(out / "report.html", evaluation=evaluation, runs=runs, title=args.title, config=config)
    print(text_summary(evaluation))
    print(f"results: {out / 'results.json'}\nreport: {report}")
    return 0


def add_evaluate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``diffrl evaluate`` to an argparse ``subparsers`` object."""
    parser = subparsers.add_parser("evaluate", help="compare a base model and fine-tuned results on the same noise",
                                   description=EVALUATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    models = parser.add_argument_group("models")
    models.add_argument("--base", required=True, help="the base model (the baseline every result is compared with); "
                                                      "LoRA results are applied to it")
    models.add_argument("--model", action="append", default=[], metavar="RESULT",
                        help="a fine-tuned result (diffrl LoRA or full result, diffusers folder, run folder or "
                             "training checkpoint RUN/checkpoints/checkpoint_N), repeatable")
    models.add_argument("--name", nargs="+", default=None, help="display names of the --model results, in order")
    models.add_argument("--base-name", default="base", help="display name of the base model (default: base)")
    models.add_argument("--revision", default="main", help="Hub revision of --base (default: main)")
    scoring = parser.add_argument_group("scoring")
    scoring.add_argument("--reward", action="append", default=[], required=True, metavar="NAME",
                         help="registered reward, repeatable: the trained one and held-out ones")
    scoring.add_argument("--reward-option", action="append", default=[], metavar="REWARD.KEY=VALUE",
                         help="reward option, repeatable; values read as JSON (e.g. digit.digit=7)")
    scoring.add_argument("--trained-reward", default=None, metavar="NAME",
                         help="which --reward the models were trained on (the others are labelled held-out)")
    scoring.add_argument("--clip-model", default="auto", metavar="PATH_OR_ID",
                         help="CLIP model whose image embeddings diversity is measured on; 'pixels' for pixels "
                              "(default: auto, the CLIP model of an evaluated aesthetic, clip_score or pickscore "
                              "reward, else pixels)")
    _add_prompt_args(parser, heldout=True)
    _add_sampling_args(parser)
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, help="output folder (results.json, report.html, images/)")
    output.add_argument("--no-images", action="store_true", help="do not save every image as a PNG")
    output.add_argument("--grid-prompts", type=int, default=4,
                        help="prompts per split shown in the report (default: 4)")
    output.add_argument("--grid-seeds", type=int, default=6, help="seeds shown per prompt in the report (default: 6)")
    output.add_argument("--run-dir", action="append", default=[],
                        help="training run folder whose curves go in the report (default: the runs of the --model "
                             "results, when they are final/ or best/ of a run folder)")
    output.add_argument("--title", default=None, help="report title")
    parser.set_defaults(func=_run("evaluate", _evaluate))
    return parser


# --------------------------------------------------------------------------------------------- report
def _report(args: argparse.Namespace) -> int:
    from diffrl.evaluate.inputs import EvaluationError
    from diffrl.evaluate.report import write_report
    from diffrl.evaluate.runs import compare_run

    run = Path(args.run_dir)
    if not (run / "metrics.jsonl").is_file():
        hint = (" It holds results.json: it is an evaluation folder, whose report diffrl evaluate already wrote to "
                "report.html." if (run / "results.json").is_file() else "")
        raise EvaluationError(f"RUN_DIR '{run}' has no metrics.jsonl; give a training run folder (with config.yaml, "
                              f"metrics.jsonl and final/).{hint}")
    evaluation = None
    if not args.no_samples:
        seeds = _seeds(args)
        evaluation = compare_run(run, model=args.model, num_prompts=args.num, seeds=seeds,
                                 num_inference_steps=args.steps, guidance_scale=args.guidance, eta=args.eta,
                                 batch_size=args.batch_size, device=_device(args.device),
                                 mixed_precision=args.mixed_precision, log=_log)
    path = write_report(args.out or run / "report.html", evaluation=evaluation, runs={run.name: run},
                        title=args.title or f"Training run {run.name}")
    print(f"report: {path}")
    return 0


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``diffrl report`` to an argparse ``subparsers`` object."""
    parser = subparsers.add_parser("report", help="write a self-contained HTML report for a training run",
                                   description=REPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="training run folder (config.yaml, metrics.jsonl, final/)")
    parser.add_argument("--out", default=None, help="report file (default: RUN_DIR/report.html)")
    parser.add_argument("--title", default=None, help="report title")
    parser.add_argument("--no-samples", action="store_true",
                        help="curves, metrics and config only: load no model")
    parser.add_argument("--model", default=None, help="fine-tuned model to show (default: RUN_DIR/final)")
    parser.add_argument("--num", type=int, default=4, help="prompts drawn from the run's prompt source (default: 4)")
    _add_sampling_args(parser, from_config=True)
    parser.set_defaults(func=_run("report", _report))
    return parser
