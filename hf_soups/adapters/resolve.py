"""PEFT adapters in soups: adapter ingredients, their base model, and the two output forms.

An adapter ingredient is seen by the soup engine as its base model plus the adapter's exact weight
change ([`AdapterSource`] yields `base + scaling * B @ A` for adapted tensors, the adapter's own
tensors for `modules_to_save`, and base tensors otherwise, one tensor at a time). Uniform, greedy and
WiSE-FT recipes, and mixed soups of full fine-tunes and adapters of one base, therefore run unchanged.

With `adapter_output="adapter"`, the chosen coefficients are written as one LoRA adapter instead
(see [`hf_soups.adapters.export`]): exact (stacked factors) or truncated by SVD to `rank=`, without
reading the base model's weights.

Model-free LoRA math lives in [`hf_soups.adapters.lora`].
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.sources import TensorInfo, TensorSource
from ..errors import (
    IncompatibleIngredientsError,
    IngredientNotFoundError,
    InvalidArgumentError,
    UnsupportedAdapterError,
)
from ..ingredients import Ingredient, ResolvedIngredient, register_adapter_resolver, resolve
from .lora import LoraAdapter

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..kitchen import Kitchen

logger = logging.getLogger(__name__)

__all__ = [
    "AdapterIngredient",
    "AdapterSource",
    "bind_adapter_bases",
    "load_adapter_soup",
    "load_base_model",
    "open_adapter_source",
    "resolve_adapter",
]


# ------------------------------------------------------------------------------------------ sources


def _may_use_conv1d(model_type: str) -> bool:
    """Whether transformers' modeling file for `model_type` mentions `Conv1D` (True when it cannot be found).

    Reading the file is cheap; importing the model code and building it on the meta device is not (seconds
    of imports, ~100 MB of memory), so that is only done for architectures that have Conv1D layers.
    """
    import importlib.util

    name = model_type.replace("-", "_")
    try:
        spec = importlib.util.find_spec(f"transformers.models.{name}.modeling_{name}")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return True
    try:
        return "Conv1D" in Path(spec.origin).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True


def conv1d_modules(config: dict[str, Any], paths: list[str]) -> dict[str, bool]:
    """Which of `paths` are transformers `Conv1D` layers in the architecture of `config` (built on the meta
    device: no weights are allocated). Empty when the architecture cannot be built."""
    model_type = config.get("model_type")
    if model_type and not _may_use_conv1d(str(model_type)):
        return dict.fromkeys(paths, False)
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig
        from transformers.pytorch_utils import Conv1D

        from ..loading import model_class_for

        cfg = dict(config)
        model_type = cfg.pop("model_type")
        config_obj = AutoConfig.for_model(model_type, **cfg)
        with init_empty_weights():
            model = model_class_for(config)._from_config(config_obj)
        out = {}
        for path in paths:
            try:
                out[path] = isinstance(model.get_submodule(path), Conv1D)
            except AttributeError:
                continue
        return out
    except Exception as e:  # noqa: BLE001 - any failure only loses a hint
        logger.debug("Could not build the base architecture on the meta device (%s).", e)
        return {}


class SharedBaseSource(TensorSource):
    """A base model's tensors, shared by every adapter ingredient of that base.

    Reads pass straight through into the caller's buffer: each adapter ingredient reads the base tensors it
    needs like any ingredient reads its own (page-cache speed), and nothing is kept between tensors, so the
    memory of an adapter soup is that of a soup of full models. It also caches, per module, whether a
    square weight belongs to a `Conv1D` layer (found once, on the meta device).
    """

    def __init__(self, base: TensorSource, config: dict[str, Any] | None = None):
        self.base = base
        self.config = dict(config or {})
        self.description = base.description
        self._conv1d: dict[str, bool | None] = {}

    def conv1d(self, paths: list[str]) -> dict[str, bool]:
        """Layer-type hints for square weights (cached)."""
        todo = [p for p in paths if p not in self._conv1d]
        if todo:
            found = conv1d_modules(self.config, todo) if self.config.get("model_type") else {}
            for p in todo:
                self._conv1d[p] = found.get(p)
        return {p: bool(self._conv1d[p]) for p in paths if self._conv1d.get(p) is not None}

    def keys(self) -> list[str]:
        return self.base.keys()

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def get(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        return self.base.get(name, buffer)

    def close(self) -> None:
        self.base.close()


class AdapterSource(TensorSource):
    """The tensors of `base + adapter`, computed lazily one tensor at a time.

    Args:
        adapter ([`LoraAdapter`]):
            The adapter.
        base ([`TensorSource`]):
            Its base model's tensors (ideally a [`SharedBaseSource`] shared by all adapters of the soup).
        base_config (`dict`, *optional*):
            The base's `config.json` (to resolve LoRA on a tied output embedding).

    Raises:
        [`IncompatibleIngredientsError`]: the adapter changes a tensor the base does not have, or one of
            another shape (it was trained on another base).
    """

    def __init__(self, adapter: LoraAdapter, base: TensorSource, base_config: dict[str, Any] | None = None):
        self.adapter = adapter
        self.base = base
        self.description = adapter.name
        keys = set(base.keys())
        square = [
            m.path for m in adapter.modules.values() if m.kind == "linear" and m.in_features == m.out_features
        ]
        self._conv1d: dict[str, bool] = (
            base.conv1d(square) if square and isinstance(base, SharedBaseSource) else {}
        )
        # base tensor name -> adapter tensor names applied to it (LoRA on a tied lm_head changes the embedding)
        self._changes: dict[str, list[str]] = {}
        for name in adapter.adapted_tensors():
            target = name if name in keys else self._tied_target(name, keys, base_config or {})
            self._changes.setdefault(target, []).append(name)
        for target, names in self._changes.items():
            shape = tuple(base.info(target).shape)
            for name in names:
                replacement_key = adapter.full_tensors.get(name)
                if replacement_key is not None:
                    got = tuple(adapter.source.info(replacement_key).shape)
                    if got != shape:
                        raise IncompatibleIngredientsError(
                            f"Adapter {adapter.name!r} replaces tensor {name!r} with shape {got}, but the base "
                            f"model's has shape {shape}. The adapter was trained on another base model (or another "
                            "number of labels): pass its own base with base_model=.",
                            ingredient=adapter.name,
                            tensor_name=name,
                        )
                hit = adapter._by_tensor.get(name)
                if hit is not None and hit[1] == "weight":
                    adapter.is_transposed(
                        hit[0], shape, self._conv1d.get(hit[0].path)
                    )  # raises on a mismatch

    def _tied_target(self, name: str, keys: set[str], config: dict[str, Any]) -> str:
        from .export import tied_alias

        alias = tied_alias(name, keys) if config.get("tie_word_embeddings", True) else None
        if alias is not None:
            logger.info(
                "Adapter %r changes %s, tied to %s in the base: the change applies to both (as merge_and_unload).",
                self.adapter.name,
                name,
                alias,
            )
            return alias
        if self.adapter.is_module_to_save(name):
            task = self.adapter.task_type or "the adapter's task"
            raise IncompatibleIngredientsError(
                f"Adapter {self.adapter.name!r} saves {name!r} (modules_to_save: a task head), but its base model "
                f"({self.base.description}) has no such tensor: the adapter was trained on the base loaded with a "
                f"new head for {task}. Save that model once (e.g. AutoModelForSequenceClassification.from_pretrained"
                "(base, num_labels=N).save_pretrained(dir)) and pass base_model=dir.",
                ingredient=self.adapter.name,
                tensor_name=name,
            )
        raise IncompatibleIngredientsError(
            f"Adapter {self.adapter.name!r} changes tensor {name!r}, which the base model "
            f"({self.base.description}) does not have. The adapter was trained on another base model: pass its "
            "own base with base_model=.",
            ingredient=self.adapter.name,
            tensor_name=name,
        )

    def keys(self) -> list[str]:
        return self.base.keys()

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def get(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        import torch

        changes = self._changes.get(name)
        if not changes:
            return self.base.get(name, buffer)
        shape = tuple(self.base.info(name).shape)
        value = None
        for adapted in changes:
            replaced = self.adapter.replacement(adapted)
            if replaced is not None:
                value = replaced
        if value is None:
            base = self.base.get(name, buffer)
            # A float32 base read into the caller's scratch buffer is modified in place (the engine consumes
            # it before its next read); anything else (another dtype, a live model's parameter) is copied.
            in_buffer = (
                buffer is not None
                and base.dtype == torch.float32
                and base.is_contiguous()
                and base.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
            )
            value = base if in_buffer else base.to(torch.float32, copy=True)
        for adapted in changes:
            hit = self.adapter._by_tensor.get(adapted)
            self.adapter.add_delta_(value, adapted, shape, self._conv1d.get(hit[0].path) if hit else None)
        return value

    def close(self) -> None:
        self.base.close()
        self.adapter.close()


# ------------------------------------------------------------------------------------------ ingredients


@dataclass
class AdapterIngredient:
    """What `ResolvedIngredient.adapter` holds for an adapter ingredient."""

    adapter: LoraAdapter
    base: ResolvedIngredient | None = None
    shared_base: SharedBaseSource | None = field(default=None, repr=False)
    peft_model: Any = field(default=None, repr=False)

    def open(self, resolved: ResolvedIngredient) -> AdapterSource:
        """The lazy tensors of `resolved` (the ingredient this describes): see [`open_adapter_source`]."""
        return open_adapter_source(resolved)

    def summary(self) -> dict[str, Any]:
        cfg = self.adapter.config
        ranks = sorted({m.rank for m in self.adapter.modules.values()})
        return {
            "peft_type": "LORA",
            "base_model": self.adapter.base_model_name_or_path,
            "base_revision": self.adapter.base_revision,
            "task_type": self.adapter.task_type,
            "ranks": ranks,
            "lora_alpha": cfg.get("lora_alpha"),
            "use_rslora": bool(cfg.get("use_rslora", False)),
            "lora_modules": len(self.adapter.modules),
            "modules_to_save": self.adapter.modules_to_save,
        }


def resolve_adapter(
    ingredient: Ingredient,
    *,
    path: str | os.PathLike | None = None,
    model: Any = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    commit_hash: str | None = None,
) -> ResolvedIngredient:
    """Resolve a PEFT adapter reference (a folder with `adapter_config.json`, or a `PeftModel`).

    The adapter is read (config and tensor headers; no weights) and checked for supported options. Its base
    model is bound later by [`bind_adapter_bases`] (from `base_model=` or `base_model_name_or_path`).

    Raises:
        [`UnsupportedAdapterError`]: not LoRA, or a LoRA option whose math is not implemented.
        [`IngredientNotFoundError`]: no adapter weights.
    """
    name = str(ingredient.name)
    if model is not None:
        adapter = LoraAdapter.from_peft_model(model, name=name)
    else:
        adapter = LoraAdapter.from_dir(path, name=name)  # type: ignore[arg-type]
    info = AdapterIngredient(adapter=adapter, peft_model=model)
    ingredient.metadata.setdefault("adapter", info.summary())
    return ResolvedIngredient(
        ingredient,
        "adapter",
        config={},
        path=Path(path).absolute() if path is not None else None,
        model=None,
        commit_hash=commit_hash,
        adapter=info,
    )


def _same_base_name(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


def _peft_model_base(model: Any, name: str) -> ResolvedIngredient:
    """The base model of a live, unmerged PeftModel (a copy with the LoRA layers removed, not merged)."""
    for module in model.get_base_model().modules():
        if getattr(module, "merged", False):
            raise UnsupportedAdapterError(
                f"Adapter {name!r}: the PeftModel has merged adapter weights, so its base weights are not the "
                "base model's. Call model.unmerge_adapter() first, or pass base_model=.",
                ingredient=name,
            )
    base_model = copy.deepcopy(model).unload()
    base_model.eval()
    base_ing = Ingredient(base_model, name=f"base of {name}")
    return ResolvedIngredient(base_ing, "memory", base_model.config.to_dict(), model=base_model)


def bind_adapter_bases(
    resolved: list[ResolvedIngredient],
    base: ResolvedIngredient | None = None,
    *,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
) -> ResolvedIngredient | None:
    """Check that the adapter ingredients share one base and task type, and give each its base model.

    The base is `base` (from `base_model=`) when given, else the adapters' `base_model_name_or_path` at its
    recorded revision (resolved once), else, for a live `PeftModel`, its own base weights.

    Returns:
        The adapters' base ([`ResolvedIngredient`]), or None when there is no adapter.

    Raises:
        [`IncompatibleIngredientsError`]: two adapters name different bases, revisions or task types.
        [`IngredientNotFoundError`]: no base can be found (pass `base_model=`).
    """
    adapters = [r for r in resolved if r.kind == "adapter"]
    if not adapters:
        return None
    first = adapters[0]
    a0 = first.adapter.adapter
    for r in adapters[1:]:
        a = r.adapter.adapter
        checks = (
            ("base model", a0.base_model_name_or_path, a.base_model_name_or_path, _same_base_name),
            ("base revision", a0.base_revision, a.base_revision, lambda x, y: x == y),
            ("task type", a0.task_type, a.task_type, lambda x, y: x == y),
        )
        for what, v0, v, same in checks:
            if v0 is not None and v is not None and not same(v0, v):
                raise IncompatibleIngredientsError(
                    f"Adapters {first.name!r} and {r.name!r} have different {what}s ({v0!r} vs {v!r}); an adapter "
                    "soup needs adapters of one base model and task.",
                    ingredient=r.name,
                )
    if base is not None:
        recorded = a0.base_model_name_or_path
        ref = base.ingredient.reference
        if recorded and isinstance(ref, str) and not _same_base_name(recorded, ref):
            logger.warning(
                "The adapters were trained on %r; using base_model=%r as their base (tensor shapes are checked).",
                recorded,
                ref,
            )
        wanted = a0.base_revision
        have = {base.ingredient.revision, base.ingredient.metadata.get("requested_revision")} - {None}
        if wanted and have and wanted not in have:
            logger.warning(
                "The adapters were trained on revision %r of their base; base_model=%r is at %s.",
                wanted,
                base.name,
                " / ".join(sorted(have)),
            )
        target = base
    else:
        target = None
        name = a0.base_model_name_or_path
        if name:
            rev = a0.base_revision or None
            try:
                target = resolve(
                    Ingredient(name, revision=rev), token=token, cache_dir=cache_dir, revision=revision
                )
            except IngredientNotFoundError:
                if first.adapter.peft_model is None:
                    raise
        if target is None:
            live = next((r for r in adapters if r.adapter.peft_model is not None), None)
            if live is None:
                raise IngredientNotFoundError(
                    f"Adapter {first.name!r} does not name its base model (base_model_name_or_path is empty); pass "
                    "it with base_model=.",
                    ingredient=first.name,
                )
            target = _peft_model_base(live.adapter.peft_model, live.name)
    if target.kind == "adapter":
        raise InvalidArgumentError(
            f"base_model={target.name!r} is itself an adapter; pass the model it adapts."
        )
    shared = SharedBaseSource(target.open(), target.config)
    for r in adapters:
        r.adapter.base = target
        r.adapter.shared_base = shared
        r.config = dict(target.config)
        r.ingredient.metadata.setdefault("adapter", r.adapter.summary())["base_model"] = target.name
    return target


def open_adapter_source(resolved: ResolvedIngredient) -> AdapterSource:
    """The lazy `base + delta` tensors of an adapter ingredient (binding its base first if needed)."""
    info: AdapterIngredient = resolved.adapter
    if info.base is None:
        bind_adapter_bases([resolved])
    assert info.base is not None and info.shared_base is not None
    return AdapterSource(info.adapter, info.shared_base, info.base.config)


def load_base_model(resolved: ResolvedIngredient):
    """A fresh instance of an adapter ingredient's base model (for evaluation and in-memory soups)."""
    from ..loading import model_class_for

    info: AdapterIngredient = resolved.adapter
    if info.base is None:
        bind_adapter_bases([resolved])
    base = info.base
    assert base is not None
    if base.model is not None:
        model = copy.deepcopy(base.model)
    else:
        model = model_class_for(base.config).from_pretrained(base.path)
    model.eval()
    return model


