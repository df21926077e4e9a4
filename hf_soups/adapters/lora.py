"""LoRA adapters read without their base model, and the exact weight change of every adapted module.

A LoRA module adds `scaling * B @ A` to its base weight, with `scaling = lora_alpha / r` (or
`lora_alpha / sqrt(r)` with rsLoRA) and per-module `r` / `lora_alpha` from `rank_pattern` /
`alpha_pattern`. GPT-2 style `Conv1D` layers store their weight transposed (`fan_in_fan_out`) and
embedding LoRA stores `A` and `B` transposed: the delta is returned in the base tensor's own layout.

Everything an adapter file holds that is not a LoRA factor (`modules_to_save` such as a classification
head, biases trained with `bias="all"` / `"lora_only"`, saved embedding layers) is a full replacement
of the base tensor of the same name.

Anything whose math is not implemented here (DoRA, other PEFT tuners, LoRA variants, convolution
LoRA, adapters that modify the base weights at initialisation) raises [`UnsupportedAdapterError`]:
an adapter soup is exact or it is refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import (
    CorruptCheckpointError,
    IncompatibleIngredientsError,
    IngredientNotFoundError,
    UnsupportedAdapterError,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..core.sources import TensorSource

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_SAFETENSORS_NAME = "adapter_model.safetensors"
ADAPTER_BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# init_lora_weights values that are plain random/zero initialisations: the base weights are untouched.
_PLAIN_INITS = {True, False, "gaussian", "eva", "orthogonal", "true", "false"}
# init_lora_weights values that change the base weights (or freeze a factor that is not saved).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")

# LoRA options whose math hf_soups does not implement: (config key, what it is).
_UNSUPPORTED_OPTIONS: list[tuple[str, str]] = [
    ("use_dora", "DoRA (weight-decomposed LoRA): its merged weight is not base + scaling * B @ A"),
    (
        "alora_invocation_tokens",
        "Activated LoRA (aLoRA): it only applies after invocation tokens, it cannot be merged",
    ),
    ("use_qalora", "QA-LoRA (quantization-aware LoRA)"),
    ("kasa_config", "KaSA (knowledge-aware singular-value adaptation)"),
    ("arrow_config", "Arrow routing over several LoRA experts"),
    ("use_bdlora", "BD-LoRA (block-diagonal LoRA factors)"),
    ("monteclora_config", "MonteCLoRA (Monte Carlo LoRA)"),
    ("layer_replication", "layer replication (the adapted model has more layers than its base)"),
    ("trainable_token_indices", "trainable tokens (sparse embedding updates)"),
    ("target_parameters", "LoRA on nn.Parameter targets (target_parameters, e.g. MoE experts)"),
]


def _plain(value: Any) -> Any:
    """Enums (PeftType, TaskType) and sets from a live PeftConfig -> JSON-friendly values."""
    if hasattr(value, "value") and isinstance(value.value, str):
        return value.value
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if all(isinstance(v, str) for v in value) else list(value)
    return value


def pattern_value(pattern: dict[str, Any] | None, module_path: str, default: Any) -> Any:
    """The value of `rank_pattern` / `alpha_pattern` for one module, matched the way PEFT matches it.

    PEFT takes the first key `k` for which `re.match(rf"(.*\\.)?({k})$", module_path)` succeeds.

    Example:

    ```python
    >>> pattern_value({"layer.1.attention.self.query": 2}, "bert.encoder.layer.1.attention.self.query", 8)
    2
    ```
    """
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """`alpha / r`, or `alpha / sqrt(r)` for rsLoRA (as `peft.tuners.lora.LoraLayer.update_layer`)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module of an adapter.

    The delta in "LoRA layout" is `scaling * B @ A`, of shape `(out_features, in_features)`. For a
    `Linear` layer that is the weight's layout; GPT-2 `Conv1D` weights and embedding weights are stored
    transposed (see [`LoraAdapter.delta`]).
    """

    path: str  # module path in the base model, e.g. "bert.encoder.layer.0.attention.self.query"
    kind: Literal["linear", "embedding"]
    a_key: str
    b_key: str
    bias_key: str | None
    rank: int
    alpha: float
    scaling: float
    in_features: int
    out_features: int

    @property
    def weight_name(self) -> str:
        return f"{self.path}.weight"

    @property
    def bias_name(self) -> str:
        return f"{self.path}.bias"


# About 330 lines: one adapter's three readers (files, state dict, PeftModel), the parsing of its keys into
# modules (~90 lines of PEFT's key conventions), and the per-module deltas; the model-free math stays together.
@dataclass
class LoraAdapter:
    """A LoRA adapter read from its files (or a `PeftModel`), without its base model.

    Use [`read_adapter`] (or the `from_*` constructors) to build one.

    Args:
        name (`str`):
            Display name, used in every message.
        config (`dict`):
            The adapter config (`adapter_config.json`).
        source ([`TensorSource`]):
            The adapter's stored tensors (keys as in `adapter_model.safetensors`).
        path (`Path`, *optional*):
            The adapter folder, when read from disk.
    """

    name: str
    config: dict[str, Any]
    source: TensorSource
    path: Path | None = None
    modules: dict[str, LoraModule] = field(default_factory=dict)
    full_tensors: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter key
    _by_tensor: dict[str, tuple[LoraModule, str]] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ construction
    def __post_init__(self) -> None:
        check_supported(self.config, self.name)
        self._parse_keys()

    @classmethod
    def from_dir(cls, path: str | os.PathLike, name: str | None = None) -> LoraAdapter:
        """Read an adapter folder written by `PeftModel.save_pretrained`.

        Raises:
            [`IngredientNotFoundError`]: no `adapter_config.json` or no adapter weights in the folder.
            [`UnsupportedAdapterError`]: the adapter type or one of its options is not implemented.
        """
        from ..core.sources import SafetensorsSource, TorchBinSource

        path = Path(path)
        name = name or path.name
        config_file = path / ADAPTER_CONFIG_NAME
        if not config_file.is_file():
            raise IngredientNotFoundError(
                f"Adapter {name!r}: no {ADAPTER_CONFIG_NAME} in {path}. Pass a folder written by "
                "PeftModel.save_pretrained.",
                ingredient=name,
            )
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptCheckpointError(
                f"Adapter {name!r}: {config_file} is not valid JSON ({e}).",
                path=str(config_file),
                ingredient=name,
            ) from None
        if (path / ADAPTER_SAFETENSORS_NAME).is_file():
            source: TensorSource = SafetensorsSource([path / ADAPTER_SAFETENSORS_NAME], description=name)
        elif (path / ADAPTER_BIN_NAME).is_file():
            source = TorchBinSource([path / ADAPTER_BIN_NAME], description=name)
        else:
            raise IngredientNotFoundError(
                f"Adapter {name!r}: {path} has {ADAPTER_CONFIG_NAME} but no {ADAPTER_SAFETENSORS_NAME} or "
                f"{ADAPTER_BIN_NAME}. Save the adapter again with PeftModel.save_pretrained.",
                ingredient=name,
            )
        return cls(name=name, config=config, source=source, path=path)

    @classmethod
    def from_state_dict(
        cls, config: dict[str, Any], state_dict: dict[str, torch.Tensor], name: str = "adapter"
    ) -> LoraAdapter:
        """An adapter from its config dict and its saved-form state dict (`get_peft_model_state_dict`)."""
        from ..core.sources import StateDictSource

        return cls(name=name, config=dict(config), source=StateDictSource(state_dict, description=name))

    @classmethod
    def from_peft_model(
        cls, model: Any, adapter_name: str | None = None, name: str | None = None
    ) -> LoraAdapter:
        """The adapter `adapter_name` (default: the active one) of a live `peft.PeftModel`.

        The factors are read from the model without copies; the model's base weights are not used.
        """
        from peft import get_peft_model_state_dict

        if adapter_name is None:
            adapter_name = model.active_adapter
            if isinstance(adapter_name, (list, tuple)):
                if len(adapter_name) != 1:
                    raise UnsupportedAdapterError(
                        f"Adapter {name or type(model).__name__!r}: several adapters are active "
                        f"({list(adapter_name)}); wrap the model in Ingredient(model, ...) after "
                        "model.set_adapter(<one name>), or save each adapter and pass the folders.",
                        ingredient=name,
                    )
                adapter_name = adapter_name[0]
        peft_config = model.peft_config[adapter_name]
        config = {k: _plain(v) for k, v in peft_config.to_dict().items()}
        # save_embedding_layers=False: "auto" asks the Hub whether the vocabulary was resized.
        state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
        state = {k: v.detach() for k, v in state.items()}
        return cls.from_state_dict(config, state, name=name or f"PeftModel[{adapter_name}]")

    # ------------------------------------------------------------------ parsing
    def _parse_keys(self) -> None:
        cfg = self.config
        factors: dict[str, dict[str, str]] = {}
        full: dict[str, tuple[int, str]] = {}  # target -> (priority, adapter key)
        for key in self.source.keys():
            rel = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
            m = re.match(
                r"^(?P<path>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)$",
                rel,
            )
            if m:
                factors.setdefault(m["path"], {})[m["part"]] = key
                continue
            if re.search(r"(^|\.)lora_[A-Za-z_]+", rel):
                what = "DoRA magnitude vector" if "lora_magnitude_vector" in rel else "LoRA parameter"
                raise UnsupportedAdapterError(
                    f"Adapter {self.name!r}: tensor {key!r} is a {what} whose math hf_soups does not implement. "
                    "Only plain LoRA (lora_A / lora_B / lora_embedding_A / lora_embedding_B) can be souped.",
                    ingredient=self.name,
                    tensor_name=key,
                )
            if ".original_module." in f".{rel}":
                continue  # the untouched base copy kept by ModulesToSaveWrapper
            priority = 1 if ".modules_to_save." in f".{rel}" else 0
            target = rel.replace(".modules_to_save.", ".").replace(".base_layer.", ".")
            if target.startswith("modules_to_save."):
                target = target[len("modules_to_save.") :]
            if target not in full or priority > full[target][0]:
                full[target] = (priority, key)
        self.full_tensors = {t: k for t, (_, k) in full.items()}

        r_default = int(cfg.get("r", 8))
        alpha_default = cfg.get("lora_alpha", 8)
        use_rslora = bool(cfg.get("use_rslora", False))
        for path, parts in factors.items():
            kind: Literal["linear", "embedding"]
            if "lora_A.weight" in parts or "lora_B.weight" in parts:
                kind, a_key, b_key = "linear", parts.get("lora_A.weight"), parts.get("lora_B.weight")
            else:
                kind, a_key, b_key = "embedding", parts.get("lora_embedding_A"), parts.get("lora_embedding_B")
            if a_key is None or b_key is None:
                raise CorruptCheckpointError(
                    f"Adapter {self.name!r}: module {path!r} has only one of its LoRA factors "
                    f"({sorted(parts)}). Save the adapter again with PeftModel.save_pretrained.",
                    ingredient=self.name,
                    tensor_name=a_key or b_key,
                )
            a_info, b_info = self.source.info(a_key), self.source.info(b_key)
            if len(a_info.shape) != 2 or len(b_info.shape) != 2:
                raise UnsupportedAdapterError(
                    f"Adapter {self.name!r}: module {path!r} has {len(a_info.shape)}-d LoRA factors (LoRA on a "
                    "convolution layer); only Linear, Conv1D and Embedding LoRA can be souped.",
                    ingredient=self.name,
                    tensor_name=a_key,
                )
            rank = int(pattern_value(cfg.get("rank_pattern"), path, r_default))
            alpha = float(pattern_value(cfg.get("alpha_pattern"), path, alpha_default))
            if a_info.shape[0] != rank or b_info.shape[1] != rank:
                raise CorruptCheckpointError(
                    f"Adapter {self.name!r}: module {path!r} has factors of rank {a_info.shape[0]} x "
                    f"{b_info.shape[1]} but its config (r / rank_pattern) says rank {rank}. The config does "
                    "not belong to these weights.",
                    ingredient=self.name,
                    tensor_name=a_key,
                )
            bias_key = parts.get("lora_B.bias")
            module = LoraModule(
                path=path,
                kind=kind,
                a_key=a_key,
                b_key=b_key,
                bias_key=bias_key,
                rank=rank,
                alpha=alpha,
                scaling=lora_scaling(alpha, rank, use_rslora),
                in_features=int(a_info.shape[1]),
                out_features=int(b_info.shape[0]),
            )
            self.modules[path] = module
            self._by_tensor[module.weight_name] = (module, "weight")
            if bias_key is not None:
                self._by_tensor[module.bias_name] = (module, "bias")
        if not self.modules and not self.full_tensors:
            raise CorruptCheckpointError(
                f"Adapter {self.name!r} holds no tensors. Save it again with PeftModel.save_pretrained.",
                ingredient=self.name,
            )

    # ------------------------------------------------------------------ metadata
    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None

    @property
    def base_revision(self) -> str | None:
        return self.config.get("revision") or None

    @property
    def task_type(self) -> str | None:
        return _plain(self.config.get("task_type")) or None

    @property
    def modules_to_save(self) -> list[str]:
        return list(self.config.get("modules_to_save") or [])

    def is_module_to_save(self, tensor_name: str) -> bool:
        """Whether a full tensor belongs to a module listed in this adapter's `modules_to_save`."""
        module_path = tensor_name.rsplit(".", 1)[0]
        return any(module_path == m or module_path.endswith(f".{m}") for m in self.modules_to_save)

    def adapted_tensors(self) -> list[str]:
        """Names of the base tensors this adapter changes (LoRA deltas and full replacements)."""
        return sorted(set(self._by_tensor) | set(self.full_tensors))

    # ------------------------------------------------------------------ math
    def tensor(self, key: str) -> torch.Tensor:
        """One stored adapter tensor as float32 (a fresh tensor)."""
        import torch

        return self.source.get(key).to(torch.float32, copy=True)

    def factors(self, module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
        """`(A, B)` in LoRA layout, float32: `A` is `(r, in)`, `B` is `(out, r)` (embedding factors transposed
        into that layout, so that `B @ A` always has shape `(out_features, in_features)`)."""
        return self.tensor(module.a_key), self.tensor(module.b_key)

    def delta_lora(self, module: LoraModule) -> torch.Tensor:
        """`scaling * B @ A` in LoRA layout `(out_features, in_features)`, float32."""
        a, b = self.factors(module)
        return b.mul_(module.scaling) @ a  # scale the small factor, not the product

    def is_transposed(
        self, module: LoraModule, base_shape: tuple[int, ...], conv1d: bool | None = None
    ) -> bool:
        """Whether the base tensor stores the module's weight as `(in, out)` (GPT-2 `Conv1D`, embeddings).

        The layout is read from the base tensor's shape. Square weights need the layer type: `conv1d`
        (whether the base layer is a transformers `Conv1D`, found by the caller from the base architecture);
        without it, the adapter's `fan_in_fan_out` flag is used (PEFT sets it per layer type while it wraps
        layers, so the saved flag is only reliable when all targets are of one type).

        Raises:
            [`IncompatibleIngredientsError`]: the base tensor has neither layout (another base model).
        """
        if module.kind == "embedding":
            expected = (module.in_features, module.out_features)
            if tuple(base_shape) != expected:
                raise self._shape_error(module, base_shape, [expected])
            return True
        lora_layout = (module.out_features, module.in_features)
        transposed = (module.in_features, module.out_features)
        shape = tuple(base_shape)
        if shape == lora_layout and shape == transposed:
            return bool(self.config.get("fan_in_fan_out", False)) if conv1d is None else conv1d
        if shape == lora_layout:
            return False
        if shape == transposed:
            return True
        raise self._shape_error(module, base_shape, [lora_layout, transposed])

    def _shape_error(self, module: LoraModule, base_shape, expected) -> IncompatibleIngredientsError:
        return IncompatibleIngredientsError(
            f"Adapter {self.name!r}: LoRA module {module.path!r} (rank {module.rank}) changes a "
            f"{module.out_features}x{module.in_features} weight, but the base tensor {module.weight_name!r} has "
            f"shape {tuple(base_shape)} (expected one of {expected}). The adapter was trained on another base "
            "model: pass its own base with base_model=.",
            ingredient=self.name,
            tensor_name=module.weight_name,
        )

    def delta(
        self, tensor_name: str, base_shape: tuple[int, ...], conv1d: bool | None = None
    ) -> torch.Tensor | None:
        """The exact float32 change this adapter makes to base tensor `tensor_name` (None if it changes none
        through LoRA factors), in the base tensor's layout.

        For a weight: `scaling * B @ A` (transposed for `Conv1D` / embeddings). For a bias with
        `lora_bias=True`: `scaling * lora_B.bias`.
        """
        hit = self._by_tensor.get(tensor_name)
        if hit is None:
            return None
        module, part = hit
        if part == "bias":
            bias = self.tensor(module.bias_key)  # type: ignore[arg-type]
            if tuple(bias.shape) != tuple(base_shape):
                raise self._shape_error(module, base_shape, [tuple(bias.shape)])
            return bias.mul_(module.scaling)
        transposed = self.is_transposed(module, base_shape, conv1d)
        delta = self.delta_lora(module)
        return delta.t().contiguous() if transposed else delta

    def add_delta_(
        self, out: torch.Tensor, tensor_name: str, base_shape: tuple[int, ...], conv1d: bool | None = None
    ) -> bool:
        """Add this adapter's change of `tensor_name` to the float32 tensor `out`, in place, without forming
        the delta (`out += (scaling * B) @ A` in one `addmm`). Returns whether anything was added."""
        hit = self._by_tensor.get(tensor_name)
        if hit is None:
            return False
        module, part = hit
        if part == "bias":
            out.add_(self.delta(tensor_name, base_shape))  # type: ignore[arg-type]
            return True
        transposed = self.is_transposed(module, base_shape, conv1d)
        a, b = self.factors(module)
        b.mul_(module.scaling)
        if transposed:
            out.addmm_(a.t(), b.t())
        else:
            out.addmm_(b, a)
        return True

    def replacement(self, tensor_name: str) -> torch.Tensor | None:
        """The full tensor this adapter stores for `tensor_name` (`modules_to_save`, trained biases), float32."""
        key = self.full_tensors.get(tensor_name)
        return None if key is None else self.tensor(key)

    def close(self) -> None:
        self.source.close()


def check_supported(config: dict[str, Any], name: str) -> None:
    """Refuse adapter types and LoRA options whose merged weights are not `base + scaling * B @ A`.

    Raises:
        [`UnsupportedAdapterError`]: naming the adapter and the option.
    """
    peft_type = _plain(config.get("peft_type"))
    if peft_type is None:
        raise UnsupportedAdapterError(
            f"Adapter {name!r}: its config has no peft_type; it is not a PEFT adapter config.",
            ingredient=name,
        )
    if str(peft_type).upper() != "LORA":
        raise UnsupportedAdapterError(
            f"Adapter {name!r} is a {peft_type} adapter; hf_soups implements the exact math of LoRA adapters only. "
            "Merge it into its base with merge_and_unload() and soup the merged models instead.",
            ingredient=name,
        )
    for key, what in _UNSUPPORTED_OPTIONS:
        value = config.get(key)
        if value not in (None, False, [], {}, ""):
            raise UnsupportedAdapterError(
                f"Adapter {name!r} uses {key}={value!r}: {what}. hf_soups does not implement its math; merge "
                "the adapter into its base (merge_and_unload()) and soup the merged models instead.",
                ingredient=name,
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise UnsupportedAdapterError(
            f"Adapter {name!r} uses init_lora_weights={init!r}, which changes the base weights (or freezes a factor "
            "that is not saved): its delta is not scaling * B @ A over the original base. Save it with "
            "path_initial_model_for_weight_conversion= (PEFT converts it to plain LoRA) and soup that.",
            ingredient=name,
        )
    if init not in _PLAIN_INITS and not isinstance(init, bool):
        raise UnsupportedAdapterError(
            f"Adapter {name!r} uses init_lora_weights={init!r}, unknown to hf_soups.", ingredient=name
        )


def read_adapter(reference: Any, name: str | None = None) -> LoraAdapter:
    """Read a LoRA adapter from a folder (written by `PeftModel.save_pretrained`) or a live `PeftModel`.

    Args:
        reference (`str`, `os.PathLike` or `peft.PeftModel`):
            The adapter folder, or the model.
        name (`str`, *optional*):
            Display name for messages; defaults to the folder name.

    Returns:
        [`LoraAdapter`]

    Raises:
        [`IngredientNotFoundError`]: the folder holds no adapter.
        [`UnsupportedAdapterError`]: not a LoRA adapter, or an option whose math is not implemented.

    Example:

    ```python
    >>> from hf_soups.adapters import read_adapter
    >>> adapter = read_adapter("./runs/lora-a")  # doctest: +SKIP
    >>> sorted(adapter.modules)[:1]  # doctest: +SKIP
    ['bert.encoder.layer.0.attention.self.query']
    ```
    """
    if isinstance(reference, (str, os.PathLike)):
        return LoraAdapter.from_dir(reference, name=name)
    if hasattr(reference, "peft_config"):
        return LoraAdapter.from_peft_model(reference, name=name)
    raise UnsupportedAdapterError(
        f"Cannot read an adapter from a {type(reference).__name__}; pass an adapter folder or a peft.PeftModel.",
        ingredient=name,
    )
