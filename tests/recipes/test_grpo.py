import random

import pytest
import torch

from diffrl import DefaultDDPODDPMPipeline, DefaultDDPOStableDiffusionPipeline, GRPOConfig, GRPOTrainer
from diffrl.config import ConfigError
from diffrl.recipes import grpo as grpo_module
from diffrl.recipes import update as update_module
from diffrl.recipes.grpo import epoch_advantages, epoch_layout, epoch_window

from .helpers import assert_same_run, interrupt_and_resume, logged_metrics


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}


def random_prompt():
    return random.choice(["a cat", "a dog", "a fox"]), {"source": "test"}


def _config(tmp_path, **kw):
    base = dict(num_epochs=2, sample_num_steps=4, prompts_per_epoch=1, group_size=4, sample_batch_size=4,
                train_batch_size=4, mixed_precision="no", logdir=str(tmp_path / "logs"), run_name="run",
                train_learning_rate=3e-3, train_clip_range=0.2, sample_guidance_scale=1.0, seed=1)
    base.update(kw)
    return GRPOConfig(**base)


class Recorder:
    """Wraps the trainer module's grpo_loss and optimizer_step: what each loss call saw, and before which update."""

    def __init__(self, monkeypatch):
        self.calls, self.updates = [], 0
        loss, step = grpo_module.grpo_loss, update_module.optimizer_step

        def recorded_loss(log_prob, old_log_prob, advantages, clip_range, kl=None, kl_coef=0.0):
            self.calls.append({"update": self.updates, "ratio": (log_prob - old_log_prob).detach().exp(),
                               "kl": None if kl is None else kl.detach().clone()})
            return loss(log_prob, old_log_prob, advantages, clip_range, kl, kl_coef)

        def counted_step(optimizer, scheduler):
            self.updates += 1
            step(optimizer, scheduler)

        monkeypatch.setattr(grpo_module, "grpo_loss", recorded_loss)
        monkeypatch.setattr(update_module, "optimizer_step", counted_step)  # UpdateLoop.step calls it


def test_ratio_is_one_and_kl_zero_before_the_first_update_then_kl_grows(tiny_ddpm_path, tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    cfg = _config(tmp_path, kl_coef=0.5, sde_window_size=2, sde_window_start=1)
    trainer = GRPOTrainer(cfg, brightness, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path))
    trainer.train()
    first = [c for c in rec.calls if c["update"] == 0]
    assert len(first) == 2  # one batch of 4 samples x the 2 window steps, then the first optimizer step
    for call in first:  # on-policy: every window step of every sample has ratio 1 in fp32
        torch.testing.assert_close(call["ratio"], torch.ones(4), rtol=0, atol=1e-5)
        assert torch.equal(call["kl"], torch.zeros(4))  # LoRA starts at the base model: KL exactly 0
    later = [c for c in rec.calls if c["update"] > 0]
    assert later and all(bool((c["kl"] > 0).all()) for c in later)
    metrics = logged_metrics(tmp_path)
    assert metrics[1]["stats/kl_ref"] > 0 and metrics[0]["stats/window_size"] == 2
    assert {"stats/ratio", "stats/clipfrac", "loss/policy", "reward/group_std", "perf/wall_s"} <= set(metrics[0])


def test_unet_runs_with_autograd_only_at_window_steps(tiny_ddpm_path, tmp_path):
    cfg = _config(tmp_path, sde_window_size=2, sde_window_schedule="sliding", sde_window_start=1, group_size=8,
                  sample_batch_size=4, train_batch_size=2)
    trainer = GRPOTrainer(cfg, brightness, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path))
    calls = []
    trainer.policy.trainable_module.register_forward_hook(
        lambda module, args, output: calls.append((torch.is_grad_enabled(), args[1].flatten().tolist())))
    timesteps = trainer.policy.schedule.timesteps(4).tolist()
    for epoch in range(2):
        calls.clear()
        trainer.global_step = trainer.step(epoch, trainer.global_step)
        window = epoch_window(cfg, epoch)
        assert window == [i in (1 + epoch, 2 + epoch) for i in range(4)]  # the sliding window moved by one
        trained = {t for t, flag in zip(timesteps, window) if flag}
        with_grad = [ts for grad, ts in calls if grad]
        assert len(with_grad) == 8 // 2 * 2  # 4 training batches x 2 window steps
        assert {t for ts in with_grad for t in ts} == trained
        assert sum(not grad for grad, _ in calls) == 2 * 4  # sampling: 2 batches x 4 steps, without autograd