# ------------------------------------------------------------------------------------------ adapter form


def adapter_members(kitchen: Kitchen) -> list[LoraAdapter | None]:
    members: list[LoraAdapter | None] = []
    base_of_adapters = None
    for r in kitchen.members:
        if r.kind == "adapter":
            members.append(r.adapter.adapter)
            base_of_adapters = r.adapter.base
        else:
            members.append(None)
    for r, m in zip(kitchen.members, members):
        if m is None and r is not kitchen.base:
            raise InvalidArgumentError(
                f"adapter_output='adapter' needs every ingredient to be an adapter, but {r.name!r} is a full model. "
                "Soups that mix full fine-tunes and adapters can only be written merged (adapter_output='merged')."
            )
    if kitchen.base is not None and base_of_adapters is not None and kitchen.base is not base_of_adapters:
        logger.info("Treating base_model %r as the adapters' base in the adapter form.", kitchen.base.name)
    return members


def build_kitchen_adapter(kitchen: Kitchen, coefficients, directory: Path | None = None) -> Any:
    """The [`AdapterSoup`] of these coefficients (one per kitchen member); streamed into `directory` when
    given (its `tensors` then stay empty), else held in memory."""
    from ..merge_ops import TensorRecipe
    from .export import build_adapter_soup, write_adapter_soup

    members = adapter_members(kitchen)
    adapters = [r for r in kitchen.members if r.kind == "adapter"]
    kwargs = dict(
        base=adapters[0].adapter.shared_base if adapters else None,
        rank=kitchen.options.get("rank"),
        dtype=kitchen.dtype,
        names=[r.name for r in kitchen.members],
    )
    if isinstance(coefficients, TensorRecipe):  # TIES, DARE, Model Stock: the method on each module's ΔWᵢ
        members = [
            r.adapter.adapter for r in kitchen.ingredients
        ]  # recipe order (adapter_members checked them)
        kwargs.update(recipe=coefficients, names=[r.name for r in kitchen.ingredients])
        full = [1.0] * len(members)
    else:
        full = kitchen.full_coefficients(coefficients)
    if directory is not None:
        soup = write_adapter_soup(directory, members, full, **kwargs)
    else:
        soup = build_adapter_soup(members, full, **kwargs)
    ranks = sorted(set(soup.module_ranks.values()))
    logger.info(
        "Adapter soup: %d LoRA modules (rank %s), %d full tensors%s.",
        len(soup.module_ranks),
        ranks[0] if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}" if ranks else "-",
        len(soup.full_tensors),
        f", max SVD error {max(soup.svd_error.values()):.3g}" if soup.svd_error else "",
    )
    return soup


