"""Model FLOPs of the GPU benchmark: one UNet call counted with ``torch.utils.flop_counter``, the GPU's bf16 peak.

    python bench/gpu_flops.py --model DIR --device cuda --latent 64 --mixed-precision bf16   # prints one JSON line

The child of ``bench/gpu.py`` that counts, at the benchmark's shapes and on diffrl's LoRA UNet (rank 4 on
``to_q, to_k, to_v, to_out.0``, as the timed runs train), the floating-point operations of one UNet forward pass
and of one forward + backward pass, per latent row (a CFG pair is two rows). ``FlopCounterMode`` counts the matrix
products and convolutions that actually run (attention through SDPA included); the backward pass of a LoRA UNet
computes activation gradients through every layer but weight gradients only for the adapters, so it costs about
one forward pass more, not two. The same file holds the GPU peak table the benchmark divides by.
"""

from __future__ import annotations

import argparse
import json
import time

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, matched by substring of
# torch.cuda.get_device_name() in this order (the more specific names first). H100 SXM and H200 (SXM) share
# the Hopper SXM rate; the NVL and PCIe parts run at lower clocks/power.
BF16_DENSE_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.0),
    ("H200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("A100", 312.0),
)


def bf16_peak_tflops(device_name: str | None) -> float | None:
    """The datasheet dense bf16 peak of a GPU from its name, or ``None`` for a GPU (or CPU) not in the table."""
    if not device_name:
        return None
    for key, tflops in BF16_DENSE_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def measured_matmul_tflops(size: int = 8192, repeats: int = 10) -> float:
    """The bf16 matrix-product rate this GPU reaches on random data (``size``^3, median of ``repeats`` timed
    products after three warm-ups, CUDA events): the practical ceiling beside the datasheet peak."""
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    times.sort()
    return 2 * size**3 / times[len(times) // 2] / 1e12


def count_unet_flops(model: str, device: str, latent: int, mixed_precision: str, rows: int = 2) -> dict:
    """FLOPs per latent row of one forward and one forward + backward pass of the LoRA UNet (LoRA grads only)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffrl import DefaultDDPOStableDiffusionPipeline

    pipe = DefaultDDPOStableDiffusionPipeline(model, use_lora=True)
    unet = pipe.unet.to(device)  # the LoRA UNet (adapters float32 trainable, base weights frozen)
    channels = unet.config.in_channels
    context = (rows, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, channels, latent, latent, generator=generator).to(device)
    text = torch.randn(*context, generator=generator).to(device)
    t = torch.full((rows,), 500, device=device, dtype=torch.long)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None)
    with torch.no_grad(), autocast, FlopCounterMode(display=False) as counter:
        unet(x, t, encoder_hidden_states=text).sample
    forward = counter.get_total_flops()
    with autocast, FlopCounterMode(display=False) as counter:
        out = unet(x, t, encoder_hidden_states=text).sample
        out.float().square().mean().backward()
    both = counter.get_total_flops()
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    return {"unet_forward_flops_per_row": forward / rows, "unet_forward_backward_flops_per_row": both / rows,
            "rows_counted": rows, "latent": latent, "text_tokens": context[1], "lora_parameters": trainable,
            "unet_parameters": sum(p.numel() for p in unet.parameters())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--latent", type=int, required=True)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--matmul", action="store_true", help="also time an 8192^3 bf16 matrix product (CUDA)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = count_unet_flops(args.model, args.device, args.latent, args.mixed_precision)
    if args.matmul and args.device == "cuda":
        result["measured_bf16_matmul_tflops"] = measured_matmul_tflops()
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
