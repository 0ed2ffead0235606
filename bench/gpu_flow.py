"""Seconds per epoch and peak GPU memory of LoRA GRPO on Stable Diffusion 3.5 Medium's architecture at 512x512.

    python bench/gpu_flow.py --device cuda                         # on one H100/H200 (random weights; no download)
    python bench/gpu_flow.py --device cpu --tiny --epochs 1        # the CPU check that keeps it running (the tests)

The model is SD3.5 Medium's architecture with random weights, built in memory from its published configs (written
out here): the MMDiT (24 layers, 24 heads of 64, dual attention in layers 0-12, RMS q/k norm, patch 2), CLIP-L and
CLIP-G text towers, T5-XXL's encoder (24 layers, width 4096; the vocabulary is diffrl's tiny character tokenizer, so
only the embedding table is smaller) and the 16-channel VAE; bf16 weights. ``--tiny`` swaps in
``diffrl.testing.flow``'s tiny SD3. The trainer is ``GRPOTrainer`` with the ``configs/sd35m_grpo_pickscore.yaml``
settings scaled to one GPU (``--prompts`` prompts x ``--group`` images, 10 SDE steps, CFG 4.5, the reference KL,
LoRA 32/64 on the attention projections, gradient checkpointing), a brightness reward (nothing to download), one
warm-up epoch, then ``--epochs`` timed epochs of ``trainer.step``. Figures: the median epoch seconds, samples per
second, and ``torch.cuda.max_memory_allocated`` from the warm-up on. The record (command, machine, settings,
figures) goes to ``$OUT/gpu_flow.json`` when ``OUT`` is set, else ``bench/results/gpu_flow/<date>-<commit>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common

BENCHMARK = "gpu_flow"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def build_sd35_medium(dtype, device):
    """SD3.5 Medium's architecture with random weights (stabilityai/stable-diffusion-3.5-medium's configs)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from diffrl.testing.flow import make_t5_tokenizer
    from diffrl.testing.tokenizer import make_clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm").to(dtype)
        with tempfile.TemporaryDirectory() as tmp:
            clip_tokenizer = make_clip_tokenizer(tmp, model_max_length=77)

        def clip(width: int, layers: int, heads: int, ff: int):
            return CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=len(clip_tokenizer), hidden_size=width, intermediate_size=ff, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=77, projection_dim=width, hidden_act="gelu",
                bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
                pad_token_id=clip_tokenizer.pad_token_id)).to(dtype)

        clip_l, clip_g = clip(768, 12, 12, 3072), clip(1280, 32, 20, 5120)
        t5_tokenizer = make_t5_tokenizer()
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                                     decoder_start_token_id=0)).to(dtype)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=1024,
                            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                            use_post_quant_conv=False).to(dtype)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=clip_l, tokenizer=clip_tokenizer, text_encoder_2=clip_g,
                                    tokenizer_2=clip_tokenizer, text_encoder_3=t5, tokenizer_3=t5_tokenizer)


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}


def run(args: argparse.Namespace) -> dict:
    import torch

    from diffrl import GRPOConfig, GRPOTrainer
    from diffrl.pipelines import LoraSettings, StableDiffusion3Policy
    from diffrl.testing.flow import build_tiny_sd3

    cuda = args.device == "cuda"
    precision = "bf16" if cuda else "no"
    pipeline = build_tiny_sd3() if args.tiny else build_sd35_medium(torch.bfloat16 if cuda else torch.float32,
                                                                     args.device)
    size = 16 if args.tiny else 512
    lora = LoraSettings(rank=4 if args.tiny else 32, alpha=8 if args.tiny else 64, target_modules=tuple(LORA_TARGETS))
    policy = StableDiffusion3Policy(pipeline, use_lora=True, lora=lora, mixed_precision=precision, device=args.device,
                                    max_sequence_length=16 if args.tiny else 256)
    steps = 3 if args.tiny else 10
    with tempfile.TemporaryDirectory() as logdir:
        config = GRPOConfig(num_epochs=args.epochs + 1, sample_num_steps=steps, sample_eta=0.7,
                            sample_guidance_scale=4.5, train_cfg=True, sample_height=size, sample_width=size,
                            prompts_per_epoch=args.prompts, group_size=args.group, sample_batch_size=args.group,
                            train_batch_size=args.group, kl_coef=0.01, train_learning_rate=3e-4,
                            mixed_precision=precision, gradient_checkpointing=not args.tiny, train_lora=True,
                            lora_rank=lora.rank, lora_alpha=lora.alpha, lora_target_modules=LORA_TARGETS,
                            logdir=logdir, run_name="bench", save_freq=100000, seed=0)
        trainer = GRPOTrainer(config, brightness, lambda: ("a photo of a cat", {}), policy)
        seconds, peak = [], None
        for epoch in range(args.epochs + 1):
            if cuda:
                torch.cuda.synchronize()
                if epoch == 0:
                    torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            trainer.global_step = trainer.step(epoch, trainer.global_step)
            if cuda:
                torch.cuda.synchronize()
            if epoch > 0:  # epoch 0 warms up (kernels, allocator)
                seconds.append(time.perf_counter() - start)
        if cuda:
            peak = torch.cuda.max_memory_allocated() / 2 ** 30
    samples = args.prompts * args.group
    epoch_s = statistics.median(seconds)
    return {"epoch_s": epoch_s, "epoch_s_all": seconds, "samples_per_epoch": samples,
            "samples_per_s": samples / epoch_s, "peak_memory_gib": peak,
            "transformer_params": sum(p.numel() for p in policy.trainable_module.parameters()),
            "trainable_params": sum(p.numel() for p in policy.trainable_parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="the tiny random SD3 instead of SD3.5 Medium's size")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up (default %(default)d)")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per epoch (default %(default)d)")
    parser.add_argument("--group", type=int, default=8, help="images per prompt = batch size (default %(default)d)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    settings = {k: getattr(args, k) for k in ("device", "tiny", "epochs", "prompts", "group")}
    record = {"benchmark": BENCHMARK, "command": common.command_line(), "machine": common.machine(),
              "settings": settings, "result": run(args)}
    default = Path(os.environ["OUT"]) / "gpu_flow.json" if os.environ.get("OUT") else common.result_path(BENCHMARK)
    path = common.save_record(record, args.out or default)
    result = record["result"]
    memory = "n/a" if result["peak_memory_gib"] is None else f"{result['peak_memory_gib']:.1f} GiB"
    print(f"SD3{' (tiny)' if args.tiny else '.5 Medium architecture'} LoRA GRPO, {result['samples_per_epoch']} samples "
          f"per epoch: {result['epoch_s']:.1f} s per epoch, {result['samples_per_s']:.2f} samples/s, peak memory "
          f"{memory}\nrecord: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
