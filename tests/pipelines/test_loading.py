import os
import subprocess
import sys

import pytest

from diffrl.pipelines import ModelLoadError, StableDiffusionPolicy


def test_missing_local_path_names_path_and_what_was_tried(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as err:
        StableDiffusionPolicy.from_pretrained(str(missing))
    assert str(missing) in str(err.value) and "Tried: local file or folder" in str(err.value)


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        StableDiffusionPolicy.from_pretrained(str(tmp_path))


def test_unreadable_single_file_names_the_loader(tmp_path):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError) as err:
        StableDiffusionPolicy.from_pretrained(str(bogus))
    assert "model.safetensors" in str(err.value) and "single-file" in str(err.value)


def test_wrong_file_type(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    with pytest.raises(ModelLoadError, match="not a checkpoint"):
        StableDiffusionPolicy.from_pretrained(str(f))


def test_hub_id_offline_without_cache_says_not_available_offline(tmp_path):
    code = (
        "from diffrl.pipelines import StableDiffusionPolicy, ModelLoadError\n"
        "try:\n"
        "    StableDiffusionPolicy.from_pretrained('someone/some-sd-model')\n"
        "except ModelLoadError as e:\n"
        "    print('ERR', e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR" in out.stdout, out.stderr[-2000:]
    assert "not available offline" in out.stdout and "someone/some-sd-model" in out.stdout
    assert "HF_HUB_OFFLINE" in out.stdout
    assert "`hf download someone/some-sd-model`" in out.stdout and "huggingface-cli" not in out.stdout


@pytest.mark.parametrize("text", ['{"_class_name": "StableDiffusionPipeline",', "[1, 2]"], ids=["truncated", "list"])
def test_corrupt_model_index_names_the_file(tmp_path, text):
    from diffrl.pipelines.auto import load_policy

    (tmp_path / "unet").mkdir()
    index = tmp_path / "model_index.json"
    index.write_text(text)
    for load in (StableDiffusionPolicy.from_pretrained, load_policy):
        with pytest.raises(ModelLoadError) as err:
            load(str(tmp_path))
        assert str(index) in str(err.value) and "damaged" in str(err.value)