def test_groups_split_over_two_processes_get_the_single_process_advantages(tiny_ddpm_path, tmp_path):
    cfg = _config(tmp_path, prompts_per_epoch=3, group_size=4, sample_batch_size=2, train_batch_size=2,
                  group_shared_noise=True)
    trainer = GRPOTrainer(cfg, brightness, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path))
    prompts, window = trainer.recipe.epoch_prompts(), epoch_window(cfg, 0)

    def rewards_of(layout):
        return torch.cat([b.rewards for b in trainer.recipe.sample_batches(0, 0, layout, prompts, window)[0]])

    single = epoch_layout(3, 4, 1, 0)
    halves = [epoch_layout(3, 4, 2, r) for r in (0, 1)]
    assert set(halves[0].group_ids.tolist()) & set(halves[1].group_ids.tolist()) == {1}  # group 1 is split
    all_rewards = rewards_of(single)
    # Sample i's noise depends on (seed, epoch, i) only: the two processes draw the single process's samples.
    torch.testing.assert_close(torch.cat([rewards_of(h) for h in halves]), all_rewards, rtol=0, atol=0)
    split = torch.cat([epoch_advantages(all_rewards, cfg, r, 2) for r in (0, 1)])
    groups = all_rewards.double().reshape(3, 4)
    by_hand = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, correction=0, keepdim=True) + cfg.adv_eps)
    torch.testing.assert_close(split, epoch_advantages(all_rewards, cfg, 0, 1), rtol=0, atol=0)
    torch.testing.assert_close(split.double(), by_hand.flatten(), rtol=1e-5, atol=1e-6)
    # group_shared_noise: one x_T per group, different between groups.
    x_T = torch.cat([b.samples.latents[:, 0] for b in trainer.recipe.sample_batches(0, 0, single, prompts, window)[0]])
    assert torch.equal(x_T[0], x_T[3]) and not torch.equal(x_T[3], x_T[4])


def test_cfg_free_text_training_and_the_reference_is_the_base_model(tiny_sd_path, tmp_path, monkeypatch):
    from diffrl.pipelines import StableDiffusionPolicy

    rec = Recorder(monkeypatch)
    torch.manual_seed(0)
    cfg = _config(tmp_path, prompts_per_epoch=2, group_size=2, train_cfg=False, sample_guidance_scale=1.0,
                  kl_coef=0.1, sde_window_size=1, sde_window_schedule="random", eval_every=1, eval_num_samples=4,
                  eval_num_steps=2)
    trainer = GRPOTrainer(cfg, brightness, random_prompt, DefaultDDPOStableDiffusionPipeline(tiny_sd_path))
    trainer.train()
    torch.testing.assert_close(rec.calls[0]["ratio"], torch.ones(4), rtol=0, atol=1e-5)
    policy = trainer.policy
    base = StableDiffusionPolicy.from_pretrained(tiny_sd_path, use_lora=False)
    x = torch.randn(2, *policy._latent_shape(2, None, None)[1:], generator=torch.Generator().manual_seed(3))
    t = torch.tensor([500, 100])
    cond = base.encode_prompts(["a cat", "a dog"], None, guidance=False)
    reference = policy.predict(x, t, cond, 1.0, params=policy.reference_params())
    torch.testing.assert_close(reference, base.predict(x, t, cond, 1.0), rtol=0, atol=1e-6)
    assert (policy.predict(x, t, cond, 1.0) - reference).abs().max() > 1e-6  # the adapters did train
    assert "eval/reward_mean" in logged_metrics(tmp_path)[-1]


@pytest.mark.parametrize("ratio_norm", [False, True])
def test_resume_matches_an_uninterrupted_run(tiny_ddpm_path, tmp_path, ratio_norm):
    """Also with GRPO-Guard's ratio, whose recorded sampling means live within an epoch (never checkpointed)."""
    def make(run_name, **kw):
        random.seed(0)
        torch.manual_seed(0)  # LoRA's random init happens when the pipeline is built
        cfg = _config(tmp_path, num_epochs=3, run_name=run_name, prompts_per_epoch=2, group_size=2,
                      sample_batch_size=2, train_batch_size=2, kl_coef=0.1, sde_window_size=2, group_shared_noise=True,
                      sde_window_schedule="random", train_num_inner_epochs=2, ratio_norm=ratio_norm, **kw)
        return GRPOTrainer(cfg, brightness, random_prompt, DefaultDDPODDPMPipeline(tiny_ddpm_path))

    straight = make("straight")
    straight.train()
    interrupted, resumed = interrupt_and_resume(make, tmp_path, stop_after=2)
    resumed.train()
    assert_same_run(straight, resumed, tmp_path)


