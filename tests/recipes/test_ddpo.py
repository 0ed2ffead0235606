import itertools
import random

import numpy as np
import pytest
import torch

from diffrl import DDPOConfig, DDPOTrainer, DefaultDDPODDPMPipeline, DefaultDDPOStableDiffusionPipeline, prompts, rewards
from diffrl.config import ConfigError
from diffrl.rewards import RewardError

from .helpers import assert_same_run, interrupt_and_resume, logged_metrics, trainable_weights


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}


def _config(tmp_path, **kw):
    base = dict(num_epochs=2, sample_num_steps=3, sample_batch_size=2, sample_num_batches_per_epoch=2,
                train_batch_size=2, mixed_precision="no", logdir=str(tmp_path / "logs"), run_name="run",
                train_learning_rate=3e-3, train_clip_range=0.2, seed=1)
    base.update(kw)
    return DDPOConfig(**base)


@pytest.mark.parametrize("algorithm,extra", [
    ("ddpo_is", {}),
    ("ddpo_sf", {}),
    ("rwr", {"rwr_temperature": 0.5}),
    ("rwr_sparse", {"rwr_sparse_percentile": 50.0}),
])
def test_each_algorithm_trains_a_ddpm(tiny_ddpm_path, tmp_path, algorithm, extra):
    pipe = DefaultDDPODDPMPipeline(tiny_ddpm_path)
    trainer = DDPOTrainer(_config(tmp_path, algorithm=algorithm, **extra), brightness, lambda: ("", {}), pipe)
    before = trainable_weights(trainer)
    trainer.train()
    after = trainable_weights(trainer)
    assert any((after[n] - before[n]).abs().max() > 0 for n in before)
    metrics = logged_metrics(tmp_path)
    assert [m["epoch"] for m in metrics] == [0, 1]
    assert {"reward/mean", "reward/std", "loss/policy", "perf/samples_per_s"} <= set(metrics[-1])
    if algorithm.startswith("ddpo"):
        assert {"stats/approx_kl", "stats/clipfrac", "stats/ratio"} <= set(metrics[-1])
    if algorithm == "ddpo_sf":  # one update per epoch
        assert trainer.global_step == 2


def test_trl_example_runs_unchanged_but_for_the_import(tiny_sd_path, tmp_path):
    # The structure of TRL's DDPO example: config, reward function, prompt function, pipeline, image hook.
    from PIL import Image

    seen = []

    def image_outputs_hook(image_data, global_step, accelerate_logger):
        result = {}
        images, prompts, _, rewards, _ = image_data[-1]
        for i, image in enumerate(images):
            pil = Image.fromarray((image.cpu().numpy().transpose(1, 2, 0) * 255).astype(np.uint8))
            result[f"{prompts[i]:.25} | {rewards[i]:.2f}"] = [pil.resize((32, 32))]
        seen.append((global_step, type(accelerate_logger).__name__, len(result)))
        accelerate_logger.log_images(result, step=global_step)  # what TRL's example does with its tracker

    config = DDPOConfig(num_epochs=1, sample_num_steps=2, sample_batch_size=2, sample_num_batches_per_epoch=1,
                        train_batch_size=1, train_gradient_accumulation_steps=1, mixed_precision="no",
                        logdir=str(tmp_path / "logs"), per_prompt_stat_tracking=True,
                        per_prompt_stat_tracking_buffer_size=4, per_prompt_stat_tracking_min_count=2)
    pipeline = DefaultDDPOStableDiffusionPipeline(tiny_sd_path, pretrained_model_revision="main", use_lora=True)
    animals = itertools.cycle(["cat", "dog"])  # two different prompts, so the example's two captions differ
    trainer = DDPOTrainer(config, brightness, lambda: (f"a {next(animals)}", {}), pipeline,
                          image_samples_hook=image_outputs_hook)
    trainer.train()
    # No tracker: instead of TRL's IndexError (or None, which the example's log_images call cannot take), the
    # hook gets a tracker that saves the images in the run folder.
    assert seen == [(0, "ImageFolderTracker", 2)]
    assert len(list(trainer.run_dir.glob("images/step_0/*.png"))) == 2
    trainer.save_pretrained(str(tmp_path / "final"))
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert "## Final metrics" in (tmp_path / "final" / "README.md").read_text()
    assert list((tmp_path / "logs").iterdir())[0].name.startswith(config.exp_name)


