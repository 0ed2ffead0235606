"""Reproduce diffrl's shipped digit models from scratch, on CPU, deterministically.

Trains, on scikit-learn's bundled 8x8 digits (1,797 images, no download):

1. a small CNN digit classifier (:class:`diffrl.digits.DigitClassifier`) on a
   stratified 80/20 split, reporting held-out accuracy;
2. a pixel-space DDPM (Ho et al. 2020): a diffusers ``UNet2DModel`` trained with
   the simple epsilon-prediction loss, saved with its ``DDPMScheduler`` as a
   ``DDPMPipeline`` folder;

then checks the DDPM the way diffrl will fine-tune it: 500 samples drawn with DDIM
(Song et al. 2021) at eta=1 and 20 steps, classified, and the share of each digit
printed. The requirement is that no digit falls below 5%.

    python scripts/pretrain_digits.py                  # writes src/diffrl/assets/digits/
    python scripts/pretrain_digits.py --quick --out /tmp/digits   # a smoke run, ~20 s
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from diffrl.digits import DigitClassifier, digit_shares

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "diffrl" / "assets" / "digits"


@dataclass
class Args:
    out: Path = DEFAULT_OUT
    """folder that receives ddpm/ (a DDPMPipeline folder), classifier/ and report.json"""
    seed: int = 0
    """seeds data splits, initialisation, noise and the evaluation samples"""
    quick: bool = False
    """smoke run: a few training steps and 100 evaluation samples (the 5% check is not enforced)"""
    classifier_epochs: int = 40
    """epochs of classifier training (batch 64, Adam)"""
    ddpm_steps: int = 3000
    """optimizer steps of DDPM training (batch 128, AdamW, warmup then cosine decay)"""
    ddpm_lr: float = 2e-3
    """peak DDPM learning rate"""
    ema_decay: float = 0.995
    """decay of the exponential moving average of the UNet weights that is saved"""
    beta_schedule: str = "squaredcos_cap_v2"
    """DDPMScheduler beta schedule (1000 training steps)"""
    eval_samples: int = 500
    """samples drawn for the per-digit check"""
    eval_steps: int = 20
    """DDIM inference steps (eta=1) for the check"""


def parse_args() -> Args:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in fields(Args):
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(f"--{f.name.replace('_', '-')}", action="store_true")
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(default), default=default)
    args = Args(**vars(parser.parse_args()))
    if args.quick:
        args.classifier_epochs, args.ddpm_steps, args.eval_samples = 3, 30, 100
    return args


def load_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits as ``images [1797, 1, 8, 8]`` in [0, 1] and ``labels [1797]``."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(digits.target, dtype=torch.long)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, args: Args) -> tuple[DigitClassifier, float]:
    """Train on a stratified 80% split; return the model and its accuracy on the other 20%."""
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels.numpy(), random_state=args.seed
    )
    x_train, y_train = images[idx_train], labels[idx_train]
    x_test, y_test = images[idx_test], labels[idx_test]
    gen = torch.Generator().manual_seed(args.seed)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    for epoch in range(args.classifier_epochs):
        model.train()
        for batch in torch.randperm(len(y_train), generator=gen).split(64):
            # light noise augmentation, so samples from the DDPM are not out of distribution
            x = (x_train[batch] + 0.05 * torch.randn(x_train[batch].shape, generator=gen)).clamp(0, 1)
            loss = F.cross_entropy(model(x), y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.classifier_epochs:
            print(f"  classifier epoch {epoch + 1:3d}  loss {loss.item():.4f}  "
                  f"test acc {accuracy(model, x_test, y_test):.4f}", flush=True)
    model.eval()
    return model, accuracy(model, x_test, y_test)


def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(images).argmax(1) == labels).float().mean().item()
    model.train(was_training)
    return acc


def make_unet() -> UNet2DModel:
    """A ~0.7M-parameter UNet: 8x8 -> 4x4 with self-attention at 4x4."""
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    )


def make_scheduler(beta_schedule: str) -> DDPMScheduler:
    # steps_offset=1 and set_alpha_to_one=False: with DDIM eta>0 every step is stochastic,
    # the last one included (the DDPO convention). set_alpha_to_one is not a DDPMScheduler
    # argument; diffusers keeps it in the config and DDIMScheduler.from_config reads it.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type="epsilon",
        clip_sample=True, steps_offset=1,
    )
    scheduler.register_to_config(set_alpha_to_one=False)
    return scheduler


def train_ddpm(data: torch.Tensor, args: Args) -> tuple[UNet2DModel, DDPMScheduler]:
    """Train the UNet with L_simple (Ho et al. 2020, eq. 14 and Algorithm 1).

    Minimises ``||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)||^2`` with t uniform;
    returns an exponential moving average of the weights and the scheduler.
    """
    gen = torch.Generator().manual_seed(args.seed + 1)
    torch.manual_seed(args.seed + 1)
    unet, scheduler = make_unet(), make_scheduler(args.beta_schedule)
    ema = make_unet().requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    print(f"  UNet2DModel: {sum(p.numel() for p in unet.parameters()):,} parameters", flush=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.ddpm_lr, weight_decay=0.0)
    warmup = max(1, args.ddpm_steps // 20)

    def lr_factor(s: int) -> float:  # linear warmup, then cosine decay to zero
        return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.ddpm_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    x0_all = data * 2.0 - 1.0  # [0, 1] -> [-1, 1]
    order = torch.randperm(len(data), generator=gen)
    cursor, start, running = 0, time.perf_counter(), 0.0
    for step in range(args.ddpm_steps):
        if cursor + 128 > len(order):
            order, cursor = torch.randperm(len(data), generator=gen), 0
        x0 = x0_all[order[cursor : cursor + 128]]
        cursor += 128
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % 250 == 0 or step + 1 == args.ddpm_steps:
            print(f"  ddpm step {step + 1:5d}/{args.ddpm_steps}  loss(ema) {running:.4f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}  {time.perf_counter() - start:6.1f}s", flush=True)
    return ema.eval(), scheduler


@torch.no_grad()
def sample_ddim(
    unet: UNet2DModel, scheduler_config: dict, n: int, steps: int, eta: float, generator: torch.Generator,
    batch_size: int = 500,
) -> torch.Tensor:
    """Draw ``n`` samples with DDIM (Song et al. 2021, eq. 12; eta=1 is ancestral sampling).

    Returns ``[n, 1, 8, 8]`` in [0, 1].
    """
    ddim = DDIMScheduler.from_config(scheduler_config)
    ddim.set_timesteps(steps)
    size = unet.config.sample_size
    out = []
    for start in range(0, n, batch_size):
        x = torch.randn((min(batch_size, n - start), 1, size, size), generator=generator)
        for t in ddim.timesteps:
            eps = unet(x, t).sample
            x = ddim.step(eps, t, x, eta=eta, generator=generator).prev_sample
        out.append(x)
    return (torch.cat(out) / 2 + 0.5).clamp(0, 1)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    settings = {k: v for k, v in asdict(args).items() if k != "out"}
    report: dict = {"args": settings, "torch_threads": torch.get_num_threads()}
    images, labels = load_dataset()
    print(f"sklearn digits: {tuple(images.shape)}; torch threads: {torch.get_num_threads()}", flush=True)

    print("[1/3] digit classifier", flush=True)
    start = time.perf_counter()
    classifier, test_acc = train_classifier(images, labels, args)
    report["classifier_seconds"] = round(time.perf_counter() - start, 1)
    report["classifier_test_accuracy"] = round(test_acc, 4)
    report["classifier_full_accuracy"] = round(accuracy(classifier, images, labels), 4)
    classifier.save_pretrained(args.out / "classifier")
    print(f"  test accuracy {test_acc:.4f} ({report['classifier_seconds']}s)", flush=True)

    print("[2/3] DDPM", flush=True)
    start = time.perf_counter()
    unet, scheduler = train_ddpm(images, args)
    report["ddpm_seconds"] = round(time.perf_counter() - start, 1)
    report["ddpm_parameters"] = sum(p.numel() for p in unet.parameters())
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(args.out / "ddpm")

    print(f"[3/3] {args.eval_samples} samples, DDIM eta=1, {args.eval_steps} steps", flush=True)
    loaded = DDPMPipeline.from_pretrained(args.out / "ddpm")  # check what ships, not what is in memory
    start = time.perf_counter()
    samples = sample_ddim(loaded.unet, loaded.scheduler.config, args.eval_samples, args.eval_steps, 1.0,
                          torch.Generator().manual_seed(args.seed + 2))
    report["sampling_seconds"] = round(time.perf_counter() - start, 1)
    shares = digit_shares(samples, classifier)
    report["shares"] = [round(s, 4) for s in shares.tolist()]
    print("  share per digit: " + "  ".join(f"{d}:{s:.1%}" for d, s in enumerate(shares.tolist())))
    print(f"  min share {shares.min():.1%} (need >= 5%); classifier test accuracy {test_acc:.2%}")
    print(f"  classifier {report['classifier_seconds']}s, DDPM {report['ddpm_seconds']}s, "
          f"sampling {report['sampling_seconds']}s")
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.quick and shares.min() < 0.05:
        raise SystemExit(f"FAILED: a digit has share {shares.min():.1%} < 5% on {args.eval_samples} samples")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
