"""A soup of LoRA adapters written as one LoRA adapter, exactly or truncated by SVD.

For a module adapted by ingredients `i` with coefficients `c_i`, the soup's weight change is
`sum_i c_i * s_i * B_i @ A_i`. Stacking the `A_i` (rows) and the `c_i * s_i * B_i` (columns) gives one
LoRA pair of rank `sum_i r_i` whose product is exactly that sum (no cross terms `B_i @ A_j`, unlike
averaging `A` and `B` separately). With `rank=k`, each module's summed delta is truncated to its best
rank-`k` approximation (SVD, computed through the QR factors of the stacked pair, so the full delta is
never formed when it is larger) and the relative Frobenius error of every module is reported.

The written adapter uses `scaling = 1` for every module (`lora_alpha = r`, with `rank_pattern` /
`alpha_pattern` entries for modules whose rank differs): `PeftModel.from_pretrained` loads it as is.

Tensors that adapters replace in full (`modules_to_save`, trained biases) are averaged as full tensors;
only those few base tensors are read, never the base model's other weights.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import (
    IncompatibleIngredientsError,
    IngredientNotFoundError,
    InvalidArgumentError,
    UnsupportedAdapterError,
)
from ..utils import single_threaded
from .lora import ADAPTER_SAFETENSORS_NAME, PEFT_PREFIX, LoraAdapter, LoraModule

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..core.sources import TensorSource
    from ..merge_ops import TensorRecipe

logger = logging.getLogger(__name__)

_BIAS_ORDER = {"none": 0, "lora_only": 1, "all": 2}


@dataclass
class AdapterSoup:
    """The result of [`build_adapter_soup`]: the tensors and config of one LoRA adapter.

    Attributes:
        tensors (`dict[str, torch.Tensor]`): saved-form tensors (keys as in `adapter_model.safetensors`).
        config (`dict`): `LoraConfig` keyword arguments.
        module_ranks (`dict[str, int]`): rank of every LoRA module written.
        svd_error (`dict[str, float]`): per module, relative Frobenius error of the truncation (`rank=` only).
        full_tensors (`list[str]`): base tensor names written in full (averaged).
    """

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    module_ranks: dict[str, int] = field(default_factory=dict)
    svd_error: dict[str, float] = field(default_factory=dict)
    full_tensors: list[str] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        """A JSON-friendly summary (for `Soup.report_extra`)."""
        ranks = list(self.module_ranks.values())
        out: dict[str, Any] = {
            "adapter_modules": len(self.module_ranks),
            "adapter_rank_min": min(ranks) if ranks else 0,
            "adapter_rank_max": max(ranks) if ranks else 0,
        }
        if self.full_tensors:
            out["adapter_full_tensors"] = list(self.full_tensors)
        if self.svd_error:
            out["adapter_svd_error"] = dict(self.svd_error)
            out["adapter_svd_error_max"] = max(self.svd_error.values())
        return out

    def write_config(self, directory: str | Path) -> None:
        """Write `adapter_config.json` (through `peft.LoraConfig`, so PEFT validates and versions it)."""
        from peft import LoraConfig

        LoraConfig(**self.config).save_pretrained(str(directory))

    def save(self, directory: str | Path) -> Path:
        """Write `adapter_config.json` and `adapter_model.safetensors` into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        stream = SafetensorsStream(directory / ADAPTER_SAFETENSORS_NAME)
        try:
            for k, v in self.tensors.items():
                stream.add(k, v)
        except BaseException:
            stream.abort()
            raise
        stream.close()
        self.write_config(directory)
        return directory


