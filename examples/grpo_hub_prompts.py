"""GRPO (group advantages, a stochastic-step window, a reference KL) on Stable Diffusion 1.4 with prompts from a
Hugging Face dataset, sharded across processes and resumed exactly like the built-in prompt sets.

    accelerate launch --num_processes 8 examples/grpo_hub_prompts.py          # PartiPrompts, PickScore, 8 GPUs
    python examples/grpo_hub_prompts.py --smoke --model <folder> --dataset <saved dataset> --reward jpeg_compressibility

`--dataset` is a Hub dataset id or a folder written by `Dataset.save_to_disk`; `--column` holds the prompts and
`--metadata` columns reach the reward as `prompt_metadata` (here PartiPrompts' category). Add `--streaming` for
sets too large to load.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from diffrl import DefaultDDPOStableDiffusionPipeline, GRPOConfig, GRPOTrainer, prompts, rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="CompVis/stable-diffusion-v1-4")
    parser.add_argument("--dataset", default="nateraw/parti-prompts")
    parser.add_argument("--column", default="Prompt")
    parser.add_argument("--metadata", nargs="*", default=["Category"])
    parser.add_argument("--streaming", action="store_true")
    parser.add_argument("--reward", default="pickscore", help="a registered reward or module:function")
    parser.add_argument("--smoke", action="store_true", help="1 epoch, 3 steps, 2 groups of 2: a plumbing check")
    parser.add_argument("--logdir", default=None, help="default: a temporary folder")
    args = parser.parse_args()
    settings = dict(num_epochs=300, sample_num_steps=50, prompts_per_epoch=32, group_size=16, sample_batch_size=8,
                    train_batch_size=4, train_gradient_accumulation_steps=4, sde_window_size=4,
                    sde_window_schedule="sliding", sde_window_shift_every=10, kl_coef=0.04,
                    train_learning_rate=1e-5, eval_every=10, eval_num_samples=64,
                    mixed_precision="bf16" if torch.cuda.is_available() else "no")
    if args.smoke:
        settings.update(num_epochs=1, sample_num_steps=3, prompts_per_epoch=2, group_size=2, sample_batch_size=2,
                        train_batch_size=2, train_gradient_accumulation_steps=1, sde_window_size=2,
                        eval_every=1, eval_num_samples=4)
    config = GRPOConfig(**settings, sample_eta=1.0, sample_guidance_scale=5.0, train_lora=True,
                        logdir=args.logdir or tempfile.mkdtemp(prefix="diffrl-grpo-"), run_name="grpo-parti")
    source = prompts.load("hf_dataset", path=args.dataset, column=args.column, metadata_columns=args.metadata,
                          streaming=args.streaming, seed=config.seed)
    trainer = GRPOTrainer(config, rewards.load(args.reward), source,
                          DefaultDDPOStableDiffusionPipeline(args.model, use_lora=True))
    trainer.train()
    metrics = trainer.last_metrics
    print(f"reward/mean of the last epoch: {metrics['reward/mean']:.4f}; "
          f"prompts drawn by this process: {source.state_dict()['count']}")


if __name__ == "__main__":
    main()
