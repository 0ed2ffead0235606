"""evaluate_models on tiny models: a model against itself, against a collapsed copy, and the noise it shares."""

from __future__ import annotations

import pytest
import torch

from diffrl import rewards
from diffrl.evaluate.compare import ModelSource, evaluate_models
from diffrl.evaluate.inputs import HELDOUT, TRAIN, EvaluationError, PromptItem
from diffrl.evaluate.sample import SampleSettings, generate, make_jobs
from diffrl.pipelines.auto import load_policy
from diffrl.seeding import image_generator

SETTINGS = SampleSettings(num_inference_steps=2, guidance_scale=5.0, eta=1.0, batch_size=4)
PROMPTS = [PromptItem("a cat", {}, TRAIN), PromptItem("a dog", {}, TRAIN), PromptItem("a horse", {}, HELDOUT)]
SEEDS = [0, 1, 2]


class CollapsedPolicy:
    """Mode collapse made on purpose: every seed is mapped to one image (seed 1234's noise, always)."""

    def __init__(self, policy) -> None:
        self.policy = policy
        self.is_conditional = policy.is_conditional

    def initial_noise(self, batch_size, generator=None):
        return self.policy.initial_noise(batch_size, generator)

    def sample(self, prompts, *, latents=None, generator=None, **kwargs):
        generators = [image_generator(1234) for _ in range(latents.shape[0])]
        x_T = self.policy.initial_noise(latents.shape[0], generators)
        return self.policy.sample(prompts, latents=x_T, generator=generators, **kwargs)


@pytest.fixture(scope="module")
def sd_policy(tiny_sd_path):
    return load_policy(tiny_sd_path, use_lora=False)


def _jpeg():
    return {"jpeg_compressibility": rewards.load("jpeg_compressibility"),
            "jpeg_incompressibility": rewards.load("jpeg_incompressibility")}


def test_model_against_itself_gives_equal_rewards_and_diversity(tiny_sd_path, sd_policy):
    again = load_policy(tiny_sd_path, use_lora=False)  # a second, independently loaded copy
    result = evaluate_models([ModelSource.of("base", sd_policy), ModelSource.of("same", again)], _jpeg(), PROMPTS,
                             SEEDS, SETTINGS, trained_reward="jpeg_compressibility")
    for name in result.reward_names:
        assert torch.equal(result.rewards["base"][name], result.rewards["same"][name])
        assert not torch.isnan(result.rewards["base"][name]).any()
    assert torch.equal(result.diversity["base"], result.diversity["same"])
    assert (result.diversity["base"] > 0.01).all()
    delta = result.versus_baseline()["same"]
    assert set(delta) == {TRAIN, HELDOUT}
    assert all(v.mean == 0.0 for split in delta.values() for v in split.values())
    summary = result.summary()
    assert summary["base"][HELDOUT]["reward/jpeg_compressibility"].n == len(SEEDS)
    assert summary["base"][TRAIN]["diversity"].n == 2


def test_collapsed_model_has_about_zero_diversity(sd_policy):
    pair = [ModelSource.of("base", sd_policy), ModelSource.of("collapsed", CollapsedPolicy(sd_policy))]
    result = evaluate_models(pair, _jpeg(), PROMPTS, SEEDS, SETTINGS)
    assert (result.diversity["base"] > 0.01).all()
    assert result.diversity["collapsed"].abs().max() < 1e-6
    drop = result.versus_baseline()["collapsed"][TRAIN]["diversity"]
    assert drop.mean < -0.01
    previews = result.previews["collapsed"]
    assert torch.equal(previews[0, 0], previews[0, 1])  # same image from different seeds


def test_each_image_noise_depends_on_its_seed_only(sd_policy):
    jobs = make_jobs(PROMPTS[:2], SEEDS)
    one_by_one = torch.cat([b.images for b in generate(sd_policy, jobs, SampleSettings(2, 5.0, 1.0, batch_size=1))])
    batched = torch.cat([b.images for b in generate(sd_policy, jobs, SampleSettings(2, 5.0, 1.0, batch_size=6))])
    torch.testing.assert_close(one_by_one, batched, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batched[0], batched[1])  # seeds differ


def test_models_of_different_image_sizes_are_refused(sd_policy, tiny_ddpm_path):
    ddpm = load_policy(tiny_ddpm_path, use_lora=False)
    with pytest.raises(EvaluationError, match="must share the latent shape and image size"):
        evaluate_models([ModelSource.of("sd", sd_policy), ModelSource.of("ddpm", ddpm)], _jpeg(),
                        [PromptItem("", {}, TRAIN)], SEEDS, SETTINGS)


def test_unconditional_model_with_several_prompts_is_refused(tiny_ddpm_path):
    ddpm = load_policy(tiny_ddpm_path, use_lora=False)
    with pytest.raises(EvaluationError, match="unconditional"):
        evaluate_models([ModelSource.of("ddpm", ddpm)], _jpeg(), PROMPTS, SEEDS, SETTINGS)


def test_results_json_is_complete(sd_policy):
    import json

    result = evaluate_models([ModelSource.of("base", sd_policy, source="tiny")], _jpeg(), PROMPTS, SEEDS, SETTINGS)
    data = json.loads(json.dumps(result.to_dict()))  # strict JSON: no NaN
    assert data["models"] == [{"name": "base", "source": "tiny"}]
    assert [p["split"] for p in data["prompts"]] == [TRAIN, TRAIN, HELDOUT]
    assert len(data["samples"]["base"]) == len(PROMPTS) * len(SEEDS)
    assert data["summary"]["base"][HELDOUT]["diversity"]["se"] is None  # one held-out prompt
    assert data["per_prompt"]["base"][0]["reward/jpeg_compressibility"]["n"] == len(SEEDS)


def test_clip_features_measure_collapse_too(sd_policy, tmp_path):
    from diffrl.evaluate.features import ClipFeatures, FeatureError
    from diffrl.testing.rewards import make_tiny_clip

    features = ClipFeatures(str(make_tiny_clip(tmp_path / "clip")))
    pair = [ModelSource.of("base", sd_policy), ModelSource.of("collapsed", CollapsedPolicy(sd_policy))]
    result = evaluate_models(pair, _jpeg(), PROMPTS[:1], SEEDS, SETTINGS, features=features)
    assert result.features.startswith("clip:") and result.feature_metric == "cosine"
    assert result.diversity["base"][0] > 1e-4 and result.diversity["collapsed"].abs().max() < 1e-6
    with pytest.raises(FeatureError, match="--clip-model"):
        ClipFeatures(str(tmp_path / "no-clip"))(torch.rand(2, 3, 16, 16))