def test_resume_matches_an_uninterrupted_run(tiny_sd_path, tmp_path):
    scored: dict[str, list[str]] = {"straight": [], "split": []}

    def make(run_name, **kw):
        random.seed(0)
        torch.manual_seed(0)  # LoRA's random init happens when the pipeline is built
        pipe = DefaultDDPOStableDiffusionPipeline(tiny_sd_path)
        cfg = _config(tmp_path, num_epochs=3, run_name=run_name, per_prompt_stat_tracking=True,
                      per_prompt_stat_tracking_buffer_size=8, per_prompt_stat_tracking_min_count=2,
                      train_num_inner_epochs=2, **kw)

        def reward(images, prompts, metadata):
            scored[run_name].extend(prompts)
            return brightness(images, prompts, metadata)

        # the built-in source a user passes (a fresh one per process start, as after a preemption)
        return DDPOTrainer(cfg, reward, prompts.simple_animals(seed=3), pipe)

    straight = make("straight")
    straight.train()
    interrupted, resumed = interrupt_and_resume(make, tmp_path, stop_after=2)
    resumed.train()
    assert_same_run(straight, resumed, tmp_path)
    assert resumed.global_step == straight.global_step
    # the resumed run scored the prompts the uninterrupted one scored in its last epoch (the stream's position
    # is in the checkpoint), not the stream's start again
    assert len(scored["split"]) == len(scored["straight"]) == 3 * 4
    assert scored["split"] == scored["straight"] and scored["straight"][8:] != scored["straight"][:4]


def test_checkpoints_are_rotated(tiny_ddpm_path, tmp_path):
    trainer = DDPOTrainer(_config(tmp_path, num_epochs=3, num_checkpoint_limit=2), brightness, lambda: ("", {}),
                          DefaultDDPODDPMPipeline(tiny_ddpm_path))
    trainer.train()
    names = sorted(p.name for p in (tmp_path / "logs" / "run" / "checkpoints").iterdir())
    assert names == ["checkpoint_1", "checkpoint_2"]


def test_a_failed_save_leaves_no_partial_result(tiny_ddpm_path, tmp_path, monkeypatch):
    trainer = DDPOTrainer(_config(tmp_path), brightness, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path))
    policy_save = type(trainer.policy).save_pretrained

    def fail_halfway(self, directory):
        policy_save(self, directory)  # the weights are written, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(type(trainer.policy), "save_pretrained", fail_halfway)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_pretrained(str(tmp_path / "out" / "final"))
    assert list((tmp_path / "out").iterdir()) == []  # neither a half 'final' nor the temporary folder
    monkeypatch.undo()
    trainer.save_pretrained(str(tmp_path / "out" / "final"))
    assert {"adapter_model.safetensors", "diffrl_model.json", "README.md"} <= {
        p.name for p in (tmp_path / "out" / "final").iterdir()}


def test_async_rewards_give_the_same_run(tiny_ddpm_path, tmp_path):
    results = []
    for run_async in (False, True):
        # one chain per batch in both (async scoring keeps that by default; fused chains round differently)
        cfg = _config(tmp_path, run_name=f"async{run_async}", async_reward_computation=run_async, sample_batch_chunk=1)
        trainer = DDPOTrainer(cfg, brightness, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path))
        trainer.train()
        results.append(trainable_weights(trainer))
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name])


def test_bad_config_fails_before_training(tiny_ddpm_path, tmp_path):
    pipe = DefaultDDPODDPMPipeline(tiny_ddpm_path)
    with pytest.raises(ConfigError) as err:
        DDPOTrainer(_config(tmp_path, sample_batch_size=3, train_batch_size=2, train_timestep_fraction=1.5),
                    brightness, lambda: ("", {}), pipe)
    text = str(err.value)
    assert "sample_batch_size" in text and "train_timestep_fraction" in text and "1.5" in text


@pytest.mark.parametrize("bad,match", [
    (lambda im, p, m: (torch.full((im.shape[0],), float("nan")), {}), "non-finite"),
    (lambda im, p, m: (torch.zeros(im.shape[0], 2), {}), "shape"),
    (lambda im, p, m: torch.zeros(im.shape[0]), "must return \\(rewards, metadata\\)"),
])
def test_bad_rewards_name_the_function(tiny_ddpm_path, tmp_path, bad, match):
    trainer = DDPOTrainer(_config(tmp_path), bad, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path))
    with pytest.raises(RewardError, match=match) as err:
        trainer.train()
    assert "lambda" in str(err.value)


