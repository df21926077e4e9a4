"""PEFT adapters as soup ingredients: exact LoRA weight deltas and the adapter output forms.

- [`lora`](./lora.py): reading a LoRA adapter (folder, state dict or `PeftModel`) and computing each
  module's exact weight delta `scaling * B @ A`, model-free.
- [`export`](./export.py): writing a soup of adapters as one LoRA adapter, exactly (stacked factors)
  or truncated to a rank by SVD.
- [`resolve`](./resolve.py): adapter ingredients: resolution (registered with `hf_soups.ingredients` on import),
  `AdapterSource` (base + delta, one tensor at a time), base binding and loading.

Nothing here imports torch or peft at import time.
"""

from __future__ import annotations

from . import resolve  # noqa: F401  (registers adapter resolution with hf_soups.ingredients)
from .lora import LoraAdapter, LoraModule, read_adapter

__all__ = ["LoraAdapter", "LoraModule", "read_adapter"]
