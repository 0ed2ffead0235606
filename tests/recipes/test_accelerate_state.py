"""Checkpoints through accelerate's save_state/load_state inside diffrl's atomic commit (issue 17, item 3), and the
sharding helpers that can run on one CPU process (issue 16, item 4)."""

from __future__ import annotations

import types

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from diffrl import DDPOConfig, DDPOTrainer, DefaultDDPODDPMPipeline
from diffrl import checkpoint as ckpt
from diffrl.recipes.checkpoints import full_trainable_state_dict, whole_parameters
from diffrl.recipes.update import configure_deepspeed
from diffrl.run_folder import OPTIMIZER_FILE, SCHEDULER_FILE, TRAINABLE_FILE

from .helpers import trainable_weights


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}


def _config(tmp_path, **kw):
    base = dict(num_epochs=3, sample_num_steps=3, sample_batch_size=4, sample_num_batches_per_epoch=1,
                train_batch_size=2, train_gradient_accumulation_steps=1, mixed_precision="no",
                logdir=str(tmp_path / "logs"), run_name="run", seed=3, save_freq=1, train_learning_rate=1e-3)
    base.update(kw)
    return DDPOConfig(**base)


def _trainer(tiny_ddpm_path, tmp_path, **kw):
    torch.manual_seed(0)  # LoRA's random init
    return DDPOTrainer(_config(tmp_path, **kw), brightness, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path))


def _optimizer_tensors(optimizer) -> dict[str, torch.Tensor]:
    state = optimizer.state_dict()["state"]
    return {f"{i}.{k}": v.clone() for i, s in state.items() for k, v in s.items() if isinstance(v, torch.Tensor)}


def test_a_checkpoint_is_accelerates_state_with_only_the_trained_weights(tiny_ddpm_path, tmp_path):
    trainer = _trainer(tiny_ddpm_path, tmp_path, num_epochs=1)
    trainer.train()
    folder = tmp_path / "logs" / "run" / "checkpoints" / "checkpoint_0"
    names = {p.name for p in folder.iterdir()}
    assert {"optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl", TRAINABLE_FILE, ckpt.MARKER} <= names
    # each thing once: the random states are accelerate's file only, the trainer's state the marker only
    assert not {"rng_0.pt", "custom_checkpoint_1.pkl"} & names
    assert ckpt.read_state(folder)["global_step"] == trainer.global_step
    assert "model.safetensors" not in names  # not the whole UNet: the hook writes only the LoRA weights
    saved = load_file(folder / TRAINABLE_FILE)
    assert set(saved) == set(trainable_weights(trainer)) and all("lora" in k for k in saved)
    assert not list(folder.parent.glob(".*"))  # the hidden folder every process wrote into was renamed


def test_resume_restores_optimizer_schedule_and_state_exactly(tiny_ddpm_path, tmp_path):
    first = _trainer(tiny_ddpm_path, tmp_path, num_epochs=2)
    first.train(epochs=2)
    expected = _optimizer_tensors(first.optimizer)
    assert expected  # Adam's moments exist after two epochs
    resumed = _trainer(tiny_ddpm_path, tmp_path, num_epochs=3, resume_from=str(tmp_path / "logs" / "run"))
    got = _optimizer_tensors(resumed.optimizer)
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert resumed.lr_scheduler.state_dict() == first.lr_scheduler.state_dict()
    assert (resumed.first_epoch, resumed.global_step) == (2, first.global_step)
    assert resumed.wall_s == pytest.approx(first.wall_s)
    for name, value in trainable_weights(first).items():
        assert torch.equal(trainable_weights(resumed)[name], value), name


def test_the_gradient_scaler_state_goes_through_the_checkpoint(tiny_ddpm_path, tmp_path):
    # fp16 autocast needs a GPU; the scaler accelerate would hold under fp16 can be given to it on the CPU.
    trainer = _trainer(tiny_ddpm_path, tmp_path, num_epochs=1)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=7)
    path = trainer.checkpoint_io.save(trainer.checkpoints_dir, 0, 2, {"global_step": 0})
    assert (path / "scaler.pt").is_file()
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    trainer.checkpoint_io.load(path, trainer.optimizer)
    assert trainer.accelerator.scaler.get_scale() == 256.0
    assert trainer.accelerator.scaler.get_growth_interval() == 7