def test_push_to_hub_uploads_the_result_and_never_shows_the_token(tiny_ddpm_path, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    uploads = []

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, exist_ok=False, private=None):
            uploads.append(("create", repo_id, self.token))

        def upload_folder(self, folder_path, repo_id, commit_message):
            from pathlib import Path

            uploads.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return type("Info", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_123")
    trainer = DDPOTrainer(_config(tmp_path, num_epochs=1), brightness, lambda: ("", {}),
                          DefaultDDPODDPMPipeline(tiny_ddpm_path))
    trainer.train()
    url = trainer.push_to_hub("someone/digits")
    assert url.endswith("someone/digits/commit/1")
    assert uploads[0] == ("create", "someone/digits", "hf_secret_token_123")
    assert {"adapter_model.safetensors", "README.md", "diffrl_model.json"} <= set(uploads[1][2])
    out = capsys.readouterr()
    logged = "".join(p.read_text() for p in (tmp_path / "logs").rglob("*") if p.is_file() and p.suffix in {".json", ".jsonl", ".yaml", ".md"})
    assert "hf_secret_token_123" not in out.out + out.err + logged


def test_eval_prompts_are_a_held_out_set_scored_by_training_time_evaluation(tiny_ddpm_path, tmp_path):
    scored: list[str] = []

    def reward(images, prompts, metadata):
        scored.extend(prompts)
        return brightness(images, prompts, metadata)

    config = _config(tmp_path, num_epochs=1, eval_every=1, eval_num_samples=4, eval_prompts="fixed",
                     eval_prompt_options={"prompts": ["held out a", "held out b"]})
    trainer = DDPOTrainer(config, reward, prompts.load("fixed", prompts=["train"]),
                          DefaultDDPODDPMPipeline(tiny_ddpm_path))
    trainer.train()
    assert trainer.run.evaluator.prompts == ["held out a", "held out b", "held out a", "held out b"]
    assert scored.count("train") == 4 and scored.count("held out a") == 2  # training draws never the held-out set
    assert "eval/reward_mean" in logged_metrics(tmp_path)[-1]


class RecordingTracker:
    """Stands in for a W&B/TensorBoard tracker: what the run logs to it."""

    name = "recording"

    def __init__(self) -> None:
        self.images: list[tuple[str, int, tuple]] = []
        self.metrics: list[dict] = []

    def log(self, values, step=None, **kwargs):
        self.metrics.append(dict(values))

    def log_images(self, values, step=None, **kwargs):
        self.images += [(key, step, tuple(value.shape)) for key, value in values.items()]


def test_trackers_get_fixed_image_keys_evaluation_images_and_reward_components(tiny_ddpm_path, tmp_path):
    reward = rewards.load("combined", components=[
        {"reward": brightness_reward(), "key": "bright", "weight": 2.0},
        {"reward": brightness_reward(-1.0), "key": "dark", "weight": 1.0}])
    config = _config(tmp_path, num_epochs=2, eval_every=1, eval_num_samples=4)
    trainer = DDPOTrainer(config, reward, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path))
    tracker = RecordingTracker()
    trainer.accelerator.trackers.append(tracker)
    trainer.train()
    keys = [key for key, _, _ in tracker.images]
    # one key per kind of picture (one dashboard panel), not one per prompt and reward
    assert set(keys) == {"samples/last_batch", "eval/samples"} and keys.count("samples/last_batch") == 2
    assert ("eval/samples", 2, (4, 3, 8, 8)) in tracker.images  # at the epoch's global step
    rows = logged_metrics(tmp_path)
    for row in rows:
        assert row["reward/bright/mean"] == pytest.approx(-row["reward/dark/mean"], abs=1e-6)
        assert row["reward/mean"] == pytest.approx(row["reward/bright/mean"], abs=1e-5)  # 2 b - b
        assert row["eval/bright/mean"] > 0


def brightness_reward(sign: float = 1.0):
    def reward(images, prompts, metadata):
        return sign * images.mean(dim=(1, 2, 3)), {}
    reward.differentiable = True
    return reward


def test_tracker_runs_are_named_after_the_run_folder_unless_the_user_names_them():
    from diffrl.recipes.run import tracker_init_kwargs

    merged = tracker_init_kwargs({"wandb": {"entity": "me"}, "mlflow": {"run_name": "mine"}}, "ddpo_2026.12.06")
    assert merged["wandb"] == {"entity": "me", "name": "ddpo_2026.12.06"} and merged["mlflow"]["run_name"] == "mine"
    assert DDPOConfig().tracker_project_name == "diffrl"


def test_stop_below_ends_a_collapsing_run_with_the_reason_and_a_usable_result(tiny_ddpm_path, tmp_path, capsys):
    config = _config(tmp_path, num_epochs=5, eval_every=1, eval_num_samples=4, stop_below={"eval/diversity": 10.0},
                     stop_above={"eval/dark_fraction": 2.0})
    trainer = DDPOTrainer(config, brightness, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path))
    trainer.train()
    rows = logged_metrics(tmp_path)
    assert len(rows) == 1 and {"eval/brightness", "eval/dark_fraction", "eval/colour_entropy"} <= set(rows[0])
    assert trainer.stop_reason.startswith("eval/diversity=") and "fell below 10 (stop_below)" in trainer.stop_reason
    assert "stopped after epoch 0: eval/diversity=" in capsys.readouterr().out
    assert (tmp_path / "logs" / "run" / "checkpoints" / "checkpoint_0").is_dir()  # the epoch's checkpoint first
    with pytest.raises(ConfigError, match="stop_below.reward/mean.*is not an evaluation metric"):
        DDPOConfig(stop_below={"reward/mean": 0.0}, eval_every=1).validate()
    with pytest.raises(ConfigError, match="stop_above=.*: needs evaluations to watch"):
        DDPOConfig(stop_above={"eval/dark_fraction": 0.5}).validate()