def load_adapter_soup(directory: str | os.PathLike, base_model: Any = None, revision: str | None = None):
    """Load a soup written with `adapter_output="adapter"` as a `peft.PeftModel` on its base model.

    Args:
        directory (`str` or `os.PathLike`):
            The soup folder (holds `adapter_config.json`).
        base_model (`str`, `os.PathLike` or `PreTrainedModel`, *optional*):
            The base model (instance, folder or Hub ID). Default: the adapter's `base_model_name_or_path` at
            its recorded `revision`.
        revision (`str`, *optional*):
            Revision of a Hub `base_model`.

    Returns:
        `peft.PeftModel` in eval mode.

    Example:

    ```python
    >>> from hf_soups.adapters.resolve import load_adapter_soup
    >>> model = load_adapter_soup("./soup-lora")  # doctest: +SKIP
    ```
    """
    import json

    from peft import PeftModel

    from ..loading import model_class_for

    directory = Path(directory)
    cfg = json.loads((directory / "adapter_config.json").read_text())
    if base_model is None or isinstance(base_model, (str, os.PathLike)):
        if base_model is None:
            base_model, revision = cfg.get("base_model_name_or_path"), cfg.get("revision")
        if not base_model:
            raise IngredientNotFoundError(
                f"{directory} is an adapter soup without base_model_name_or_path; pass base_model=."
            )
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(base_model, revision=revision)
        base_model = model_class_for(config.to_dict()).from_pretrained(base_model, revision=revision)
    model = PeftModel.from_pretrained(base_model, str(directory))
    model.eval()
    return model


register_adapter_resolver(resolve_adapter)
