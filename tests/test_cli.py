import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from diffrl.cli import main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert "diffrl 0." in capsys.readouterr().out
    assert main([]) == 0
    assert "train" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run([Path(sys.executable).with_name("diffrl"), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "serve-reward" in out.stdout and "train" in out.stdout


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_train_from_config_file_with_overrides(tiny_ddpm_path, tmp_path, capsys):
    cfg = _write(tmp_path, f"""
trainer: ddpo
model: {tiny_ddpm_path}
reward: jpeg_compressibility
mixed_precision: "no"
num_epochs: 1
sample_num_steps: 2
sample_batch_size: 2
sample_num_batches_per_epoch: 1
train_batch_size: 2
logdir: {tmp_path / 'logs'}
""")
    assert main(["train", cfg, "run_name=cli", "train_learning_rate=0.001"]) == 0
    run = tmp_path / "logs" / "cli"
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert (run / "metrics.jsonl").is_file() and "train_learning_rate: 0.001" in (run / "config.yaml").read_text()
    assert "run folder:" in capsys.readouterr().out
    report = (run / "report.html").read_text(encoding="utf-8")
    assert 'alt="reward/mean"' in report and "train_learning_rate: 0.001" in report


def test_unknown_field_and_bad_type_are_clear_errors(tmp_path, capsys):
    cfg = _write(tmp_path, "trainer: ddpo\nsample_batch_sise: 4\n")
    assert main(["train", cfg]) == 2
    err = capsys.readouterr().err
    assert "sample_batch_sise" in err and "sample_batch_size" in err
    assert main(["train", _write(tmp_path, "num_epochs: many\n")]) == 2
    err = capsys.readouterr().err
    assert "num_epochs" in err and "many" in err


def test_invalid_values_are_reported_before_loading_a_model(tmp_path, capsys):
    cfg = _write(tmp_path, "model: /definitely/not/here\nsample_batch_size: 3\ntrain_batch_size: 2\n")
    assert main(["train", cfg]) == 2
    err = capsys.readouterr().err
    assert "sample_batch_size" in err and "not/here" not in err  # validation ran first


# ---- the command line users type (issue 17 item 2; issue 12 item 5) -------------------------------------


def _imports_torch(*args: str) -> tuple[bool, subprocess.CompletedProcess]:
    code = ("import sys\nfrom diffrl.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "sys.stdout.flush()\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    return out.stderr.strip().endswith("\nTORCH") or out.stderr.strip() == "TORCH", out


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["sample", "--help"], ["evaluate", "--help"],
                                  ["report", "--help"], ["--version"], []])
def test_help_does_not_import_torch(args):
    torch_loaded, out = _imports_torch(*args)
    assert not torch_loaded, out.stderr
    assert out.stdout.strip()


def test_serve_reward_help_does_not_import_torch():
    # The command's own part (its parser, from diffrl.commands.serve_reward, and the text) is timed after diffrl.cli
    # is imported, so the bound holds on a loaded machine; importing torch alone takes seconds.
    code = ("import sys, time\nfrom diffrl.cli import main\nstart = time.perf_counter()\ntry:\n"
            "    main(['serve-reward', '--help'])\nexcept SystemExit:\n    pass\nsys.stdout.flush()\n"
            "print(time.perf_counter() - start, 'torch' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    seconds, torch_loaded = out.stderr.split()[-2:]
    assert "--reward" in out.stdout and "--body-timeout" in out.stdout and "POST /reward" in out.stdout
    assert torch_loaded == "False" and float(seconds) < 1.0, out.stderr


def test_train_help_lists_every_field_of_every_trainer(capsys):
    from diffrl.config import registry

    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for name in registry.TRAINERS:
        for info in registry.config_class(name).describe_fields():
            assert f"  --{info.name} ({info.type}, default " in out
            assert info.help.split(".")[0][:40] in out
    assert "--truncated_rand_backprop_minmax 0 20" in out and "rwr_sparse" in out


@pytest.mark.parametrize("words", [["trainer=grpo"], ["--trainer", "grpo"], ["configs/grpo_sd14_window.yaml"]])
def test_train_help_of_a_chosen_trainer_lists_its_fields_only(words, capsys):
    from diffrl.config import GRPOConfig

    assert main(["train", *words, "--help"]) == 0
    out = capsys.readouterr().out
    listed = set(re.findall(r"^  --(\w+) \(", out, re.MULTILINE))
    assert listed == {info.name for info in GRPOConfig.describe_fields()}
    assert "GRPOConfig fields" in out and "DDPOConfig fields" not in out
    # DDPO's own settings are not GRPO fields any more (nothing inherited only to be forbidden)
    assert not listed & {"train_timestep_fraction", "per_prompt_stat_tracking", "sample_num_batches_per_epoch",
                         "compile_model", "async_reward_computation"}


def test_hf_argument_parser_forms_reach_the_config(monkeypatch):
    import diffrl.commands.quickstart as quickstart
    import diffrl.commands.train as train

    seen = {}
    monkeypatch.setattr(train, "train_from_config", lambda path, overrides: seen.update(path=path, o=overrides) or 0)
    monkeypatch.setattr(quickstart, "run_quickstart", lambda overrides: seen.update(quick=overrides) or 0)
    config = "configs/alignprop_aesthetic.yaml"
    assert main(["train", config, "--sample_num_steps=20", "--truncated_rand_backprop_minmax", "0", "20",
                 "num_epochs=2", "--no_gradient_checkpointing", "--debug"]) == 0
    assert seen == {"path": config, "o": ["sample_num_steps=20", "truncated_rand_backprop_minmax=[0, 20]",
                                          "num_epochs=2", "gradient_checkpointing=false"]}
    assert main(["train", "--trainer", "alignprop", "--num_epochs", "1"]) == 0
    assert seen["quick"] == ["trainer=alignprop", "num_epochs=1"]


@pytest.mark.parametrize(("args", "needle"), [
    (["train", "missing.yaml"], "<file>='missing.yaml': does not exist"),
    (["train", "configs"], "is a folder, not a YAML file"),
    (["train", "--num_epoch", "3"], "num_epoch=3: unknown field of DDPOConfig. Fix: did you mean 'num_epochs'?"),
    (["train", "--num_epochs", "many"], "num_epochs='many': expected int, got str"),
    (["train", "--use_lora", "false"], "use_lora=False: was renamed to train_lora"),
    (["train", "reward=x", "stray"], "'stray' is neither field=value nor --field value"),
    (["train", "algorithm=ppo"], "algorithm='ppo': unknown algorithm"),
])
def test_config_mistakes_are_one_line_and_exit_2(args, needle, capsys):
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("diffrl train: error: "), captured.err
    assert "Traceback" not in captured.err


def test_debug_shows_the_traceback():
    from diffrl.config import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "train", "missing.yaml"])
    with pytest.raises(ConfigError):
        main(["train", "missing.yaml", "--debug"])


def test_config_mistakes_are_reported_without_importing_torch(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: ddpo\nsample_batch_sise: 4\n")
    code = ("import sys\nfrom diffrl.cli import main\nrc = main(sys.argv[1:])\n"
            "print(rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, "train", str(bad)], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split() == ["2", "False"], out.stderr
    assert "did you mean 'sample_batch_size'" in out.stderr


def test_accelerate_launch_mixed_precision_reaches_a_run_whose_config_is_silent(tiny_ddpm_path, tmp_path):
    """``accelerate launch --mixed_precision bf16`` decides when the config leaves ``mixed_precision`` unset, and
    the run's config.yaml records the precision in force."""
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_ddpm_path}\nreward: jpeg_compressibility\nnum_epochs: 1\nsample_num_steps: 2\n"
                      "sample_batch_size: 2\nsample_num_batches_per_epoch: 1\ntrain_batch_size: 1\n"
                      f"logdir: {tmp_path}\nrun_name: bf16\n")
    assert "mixed_precision" not in config.read_text()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "bf16", "--dynamo_backend", "no", "-m", "diffrl.cli", "train", str(config)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mixed_precision: bf16" in (tmp_path / "bf16" / "config.yaml").read_text()
