"""Sharded-training smoke run: a couple of epochs of one trainer on the tiny SD, then its saved result checked.

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 \\
        bench/gpu_sharded.py --case ddpo-full --out /tmp/fsdp_ddpo_full.json      # FSDP2 on one GPU
    python bench/gpu_sharded.py --case ddpo-full --device cpu --out /tmp/plain.json   # the same path, unsharded

Cases: ``ddpo-full`` and ``alignprop-full`` (full fine-tuning of every UNet weight) and ``ddpo-lora`` (LoRA rank 4:
an empty or untrained LoRA file after sharded training is a known failure elsewhere). Each case builds diffrl's tiny
random Stable Diffusion (``diffrl.testing.models``) at 16x16 latents, trains ``--epochs`` epochs through the
trainer's own ``Accelerator`` (so ``accelerate launch``'s FSDP/DeepSpeed settings apply), saves with
``trainer.save_pretrained`` and checks what was written:

* full fine-tuning: ``unet/diffusion_pytorch_model.safetensors`` holds every UNet weight of the original shapes,
  all finite, and at least one differs from the initial weights (training reached the saved copy);
* LoRA: ``pytorch_lora_weights.safetensors`` holds adapter tensors, all finite, and some up-projection (``lora_B``,
  zero at initialisation) is non-zero.

It also checks that the UNet really is sharded as the accelerator's distributed type says (FSDP2: DTensor
parameters; DeepSpeed: an engine), since a trainer that prepares only its optimizer would train unsharded and
still pass the checks above. The main process writes one JSON record to ``--out``: the case, ``distributed_type``
as the trainer's accelerator saw it (accelerate silently turns FSDP and DeepSpeed off on a machine without a GPU),
``passed``, the checks (the saved result; the last checkpoint, written through ``accelerator.save_state``: complete,
whole trained weights, optimizer state; a second trainer resumed from it: starts after it with the same weights),
the error with the end of its traceback when one was raised, and the seconds taken.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
import traceback
from pathlib import Path

from common import build_tiny_sd

CASES = ("ddpo-full", "alignprop-full", "ddpo-lora")


def _brightness(images, prompts, metadata):
    return images.float().mean(dim=(1, 2, 3)), {}


def _prompt():
    return "a photo of a cat", {}


def _trainer(case: str, model: Path, logdir: str, args, resume_from: str | None = None):
    from diffrl import AlignPropConfig, AlignPropTrainer, DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    use_lora = case.endswith("-lora")
    shared = dict(num_epochs=args.epochs, save_freq=1, sample_num_steps=args.steps, sample_eta=1.0,
                  sample_guidance_scale=5.0, mixed_precision=args.mixed_precision, seed=0, logdir=logdir,
                  run_name=case, train_lora=use_lora, resume_from=resume_from or "",
                  accelerator_kwargs={"cpu": True} if args.device == "cpu" else {})
    pipeline = DefaultDDPOStableDiffusionPipeline(str(model), use_lora=use_lora)
    if case.startswith("ddpo"):
        config = DDPOConfig(sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2,
                            train_gradient_accumulation_steps=1, train_learning_rate=1e-3 if use_lora else 1e-4,
                            train_num_inner_epochs=1, **shared)
        return DDPOTrainer(config, _brightness, _prompt, pipeline)
    config = AlignPropConfig(train_batch_size=2, train_gradient_accumulation_steps=1, train_learning_rate=1e-4,
                             truncated_backprop_rand=False, truncated_backprop_timestep=args.steps - 1, **shared)
    return AlignPropTrainer(config, _brightness, _prompt, pipeline)


def _check_full(saved: Path, model: Path) -> dict:
    from safetensors.torch import load_file

    before = load_file(model / "unet" / "diffusion_pytorch_model.safetensors")
    after = load_file(saved / "unet" / "diffusion_pytorch_model.safetensors")
    same_shapes = set(before) == set(after) and all(before[k].shape == after[k].shape for k in before)
    finite = all(bool(v.float().isfinite().all()) for v in after.values())
    changed = sum(1 for k in before if k in after and not bool((before[k].float() == after[k].float()).all()))
    return {"tensors": len(after), "same_names_and_shapes": same_shapes, "finite": finite,
            "tensors_changed": changed, "ok": bool(after) and same_shapes and finite and changed > 0}


def _check_lora(saved: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(saved.glob("*lora*.safetensors"))
    tensors = load_file(files[0]) if files else {}
    finite = all(bool(v.float().isfinite().all()) for v in tensors.values())
    up = [v for k, v in tensors.items() if "lora_B" in k or "lora.up" in k]
    trained = sum(1 for v in up if float(v.float().abs().max()) > 0)
    return {"file": files[0].name if files else None, "tensors": len(tensors), "finite": finite,
            "up_projections": len(up), "up_projections_nonzero": trained,
            "ok": bool(tensors) and finite and trained > 0}


def _check_checkpoint(trainer, epochs: int) -> dict:
    """The last checkpoint (written through ``accelerator.save_state`` by every process): complete, with the
    trained weights gathered whole into ``trainable.safetensors`` (all of them, finite) and accelerate's optimizer
    state (``optimizer.bin`` unsharded or under FSDP's full state dict, DeepSpeed's own folder under ZeRO)."""
    from safetensors.torch import load_file

    from diffrl import checkpoint as ckpt

    folder = trainer.checkpoints_dir / ckpt.checkpoint_name(epochs - 1)
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    tensors = load_file(folder / "trainable.safetensors") if "trainable.safetensors" in names else {}
    expected = {n: tuple(p.shape) for n, p in trainer.policy.trainable_module.named_parameters() if p.requires_grad}
    # FSDP2's DTensor parameters report their global shape: a file of local shards would not match it.
    whole = set(tensors) == set(expected) and all(tuple(tensors[k].shape) == v for k, v in expected.items())
    finite = all(bool(v.float().isfinite().all()) for v in tensors.values())
    optimizer = any(n.startswith("optimizer") or n == "pytorch_model" for n in names)
    return {"files": names, "complete": ckpt.is_complete(folder), "trainable_tensors": len(tensors),
            "trainable_whole": whole, "finite": finite, "optimizer_state": optimizer,
            "ok": ckpt.is_complete(folder) and bool(tensors) and whole and finite and optimizer}


def _check_resume(case: str, model: Path, logdir: str, args, trained: dict) -> dict:
    """A second trainer resumed from the run's last checkpoint (``accelerator.load_state``) starts after it,
    with the trained weights restored (gathered whole and compared on the main process)."""
    from diffrl.recipes.checkpoints import full_trainable_state_dict

    resumed = _trainer(case, model, logdir, args, resume_from=str(Path(logdir) / case))
    weights = full_trainable_state_dict(resumed.accelerator, resumed.policy, resumed.recipe.update.module)
    if weights is None:  # not the main process
        return {"ok": True}
    differing = sorted(k for k in trained if k not in weights or not bool((weights[k] == trained[k]).all()))
    return {"first_epoch": resumed.first_epoch, "weights_equal": not differing, "differing": differing[:5],
            "ok": resumed.first_epoch == args.epochs and not differing}


def sharding_check(trainer) -> dict:
    """Whether the trained UNet really is sharded the way the accelerator's distributed type says: FSDP2 turns its
    parameters into DTensors, DeepSpeed wraps the model in an engine. A trainer that prepares only its optimizer
    would otherwise train unsharded under an FSDP/DeepSpeed config and still look fine."""
    policy = trainer.policy
    unet = getattr(policy, "trainable_module", None) or policy._unet
    kind = str(trainer.accelerator.distributed_type)
    dtensor = sum(1 for p in unet.parameters() if type(p.data).__name__ == "DTensor" or type(p).__name__ == "DTensor")
    engine = getattr(trainer.accelerator, "deepspeed_engine_wrapped", None) is not None
    forward = type(getattr(policy, "unet", unet)).__name__
    if "FSDP" in kind:
        ok = dtensor > 0
    elif "DEEPSPEED" in kind:
        ok = engine
    else:
        ok = True
    return {"dtensor_parameters": dtensor, "deepspeed_engine": engine, "forward_module": forward, "ok": ok}


def run_case(case: str, args) -> dict:
    """Train and check one case; never raises (the error goes into the record)."""
    import torch

    from diffrl.recipes.checkpoints import full_trainable_state_dict

    start = time.perf_counter()
    record = {"case": case, "epochs": args.epochs, "mixed_precision": args.mixed_precision, "passed": False}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model = build_tiny_sd(Path(tmp) / "model", args.latent)
            trainer = _trainer(case, model, str(Path(tmp) / "logs"), args)
            acc = trainer.accelerator
            record.update(distributed_type=str(acc.distributed_type), num_processes=acc.num_processes,
                          device=str(acc.device), sharding=sharding_check(trainer))
            step = 0
            for epoch in range(args.epochs):
                step = trainer.step(epoch, step)
            record["reward_mean_last_epoch"] = float(trainer.last_metrics.get("reward/mean", math.nan))
            saved = Path(tmp) / "saved"
            trainer.save_pretrained(str(saved))
            trained = full_trainable_state_dict(acc, trainer.policy, trainer.recipe.update.module)
            if acc.is_main_process:
                record["checks"] = _check_lora(saved) if case.endswith("-lora") else _check_full(saved, model)
                record["checkpoint"] = _check_checkpoint(trainer, args.epochs)
            try:
                record["resume"] = _check_resume(case, model, str(Path(tmp) / "logs"), args, trained or {})
            except Exception as error:  # noqa: BLE001 - recorded, and the case fails
                record["resume"] = {"ok": False, "error": f"{type(error).__name__}: {error}",
                                    "traceback_tail": traceback.format_exc()[-2000:]}
            if acc.is_main_process:
                record["passed"] = all(record[k]["ok"] for k in ("checks", "sharding", "checkpoint", "resume"))
            if torch.cuda.is_available():
                record["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        except Exception as error:  # noqa: BLE001 - a smoke run records the failure instead of stopping
            record["error"] = f"{type(error).__name__}: {error}"
            record["traceback_tail"] = traceback.format_exc()[-3000:]
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=CASES, default="ddpo-full")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--latent", type=int, default=16, help="latent size of the tiny SD (default 16)")
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps (default 4)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    record = run_case(args.case, args)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: record.get(k) for k in ("case", "distributed_type", "passed", "error", "seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
