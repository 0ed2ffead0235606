"""DDPO from Python with TRL's signatures, offline: the project's 8x8 digits DDPM, a reward of your own, the image
hook, and the result saved where diffusers loads it.

    python examples/ddpo_from_python.py              # 6 epochs, about 20 s on 2 CPU cores
    python examples/ddpo_from_python.py --epochs 1   # a smoke run

With TRL 0.23 the imports were `from trl import DDPOConfig, DDPOTrainer, ...`; nothing else changes.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from diffusers import DDPMPipeline

from diffrl import DDPOConfig, DDPOTrainer, DefaultDDPODDPMPipeline, rewards
from diffrl.digits import load_digits_ddpm_path

digit_three = rewards.load("digit", digit=3)  # a built-in reward: the digit classifier's log p(3 | image)


def reward_function(images, prompts, prompt_metadata):
    """TRL's reward signature. Any callable works; here the built-in digit reward, minus a penalty for dark
    images (one way to keep the classifier from being pleased by dimming)."""
    scores, metadata = digit_three(images, prompts, prompt_metadata)
    brightness = images.mean(dim=(1, 2, 3))
    return scores - 2.0 * torch.relu(0.15 - brightness), metadata


def prompt_function():
    """TRL's prompt signature; an unconditional model ignores the prompt."""
    return "", {}


def image_samples_hook(batches, global_step, tracker):
    """TRL's hook: [[images, prompts, prompt_metadata, rewards, reward_metadata], ...] per sample batch. Without a
    tracker (log_with) diffrl hands it one that saves PNGs under <run>/images/."""
    images, prompts, _, batch_rewards, _ = batches[-1]
    tracker.log_images({f"best_of_step_{global_step}": images[batch_rewards.argmax()][None]}, step=global_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--logdir", default=None, help="default: a temporary folder")
    args = parser.parse_args()
    logdir = args.logdir or tempfile.mkdtemp(prefix="diffrl-example-")
    config = DDPOConfig(num_epochs=args.epochs, sample_num_steps=20, sample_guidance_scale=1.0,
                        sample_batch_size=64, sample_num_batches_per_epoch=2, train_batch_size=32,
                        train_learning_rate=1e-3, train_lora=False, mixed_precision="no", logdir=logdir,
                        run_name="example", save_freq=args.epochs)
    pipeline = DefaultDDPODDPMPipeline(str(load_digits_ddpm_path()), use_lora=False)
    trainer = DDPOTrainer(config, reward_function, prompt_function, pipeline, image_samples_hook=image_samples_hook)
    trainer.train()
    final = Path(logdir) / "example" / "final"
    trainer.save_pretrained(str(final))
    images = DDPMPipeline.from_pretrained(final)(batch_size=4, num_inference_steps=20, output_type="np").images
    print(f"reward/mean of the last epoch: {trainer.last_metrics['reward/mean']:.3f}")
    print(f"saved {final}: DDPMPipeline.from_pretrained loads it ({images.shape[0]} images of {images.shape[1:]})")


if __name__ == "__main__":
    main()
