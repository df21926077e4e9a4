"""Compatibility checks and alignment: one [`MergePlan`] for all ingredients, computed before any averaging.

The plan says, for every output tensor, which key to read from each ingredient (wrapper prefixes such as
`module.` and `_orig_mod.` removed, tied weights resolved), whether classification-head rows must be
permuted into the reference ingredient's label order, and whether the tensor is averaged (floating
point) or checked equal and copied (integer and boolean buffers).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import IncompatibleIngredientsError
from .tensors import TensorInfo, TensorSource

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .ingredients import ResolvedIngredient

logger = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Output-embedding tensors that checkpoints omit when they are tied to the input embeddings.
TIED_OUTPUT_SUFFIXES = (
    "lm_head.weight",
    "cls.predictions.decoder.weight",
    "embed_out.weight",
    "output.weight",
)
INPUT_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "word_embeddings.weight",
    "wte.weight",
    "shared.weight",
    "tok_embeddings.weight",
)
HEAD_NAME_PARTS = ("classifier", "score", "classification_head", "out_proj", "logits", "head")
# Config fields whose difference makes ingredients incompatible (beyond what tensor shapes reveal).
STRUCTURAL_CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)


def normalize_key(key: str) -> str:
    """Remove wrapper prefixes added by DDP (`module.`) and `torch.compile` (`_orig_mod.`)."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key.replace("._orig_mod.", ".")