def test_full_fine_tuning_reference_and_multi_reward(tiny_ddpm_path, tmp_path):
    from diffrl.rewards import WeightedSum

    def darkness(images, prompts, metadata):
        return 10 * (1 - images.mean(dim=(1, 2, 3))), {}

    darkness.differentiable = True
    bright = lambda images, prompts, metadata: brightness(images, prompts, metadata)  # noqa: E731
    bright.differentiable = True
    reward = WeightedSum([("bright", bright, 1.0), ("dark", darkness, 0.5)])
    cfg = _config(tmp_path, train_lora=False, kl_coef=0.1, multi_reward=True)
    trainer = GRPOTrainer(cfg, reward, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path, use_lora=False))
    batches = trainer.recipe.sample_batches(0, 0, epoch_layout(1, 4, 1, 0), trainer.recipe.epoch_prompts(), epoch_window(cfg, 0))[0]
    adv = trainer.recipe.advantages(torch.cat([b.rewards for b in batches]), batches)
    values = batches[0].reward_metadata["components"]["bright"].double()

    def norm(r):
        return (r - r.mean()) / (r.std(correction=0) + cfg.adv_eps)

    # Each component normalised on its own, then weighted: 1 x A(bright) + 0.5 x A(10 (1 - bright)).
    torch.testing.assert_close(adv.double(), norm(values) + 0.5 * norm(10 * (1 - values)), rtol=1e-4, atol=1e-5)
    initial = {n: p.detach().clone() for n, p in trainer.policy.trainable_module.named_parameters()}
    trainer.train()
    reference = trainer.policy.reference_params()
    assert all(torch.equal(reference[n].cpu(), initial[n]) for n in reference)
    kl = [m["stats/kl_ref"] for m in logged_metrics(tmp_path)]
    assert kl[0] == 0 and kl[1] > 0  # one update per epoch: the frozen copy differs from epoch 1 on
    with pytest.raises(ValueError, match="multi_reward=true needs a combined reward"):
        GRPOTrainer(_config(tmp_path, multi_reward=True), brightness, lambda: ("", {}),
                    DefaultDDPODDPMPipeline(tiny_ddpm_path))


def test_impossible_settings_are_refused_with_the_fix():
    with pytest.raises(ConfigError) as err:
        GRPOConfig(mixed_precision="no", sample_num_steps=10, sde_window_size=12, group_size=1, prompts_per_epoch=3,
                   sample_batch_size=4, train_cfg=False, sample_guidance_scale=5.0).validate(num_processes=2)
    text = str(err.value)
    for expected in ("sde_window_size=12", "sample_num_steps=10", "group_size=1", "group_size >= 2",
                     "do not split over 2 processes", "train_cfg=False", "sample_guidance_scale=1"):
        assert expected in text, expected
    with pytest.raises(ConfigError) as err:
        GRPOConfig(mixed_precision="no", sample_num_steps=10, sde_window_size=4, sde_window_start=8,
                   prompts_per_epoch=2, group_size=6, sample_batch_size=4, train_batch_size=4,
                   sample_eta=0.0).validate(num_processes=2)
    text = str(err.value)
    for expected in ("sde_window_start=8", "[0, 6]", "sample_batch_size=4", "divisor of 6", "train_batch_size=4",
                     "sample_eta=0.0"):
        assert expected in text, expected
    with pytest.raises(ConfigError, match="train_timestep_fraction=0.5: unknown field of GRPOConfig: GRPO trains "
                                          r"the steps of its window \(set sde_window_size\)"):
        GRPOConfig.from_dict({"train_timestep_fraction": 0.5})  # a DDPO setting: not a GRPO field at all
    GRPOConfig(mixed_precision="no", prompts_per_epoch=3, group_size=4, sample_batch_size=6,
               train_batch_size=3).validate(num_processes=2)  # groups may straddle processes
    with pytest.raises(ConfigError) as err:  # DDPO's speed settings, which GRPO's loop would silently ignore
        GRPOConfig.from_dict({"sample_batch_chunk": 1, "compile_model": True})
    assert [v.field for v in err.value.violations] == ["sample_batch_chunk", "compile_model"]
    assert all("samples its batches one chain at a time" in v.problem for v in err.value.violations)
    assert GRPOConfig.from_dict({"train_timestep_chunk": 2}).train_timestep_chunk == 2  # GRPO's fused calls