class SafetensorsStream:
    """Write a safetensors file tensor by tensor, without knowing the tensors in advance.

    Tensor bytes go to a side file as they come; `close` writes the header, then copies the bytes after it
    in chunks. Memory holds one tensor at a time, never the file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._data_path = self.path.with_name(f".{self.path.name}.data")
        self._file = open(self._data_path, "wb")
        self._header: dict[str, Any] = {}
        self._pos = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        import torch

        from ..core.sources import dtype_to_safetensors

        t = tensor.detach().cpu().contiguous().reshape(-1)
        nbytes = t.numel() * t.element_size()
        if nbytes:
            self._file.write(memoryview(t.view(torch.uint8).numpy()))
        self._header[key] = {
            "dtype": dtype_to_safetensors(tensor.dtype),
            "shape": list(tensor.shape),
            "data_offsets": [self._pos, self._pos + nbytes],
        }
        self._pos += nbytes

    def close(self) -> Path:
        import json
        import shutil
        import struct

        self._file.close()
        raw = json.dumps({"__metadata__": {"format": "pt"}, **self._header}, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        try:
            with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
                out.write(struct.pack("<Q", len(raw)))
                out.write(raw)
                shutil.copyfileobj(data, out, 16 * 2**20)
        finally:
            self._data_path.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        self._file.close()
        self._data_path.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)


def truncate_pair(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` approximation of `b @ a`, as a pair `(a_k, b_k)`, and its relative Frobenius error.

    `a` is `(R, in)` and `b` is `(out, R)`. When `R` is smaller than both sides, the SVD is computed from
    `R x R` Gram matrices in float64 (matrix products and two small symmetric eigendecompositions), so the
    `(out, in)` product is never formed; otherwise the product's SVD is taken directly.

    Returns:
        `(a_k, b_k, error)` with `a_k` `(k, in)`, `b_k` `(out, k)`, `k = min(rank, numerical rank of b @ a)`
        (at least 1) and `error = ||b @ a - b_k @ a_k||_F / ||b @ a||_F` (0 for a zero delta).

    Example:

    ```python
    >>> import torch
    >>> a, b = torch.randn(4, 10), torch.randn(12, 4)
    >>> a2, b2, err = truncate_pair(a, b, 4)
    >>> bool(torch.allclose(b2 @ a2, b @ a, atol=1e-4)), err < 1e-6
    (True, True)
    ```
    """
    import torch

    r_in, n_in = a.shape
    n_out = b.shape[0]
    if r_in <= min(n_out, n_in):
        with single_threaded():  # small eigendecompositions: thread start-up costs 100x the work on busy CPUs
            return _truncate_gram(a, b, rank)
    u, s_all, vh = torch.linalg.svd(b.float() @ a.float(), full_matrices=False)
    return _cut(u * s_all, vh, s_all, rank, a.dtype, b.dtype)


