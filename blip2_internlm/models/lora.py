"""LoRA adapters on the frozen LLM (``model.llm_lora``), through ``peft``.

The adapters are injected into the LLM's own modules (``peft.inject_adapter_in_model``), so the
LLM keeps its class, its ``generate`` and its ``base_model``; only the adapter weights
(``lora_A``, ``lora_B``) train.  :func:`merge_lora` folds them into the linear weights and puts
the plain ``nn.Linear`` s back, which is what an export needs (the LLM's weight names are then
the official ones again).

``model.llm_lora`` in a config::

    llm_lora: {r: 8, alpha: 16, dropout: 0.05, target_modules: [wqkv, wo, w1, w2, w3]}

4-bit base weights (QLoRA) need CUDA and bitsandbytes: ``load_in_4bit: true`` loads the frozen LLM
through transformers' ``BitsAndBytesConfig`` (nf4, double quantisation, compute in the model's
autocast dtype) before the adapters are added; docs/instruction_tuning.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

#: InternLM2's linear layers: attention (wqkv, wo) and MLP (w1, w2, w3).
INTERNLM2_LINEARS = ("wqkv", "wo", "w1", "w2", "w3")
_KEYS = ("r", "alpha", "dropout", "target_modules", "load_in_4bit")


@dataclass(frozen=True)
class LoraSettings:
    """``model.llm_lora``: rank, scale (``alpha / r``), dropout on the adapters' input, the modules that get one,
    and whether the frozen base weights are loaded in 4 bits (QLoRA, CUDA only)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = field(default=INTERNLM2_LINEARS)
    load_in_4bit: bool = False

    @classmethod
    def from_config(cls, value) -> LoraSettings | None:
        """From the config value: null (no adapters) or a mapping of the keys above; errors name the key."""
        if value is None or value is False:
            return None
        if not hasattr(value, "items"):
            raise ValueError(f"model.llm_lora must be null or a mapping of {list(_KEYS)}, got {value!r}")
        values = dict(value.items())
        unknown = sorted(set(values) - set(_KEYS))
        if unknown:
            raise ValueError(f"model.llm_lora: unknown keys {unknown}; known: {list(_KEYS)}")
        settings = cls(**{**values, "target_modules": tuple(values.get("target_modules", INTERNLM2_LINEARS))})
        if not isinstance(settings.r, int) or isinstance(settings.r, bool) or settings.r < 1:
            raise ValueError(f"model.llm_lora.r = {settings.r!r}; must be an int >= 1")
        if not isinstance(settings.alpha, int | float) or settings.alpha <= 0:
            raise ValueError(f"model.llm_lora.alpha = {settings.alpha!r}; must be > 0")
        if not isinstance(settings.dropout, int | float) or not 0 <= settings.dropout < 1:
            raise ValueError(f"model.llm_lora.dropout = {settings.dropout!r}; must be in [0, 1)")
        if not settings.target_modules or not all(isinstance(m, str) for m in settings.target_modules):
            raise ValueError(f"model.llm_lora.target_modules = {list(settings.target_modules)!r}; names of linears")
        return settings

    def to_dict(self) -> dict:
        return {**asdict(self), "target_modules": list(self.target_modules)}


def add_lora(llm: nn.Module, settings: LoraSettings) -> int:
    """Adapters on every linear of ``llm`` named in ``settings.target_modules``; only they train afterwards.

    Returns the number of adapter parameters.  A target name that matches no module is an error (peft
    would silently add nothing for it)."""
    from peft import LoraConfig, inject_adapter_in_model

    names = {name.rsplit(".", 1)[-1] for name, module in llm.named_modules() if isinstance(module, nn.Linear)}
    missing = [target for target in settings.target_modules if target not in names]
    if missing:
        raise ValueError(
            f"model.llm_lora.target_modules: {missing} name no linear layer of {type(llm).__name__} "
            f"(its linears: {sorted(names)})"
        )
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
    )
    inject_adapter_in_model(config, llm)
    count = 0
    for name, param in llm.named_parameters():
        param.requires_grad = "lora_" in name
        count += param.numel() if param.requires_grad else 0
    return count


def lora_layers(llm: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [module for module in llm.modules() if isinstance(module, LoraLayer)]


def set_adapter_dropout(llm: nn.Module, training: bool) -> None:
    """The adapters' dropout follows the model's mode: the frozen LLM itself always stays in eval mode."""
    for layer in lora_layers(llm):
        layer.lora_dropout.train(training)


@torch.no_grad()
def merge_lora(llm: nn.Module) -> int:
    """Fold every adapter into its linear weight and put the plain linear back; returns how many were merged.

    Afterwards ``llm`` has no peft modules: its state dict has the base model's key names."""
    layers = lora_layers(llm)
    parents = {id(module): name for name, module in llm.named_modules()}
    for layer in layers:
        layer.merge(safe_merge=True)
        name = parents[id(layer)]
        parent_name, _, child = name.rpartition(".")
        parent = llm.get_submodule(parent_name) if parent_name else llm
        setattr(parent, child, layer.get_base_layer())
    return len(layers)