def test_diffrl_train_algorithm_grpo_runs_the_digits_preset(tmp_path, capsys):
    from diffrl.cli import main

    assert main(["train", "algorithm=grpo", "num_epochs=1", "sample_num_steps=4", "eval_num_samples=16",
                 "group_size=16", "sample_batch_size=16", "train_batch_size=16", f"logdir={tmp_path}",
                 "run_name=g"]) == 0
    run = tmp_path / "g"
    assert (run / "summary.json").is_file() and (run / "final").is_dir()
    assert "GRPOTrainer" in (run / "summary.json").read_text()
    assert "trainer: grpo" in (run / "config.yaml").read_text()


def test_kl_trust_region_is_zero_on_policy_then_bounds_the_updates(tiny_ddpm_path, tmp_path, monkeypatch):
    """trust_region=kl_penalty: the sampling means are recorded with the trajectory; at the first update the exact
    step KL to them is 0 and the ratio 1; later updates see KL > 0; no ratio clipping is applied."""
    from diffrl.algorithms import trust_region as tr_math

    seen = []
    real = grpo_module.trust_region_loss

    def recording(log_prob, old, adv, kl_old, mode, **kw):
        seen.append(((log_prob - old).detach().exp(), kl_old.detach().clone(), mode, kw))
        return real(log_prob, old, adv, kl_old, mode, **kw)

    monkeypatch.setattr(grpo_module, "trust_region_loss", recording)
    cfg = _config(tmp_path, trust_region="kl_penalty", trust_region_coef=10.0, sde_window_size=2,
                  sde_window_start=1, kl_coef=0.1, train_clip_range=1e-4,  # the default: no clipping to set
                  train_num_inner_epochs=2)  # the second pass sees weights moved by the first
    trainer = GRPOTrainer(cfg, brightness, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path))
    trainer.train()
    ratio, kl_old, mode, kw = seen[0]
    assert mode == "kl_penalty" and kw["coef"] == 10.0
    assert torch.equal(kl_old, torch.zeros(4)) and torch.equal(ratio, torch.ones(4))
    assert any(bool((k > 0).all()) for _, k, _, _ in seen[2:])
    rows = logged_metrics(tmp_path)
    assert rows[-1]["stats/kl_old"] > 0 and "stats/clipfrac" not in rows[-1] and rows[-1]["stats/kl_ref"] > 0
    assert tr_math.TRUST_REGIONS == ("clip", "kl_penalty", "kl_mask")


def test_kl_mask_runs_and_logs_the_masked_fraction(tiny_ddpm_path, tmp_path):
    cfg = _config(tmp_path, trust_region="kl_mask", trust_region_max_kl=1e-9, num_epochs=2, train_clip_range=1e-4,
                  train_num_inner_epochs=2)
    trainer = GRPOTrainer(cfg, brightness, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path))
    trainer.train()
    rows = logged_metrics(tmp_path)
    assert rows[0]["stats/masked"] >= 0 and rows[-1]["stats/masked"] > 0  # a tiny bound: later steps hit it


