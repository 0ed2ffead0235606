"""TRL 0.23.1's own example scripts, run against diffrl with only the import changed (issue 17's "must show").

The scripts are not copied into this repository: the test downloads TRL's published source
distribution once (``pip download --no-deps --no-binary :all: trl==0.23.1``) into a cache
folder (``$DIFFRL_TEST_CACHE`` or ``~/.cache/diffrl-tests``), extracts
``examples/scripts/ddpo.py`` and ``alignprop.py`` into a temporary folder, rewrites their
``from trl ...`` imports to diffrl, and runs them in a subprocess through a small wrapper that
makes their hub-downloading aesthetic scorer offline: ``openai/clip-vit-large-patch14`` is
redirected to a tiny random CLIP (with TRL's 768-d projection), the MLP weights come from a
local folder, ``.cuda()`` is a no-op without CUDA (TRL's scorer calls it unconditionally), and
``CLIPModel.get_image_features`` returns the embedding tensor as in transformers 4, for which
TRL 0.23.1's ``ddpo.py`` scorer was written (transformers 5 returns an output object).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

TRL_VERSION = "0.23.1"
SCRIPTS = ("ddpo.py", "alignprop.py")
CLIP_ID = "openai/clip-vit-large-patch14"

WRAPPER = '''"""Run a TRL example script offline (written by tests/test_trl_examples.py)."""
import os
import runpy
import sys

import huggingface_hub
import torch
import transformers

TINY_CLIP = os.environ["DIFFRL_TEST_TINY_CLIP"]
_download = huggingface_hub.hf_hub_download


def _offline_download(repo_id, filename, *args, **kwargs):
    if os.path.isdir(repo_id):  # the aesthetic MLP from a local folder
        return os.path.join(repo_id, filename)
    return _download(repo_id, filename, *args, **kwargs)


def _redirect(cls):
    original = cls.from_pretrained.__func__

    def from_pretrained(klass, name, *args, **kwargs):
        return original(klass, TINY_CLIP if name == "{clip}" else name, *args, **kwargs)

    cls.from_pretrained = classmethod(from_pretrained)


huggingface_hub.hf_hub_download = _offline_download
for _cls in (transformers.CLIPModel, transformers.CLIPProcessor, transformers.AutoImageProcessor,
             transformers.CLIPImageProcessor, transformers.AutoTokenizer):
    _redirect(_cls)
if not torch.cuda.is_available():
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
_features = transformers.CLIPModel.get_image_features


def _image_features(self, *args, **kwargs):  # transformers 5 wraps the tensor TRL's scorer expects
    out = _features(self, *args, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


transformers.CLIPModel.get_image_features = _image_features
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''.replace("{clip}", CLIP_ID)


def _cache_dir() -> Path:
    return Path(os.environ.get("DIFFRL_TEST_CACHE", Path.home() / ".cache" / "diffrl-tests"))


def _sdist() -> Path:
    """TRL's source distribution, downloaded once into the cache."""
    cache = _cache_dir()
    path = cache / f"trl-{TRL_VERSION}.tar.gz"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        out = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                              f"trl=={TRL_VERSION}", "-d", str(cache)], capture_output=True, text=True, timeout=600)
        assert path.is_file(), (f"could not download TRL {TRL_VERSION}'s sdist into {cache} (the package registry "
                                f"must be reachable once):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return path


def rewrite_imports(source: str) -> str:
    """TRL's imports -> diffrl's; nothing else in the script changes."""
    out = re.sub(r"^from trl\.models\.auxiliary_modules import", "from diffrl.models.auxiliary_modules import",
                 source, flags=re.M)
    out = re.sub(r"^from trl import", "from diffrl import", out, flags=re.M)
    left = re.findall(r"^\s*(?:from|import) trl\b.*$", out, flags=re.M)
    assert not left, f"TRL imports the rewrite does not handle: {left}"
    return out


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trl-examples")
    with tarfile.open(_sdist()) as tar:
        for name in SCRIPTS:
            member = tar.getmember(f"trl-{TRL_VERSION}/examples/scripts/{name}")
            source = tar.extractfile(member).read().decode("utf-8")
            (folder / name).write_text(rewrite_imports(source), encoding="utf-8")
    (folder / "run_example.py").write_text(WRAPPER, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def aesthetic_models(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny CLIP with TRL's 768-d projection and LAION-layout MLP weights as aesthetic-model.pth."""
    from diffrl.testing.rewards import make_tiny_aesthetic_mlp, make_tiny_clip

    root = tmp_path_factory.mktemp("aesthetic")
    clip = make_tiny_clip(root / "clip", projection_dim=768)
    mlp = root / "mlp"
    make_tiny_aesthetic_mlp(mlp / "aesthetic-model.pth", input_size=768, pickle=True)
    return clip, mlp


def _run(examples: Path, clip: Path | str, script: str, *args: str, cwd: Path | None = None,
         timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "DIFFRL_TEST_TINY_CLIP": str(clip), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return subprocess.run([sys.executable, str(examples / "run_example.py"), str(examples / script), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd or examples, env=env)


def test_only_the_imports_change(examples) -> None:
    with tarfile.open(_sdist()) as tar:
        original = tar.extractfile(f"trl-{TRL_VERSION}/examples/scripts/alignprop.py").read().decode("utf-8")
    rewritten = (examples / "alignprop.py").read_text(encoding="utf-8")
    changed = [(a, b) for a, b in zip(original.splitlines(), rewritten.splitlines(), strict=True) if a != b]
    assert changed == [
        ("from trl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline",
         "from diffrl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline"),
        ("from trl.models.auxiliary_modules import aesthetic_scorer",
         "from diffrl.models.auxiliary_modules import aesthetic_scorer")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(examples, script) -> None:
    out = _run(examples, "unused", script, "--help", timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    for flag in ("--use_lora", "--pretrained_model", "--sample_num_steps", "--train_lora", "--mixed_precision"):
        assert flag in out.stdout, flag
    if script == "alignprop.py":
        assert "--truncated_rand_backprop_minmax MIN MAX" in out.stdout


COMMON = ["--num_epochs", "1", "--sample_num_steps", "2", "--train_batch_size", "1", "--mixed_precision", "no",
          "--logdir", "logs", "--output_dir", "out", "--seed", "0"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs_to_its_last_line(examples, aesthetic_models, tiny_sd_path, script, tmp_path) -> None:
    clip, mlp = aesthetic_models
    args = ["--pretrained_model", tiny_sd_path, "--hf_hub_aesthetic_model_id", str(mlp), *COMMON]
    if script == "ddpo.py":
        args += ["--sample_batch_size", "2", "--sample_num_batches_per_epoch", "1"]
    else:
        args += ["--truncated_rand_backprop_minmax", "0", "2"]
    out = _run(examples, clip, script, *args, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-5000:]
    saved = list((tmp_path / "out").rglob("*.safetensors"))
    assert saved, f"nothing saved in {tmp_path / 'out'}: {list(tmp_path.rglob('*'))[:50]}"
