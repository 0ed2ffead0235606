"""The trainers users construct, with TRL's signature and method names: each is a
:class:`~diffrl.recipes.trainer.Trainer` over one recipe, and TRL's methods (``calculate_loss``,
``compute_rewards``, ``_generate_samples``, ``loss``) are thin adapters over that recipe, here and nowhere else.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Sequence

import torch

from diffrl.algorithms import ppo_clip_loss
from diffrl.config import AlignPropConfig, DDPOConfig, GRPOConfig
from diffrl.config.awm import AWMConfig
from diffrl.config.dgpo import DGPOConfig
from diffrl.config.nft import NFTConfig
from diffrl.pipelines.types import TextConditioning
from diffrl.recipes.alignprop import AlignPropRecipe
from diffrl.recipes.ddpo import DDPORecipe
from diffrl.recipes.grpo import GRPORecipe
from diffrl.recipes.awm import AWMRecipe
from diffrl.recipes.dgpo import DGPORecipe
from diffrl.recipes.nft import NFTRecipe
from diffrl.recipes.trainer import Trainer
from diffrl.rewards import score
from diffrl.seeding import Stream, generator_for

__all__ = ["AlignPropTrainer", "AWMTrainer", "DDPOTrainer", "DGPOTrainer", "GRPOTrainer", "NFTTrainer"]


class DDPOTrainer(Trainer):
    """``DDPOTrainer(config, reward_function, prompt_function, sd_pipeline, image_samples_hook=None)``, as in TRL.

    ``config.algorithm`` picks DDPO-IS (PPO clipping, the default), DDPO-SF (REINFORCE), RWR or RWR-sparse
    (:mod:`diffrl.recipes.ddpo`). The image hook gets ``[[images, prompts, prompt_metadata, rewards,
    reward_metadata], ...]`` per sample batch.
    """

    trainer_name = "DDPO"
    config_class = DDPOConfig
    recipe_class = DDPORecipe

    def loss(self, advantages: torch.Tensor, clip_range: float, ratio: torch.Tensor) -> torch.Tensor:
        """TRL's PPO surrogate on given ratios: ``mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))``."""
        return ppo_clip_loss(torch.log(ratio), torch.zeros_like(ratio), advantages, clip_range)[0]

    def calculate_loss(self, latents, timesteps, next_latents, log_probs, advantages, embeds):
        """TRL's per-step loss: returns ``(loss, approx_kl, clipfrac)``. ``embeds`` is ``[neg; pos]`` with guidance,
        as TRL passed it, or the ``conditioning`` of a sample from :meth:`_generate_samples` (any policy)."""
        c, policy = self.config, self.policy
        guided = c.train_cfg and policy.is_conditional and c.sample_guidance_scale > 1.0
        cond = None
        if policy.is_conditional and isinstance(embeds, torch.Tensor):  # TRL's [neg; pos] states
            cond = TextConditioning(*reversed(embeds.chunk(2))) if guided else TextConditioning(embeds, None)
        elif policy.is_conditional:  # a policy's own conditioning (e.g. with pooled states and time ids)
            guided = guided and embeds.negative_prompt_embeds is not None
            cond = embeds if guided else embeds.without_guidance()
        prev = policy.schedule.prev_timesteps(timesteps, c.sample_num_steps)
        step = policy.step_log_prob(latents, timesteps, prev, next_latents, cond, eta=c.sample_eta,
                                    guidance_scale=c.sample_guidance_scale if guided else 1.0)
        adv = torch.clamp(advantages, -c.train_adv_clip_max, c.train_adv_clip_max)
        loss, st = ppo_clip_loss(step.log_prob, log_probs, adv, c.train_clip_range)
        return loss, st.approx_kl, st.clipfrac

    def compute_rewards(self, prompt_image_pairs: list, is_async: bool = False) -> list:
        """TRL's method: score ``[[images, prompts, prompt_metadata], ...]``; returns ``[(rewards, metadata), ...]``
        (futures resolved)."""
        executor = self.recipe.executor
        out = []
        for images, prompts, prompt_metadata, *_ in prompt_image_pairs:
            if is_async and executor is not None:
                out.append(executor.submit(score, self.reward_fn, images, prompts, prompt_metadata))
            else:
                out.append(score(self.reward_fn, images, prompts, prompt_metadata))
        return [o.result() if isinstance(o, Future) else o for o in out]

    def _generate_samples(self, iterations: int, batch_size: int) -> tuple[list[dict], list[list]]:
        """TRL's method: ``iterations`` batches; returns TRL's sample dicts (``prompt_ids``, ``prompt_embeds``,
        ``timesteps``, ``latents``, ``next_latents``, ``log_probs``, ``negative_prompt_embeds``) and the
        ``[images, prompts, prompt_metadata]`` pairs."""
        c = self.config
        samples, pairs = [], []
        for b in range(iterations):
            prompts, prompt_meta = zip(*[self.prompt_fn() for _ in range(batch_size)])
            with torch.no_grad():
                traj = self.policy.sample(list(prompts), batch_size=batch_size, num_inference_steps=c.sample_num_steps,
                                          guidance_scale=c.sample_guidance_scale, eta=c.sample_eta,
                                          generator=generator_for(Stream.TRL_SAMPLES, c.seed, self.global_step, b),
                                          height=c.sample_height, width=c.sample_width).trajectory
            cond = traj.conditioning
            samples.append({
                "prompt_ids": _prompt_ids(self.policy, list(prompts)),
                "prompt_embeds": None if cond is None else cond.prompt_embeds,
                "timesteps": traj.timesteps, "latents": traj.latents[:, :-1], "next_latents": traj.latents[:, 1:],
                "log_probs": traj.log_probs,
                "negative_prompt_embeds": None if cond is None else cond.negative_prompt_embeds,
                "conditioning": cond,
            })
            pairs.append([traj.images, list(prompts), list(prompt_meta)])
        return samples, pairs


