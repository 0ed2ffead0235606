"""The trainer registry: one table read by the loader, the presets and the CLI."""

from __future__ import annotations

import dataclasses

import pytest

from diffrl.config import AlignPropConfig, ConfigError, DDPOConfig, load_config, registry
from diffrl.config.shared import SharedConfig
from diffrl.presets import quickstart_preset


def test_every_entry_resolves_to_a_config_class_whose_spec_is_itself() -> None:
    assert list(registry.TRAINERS)[:2] == ["ddpo", "alignprop"]
    for name, spec in registry.TRAINERS.items():
        cls = registry.config_class(name)
        assert issubclass(cls, SharedConfig) and registry.spec_of(cls) is spec
        assert spec.trainer.startswith("diffrl.recipes.") and ":" in spec.trainer
        assert cls().to_yaml().startswith(f"trainer: {name}\n")
    assert set(registry.get("ddpo").algorithms) >= {"ddpo_is", "ddpo_sf", "rwr", "rwr_sparse"}


def test_a_subclass_keeps_its_parents_trainer() -> None:
    @dataclasses.dataclass
    class MyConfig(DDPOConfig):
        pass

    assert registry.spec_of(MyConfig).name == "ddpo"
    assert registry.spec_of(object) is None


def test_one_new_entry_is_all_a_new_trainer_needs(monkeypatch) -> None:
    # a stand-in trainer: its config class plus one TrainerSpec
    spec = registry.TrainerSpec("standin", f"{__name__}:StandInConfig", "diffrl.recipes.standin:StandInTrainer",
                                {"standin_pg": {}}, None)
    monkeypatch.setattr(registry, "TRAINERS", {**registry.TRAINERS, "standin": spec})
    config = load_config(None, ["algorithm=standin_pg", "standin_group_size=4"])
    assert type(config) is StandInConfig and config.standin_group_size == 4
    assert config.to_yaml().startswith("trainer: standin\n")
    with pytest.raises(ConfigError, match=r"standin_group_size=4: unknown field of DDPOConfig \(a field of "
                                          r"StandInConfig, selected by `trainer: standin`\)"):
        load_config(None, ["trainer=ddpo", "standin_group_size=4"])
    with pytest.raises(ConfigError, match="has no offline quickstart"):
        quickstart_preset(["trainer=standin"])


@dataclasses.dataclass
class StandInConfig(SharedConfig):
    standin_group_size: int = dataclasses.field(default=16, metadata={"help": "Images per prompt."})


def test_selection_errors_name_the_choices() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["trainer=ppo"])
    assert "use one of ddpo, alignprop" in str(err.value)  # the registry's names, in order
    with pytest.raises(ConfigError, match="unknown algorithm. Fix: use one of ddpo, ddpo_is"):
        load_config(None, ["algorithm=dpo"])
    with pytest.raises(ConfigError, match="selects AlignPropConfig, not DDPOConfig"):
        DDPOConfig.from_dict({"trainer": "alignprop"})
    with pytest.raises(ConfigError, match="truncation='fixed': contradicts algorithm='refl'"):
        AlignPropConfig.from_dict({"algorithm": "refl", "truncation": "fixed"})


def test_quickstart_preset_follows_the_registry() -> None:
    assert quickstart_preset([]).stem == "quickstart"
    assert quickstart_preset(["reward=x", "trainer=alignprop"]).stem == "quickstart_alignprop"
    assert quickstart_preset(["algorithm=draft_k"]).stem == "quickstart_alignprop"
    assert quickstart_preset(["algorithm=rwr"]).stem == "quickstart"
