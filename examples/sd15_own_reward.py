"""Your own reward on Stable Diffusion 1.5: DDPO with a LoRA (rank 4, alpha 16), the DDPO paper's animal prompts,
and the result loaded back into plain diffusers.

    python examples/sd15_own_reward.py                  # one GPU: 50 epochs of 32 images, 50 steps
    python examples/sd15_own_reward.py --smoke --model <a folder>   # what the tests run on a tiny model

The reward is any callable with TRL's signature; here the colourfulness metric of Hasler & Suesstrunk (2003):
the spread plus 0.3 x the mean magnitude of the opponent colour channels rg = R - G and yb = (R + G) / 2 - B.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from diffrl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline, LoraSettings, prompts


def colourfulness(images, prompts, prompt_metadata):
    """``[B, 3, H, W]`` in [0, 1] -> ``[B]`` colourfulness (higher: more colourful), and no metadata."""
    red, green, blue = images.float().unbind(dim=1)
    rg, yb = red - green, 0.5 * (red + green) - blue
    spread = torch.sqrt(rg.flatten(1).var(dim=1) + yb.flatten(1).var(dim=1))
    mean = torch.sqrt(rg.flatten(1).mean(dim=1) ** 2 + yb.flatten(1).mean(dim=1) ** 2)
    return spread + 0.3 * mean, {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                        help="Hub id, diffusers folder or single .safetensors file")
    parser.add_argument("--smoke", action="store_true", help="1 epoch, 2 steps, 4 images: a plumbing check")
    parser.add_argument("--logdir", default=None, help="default: a temporary folder")
    args = parser.parse_args()
    logdir = args.logdir or tempfile.mkdtemp(prefix="diffrl-sd15-")
    settings = dict(num_epochs=50, sample_num_steps=50, sample_batch_size=8, sample_num_batches_per_epoch=4,
                    train_batch_size=4, train_gradient_accumulation_steps=2, train_learning_rate=3e-4,
                    mixed_precision="fp16" if torch.cuda.is_available() else "no")
    if args.smoke:
        settings.update(num_epochs=1, sample_num_steps=2, sample_batch_size=2, sample_num_batches_per_epoch=2,
                        train_batch_size=2, train_gradient_accumulation_steps=1)
    config = DDPOConfig(**settings, sample_guidance_scale=5.0, logdir=logdir, run_name="sd15-colour",
                        save_freq=settings["num_epochs"])
    pipeline = DefaultDDPOStableDiffusionPipeline(args.model, lora=LoraSettings(rank=4, alpha=16))
    trainer = DDPOTrainer(config, colourfulness, prompts.load("simple_animals"), pipeline)
    trainer.train()
    final = Path(logdir) / "sd15-colour" / "final"
    trainer.save_pretrained(str(final))
    print(f"reward/mean of the last epoch: {trainer.last_metrics['reward/mean']:.4f}")

    from diffusers import StableDiffusionPipeline  # the result in plain diffusers: base model + the LoRA file

    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None)
    pipe.load_lora_weights(str(final))
    image = pipe("a cat", num_inference_steps=config.sample_num_steps, output_type="pt").images
    print(f"saved {final}: StableDiffusionPipeline.load_lora_weights loads it "
          f"(colourfulness of 'a cat': {colourfulness(image, None, None)[0].item():.4f})")


if __name__ == "__main__":
    main()