def _prompt_ids(policy, prompts: list[str]) -> torch.Tensor | None:
    """``[B, L]`` token ids as TRL returned them (``None`` for unconditional models)."""
    tokenizer = getattr(policy, "tokenizer", None)
    if not policy.is_conditional or tokenizer is None:
        return None
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


class AlignPropTrainer(Trainer):
    """``AlignPropTrainer(config, reward_function, prompt_function, sd_pipeline, image_samples_hook=None)``, as in TRL.

    ``config.truncation_strategy`` picks the steps that carry gradients (:mod:`diffrl.recipes.alignprop`). The
    image hook is called as ``hook({"images", "prompts", "prompt_metadata", "rewards"}, global_step, tracker)``
    with the last chain of every ``log_image_freq``-th step and the first tracker, or ``None``.
    """

    trainer_name = "AlignProp"
    config_class = AlignPropConfig
    recipe_class = AlignPropRecipe

    @property
    def last_plan(self):
        """The truncation plan of the last sampled batch."""
        return self.recipe.last_plan

    def _generate_samples(self, batch_size: int, with_grad: bool = True, prompts: Sequence[str] | None = None, *,
                          generator: torch.Generator | None = None) -> dict[str, Any]:
        """Sample ``batch_size`` images: ``{"images": [B', 3, H, W], "prompts", "prompt_metadata"}``.

        With gradients, the truncation strategy's plan for this batch (kept in :attr:`last_plan`) decides which
        steps carry them; DRaFT-LV returns ``B' = draft_lv_draws * B`` images (prompts repeated, draw-major).
        ``generator`` drives the plan's random choice and all sampling noise (default: seeded from torch's
        global RNG).
        """
        recipe = self.recipe
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        if prompts is None:
            prompts, prompt_metadata = zip(*[self.prompt_fn() for _ in range(batch_size)])
        else:
            prompt_metadata = [{} for _ in prompts]
        prompts, prompt_metadata = list(prompts), list(prompt_metadata)
        kwargs = recipe.sample_kwargs(len(prompts), generator)
        if not with_grad:
            with torch.no_grad():
                images = self.policy.sample(prompts, **kwargs).trajectory.images
            return {"images": images, "prompts": prompts, "prompt_metadata": prompt_metadata}
        plan = recipe.gradient_plan(generator)
        recipe.last_plan = plan
        images = self.policy.sample_for_plan(prompts, plan, gradient_checkpointing=self.config.gradient_checkpointing,
                                             **kwargs)
        draws = max(1, plan.renoise_draws)
        return {"images": images, "prompts": prompts * draws, "prompt_metadata": prompt_metadata * draws}

    def compute_rewards(self, prompt_image_pairs: dict[str, Any]) -> torch.Tensor:
        """TRL's method: rewards ``[B']`` of ``prompt_image_pairs``, attached to the graph."""
        return self.recipe.score_images(prompt_image_pairs)

    def calculate_loss(self, rewards: torch.Tensor) -> torch.Tensor:
        """TRL's method: ``-reward_coefficient * mean(rewards)``."""
        return self.recipe.reward_loss(rewards)

    loss = calculate_loss


class GRPOTrainer(Trainer):
    """``GRPOTrainer(config, reward_function, prompt_function, sd_pipeline, image_samples_hook=None)``
    (:mod:`diffrl.recipes.grpo`)."""

    trainer_name = "GRPO"
    config_class = GRPOConfig
    recipe_class = GRPORecipe


class NFTTrainer(Trainer):
    """``NFTTrainer(config, reward_function, prompt_function, sd_pipeline, image_samples_hook=None)``
    (:mod:`diffrl.recipes.nft`)."""

    trainer_name = "NFT"
    config_class = NFTConfig
    recipe_class = NFTRecipe


class AWMTrainer(Trainer):
    """``AWMTrainer(config, reward_function, prompt_function, sd_pipeline, image_samples_hook=None)``: Advantage
    Weighted Matching (:mod:`diffrl.recipes.awm`)."""

    trainer_name = "AWM"
    config_class = AWMConfig
    recipe_class = AWMRecipe


class DGPOTrainer(Trainer):
    """``DGPOTrainer(config, reward_function, prompt_function, sd_pipeline, image_samples_hook=None)``: Direct Group
    Preference Optimization (:mod:`diffrl.recipes.dgpo`)."""

    trainer_name = "DGPO"
    config_class = DGPOConfig
    recipe_class = DGPORecipe