def test_a_checkpoint_of_the_earlier_layout_still_resumes_to_the_same_run(tiny_ddpm_path, tmp_path):
    straight = _trainer(tiny_ddpm_path, tmp_path, run_name="straight")
    straight.train()
    first = _trainer(tiny_ddpm_path, tmp_path, run_name="old", num_epochs=3)
    first.train(epochs=1)
    # Rewrite checkpoint_0 in the layout diffrl wrote before accelerate's save_state.
    folder = tmp_path / "logs" / "old" / "checkpoints" / "checkpoint_0"
    state = ckpt.read_state(folder)
    rng = ckpt.save_rng_state()  # nothing drew from the global generators since the checkpoint

    def write(tmp):
        save_file(first.policy.trainable_state_dict(), tmp / TRAINABLE_FILE)
        torch.save(first.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        torch.save(first.lr_scheduler.state_dict(), tmp / SCHEDULER_FILE)
        torch.save(rng, tmp / "rng_0.pt")

    ckpt.save_atomically(folder, write, state=state)
    assert not (folder / "optimizer.bin").exists()
    resumed = _trainer(tiny_ddpm_path, tmp_path, run_name="old", resume_from=str(tmp_path / "logs" / "old"))
    assert resumed.first_epoch == 1
    resumed.train()
    for name, value in trainable_weights(straight).items():
        torch.testing.assert_close(trainable_weights(resumed)[name], value, rtol=0, atol=1e-6)


def test_trl_style_automatic_checkpoint_naming_keeps_diffrls_folders(tiny_ddpm_path, tmp_path):
    kw = dict(project_kwargs={"automatic_checkpoint_naming": True, "total_limit": 1}, num_checkpoint_limit=2)
    trainer = _trainer(tiny_ddpm_path, tmp_path, num_epochs=3, **kw)
    trainer.train(epochs=2)
    checkpoints = tmp_path / "logs" / "run" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(checkpoints)] == ["checkpoint_0", "checkpoint_1"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_0", "checkpoint_1"]
    resumed = _trainer(tiny_ddpm_path, tmp_path, num_epochs=3, resume_from=str(tmp_path / "logs" / "run"), **kw)
    assert resumed.first_epoch == 2
    assert resumed.accelerator.project_configuration.automatic_checkpoint_naming  # put back after each use


def test_the_gathered_state_is_the_trained_weights_without_sharding(tiny_ddpm_path, tmp_path):
    trainer = _trainer(tiny_ddpm_path, tmp_path, num_epochs=1)
    full = full_trainable_state_dict(trainer.accelerator, trainer.policy, trainer.recipe.update.module)
    assert set(full) == set(trainable_weights(trainer))
    for name, value in trainable_weights(trainer).items():
        assert torch.equal(full[name], value)


def test_whole_parameters_stand_in_and_are_put_back():
    class FSDPModule:  # the name FSDP2 gives the base it mixes into a sharded module's class
        pass

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    model.__class__ = type("FSDPSequential", (FSDPModule, torch.nn.Sequential), {})
    originals = {n: p for n, p in model.named_parameters()}
    full = {"0.weight": torch.full((3, 2), 7.0), "1.bias": torch.zeros(1)}
    with whole_parameters(model, full):
        assert type(model) is torch.nn.Sequential  # a saved config names the model's own class
        assert torch.equal(model.state_dict()["0.weight"], full["0.weight"])
        assert torch.equal(model.state_dict()["1.bias"], full["1.bias"])
    assert type(model).__name__ == "FSDPSequential"
    assert all(p is originals[n] for n, p in model.named_parameters())
    with whole_parameters(model, None):  # a process that received nothing
        assert type(model).__name__ == "FSDPSequential"


def test_deepspeed_gets_the_trainers_batch_accumulation_and_clipping():
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 2}}
    fake = types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2,
                                 state=types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(deepspeed_config=ds)))
    config = DDPOConfig(train_batch_size=3, train_max_grad_norm=0.5, sample_batch_size=6)
    configure_deepspeed(fake, config, backward_calls=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 3 * 4 * 2 and ds["gradient_clipping"] == 0.5
    plain = types.SimpleNamespace(distributed_type=DistributedType.NO, state=types.SimpleNamespace())
    configure_deepspeed(plain, config, backward_calls=4)  # a no-op without DeepSpeed