def _truncate_gram(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`truncate_pair` for a stacked rank below both sides, from `R x R` Gram matrices in float64."""
    import torch

    a64, b64 = a.double(), b.double()
    # a = V diag(sqrt(lam)) Qa^T with orthonormal rows Qa^T = diag(1/sqrt(lam)) V^T a
    lam, v = torch.linalg.eigh(a64 @ a64.T)
    keep = lam > max(float(lam.max()), 0.0) * 1e-13
    v, sq = v[:, keep], lam[keep].clamp_min(0).sqrt()
    c = b64 @ (v * sq)  # b @ a = c @ Qa^T
    mu, w = torch.linalg.eigh(c.T @ c)  # c = U diag(s) W^T with s^2 = mu
    mu, w = mu.flip(0).clamp_min(0), w.flip(1)
    left = c @ w  # = U diag(s)
    right = (w.T / sq) @ (v.T @ a64)  # = W^T Qa^T: orthonormal rows
    return _cut(left, right, mu.sqrt(), rank, a.dtype, b.dtype)


def _cut(left, right, s_all, rank: int, a_dtype, b_dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Keep the top `rank` of `left @ right` (`left = U diag(s)`, `right = V^T`), split as sqrt(s) each side."""
    import torch

    positive = int((s_all > s_all.max() * 1e-12).sum()) if s_all.numel() and float(s_all.max()) > 0 else 0
    k = max(1, min(rank, positive if positive else 1))
    total = float((s_all.double() ** 2).sum())
    error = math.sqrt(max(float((s_all[k:].double() ** 2).sum()), 0.0) / total) if total > 0 else 0.0
    root = s_all[:k].clamp_min(torch.finfo(s_all.dtype).tiny).sqrt()
    b_k = (left[:, :k] / root).to(b_dtype)  # U diag(sqrt(s))
    a_k = (right[:k] * root[:, None]).contiguous().to(a_dtype)  # diag(sqrt(s)) V^T
    return a_k, b_k, error


def tied_alias(name: str, keys) -> str | None:
    """The input-embedding key that a missing tied output embedding (`lm_head.weight`, ...) shares, if unique."""
    from ..core.plan import INPUT_EMBEDDING_SUFFIXES, TIED_OUTPUT_SUFFIXES

    if not name.endswith(TIED_OUTPUT_SUFFIXES):
        return None
    embeddings = [k for k in keys if k.endswith(INPUT_EMBEDDING_SUFFIXES)]
    return embeddings[0] if len(embeddings) == 1 else None


def _escape_module(path: str) -> str:
    # rank_pattern / alpha_pattern keys are regexes matched as rf"(.*\.)?({key})$": anchor the full path.
    return "^" + re.escape(path)


def build_adapter_soup(
    members: Sequence[LoraAdapter | None],
    coefficients: Sequence[float],
    *,
    base: TensorSource | None = None,
    rank: int | None = None,
    dtype: torch.dtype | None = None,
    names: Sequence[str] | None = None,
    sink: Callable[[str, torch.Tensor], None] | None = None,
    recipe: TensorRecipe | None = None,
) -> AdapterSoup:
    """One LoRA adapter equal to `sum_i coefficients[i] * member_i` (members over one base model).

    Modules are computed one at a time; with `sink`, each finished tensor is handed to it (and not kept),
    so memory holds one module, whatever the size of the result (see [`write_adapter_soup`]).

    Args:
        members (`Sequence[LoraAdapter | None]`):
            The adapters; `None` stands for the base model itself (WiSE-FT's zero-shot end).
        coefficients (`Sequence[float]`):
            One per member; they must sum to 1 (the base weights appear once in the result).
        base ([`TensorSource`], *optional*):
            The base model's tensors. Only the tensors that some adapter replaces in full
            (`modules_to_save`, trained biases) and that another member leaves unchanged are read.
        rank (`int`, *optional*):
            Truncate every module's summed delta to this rank (SVD) and report the error. Default: exact,
            rank = sum of the members' ranks for that module.
        dtype (`torch.dtype`, *optional*):
            dtype of the written tensors (default: each tensor's own, the factors' for LoRA pairs).
        names (`Sequence[str]`, *optional*):
            Display names of the members, for messages.
        sink (`Callable[[str, torch.Tensor], None]`, *optional*):
            Receives every saved-form tensor as it is computed. Default: collect them in `AdapterSoup.tensors`.
        recipe ([`~hf_soups.merge_ops.TensorRecipe`], *optional*):
            A method on task vectors that is not linear in them (TIES, DARE, Model Stock) instead of
            `coefficients` (whose non-zero entries then only mark the adapters, in recipe order). Each module's
            soup delta is the method applied to the members' exact ΔWᵢ (in the base tensor's layout, so that
            DARE drops the same entries as the merged form), written as the truncated SVD of rank `rank`
            (required: such a delta has no exact low-rank form).

    Returns:
        [`AdapterSoup`]

    Raises:
        [`InvalidArgumentError`]: coefficients that do not sum to 1, or a rank below 1.
        [`IncompatibleIngredientsError`]: two adapters adapt one module with different shapes or kinds.
        [`IngredientNotFoundError`]: a base tensor is needed but `base` is None.
    """
    import torch

    if len(members) != len(coefficients):
        raise InvalidArgumentError(
            f"{len(coefficients)} coefficients for {len(members)} adapter soup members."
        )
    names = list(names) if names is not None else [m.name if m is not None else "base model" for m in members]
    total = float(sum(coefficients))
    if recipe is None and not math.isclose(total, 1.0, rel_tol=0, abs_tol=1e-6):
        raise InvalidArgumentError(
            f"An adapter soup written as an adapter needs coefficients that sum to 1 (got {total:.6g}): the base "
            'weights appear once in base + sum_i c_i * delta_i. Use adapter_output="merged" for other combinations.'
        )
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise InvalidArgumentError(f"rank={rank!r}: pass a positive integer (or None for the exact adapter).")
    active = [(i, float(c), m) for i, (m, c) in enumerate(zip(members, coefficients)) if c != 0]
    adapters = [(i, c, m) for i, c, m in active if m is not None]
    if not adapters:
        raise InvalidArgumentError(
            "No adapter has a non-zero coefficient: the soup is the base model itself."
        )
    first = adapters[0][2]
    if recipe is not None:
        return _build_svd_adapter_soup(recipe, adapters, first, base=base, rank=rank, dtype=dtype, sink=sink)

    # ---- full tensors: replaced somewhere, or folded (a LoRA module whose weight is replaced elsewhere)
    full: dict[str, None] = {}
    for _, _, m in adapters:
        for t in m.full_tensors:
            full[t] = None
    for _, _, m in adapters:
        for mod in m.modules.values():
            if mod.weight_name in full and any(
                (other.modules.get(mod.path) is not None and other.modules[mod.path].bias_key)
                for _, _, other in adapters
            ):
                full[mod.bias_name] = None

    base_keys = set(base.keys()) if base is not None else set()

    def base_key(name: str) -> str | None:
        if name in base_keys:
            return name
        return tied_alias(name, base_keys)

    def base_info(name: str):
        key = base_key(name)
        return base.info(key) if base is not None and key is not None else None

    # ---- LoRA modules: check them all before computing anything
    paths: list[str] = sorted(
        {p for _, _, m in adapters for p, mod in m.modules.items() if mod.weight_name not in full}
    )
    plans: dict[str, list[tuple[int, float, LoraAdapter, LoraModule]]] = {}
    for p in paths:
        parts = [(i, c, m, m.modules[p]) for i, c, m in adapters if p in m.modules]
        i0, _, _m0, mod0 = parts[0]
        for i, _, _m, mod in parts[1:]:
            if (mod.kind, mod.in_features, mod.out_features) != (
                mod0.kind,
                mod0.in_features,
                mod0.out_features,
            ):
                raise IncompatibleIngredientsError(
                    f"Adapters {names[i0]!r} and {names[i]!r} adapt module {p!r} differently ({mod0.kind} "
                    f"{mod0.out_features}x{mod0.in_features} vs {mod.kind} {mod.out_features}x{mod.in_features}): "
                    "they were not trained on the same base model.",
                    ingredient=names[i],
                    tensor_name=mod.weight_name,
                )
        plans[p] = parts
    lora_bias = any(
        mod.bias_key is not None and mod.bias_name not in full
        for parts in plans.values()
        for *_, mod in parts
    )
    embedding_paths = [p for p, parts in plans.items() if parts[0][3].kind == "embedding"]
    if lora_bias and embedding_paths:
        raise UnsupportedAdapterError(
            f"The adapter soup would need lora_bias=True (an adapter trains LoRA biases) and also adapts embedding "
            f"module {embedding_paths[0]!r}; PEFT does not support LoRA biases on embeddings. Use "
            'adapter_output="merged".',
            tensor_name=embedding_paths[0],
        )

    tensors: dict[str, torch.Tensor] = {}
    emit = sink if sink is not None else tensors.__setitem__
    module_ranks: dict[str, int] = {}
    svd_error: dict[str, float] = {}
    factor_dtype = dtype
    if factor_dtype is None and first.modules:
        factor_dtype = first.source.info(next(iter(first.modules.values())).a_key).dtype
    for p, parts in plans.items():
        a_parts, b_parts = [], []
        bias_sum = None
        for _, c, m, mod in parts:
            a, b = m.factors(mod)
            a_parts.append(a)
            b_parts.append(b.mul_(c * mod.scaling))
            if mod.bias_key is not None and mod.bias_name not in full:
                bias = m.tensor(mod.bias_key).mul_(c * mod.scaling)
                bias_sum = bias if bias_sum is None else bias_sum.add_(bias)
        a_cat, b_cat = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)
        del a_parts, b_parts
        if rank is not None:
            a_cat, b_cat, err = truncate_pair(a_cat, b_cat, rank)
            svd_error[p] = err
        module_ranks[p] = int(a_cat.shape[0])
        a_name, b_name = (
            ("lora_A.weight", "lora_B.weight")
            if parts[0][3].kind == "linear"
            else ("lora_embedding_A", "lora_embedding_B")
        )
        emit(f"{PEFT_PREFIX}{p}.{a_name}", a_cat.to(factor_dtype or a_cat.dtype))
        emit(f"{PEFT_PREFIX}{p}.{b_name}", b_cat.to(factor_dtype or b_cat.dtype))
        if lora_bias:
            if bias_sum is None:
                bias_sum = torch.zeros(b_cat.shape[0], dtype=torch.float32)
            emit(f"{PEFT_PREFIX}{p}.lora_B.bias", bias_sum.to(factor_dtype or bias_sum.dtype))

    # ---- full tensors, one at a time
    for tname in full:
        info = base_info(tname)
        shape = tuple(info.shape) if info is not None else None
        acc = None
        base_value = None
        out_dtype = dtype
        for i, c, m in active:
            value = m.replacement(tname) if m is not None else None
            if value is None:
                if base_value is None:
                    if info is None:
                        raise IngredientNotFoundError(
                            f"The adapter soup needs base tensor {tname!r} (replaced in full by one adapter, kept by "
                            f"{names[i]!r}), but the base model is {'unknown' if base is None else 'missing it'}. "
                            "Pass the adapters' base model with base_model=.",
                            ingredient=names[i],
                            tensor_name=tname,
                        )
                    base_value = base.get(base_key(tname)).to(torch.float32, copy=True)  # type: ignore[union-attr,arg-type]
                    out_dtype = out_dtype or info.dtype
                value = base_value.clone()
            else:
                out_dtype = out_dtype or (
                    m.source.info(m.full_tensors[tname]).dtype if m is not None else None
                )
            if m is not None:
                m.add_delta_(value, tname, shape or tuple(value.shape))
            if shape is not None and tuple(value.shape) != shape:
                raise IncompatibleIngredientsError(
                    f"Adapter {names[i]!r} stores tensor {tname!r} with shape {tuple(value.shape)}, but the base "
                    f"model's has shape {shape}. The adapter was trained on another base model.",
                    ingredient=names[i],
                    tensor_name=tname,
                )
            acc = value.mul_(c) if acc is None else acc.add_(value, alpha=c)
        module, _, param = tname.rpartition(".")
        key = f"{PEFT_PREFIX}{module}.base_layer.{param}" if module in plans else f"{PEFT_PREFIX}{tname}"
        emit(key, acc.to(out_dtype or torch.float32))  # type: ignore[union-attr]
        del acc, base_value

    # ---- config
    modules_to_save: list[str] = []
    for _, _, m in adapters:
        for entry in m.modules_to_save:
            if entry not in modules_to_save:
                modules_to_save.append(entry)
    bias_mode = max(
        (str(m.config.get("bias", "none")) for _, _, m in adapters), key=lambda v: _BIAS_ORDER.get(v, 0)
    )
    config = _adapter_config(
        first,
        adapters,
        module_ranks,
        modules_to_save=modules_to_save or None,
        bias=bias_mode,
        lora_bias=lora_bias,
    )
    return AdapterSoup(
        tensors=tensors,
        config=config,
        module_ranks=module_ranks,
        svd_error=svd_error,
        full_tensors=list(full),
    )


