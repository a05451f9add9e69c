"""LoRA / aLoRA adapters as separate parameter pytrees (see lora.py) and the PEFT format (peft_format.py)."""

from spanjax.adapters.lora import (
    ATTENTION_MODULES,
    MODULES,
    Adapter,
    AdapterBank,
    AdapterConfig,
    AdapterWeights,
    LoraModule,
    adapter_mask,
    bank_from_weights,
    init_adapter,
    invocation_start,
    make_bank,
)
from spanjax.adapters.peft_format import AdapterFormatError, export_peft, load_peft

__all__ = [
    "ATTENTION_MODULES",
    "MODULES",
    "Adapter",
    "AdapterBank",
    "AdapterConfig",
    "AdapterWeights",
    "LoraModule",
    "adapter_mask",
    "bank_from_weights",
    "init_adapter",
    "invocation_start",
    "make_bank",
    "AdapterFormatError",
    "export_peft",
    "load_peft",
]