@dataclass
class TensorPlan:
    """How one output tensor is made."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source_keys: list[str]
    row_permutations: list[list[int] | None] = field(default_factory=list)
    mergeable: bool = True

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass
class MergePlan:
    """The aligned plan shared by every recipe."""

    tensors: list[TensorPlan]
    config: dict[str, Any]
    reference_index: int
    names: list[str]
    label_permuted: list[bool]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def max_tensor_bytes(self, sources: Sequence[TensorSource]) -> int:
        """Largest tensor, in bytes, stored by any ingredient (for the reused read buffer)."""
        biggest = 0
        for t in self.tensors:
            for src, key in zip(sources, t.source_keys):
                biggest = max(biggest, src.info(key).nbytes)
        return biggest


def label_list(config: dict[str, Any]) -> list[str] | None:
    id2label = config.get("id2label")
    if not id2label:
        return None
    try:
        return [str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k))]
    except (TypeError, ValueError):
        return None


def _is_default_labels(labels: list[str]) -> bool:
    return all(label == f"LABEL_{i}" for i, label in enumerate(labels))


def check_configs(
    ingredients: Sequence[ResolvedIngredient], reference_index: int = 0
) -> list[list[int] | None]:
    """Check architecture, vocabulary and labels; return label permutations into the reference's order.

    Raises:
        [`IncompatibleIngredientsError`]: naming both ingredients, the config field and both values.
    """
    ref = ingredients[reference_index]
    ref_cfg = ref.config
    ref_arch = (ref_cfg.get("architectures") or [None])[0]
    ref_labels = label_list(ref_cfg)
    perms: list[list[int] | None] = []
    for ing in ingredients:
        cfg = ing.config
        if ing is ref:
            perms.append(None)
            continue
        for key in STRUCTURAL_CONFIG_KEYS:
            if key in ref_cfg and key in cfg and ref_cfg[key] != cfg[key]:
                raise IncompatibleIngredientsError(
                    f"Ingredients {ref.name!r} and {ing.name!r} have different architectures: config field "
                    f"{key!r} is {ref_cfg[key]!r} vs {cfg[key]!r}. A soup needs fine-tunes of one pre-trained "
                    "model; leave the odd one out.",
                    ingredient=ing.name,
                )
        arch = (cfg.get("architectures") or [None])[0]
        if ref_arch and arch and ref_arch != arch:
            raise IncompatibleIngredientsError(
                f"Ingredients {ref.name!r} and {ing.name!r} have different architecture classes: {ref_arch} vs "
                f"{arch}. Souping needs the same model class (same head); re-save one with the other's class or "
                "leave it out.",
                ingredient=ing.name,
            )
        if "vocab_size" in ref_cfg and "vocab_size" in cfg and ref_cfg["vocab_size"] != cfg["vocab_size"]:
            raise IncompatibleIngredientsError(
                _vocab_message(ref.name, ref_cfg["vocab_size"], ing.name, cfg["vocab_size"])
            )
        labels = label_list(cfg)
        perm = None
        if ref_labels is not None and labels is not None and ref_labels != labels:
            if sorted(ref_labels) != sorted(labels):
                raise IncompatibleIngredientsError(
                    f"Ingredients {ref.name!r} and {ing.name!r} were fine-tuned for different labels: "
                    f"{ref_labels} vs {labels}. Their classification heads cannot be averaged; soup only models "
                    "trained on the same label set.",
                    ingredient=ing.name,
                )
            if not (_is_default_labels(ref_labels) and _is_default_labels(labels)):
                perm = [labels.index(label) for label in ref_labels]
                logger.info(
                    "Ingredient %r lists its labels in another order; its head rows will be permuted.",
                    ing.name,
                )
        perms.append(perm)
    return perms


def _vocab_message(ref_name: str, ref_vocab: int, name: str, vocab: int) -> str:
    return (
        f"Ingredient {name!r} has a vocabulary of {vocab} tokens but {ref_name!r} has {ref_vocab}: its embeddings "
        "were resized (tokens added?). hf_soups does not truncate embeddings silently. Use ingredients fine-tuned "
        "with the same tokenizer, or resize every ingredient to one vocabulary with "
        "model.resize_token_embeddings(...) (after adding the same tokens) and re-save them."
    )


def _head_keys(keys: dict[str, str], infos: dict[str, TensorInfo], num_labels: int) -> list[str]:
    out = []
    for key in keys:
        info = infos[key]
        if not info.shape or info.shape[0] != num_labels:
            continue
        parts = key.split(".")
        if any(p in HEAD_NAME_PARTS for p in parts[:-1]):
            out.append(key)
    return out


def build_plan(
    ingredients: Sequence[ResolvedIngredient],
    *,
    dtype: torch.dtype | None = None,
    reference_index: int = 0,
) -> MergePlan:
    """Check that the ingredients can be souped and compute how every output tensor is made.

    Args:
        ingredients (`Sequence[ResolvedIngredient]`):
            Every ingredient taking part (a WiSE-FT base included).
        dtype (`torch.dtype`, *optional*):
            Output dtype of floating point tensors. Defaults to the reference ingredient's dtype, per tensor.
        reference_index (`int`, defaults to 0):
            The ingredient whose tensor names, label order and config the soup takes.

    Returns:
        [`MergePlan`]

    Raises:
        [`IncompatibleIngredientsError`]: architecture, tensor names, shapes, labels or vocabulary differ.
        [`CorruptCheckpointError`], [`IngredientNotFoundError`]: a weight file cannot be read.
    """
    perms = check_configs(ingredients, reference_index)
    sources = [ing.open() for ing in ingredients]
    key_maps: list[dict[str, str]] = []  # normalised -> stored key
    infos: list[dict[str, TensorInfo]] = []
    for ing, src in zip(ingredients, sources):
        mapping: dict[str, str] = {}
        info: dict[str, TensorInfo] = {}
        for key in src.keys():
            norm = normalize_key(key)
            if norm in mapping:
                raise IncompatibleIngredientsError(
                    f"Ingredient {ing.name!r} stores tensor {norm!r} twice (as {mapping[norm]!r} and {key!r}).",
                    ingredient=ing.name,
                    tensor_name=norm,
                )
            mapping[norm] = key
            info[norm] = src.info(key)
        key_maps.append(mapping)
        infos.append(info)

    ref = ingredients[reference_index]
    ref_keys = key_maps[reference_index]
    ref_info = infos[reference_index]

    resolved_keys: list[dict[str, str]] = []
    for i, ing in enumerate(ingredients):
        mapping = dict(key_maps[i])
        missing = [k for k in ref_keys if k not in mapping]
        tied_sources = _tied_sources(missing, mapping, infos[i], ref_info)
        for k, tied_to in tied_sources.items():
            mapping[k] = mapping[tied_to]
            infos[i][k] = infos[i][tied_to]
        missing = [k for k in missing if k not in tied_sources]
        extra = [k for k in key_maps[i] if k not in ref_keys]
        extra = [k for k in extra if not (k.endswith(TIED_OUTPUT_SUFFIXES) and _tied(ing.config))]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {len(missing)} tensor(s) that {ref.name!r} has: {_sample(missing)}")
            if extra:
                parts.append(f"has {len(extra)} tensor(s) that {ref.name!r} lacks: {_sample(extra)}")
            raise IncompatibleIngredientsError(
                f"Ingredient {ing.name!r} "
                + " and ".join(parts)
                + ". Ingredients must be the same architecture "
                "with the same head; check that every model was saved from the same model class.",
                ingredient=ing.name,
                tensor_name=(missing or extra)[0],
            )
        resolved_keys.append(mapping)

    num_labels = len(label_list(ref.config) or [])
    head_keys = set(_head_keys(ref_keys, ref_info, num_labels)) if any(perms) else set()
    if any(perms) and not head_keys:
        raise IncompatibleIngredientsError(
            f"Ingredients list their labels in different orders but no classification-head tensor with "
            f"{num_labels} rows was found in {ref.name!r}; cannot align the heads. Re-save the ingredients with the "
            "same id2label order.",
        )

    tensors: list[TensorPlan] = []
    for name in ref_keys:
        shape = ref_info[name].shape
        ref_dtype = ref_info[name].dtype
        for i, ing in enumerate(ingredients):
            other = infos[i][name]
            if other.shape != shape:
                raise IncompatibleIngredientsError(
                    _shape_message(ref, ing, name, shape, other.shape), ingredient=ing.name, tensor_name=name
                )
        floating = ref_dtype.is_floating_point
        if floating:
            for i, ing in enumerate(ingredients):
                if not infos[i][name].dtype.is_floating_point:
                    raise IncompatibleIngredientsError(
                        f"Tensor {name!r} is floating point in {ref.name!r} but {infos[i][name].dtype} in "
                        f"{ing.name!r}.",
                        ingredient=ing.name,
                        tensor_name=name,
                    )
        out_dtype = dtype if (floating and dtype is not None) else ref_dtype
        row_perms = [perm if name in head_keys else None for perm in perms]
        tensors.append(
            TensorPlan(
                name=name,
                shape=shape,
                dtype=out_dtype,
                source_keys=[resolved_keys[i][name] for i in range(len(ingredients))],
                row_permutations=row_perms,
                mergeable=floating,
            )
        )
    config = dict(ref.config)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    return MergePlan(
        tensors=tensors,
        config=config,
        reference_index=reference_index,
        names=[ing.name for ing in ingredients],
        label_permuted=[p is not None for p in perms],
    )


def _tied(config: dict[str, Any]) -> bool:
    return bool(config.get("tie_word_embeddings", True))


def _tied_sources(
    missing: list[str], mapping: dict[str, str], info: dict[str, TensorInfo], ref_info: dict[str, TensorInfo]
) -> dict[str, str]:
    """For missing output-embedding tensors, the (normalised) input embedding they are tied to."""
    out = {}
    for key in missing:
        if not key.endswith(TIED_OUTPUT_SUFFIXES):
            continue
        for candidate in mapping:
            if candidate.endswith(INPUT_EMBEDDING_SUFFIXES) and info[candidate].shape == ref_info[key].shape:
                out[key] = candidate
                break
    return out


def _sample(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _shape_message(ref, ing, name: str, shape: tuple, other: tuple) -> str:
    vocab = ref.config.get("vocab_size")
    if vocab and shape and other and shape[0] == vocab and other[0] != vocab and shape[1:] == other[1:]:
        return (
            _vocab_message(ref.name, shape[0], ing.name, other[0]) + f" (tensor {name!r}: {shape} vs {other})"
        )
    return (
        f"Tensor {name!r} has shape {tuple(shape)} in {ref.name!r} but {tuple(other)} in {ing.name!r}. "
        "Ingredients must share one architecture and head size; leave the odd one out."
    )
