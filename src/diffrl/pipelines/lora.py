"""LoRA adapters through PEFT, saved in the formats diffusers and PEFT load directly."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

ADAPTER = "default"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters (Hu et al. 2021). Defaults are TRL's: rank 4, alpha 4, gaussian init, attention projections."""

    rank: int = 4
    alpha: float = 4
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    init: str = "gaussian"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora rank={self.rank} must be a positive integer (TRL's default is 4).")
        if not self.target_modules:
            raise ValueError("lora target_modules is empty; name the modules to adapt, e.g. to_q,to_k,to_v,to_out.0.")

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            init_lora_weights=self.init,
            target_modules=list(self.target_modules),
            lora_dropout=self.dropout,
        )

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "target_modules": list(self.target_modules), "init": self.init}


def add_lora(model: torch.nn.Module, settings: LoraSettings) -> None:
    """Insert trainable LoRA layers into ``model`` (freezing everything else); clear error if no module matches."""
    model.requires_grad_(False)
    try:
        if hasattr(model, "add_adapter"):  # diffusers models with PeftAdapterMixin (UNet2DConditionModel)
            model.add_adapter(settings.peft_config(), adapter_name=ADAPTER)
        else:  # e.g. UNet2DModel: plain PEFT injection
            inject_adapter_in_model(settings.peft_config(), model, adapter_name=ADAPTER)
    except ValueError as err:
        names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(
            f"lora target_modules={list(settings.target_modules)} match no layer of {type(model).__name__} ({err}). "
            f"Its linear layers are named: {names[:20]}."
        ) from err
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
            param.data = param.data.float()


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in PEFT's naming (``<module>.lora_A.weight``), on CPU."""
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def load_lora_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load PEFT-named adapter weights into ``model``'s adapter; any mismatch is an error naming ``source``."""
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing:
        raise ValueError(
            f"LoRA weights in '{source}' do not fit this model's adapter (rank/targets differ?): "
            f"unexpected {unexpected[:5]}, missing {missing[:5]}."
        )


def kohya_state_dict(peft_state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """A UNet adapter's PEFT-named weights in kohya's layout (diffusers' ``convert_state_dict_to_kohya``), each
    module's ``.alpha`` set to the adapter's ``alpha`` (the converter writes the rank, which reloads any other alpha
    at the wrong scale)."""
    state = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_state.items()})
    return {k: (torch.tensor(float(alpha)) if k.endswith(".alpha") else v.contiguous()) for k, v in state.items()}


def merged_unet(model: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of ``model`` (same class, same config) with its LoRA updates merged into the base weights,
    so it loads with diffusers alone (no PEFT)."""
    unet = copy.deepcopy(model).float()
    for module in unet.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    state = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    clean = type(model).from_config(model.config)
    clean.load_state_dict(state)
    return clean
