"""Run by ``accelerate launch --num_processes 2`` from test_sdxl_multiprocess.py: a tiny SDXL DDPO run on CPU (gloo).

Each process writes a checksum of every trainable weight, its own first epoch's rewards and the prompts it drew, so
the test can see that the weights stayed in sync while the processes sampled different images.
Usage: two_process_sdxl_job.py MODEL_PATH LOGDIR [field=value ...]
"""

import json
import sys
from pathlib import Path

import torch

from diffrl import DDPOTrainer, DefaultDDPOStableDiffusionXLPipeline
from diffrl.config import load_config

PROMPTS = ["a cat", "a dog", "a red bird", "a fish"]


def main() -> None:
    model, logdir, *overrides = sys.argv[1:]
    config = load_config(None, ["trainer=ddpo", f"logdir={logdir}", "run_name=mp", "mixed_precision=no", *overrides])
    torch.manual_seed(0)  # the same LoRA init on every process
    pipe = DefaultDDPOStableDiffusionXLPipeline(model, use_lora=True)
    drawn: list[str] = []
    rewards: list[float] = []

    def prompt_fn():
        prompt = PROMPTS[torch.randint(len(PROMPTS), ()).item()]
        drawn.append(prompt)
        return prompt, {}

    def brightness(images, prompts, metadata):
        scores = images.mean(dim=(1, 2, 3))
        rewards.extend(scores.tolist())
        return scores, {}

    trainer = DDPOTrainer(config, brightness, prompt_fn, pipe)
    trainer.train()
    trainer.save_pretrained(str(Path(logdir) / "final"))
    weights = [p.detach().double().sum().item() for p in trainer.policy.trainable_parameters()]
    rank = trainer.accelerator.process_index
    Path(logdir, f"weights_{rank}.json").write_text(json.dumps(
        {"rank": rank, "num_processes": trainer.accelerator.num_processes, "weights": weights,
         "global_step": trainer.global_step, "rewards": rewards, "prompts": drawn}))


if __name__ == "__main__":
    main()
    from diffrl.recipes.accelerator import close_processes

    close_processes()