def test_eval_rewards_score_the_evaluation_images_held_out(tiny_ddpm_path, tmp_path, capsys):
    from diffrl.cli import main

    config = _config(tmp_path, num_epochs=1, eval_every=1, eval_num_samples=4,
                     eval_rewards={"jpeg_compressibility": None, "digit": {"digit": 7}})
    trainer = DDPOTrainer(config, brightness, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path))
    trainer.train()
    row = logged_metrics(tmp_path)[-1]
    assert row["eval/heldout/jpeg_compressibility"] < 0 and row["eval/heldout/digit"] < 0  # -kB; log p(7)
    assert main(["train", "eval_every=1", "eval_rewards={jpeg_compresibility: null}",
                 f"logdir={tmp_path / 'cli'}"]) == 2
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("diffrl train: error:")][0]
    assert "did you mean 'jpeg_compressibility'" in line


def test_ddpo_is_with_the_kl_trust_region(tiny_ddpm_path, tmp_path, monkeypatch):
    """trust_region=kl_mask on DDPO-IS (fused timesteps): the first update is at KL 0 and ratio 1 exactly, later
    passes see the KL to the recorded sampling means grow; the mask and the KL are logged, no clip fraction."""
    from diffrl.recipes import ddpo as ddpo_recipe

    seen = []
    real = ddpo_recipe.trust_region_loss

    def recording(log_prob, old, adv, kl_old, mode, **kw):
        seen.append(((log_prob - old).detach().exp(), kl_old.detach().clone(), mode))
        return real(log_prob, old, adv, kl_old, mode, **kw)

    monkeypatch.setattr(ddpo_recipe, "trust_region_loss", recording)
    cfg = _config(tmp_path, trust_region="kl_mask", trust_region_max_kl=1e-6, train_num_inner_epochs=2,
                  train_timestep_chunk=2, train_clip_range=1e-4)
    trainer = DDPOTrainer(cfg, brightness, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path))
    trainer.train()
    ratio, kl_old, mode = seen[0]
    assert mode == "kl_mask" and torch.equal(kl_old, torch.zeros_like(kl_old)) and torch.equal(ratio, torch.ones_like(ratio))
    assert any(bool((k > 0).any()) for _, k, _ in seen[1:])
    row = logged_metrics(tmp_path)[-1]
    assert row["stats/kl_old"] > 0 and "stats/masked" in row and "stats/clipfrac" not in row
    with pytest.raises(ConfigError, match="trust_region='kl_penalty': bounds importance-weighted updates, which "
                                          "ddpo_sf does not make"):
        _config(tmp_path, algorithm="ddpo_sf", trust_region="kl_penalty", train_clip_range=1e-4).validate()


def test_ddpo_is_with_ratio_norm(tiny_ddpm_path, tmp_path, monkeypatch):
    """ratio_norm=true on DDPO-IS (fused timesteps, no reweighting): the normalised ratio is exactly 1 at the first
    update and the rows carry no weight; later passes see the KL to the recorded means grow."""
    from diffrl.recipes import ddpo as ddpo_recipe

    seen = []
    real = ddpo_recipe.ratio_norm_loss

    def recording(log_prob, old, adv, kl_old, std, clip_range, weight=None):
        loss, st = real(log_prob, old, adv, kl_old, std, clip_range, weight)
        if log_prob.requires_grad:
            seen.append((st.ratio, kl_old.detach().clone(), weight))
        return loss, st

    monkeypatch.setattr(ddpo_recipe, "ratio_norm_loss", recording)
    cfg = _config(tmp_path, ratio_norm=True, ratio_norm_reweight=False, train_num_inner_epochs=2,
                  train_timestep_chunk=2)
    trainer = DDPOTrainer(cfg, brightness, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path))
    trainer.train()
    ratio, kl_old, weight = seen[0]
    assert float(ratio) == 1.0 and torch.equal(kl_old, torch.zeros_like(kl_old)) and weight is None
    assert any(bool((k > 0).any()) for _, k, _ in seen[1:])
    row = logged_metrics(tmp_path)[-1]
    assert row["stats/kl_old"] > 0 and "stats/raw_ratio" in row and "stats/clipfrac" in row
    with pytest.raises(ConfigError, match="ratio_norm=True: normalises the importance ratio, which ddpo_sf does "
                                          "not use"):
        _config(tmp_path, algorithm="ddpo_sf", ratio_norm=True).validate()
