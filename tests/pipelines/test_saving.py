import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, StableDiffusionPipeline, UNet2DModel
from safetensors import safe_open

from diffrl.pipelines import DDPMPolicy, LoraSettings, StableDiffusionPolicy

from .helpers import perturb_trainable


@pytest.mark.parametrize("alpha", [4, 16])  # alpha = rank hid a wrong scale on reload: test another alpha too
def test_sd_lora_loads_into_plain_diffusers_and_reproduces_images(tiny_sd_path, tmp_path, alpha):
    policy = StableDiffusionPolicy.from_pretrained(tiny_sd_path, lora=LoraSettings(rank=4, alpha=alpha))
    perturb_trainable(policy, scale=0.2)
    policy.save_pretrained(tmp_path / "lora")
    with safe_open(tmp_path / "lora" / "pytorch_lora_weights.safetensors", "pt") as weights:
        recorded = json.loads(weights.metadata()["lora_adapter_metadata"])  # what load_lora_weights reads
    assert recorded["unet.r"] == 4 and recorded["unet.lora_alpha"] == alpha
    ours = policy.sample(["a cat", "a dog"], num_inference_steps=5, guidance_scale=5.0, eta=1.0,
                         generator=torch.Generator().manual_seed(7)).trajectory.images

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    base = pipe(["a cat", "a dog"], num_inference_steps=5, guidance_scale=5.0, eta=1.0, output_type="pt",
                generator=torch.Generator().manual_seed(7)).images
    pipe.load_lora_weights(str(tmp_path / "lora"))
    theirs = pipe(["a cat", "a dog"], num_inference_steps=5, guidance_scale=5.0, eta=1.0, output_type="pt",
                  generator=torch.Generator().manual_seed(7)).images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert (ours - base).abs().max() > 1e-3  # the adapter really changes the images


def test_sd_lora_result_continues_training(tiny_sd_path, tmp_path):
    policy = StableDiffusionPolicy.from_pretrained(tiny_sd_path)
    perturb_trainable(policy, scale=0.2)
    policy.save_pretrained(tmp_path / "lora")
    info = json.loads((tmp_path / "lora" / "diffrl_model.json").read_text())
    assert info["base_model"] == tiny_sd_path and info["lora"]["rank"] == 4

    resumed = StableDiffusionPolicy.from_pretrained(tmp_path / "lora")
    before = dict((n, p.detach().clone()) for n, p in policy._unet.named_parameters() if p.requires_grad)
    after = dict((n, p) for n, p in resumed._unet.named_parameters() if p.requires_grad)
    assert before.keys() == after.keys() and len(after) > 0
    for name in before:
        torch.testing.assert_close(after[name], before[name])
    a = policy.sample(["a"], num_inference_steps=3, generator=torch.Generator().manual_seed(0)).trajectory.images
    b = resumed.sample(["a"], num_inference_steps=3, generator=torch.Generator().manual_seed(0)).trajectory.images
    torch.testing.assert_close(a, b)


def test_sd_full_finetune_saves_a_pipeline_folder(tiny_sd_path, tmp_path):
    policy = StableDiffusionPolicy.from_pretrained(tiny_sd_path, use_lora=False)
    perturb_trainable(policy, scale=0.01)
    policy.save_pretrained(tmp_path / "full")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "full")
    for (n, p), q in zip(policy._unet.named_parameters(), pipe.unet.parameters()):
        torch.testing.assert_close(p.detach(), q, msg=n)
    again = StableDiffusionPolicy.from_pretrained(tmp_path / "full", use_lora=False)
    assert sum(p.numel() for p in again.trainable_parameters()) == sum(p.numel() for p in policy.trainable_parameters())


def test_ddpm_lora_loads_with_peft_and_continues(tiny_ddpm_path, tmp_path):
    from peft import PeftModel

    policy = DDPMPolicy.from_pretrained(tiny_ddpm_path)
    perturb_trainable(policy, scale=0.3)
    policy.save_pretrained(tmp_path / "lora")
    base = UNet2DModel.from_pretrained(tiny_ddpm_path, subfolder="unet")
    peft_unet = PeftModel.from_pretrained(base, str(tmp_path / "lora")).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([500, 20])
    with torch.no_grad():
        torch.testing.assert_close(peft_unet(x, t).sample, policy.unet(x, t).sample, rtol=1e-5, atol=1e-5)
        assert (base.__class__.from_pretrained(tiny_ddpm_path, subfolder="unet")(x, t).sample
                - policy.unet(x, t).sample).abs().max() > 1e-4
    resumed = DDPMPolicy.from_pretrained(tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(resumed.unet(x, t).sample, policy.unet(x, t).sample)


def test_ddpm_full_finetune_loads_with_ddpm_pipeline(tiny_ddpm_path, tmp_path):
    policy = DDPMPolicy.from_pretrained(tiny_ddpm_path, use_lora=False)
    perturb_trainable(policy, scale=0.01)
    policy.save_pretrained(tmp_path / "full")
    pipe = DDPMPipeline.from_pretrained(tmp_path / "full")
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t).sample, policy.unet(x, t).sample)


def test_loading_lora_into_wrong_rank_is_a_clear_error(tiny_ddpm_path, tmp_path):
    from diffrl.pipelines import LoraSettings

    DDPMPolicy.from_pretrained(tiny_ddpm_path).save_pretrained(tmp_path / "r4")
    policy = DDPMPolicy.from_pretrained(tiny_ddpm_path, lora=LoraSettings(rank=8))
    with pytest.raises(Exception, match="r4|size mismatch|do not fit"):
        policy.load_lora_weights(tmp_path / "r4")
