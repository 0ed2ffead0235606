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
