"""Run by ``accelerate launch --num_processes 2`` from test_multiprocess.py: a tiny training run on CPU (gloo).

Each process writes a checksum of its trainable weights, so the test can see that they stayed in sync, and the
prompts its reward was given (with ``prompts=...`` the source is built as ``diffrl train`` builds it).
Usage: two_process_job.py TRAINER MODEL_PATH LOGDIR [field=value ...]
"""

import json
import sys
from pathlib import Path

import torch

from diffrl import DefaultDDPODDPMPipeline, build
from diffrl.config import load_config, registry
from diffrl.pipelines.auto import load_policy, model_kind

SCORED: list[str] = []


def brightness(images, prompts, metadata):
    SCORED.extend(prompts)
    return images.mean(dim=(1, 2, 3)), {}


def main() -> None:
    trainer_name, model, logdir, *overrides = sys.argv[1:]
    config = load_config(None, [f"trainer={trainer_name}", f"logdir={logdir}", "run_name=mp", "mixed_precision=no",
                                *overrides])
    torch.manual_seed(0)  # the same LoRA init on every process
    conditional = model_kind(model) != "ddpm"  # a text model (the flow family's tiny SD3) loads by its family
    pipe = load_policy(model, use_lora=config.train_lora) if conditional else \
        DefaultDDPODDPMPipeline(model, use_lora=config.train_lora)
    Trainer = registry.resolve(registry.spec_of(type(config)).trainer)  # the config's own trainer
    prompt_fn = build.build_prompt_fn(config, conditional=conditional)
    trainer = Trainer(config, brightness, prompt_fn, pipe)
    trainer.train()
    trainer.save_pretrained(str(Path(logdir) / "final"))
    weights = [p.detach().double().sum().item() for p in trainer.policy.trainable_parameters()]  # whole sums
    params = list(trainer.policy.trainable_parameters())
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    rank = trainer.accelerator.process_index
    Path(logdir, f"weights_{rank}.json").write_text(json.dumps(
        {"rank": rank, "num_processes": trainer.accelerator.num_processes, "weights": weights,
         "global_step": trainer.global_step, "scored_prompts": SCORED,
         "param_types": sorted({type(p).__name__ for p in params}),
         "module_class": type(trainer.policy.trainable_module).__name__,
         "local_numel": sum(t.numel() for t in local), "whole_numel": sum(p.numel() for p in params)}))


if __name__ == "__main__":
    main()
    from diffrl.recipes.accelerator import close_processes

    close_processes()