def _adapter_config(first, adapters, module_ranks, *, modules_to_save, bias, lora_bias) -> dict[str, Any]:
    """The `adapter_config.json` of a soup: the most common module rank as `r`, the others in `rank_pattern`, and
    `lora_alpha` equal to each rank (the factors already carry every scaling)."""
    ranks = list(module_ranks.values())
    r = max(set(ranks), key=lambda v: (ranks.count(v), v)) if ranks else 8
    pattern = {_escape_module(p): k for p, k in module_ranks.items() if k != r}
    return {
        "base_model_name_or_path": first.base_model_name_or_path,
        "revision": first.base_revision,
        "task_type": first.task_type,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": dict(pattern),
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "target_modules": sorted(module_ranks),
        "modules_to_save": modules_to_save,
        "fan_in_fan_out": any(bool(m.config.get("fan_in_fan_out", False)) for _, _, m in adapters),
        "bias": bias,
        "lora_bias": lora_bias,
        "lora_dropout": float(first.config.get("lora_dropout", 0.0) or 0.0),
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _build_svd_adapter_soup(recipe, adapters, first, *, base, rank, dtype, sink) -> AdapterSoup:
    """[`build_adapter_soup`] of a non-linear method: per module, the method on the exact ΔWᵢ, then its SVD."""
    import torch

    from ..merge_ops import merge_tensor

    method = recipe.method
    if not recipe.needs_base:
        raise UnsupportedAdapterError(
            f"adapter_output='adapter': method={method!r} interpolates the weights themselves, not their changes, "
            "so its soup is no change of the base model; use adapter_output='merged'."
        )
    if rank is None:
        raise InvalidArgumentError(
            f"rank: method={method!r} is not linear in the adapters' ΔW, so its adapter form is a truncated SVD of "
            "each module's merged change: pass rank= (its error per module is in the report), or use "
            "adapter_output='merged' for the exact soup."
        )
    for _, _, m in adapters:
        full = [t for t in m.full_tensors] + [
            mod.bias_name for mod in m.modules.values() if mod.bias_key is not None
        ]
        if full:
            raise UnsupportedAdapterError(
                f"adapter_output='adapter': adapter {m.name!r} also trains full tensors or LoRA biases ({full[0]!r}), "
                f"which the SVD form of method={method!r} does not cover; use adapter_output='merged'.",
                ingredient=m.name,
                tensor_name=full[0],
            )
    base_keys = set(base.keys()) if base is not None else set()
    tensors: dict[str, torch.Tensor] = {}
    emit = sink if sink is not None else tensors.__setitem__
    module_ranks: dict[str, int] = {}
    svd_error: dict[str, float] = {}
    paths = sorted({p for _, _, m in adapters for p in m.modules})
    for p in paths:
        owner, mod = next((m, m.modules[p]) for _, _, m in adapters if p in m.modules)
        lora_layout = (mod.out_features, mod.in_features)
        key = mod.weight_name if mod.weight_name in base_keys else tied_alias(mod.weight_name, base_keys)
        shape = tuple(base.info(key).shape) if key is not None else lora_layout  # type: ignore[union-attr]
        transposed = owner.is_transposed(mod, shape)
        deltas = []
        for _, _, m in adapters:  # every adapter, in recipe order (DARE's stream is keyed by the position)
            other = m.modules.get(p)
            if other is not None and (other.kind, other.in_features, other.out_features) != (
                mod.kind,
                mod.in_features,
                mod.out_features,
            ):
                raise IncompatibleIngredientsError(
                    f"Adapters {owner.name!r} and {m.name!r} adapt module {p!r} differently: they were not trained "
                    "on the same base model.",
                    ingredient=m.name,
                    tensor_name=mod.weight_name,
                )
            delta = m.delta(mod.weight_name, shape) if other is not None else None
            deltas.append(delta if delta is not None else torch.zeros(shape, dtype=torch.float32))
        merged = merge_tensor(recipe, mod.weight_name, torch.zeros(shape, dtype=torch.float32), deltas)
        del deltas
        if transposed:
            merged = merged.t()
        u, s_all, vh = torch.linalg.svd(merged.double(), full_matrices=False)
        factor_dtype = dtype or owner.source.info(mod.a_key).dtype
        a_k, b_k, err = _cut(u * s_all, vh, s_all, rank, factor_dtype, factor_dtype)
        svd_error[p] = err
        module_ranks[p] = int(a_k.shape[0])
        a_name, b_name = (
            ("lora_A.weight", "lora_B.weight")
            if mod.kind == "linear"
            else ("lora_embedding_A", "lora_embedding_B")
        )
        emit(f"{PEFT_PREFIX}{p}.{a_name}", a_k)
        emit(f"{PEFT_PREFIX}{p}.{b_name}", b_k)
    config = _adapter_config(
        first, adapters, module_ranks, modules_to_save=None, bias="none", lora_bias=False
    )
    return AdapterSoup(
        tensors=tensors, config=config, module_ranks=module_ranks, svd_error=svd_error, full_tensors=[]
    )


def write_adapter_soup(directory: str | Path, members, coefficients, **kwargs) -> AdapterSoup:
    """[`build_adapter_soup`] streamed into `directory` (`adapter_model.safetensors` written tensor by tensor,
    then `adapter_config.json`). Returns the soup's description (its `tensors` dict is empty)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stream = SafetensorsStream(directory / ADAPTER_SAFETENSORS_NAME)
    try:
        soup = build_adapter_soup(members, coefficients, sink=stream.add, **kwargs)
    except BaseException:
        stream.abort()
        raise
    stream.close()
    soup.write_config(directory)
    return soup
