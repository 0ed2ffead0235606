"""Fused training calls: several timesteps of a micro-batch in one UNet call give the step-by-step gradients.

Derivation checked here: with ``K`` timesteps of ``B`` samples in one call, the fused loss is the mean over its
``K * B`` rows, ``L = (1/K) sum_j loss_j`` where ``loss_j`` is timestep ``j``'s mean over ``B`` (PPO surrogate,
REINFORCE or the weighted denoising loss). So ``backward(L * K / accumulate)`` accumulates exactly
``sum_j backward(loss_j / accumulate)``, the step-by-step loop's gradient.
"""

from __future__ import annotations

import time

import pytest
import torch

from diffrl import DDPOConfig, DDPOTrainer, DefaultDDPODDPMPipeline, DefaultDDPOStableDiffusionPipeline
from diffrl.config import ConfigError
from diffrl.recipes.memory import SavedTensorProbe, fit_timestep_chunk
from diffrl.recipes.samples import EpochSamples

from .helpers import logged_metrics, trainable_weights

MODELS = ("sd", "ddpm")
ALGORITHMS = ("ddpo_is", "ddpo_sf", "rwr")


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}


def _trainer(kind, paths, tmp_path, run, algorithm, chunk, **kw):
    base = dict(num_epochs=1, sample_num_steps=3, sample_batch_size=2, sample_num_batches_per_epoch=2,
                train_batch_size=1, train_gradient_accumulation_steps=2, mixed_precision="no",
                logdir=str(tmp_path / "logs"), run_name=run, train_learning_rate=3e-3, train_clip_range=0.2,
                seed=3, algorithm=algorithm, train_timestep_chunk=chunk, sample_guidance_scale=5.0, train_cfg=True)
    base.update(kw)
    torch.manual_seed(0)  # the same LoRA initialisation for every trainer
    if kind == "sd":
        pipe = DefaultDDPOStableDiffusionPipeline(paths["sd"], use_lora=True)
        prompt = lambda: ("a cat", {})  # noqa: E731
    else:
        pipe = DefaultDDPODDPMPipeline(paths["ddpm"])
        prompt = lambda: ("", {})  # noqa: E731
    return DDPOTrainer(DDPOConfig(**base), brightness, prompt, pipe)


@pytest.fixture
def paths(tiny_sd_path, tiny_ddpm_path):
    return {"sd": tiny_sd_path, "ddpm": tiny_ddpm_path}


def _one_epoch_of_samples(trainer) -> tuple[EpochSamples, torch.Tensor]:
    batches = trainer.recipe.sample_epoch(0, 0)[0]
    samples = EpochSamples.from_trajectories([b.samples for b in batches])
    rewards = torch.cat([b.rewards for b in batches]).numpy()
    return samples, trainer.recipe.sample_weights(rewards, [p for b in batches for p in b.prompts])


