"""Precision, trackers, the project configuration and LR schedules, against the installed accelerate/diffusers."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from diffrl.config import AlignPropConfig, ConfigError, DDPOConfig, Precision
from diffrl.config.accelerate_settings import (
    PROJECT_CONFIGURATION_KEYS,
    TRACKERS,
    has_accelerator_device,
    resolve_mixed_precision,
)
from diffrl.config.schedule import DIFFUSERS_SCHEDULES


def test_precision_defers_to_accelerate_then_trl() -> None:
    assert DDPOConfig().mixed_precision is None
    assert resolve_mixed_precision("bf16", environ={"ACCELERATE_MIXED_PRECISION": "fp16"}) == Precision("bf16",
                                                                                                         "config")
    assert resolve_mixed_precision(None, environ={"ACCELERATE_MIXED_PRECISION": "bf16"}, gpu=False) == Precision(
        "bf16", "accelerate")
    assert resolve_mixed_precision(None, environ={}, gpu=True) == Precision("fp16", "TRL default")
    assert resolve_mixed_precision(None, environ={}, gpu=False) == Precision("no", "no GPU")
    assert DDPOConfig(mixed_precision="no").resolve_mixed_precision(environ={}).value == "no"


@pytest.mark.skipif(has_accelerator_device(), reason="the check is for machines without a GPU")
def test_fp16_without_a_gpu_is_refused_before_any_model_loads(monkeypatch) -> None:
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    with pytest.raises(ConfigError, match=r"mixed_precision='fp16': fp16 on a machine without a GPU: .*8-17x slower"
                                          r".*Fix: set mixed_precision=no"):
        DDPOConfig(mixed_precision="fp16").validate()
    DDPOConfig().validate()  # unset resolves to 'no' here
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match=r"set by accelerate"):
        DDPOConfig().validate()
    DDPOConfig(mixed_precision="fp16").validate(check_environment=False)


def test_every_accelerate_tracker_is_accepted() -> None:
    from accelerate.utils import LoggerType, ProjectConfiguration

    assert set(TRACKERS) - {None} == {t.value for t in LoggerType}
    assert set(PROJECT_CONFIGURATION_KEYS) == set(inspect.signature(ProjectConfiguration).parameters)
    for tracker in ("mlflow", "comet_ml", "aim", "clearml", "all"):
        DDPOConfig(log_with=tracker).validate(check_environment=False)
    with pytest.raises(ConfigError, match="did you mean 'mlflow'"):
        DDPOConfig(log_with="mlflw").validate(check_environment=False)


def test_project_kwargs_of_trl_examples_merge_with_the_run_folder(tmp_path) -> None:
    from accelerate.utils import ProjectConfiguration

    trl_example = {"logging_dir": "./logs", "automatic_checkpoint_naming": True, "total_limit": 5,
                   "project_dir": "./save"}
    config = DDPOConfig(project_kwargs=trl_example).validate(check_environment=False)
    kwargs = config.project_configuration_kwargs(tmp_path / "run")
    assert kwargs == trl_example  # the user's folders win
    ProjectConfiguration(**kwargs)  # no "multiple values for project_dir"
    default = DDPOConfig().project_configuration_kwargs(tmp_path / "run")
    assert default == {"project_dir": str(tmp_path / "run"), "logging_dir": str(tmp_path / "run")}
    only_logs = DDPOConfig(project_kwargs={"total_limit": 2}).project_configuration_kwargs("r")
    assert only_logs == {"total_limit": 2, "project_dir": "r", "logging_dir": "r"}
    with pytest.raises(ConfigError, match="project_kwargs.total_limt=2: is not a field of accelerate's "
                                          "ProjectConfiguration. Fix: did you mean 'total_limit'"):
        DDPOConfig(project_kwargs={"total_limt": 2}).validate(check_environment=False)


def test_output_dir_and_hub_fields() -> None:
    config = DDPOConfig()
    assert config.output_dir == "" and config.final_dir("logs/run") == "logs/run/final"
    assert DDPOConfig(output_dir="out").final_dir("logs/run") == "out"
    assert config.hub_repo_id("run1") == "run1" and DDPOConfig(hub_model_id="me/m").hub_repo_id("run1") == "me/m"
    assert config.hub_private is False


def test_schedules_are_diffusers_names_and_warmup_cosine_stays() -> None:
    from diffusers.optimization import SchedulerType

    assert set(DIFFUSERS_SCHEDULES) <= {s.value for s in SchedulerType}
    linear = DDPOConfig(lr_scheduler="linear", lr_warmup_steps=10).validate()
    assert linear.lr_schedule(100)[:3] == ("linear", 10, 100) and linear.lr_schedule(100).diffusers
    celebahq = DDPOConfig(lr_scheduler="warmup_cosine", lr_initial=9e-8, train_learning_rate=3.74e-6,
                          lr_warmup_fraction=0.5).validate()
    schedule = celebahq.lr_schedule(25)
    assert (schedule.warmup_steps, schedule.diffusers) == (12, False)
    assert schedule.initial_factor == pytest.approx(9e-8 / 3.74e-6)
    DDPOConfig(lr_scheduler="cosine_with_restarts", lr_num_cycles=3, lr_warmup_fraction=0.1).validate()
    with pytest.raises(ConfigError, match="lr_scheduler='cosin'.*did you mean 'cosine'"):
        DDPOConfig(lr_scheduler="cosin")


def test_minmax_past_the_last_step_says_what_trl_did() -> None:
    with pytest.raises(ConfigError) as err:
        AlignPropConfig(sample_num_steps=20).validate()
    text = str(err.value)
    assert "TRL 0.23 accepted this silently: it draws randint(0, 50) anew at every step" in text
    assert "the 31 of 51 draws at or above 20 never reach a step" in text
    assert "4.1 of 20 steps on average and 1% of batches trained on nothing" in text
    assert "--truncated_rand_backprop_minmax 0 20 on the command line" in text
    with pytest.raises(ConfigError, match="29% of batches trained on nothing|31% of batches"):
        AlignPropConfig(sample_num_steps=10).validate()


@dataclasses.dataclass
class ScriptArguments:  # the fields of TRL 0.23.1's examples/scripts/{ddpo,alignprop}.py, written out by hand
    pretrained_model: str = dataclasses.field(default="m", metadata={"help": "h"})
    pretrained_revision: str = dataclasses.field(default="main", metadata={"help": "h"})
    hf_hub_model_id: str = dataclasses.field(default="x", metadata={"help": "h"})
    hf_hub_aesthetic_model_id: str = dataclasses.field(default="x", metadata={"help": "h"})
    hf_hub_aesthetic_model_filename: str = dataclasses.field(default="x", metadata={"help": "h"})
    use_lora: bool = dataclasses.field(default=True, metadata={"help": "h"})


@pytest.mark.parametrize("cls", [DDPOConfig, AlignPropConfig])
def test_hf_argument_parser_with_trls_script_arguments(cls, capsys) -> None:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ScriptArguments, cls))
    args = ["--use_lora", "false", "--mixed_precision", "no", "--train_batch_size=2", "--log_with", "mlflow"]
    if cls is AlignPropConfig:
        args += ["--truncated_rand_backprop_minmax", "0", "10"]
    script, config = parser.parse_args_into_dataclasses(args)
    assert script.use_lora is False and config.train_lora is True and config.train_batch_size == 2
    assert config.mixed_precision == "no" and config.log_with == "mlflow"
    if cls is AlignPropConfig:
        assert config.truncated_rand_backprop_minmax == (0, 10)
    (default,) = HfArgumentParser(cls).parse_args_into_dataclasses([])
    assert default.mixed_precision is None and default == cls(exp_name=default.exp_name)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--help"])
    out = capsys.readouterr().out
    assert "--train_lora" in out and "--hf_hub_model_id" in out
