"""SDXL with a LoRA, DDPO on JPEG compressibility (the DDPO paper's first task), the result loaded back into plain
diffusers' StableDiffusionXLPipeline.

    python examples/sdxl_lora_ddpo.py                  # one GPU, 1024 px, bf16 (GPU memory not measured yet)
    python examples/sdxl_lora_ddpo.py --smoke --model <a folder> --size 64   # what the tests run on a tiny SDXL

SDXL's size conditioning (original size, crop, target size) is built for the sampled resolution, as
diffusers does. bf16, not fp16: SDXL's VAE overflows in fp16. `configs/sdxl_ddpo_compressibility.yaml` is the
8-GPU preset of the same run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from diffrl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionXLPipeline, LoraSettings, prompts, rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="stabilityai/stable-diffusion-xl-base-1.0")
    parser.add_argument("--size", type=int, default=1024, help="sampled height and width in pixels")
    parser.add_argument("--smoke", action="store_true", help="1 epoch, 2 steps, 4 images: a plumbing check")
    parser.add_argument("--logdir", default=None, help="default: a temporary folder")
    args = parser.parse_args()
    logdir = args.logdir or tempfile.mkdtemp(prefix="diffrl-sdxl-")
    settings = dict(num_epochs=40, sample_num_steps=40, sample_batch_size=4, sample_num_batches_per_epoch=4,
                    train_batch_size=2, train_gradient_accumulation_steps=4, train_learning_rate=3e-4,
                    mixed_precision="bf16" if torch.cuda.is_available() else "no", gradient_checkpointing=True)
    if args.smoke:
        settings.update(num_epochs=1, sample_num_steps=2, sample_batch_size=2, sample_num_batches_per_epoch=2,
                        train_batch_size=2, train_gradient_accumulation_steps=1)
    config = DDPOConfig(**settings, sample_guidance_scale=5.0, sample_height=args.size, sample_width=args.size,
                        logdir=logdir, run_name="sdxl-jpeg", save_freq=settings["num_epochs"])
    pipeline = DefaultDDPOStableDiffusionXLPipeline(args.model, lora=LoraSettings(rank=8, alpha=8))
    trainer = DDPOTrainer(config, rewards.load("jpeg_compressibility"), prompts.load("simple_animals"), pipeline)
    trainer.train()
    final = Path(logdir) / "sdxl-jpeg" / "final"
    trainer.save_pretrained(str(final))
    print(f"reward/mean of the last epoch: {trainer.last_metrics['reward/mean']:.4f} (-kB as JPEG)")

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(args.model)
    pipe.load_lora_weights(str(final))
    image = pipe("a cat", height=args.size, width=args.size, num_inference_steps=config.sample_num_steps,
                 output_type="pt").images
    print(f"saved {final}: StableDiffusionXLPipeline.load_lora_weights loads it (an image of {tuple(image.shape)})")


if __name__ == "__main__":
    main()