def _grads(trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainer.policy._unet.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fused_gradient_and_stats_equal_the_step_by_step_ones(paths, tmp_path, kind, algorithm):
    trainer = _trainer(kind, paths, tmp_path, "g", algorithm, 1)
    samples, weights = _one_epoch_of_samples(trainer)
    n, accumulate, idx = trainer.config.num_train_timesteps, trainer.recipe.accumulation_steps(), slice(1, 3)
    trainer.policy.train()

    trainer.optimizer.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(5)
    step_stats = []
    for j in range(n):
        loss, infos = trainer.recipe.loss(samples, weights, idx, range(j, j + 1), generator)
        (loss / accumulate).backward()
        step_stats += infos
    stepwise = _grads(trainer)

    trainer.optimizer.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(5)
    loss, fused_stats = trainer.recipe.loss(samples, weights, idx, range(0, n), generator)
    (loss * (n / accumulate)).backward()
    fused = _grads(trainer)

    assert stepwise.keys() == fused.keys() and stepwise
    assert any(g.abs().max() > 0 for g in stepwise.values())  # a real gradient, not two zeros
    # fp32 rounding only: the sums run in another order (in float64 the two agree to 4e-15, checked by hand);
    # the largest difference in float32 is ~2e-6 on gradients of ~0.04, a wrong weighting would be off by K.
    for name in stepwise:
        torch.testing.assert_close(fused[name], stepwise[name], atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    assert len(fused_stats) == len(step_stats) == n  # per-timestep stats, as the step-by-step loop logs them
    for a, b in zip(fused_stats, step_stats):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
    # The fused loss is the mean of the per-timestep losses.
    per_step = torch.stack([s["loss/policy"] for s in step_stats])
    torch.testing.assert_close(loss.detach(), per_step.mean(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fused_epoch_gives_the_step_by_step_weights(paths, tmp_path, kind, algorithm):
    results = {}
    for chunk in (1, 2, 0):  # one call per timestep; chunks of 2 and 1 of the 3 timesteps; all 3 in one call
        # lr 3e-4: Adam's first steps are near lr * sign(g), so fp32 rounding of a gradient element near 0 can move
        # a weight by up to ~lr * 2e-2 (1.9e-5 seen at lr 1e-3); at 3e-4 that stays inside the 1e-5 asked for.
        trainer = _trainer(kind, paths, tmp_path, f"c{chunk}", algorithm, chunk, train_learning_rate=3e-4)
        calls = []
        hook = trainer.policy._unet.register_forward_hook(
            lambda m, args, out: calls.append(args[0].shape[0]) if torch.is_grad_enabled() else None)
        before = trainable_weights(trainer)
        trainer.train()
        hook.remove()
        results[chunk] = (trainable_weights(trainer), trainer.global_step, logged_metrics(tmp_path, f"c{chunk}")[-1],
                          calls)
    reference, steps, metrics, calls = results[1]
    assert any((reference[n] - before[n]).abs().max() > 1e-4 for n in before)  # the epoch moved the weights
    rows = 2 if kind == "sd" else 1  # train_batch_size 1, doubled by classifier-free guidance on SD
    rows = 1 if algorithm == "rwr" else rows  # RWR regresses without guidance
    assert calls == [rows] * 12  # 4 micro-batches x 3 timesteps
    assert results[2][3] == [2 * rows, rows] * 4
    # automatic: the first call runs one timestep and measures it; the tiny model then fits all 3 per call
    assert results[0][3] == [rows, 2 * rows] + [3 * rows] * 3
    for chunk in (2, 0):
        weights, fused_steps, fused_metrics, _ = results[chunk]
        assert fused_steps == steps == (1 if algorithm == "ddpo_sf" else 2)
        for name in reference:
            torch.testing.assert_close(weights[name], reference[name], atol=1e-5, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
        for key in ("loss/policy", "stats/approx_kl", "stats/clipfrac", "stats/ratio"):
            if key in metrics:
                assert fused_metrics[key] == pytest.approx(metrics[key], rel=1e-3, abs=1e-6), key


@pytest.mark.parametrize("kind", MODELS)
def test_sample_batches_in_one_chain_give_the_one_chain_each_samples_and_weights(paths, tmp_path, kind):
    """DDPO sampling: an epoch's batches drawn as one chain (no gradients, the weights fixed) are the same samples as
    one chain per batch, since each sample draws its noise from its own generator; rewards are still computed per
    batch, and the epoch ends on the same weights."""
    results = {}
    for chunk in (1, 0):  # one chain per batch (TRL's loop); automatic (all of them, on the CPU)
        trainer = _trainer(kind, paths, tmp_path, f"s{chunk}", "ddpo_is", 1, sample_batch_chunk=chunk,
                           sample_num_batches_per_epoch=3, train_learning_rate=3e-4, negative_prompts="blurry,dark")
        calls, reward_batches = [], []
        trainer.policy._unet.register_forward_hook(
            lambda m, a, o: calls.append(a[0].shape[0]) if not torch.is_grad_enabled() else None)
        inner = trainer.recipe.reward_fn
        trainer.recipe.reward_fn = lambda images, prompts, meta: (reward_batches.append(len(images)), inner(images, prompts, meta))[1]
        batches = trainer.recipe.sample_epoch(0, 0)[0]
        samples = EpochSamples.from_trajectories([b.samples for b in batches])
        rewards = torch.cat([b.rewards for b in batches])
        trainer.train()
        results[chunk] = (samples, rewards, calls, reward_batches, trainable_weights(trainer))
    (one, one_rewards, one_calls, one_scored, one_w), (fused, fused_rewards, fused_calls, fused_scored, fused_w) = \
        results[1], results[0]
    for a, b in zip(fused, one):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_rewards, one_rewards, atol=1e-5, rtol=1e-5)
    rows = 2 * 2 if kind == "sd" else 2  # sample_batch_size 2, doubled by guidance on SD
    assert one_calls[:9] == [rows] * 9 and fused_calls[:3] == [3 * rows] * 3  # 3 steps x 3 batches, or 3 steps
    assert one_scored == fused_scored and set(one_scored) == {2}  # the reward sees batches of sample_batch_size
    for name in one_w:
        torch.testing.assert_close(fused_w[name], one_w[name], atol=1e-5, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("trainer_name", ["ddpo", "alignprop"])
def test_no_two_draws_of_an_epoch_share_a_random_stream(paths, tmp_path, monkeypatch, trainer_name):
    """Every generator a DDPO or AlignProp epoch makes (each sample's noise, the shuffle, the truncation plans) has its
    own seed. A sample's noise once shared the shuffle's stream, which slowed the DDPO quickstart from 94% to 67%."""
    import diffrl.recipes.alignprop as alignprop_module
    import diffrl.recipes.ddpo as ddpo_module
    from diffrl import AlignPropConfig, AlignPropTrainer

    module = ddpo_module if trainer_name == "ddpo" else alignprop_module
    seeds = []
    real = module.generator_for

    def recording(*parts):
        generator = real(*parts)
        seeds.append(generator.initial_seed() % 2**32)  # torch's CPU generator seeds mt19937 with 32 bits
        return generator

    monkeypatch.setattr(module, "generator_for", recording)
    if trainer_name == "ddpo":
        trainer = _trainer("ddpm", paths, tmp_path, "streams", "ddpo_is", 0)
    else:
        config = AlignPropConfig(num_epochs=1, sample_num_steps=3, train_batch_size=2, train_gradient_accumulation_steps=2,
                                 mixed_precision="no", logdir=str(tmp_path / "logs"), run_name="streams", seed=3,
                                 truncation="random", truncated_rand_backprop_minmax=(0, 2), save_freq=10)
        trainer = AlignPropTrainer(config, brightness, lambda: ("", {}), DefaultDDPODDPMPipeline(paths["ddpm"]))
    trainer.train()
    assert len(seeds) >= 5 and len(set(seeds)) == len(seeds), sorted(seeds)


def test_chunk_setting_is_checked_and_fitted():
    with pytest.raises(ConfigError, match="train_timestep_chunk"):
        DDPOConfig(train_timestep_chunk=-1).validate()
    assert fit_timestep_chunk(100, 1000, 20) == 5  # half of 1000 bytes at 100 per timestep
    assert fit_timestep_chunk(100, 10, 20) == 1 and fit_timestep_chunk(1, 10**9, 20) == 20
    assert fit_timestep_chunk(0, 10, 7) == 7


def test_the_cpu_probe_counts_the_activations_a_call_keeps_not_the_weights(monkeypatch):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.SiLU(), torch.nn.Linear(256, 64))
    measured = {}
    for rows in (8, 16):
        with SavedTensorProbe(net) as probe:
            net(torch.randn(rows, 64)).square().sum().backward()
        measured[rows] = probe.bytes
    # per row: the input (64) kept by the first Linear, its output (256) by SiLU, SiLU's output (256) by the second
    # Linear, the output (64) by square: 640 floats; the weights (~33k floats) are not counted
    assert measured[8] == 8 * 640 * 4 and measured[16] == 2 * measured[8]
    monkeypatch.setattr("psutil.virtual_memory", lambda: type("M", (), {"available": 10 * measured[8]})())
    assert probe.fit(20) == 2  # half of 10 calls' worth of the 16-row call (2x the 8-row bytes) is 2.5 -> 2


def test_draft_lv_draws_run_in_one_unet_call(tiny_sd_path):
    """AlignProp/DRaFT: the steps that carry gradients are sequential in the chain, so only DRaFT-LV's ``n``
    re-noised draws of the last step can share a call, and they do (one call of ``2 n B`` rows with CFG)."""
    from diffrl.algorithms.truncation import plan_gradients
    from diffrl.pipelines import StableDiffusionPolicy

    policy = StableDiffusionPolicy.from_pretrained(tiny_sd_path)
    calls = []
    policy._unet.register_forward_hook(lambda m, a, o: calls.append((torch.is_grad_enabled(), a[0].shape[0])))
    plan = plan_gradients("draft_lv", 3, torch.Generator().manual_seed(0), draws=4)
    images = policy.sample_for_plan(["a cat", "a dog"], plan, num_inference_steps=3, guidance_scale=5.0,
                                    generator=torch.Generator().manual_seed(0))
    assert images.shape[0] == 8 and images.requires_grad
    assert [c for c in calls if c[0]] == [(True, 2 * 4 * 2)]


@pytest.mark.parametrize("truncation,extra", [("draft_k", {"draft_k": 2}), ("draft_lv", {"draft_lv_draws": 2}),
                                               ("random", {"truncated_rand_backprop_minmax": (0, 2)})])
def test_alignprop_micro_batches_in_one_chain_give_the_one_chain_each_weights(tiny_sd_path, tmp_path, truncation,
                                                                              extra):
    """AlignProp: consecutive micro-batches with equal truncation plans share one chain; the loss of ``G`` of them
    is their mean, backpropagated with weight ``G / accumulate``, so the weights after two epochs are those of one
    chain per micro-batch (TRL's loop). ``random`` draws a plan per micro-batch: only equal ones are grouped."""
    from diffrl import AlignPropConfig, AlignPropTrainer

    results = {}
    for chunk in (1, 0):  # one chain per micro-batch; automatic (all of an optimizer step's, on the CPU)
        config = AlignPropConfig(num_epochs=2, sample_num_steps=3, train_batch_size=2,
                                 train_gradient_accumulation_steps=3, mixed_precision="no",
                                 logdir=str(tmp_path / "logs"), run_name=f"m{chunk}", seed=3, truncation=truncation,
                                 train_learning_rate=1e-3, sample_guidance_scale=5.0, negative_prompts="blurry,dark,grey",
                                 train_micro_batch_chunk=chunk, save_freq=10, **extra)
        torch.manual_seed(0)
        trainer = AlignPropTrainer(config, brightness, lambda: ("a cat", {}),
                                   DefaultDDPOStableDiffusionPipeline(tiny_sd_path))
        rows = []
        trainer.policy._unet.register_forward_hook(
            lambda m, a, o: rows.append(a[0].shape[0]) if torch.is_grad_enabled() else None)
        before = trainable_weights(trainer)
        trainer.train()
        results[chunk] = (trainable_weights(trainer), logged_metrics(tmp_path, f"m{chunk}"), rows)
    (one, one_metrics, one_rows), (fused, fused_metrics, fused_rows) = results[1], results[0]
    assert any((one[n] - before[n]).abs().max() > 1e-4 for n in before)
    for name in one:
        torch.testing.assert_close(fused[name], one[name], atol=1e-5, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    for a, b in zip(fused_metrics, one_metrics):
        assert a["reward/mean"] == pytest.approx(b["reward/mean"], abs=1e-6)
        assert a["loss/reward"] == pytest.approx(b["loss/reward"], abs=1e-6)
    draws = extra.get("draft_lv_draws", 1)
    assert set(one_rows) == {2 * 2 * draws}  # 2 samples x CFG (x draws) per call
    if truncation != "random":  # equal plans: the three micro-batches of a step run as one chain
        assert set(fused_rows) == {3 * 2 * 2 * draws} and len(fused_rows) == len(one_rows) // 3
    else:
        assert len(fused_rows) <= len(one_rows) and sum(fused_rows) == sum(one_rows)


def test_micro_batches_are_grouped_by_equal_plans_up_to_the_chunk():
    from diffrl.algorithms.truncation import GradientPlan
    from diffrl.recipes.alignprop import group_equal_plans

    a, b = GradientPlan([False, True]), GradientPlan([True, True])
    assert group_equal_plans([a, a, b, a], 4) == [[0, 1], [2], [3]]
    assert group_equal_plans([a, a, a, a, a], 2) == [[0, 1], [2, 3], [4]]
    assert group_equal_plans([a, a], 1) == [[0], [1]]
    with pytest.raises(ConfigError, match="train_micro_batch_chunk"):
        from diffrl import AlignPropConfig

        AlignPropConfig(train_micro_batch_chunk=-1).validate()


@pytest.mark.slow
def test_compiled_unet_gives_the_same_loss(tiny_ddpm_path, tmp_path):
    paths = {"ddpm": tiny_ddpm_path}
    losses = {}
    for compiled in (False, True):
        trainer = _trainer("ddpm", paths, tmp_path, f"k{compiled}", "ddpo_is", 0, compile_model=compiled)
        samples, weights = _one_epoch_of_samples(trainer)
        start = time.perf_counter()
        loss, _ = trainer.recipe.loss(samples, weights, slice(0, 1), range(0, 3), torch.Generator().manual_seed(0))
        loss.backward()
        losses[compiled] = (loss.detach(), time.perf_counter() - start, samples.log_probs)
    torch.testing.assert_close(losses[True][2], losses[False][2], atol=1e-5, rtol=1e-5)  # sampling, compiled
    torch.testing.assert_close(losses[True][0], losses[False][0], atol=1e-5, rtol=1e-4)