def test_ratio_norm_is_one_on_policy_and_weights_each_step_by_its_inverse_gain(tiny_ddpm_path, tmp_path, monkeypatch):
    """ratio_norm=true (GRPO-Guard): the sampling means are recorded; at the first update the normalised ratio is
    exactly 1 and the step KL 0; each row's weight is 1 / the DDIM step's gain at its timestep; later passes see the
    KL grow; the clip fraction and the raw ratio are logged."""
    seen = []
    real = grpo_module.ratio_norm_loss

    def recording(log_prob, old, adv, kl_old, std, clip_range, weight=None):
        loss, st = real(log_prob, old, adv, kl_old, std, clip_range, weight)
        if log_prob.requires_grad:
            seen.append((st.ratio, kl_old.detach().clone(), weight.clone(), std.clone()))
        return loss, st

    monkeypatch.setattr(grpo_module, "ratio_norm_loss", recording)
    cfg = _config(tmp_path, ratio_norm=True, sde_window_size=2, sde_window_start=1, train_num_inner_epochs=2,
                  train_timestep_chunk=2)
    trainer = GRPOTrainer(cfg, brightness, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path))
    trainer.train()
    ratio, kl_old, weight, std = seen[0]
    assert float(ratio) == 1.0 and torch.equal(kl_old, torch.zeros(8)) and bool((std > 0).all())
    schedule = trainer.policy.schedule
    t = schedule.timesteps(4)
    gains = schedule.output_gain(t, schedule.prev_timesteps(t, 4))[1:3]  # the window: steps 1 and 2, 4 rows each
    # the rows' timesteps are shuffled per sample (as DDPO's); each row carries its own step's weight
    torch.testing.assert_close(weight.sort().values, (1 / gains).repeat_interleave(4).sort().values)
    assert not torch.allclose(gains[0], gains[1])
    assert any(bool((k > 0).any()) for _, k, _, _ in seen[1:])
    row = logged_metrics(tmp_path)[-1]
    assert row["stats/kl_old"] > 0 and "stats/clipfrac" in row and row["stats/raw_ratio"] > 0


def test_fused_window_steps_train_as_one_call_per_step(tiny_ddpm_path, tmp_path, monkeypatch):
    """train_timestep_chunk=2 runs two window steps in one model call of 2B rows; the loss is the mean of the
    step-by-step losses, so the gradient of the first optimizer step equals the one-call-per-step run's."""
    calls, grads = {}, {}
    step = update_module.optimizer_step
    for chunk in (1, 2):
        seen = []

        def captured(optimizer, scheduler):
            seen.append([p.grad.detach().clone() for group in optimizer.param_groups for p in group["params"]])
            step(optimizer, scheduler)

        monkeypatch.setattr(update_module, "optimizer_step", captured)
        cfg = _config(tmp_path, run_name=f"chunk{chunk}", train_timestep_chunk=chunk, sde_window_size=2,
                      sde_window_start=1, kl_coef=0.1, train_lora=False, num_epochs=1, train_batch_size=2)
        trainer = GRPOTrainer(cfg, brightness, lambda: ("", {}),
                              DefaultDDPODDPMPipeline(tiny_ddpm_path, use_lora=False))
        shapes = []
        trainer.policy.trainable_module.register_forward_hook(
            lambda module, args, output: shapes.append((torch.is_grad_enabled(), args[0].shape[0])))
        trainer.train()
        calls[chunk] = [n for grad, n in shapes if grad]
        grads[chunk] = seen[0]
    assert set(calls[1]) == {2} and set(calls[2]) == {4}  # a micro-batch of 2 at 1 step, or at both steps at once
    assert len(calls[2]) * 2 == len(calls[1])
    for a, b in zip(grads[1], grads[2]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    m1, m2 = logged_metrics(tmp_path, "chunk1"), logged_metrics(tmp_path, "chunk2")
    for key in ("loss/policy", "stats/ratio", "stats/kl_ref"):
        assert m2[0][key] == pytest.approx(m1[0][key], rel=1e-4, abs=1e-7), key


@pytest.mark.parametrize("override,needle", [
    ({"trust_region": "kl_penalty", "train_clip_range": 0.2}, "train_clip_range=0.2: has no effect with "
                                                              "trust_region='kl_penalty'"),
    ({"trust_region_coef": 5.0}, "trust_region_coef=5.0: has no effect with trust_region='clip'"),
    ({"trust_region": "kl_mask", "trust_region_max_kl": 0.0}, "trust_region_max_kl=0.0"),
    ({"train_timestep_chunk": 0}, "train_timestep_chunk=0"),
    ({"ratio_norm": True, "trust_region": "kl_mask", "train_clip_range": 1e-4},
     "ratio_norm=True: normalises the ratio that PPO clips; trust_region='kl_mask' does not clip it"),
    ({"ratio_norm_reweight": False}, "ratio_norm_reweight=False: has no effect without ratio_norm"),
])
def test_bad_trust_region_settings_are_named(tmp_path, override, needle):
    base = dict(mixed_precision="no", prompts_per_epoch=1, group_size=4, sample_batch_size=4, train_batch_size=4)
    with pytest.raises(ConfigError) as err:
        GRPOConfig(**{**base, **override}).validate()
    assert needle in str(err.value)
