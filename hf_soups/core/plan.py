"""Alignment: one [`MergePlan`] for all ingredients, computed before any averaging.

The rules that decide whether ingredients can be souped live in [`hf_soups.core.compat`] (one checker for
`merge_models`, `inspect` and `--dry-run`); [`build_plan`] runs it, raises its first fatal problem, and
turns what it learned into the plan. The plan says, for every output tensor, which key to read from each
ingredient (wrapper prefixes such as `module.` and `_orig_mod.` removed, tied weights resolved), whether
classification-head rows must be permuted into the reference ingredient's label order, and whether the
tensor is averaged (floating point) or checked equal and copied (integer and boolean buffers).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..utils import numel
from .compat import (  # noqa: F401 - re-exported: the names other modules know align by
    HEAD_NAME_PARTS,
    INPUT_EMBEDDING_SUFFIXES,
    STRUCTURAL_CONFIG_KEYS,
    TIED_OUTPUT_SUFFIXES,
    Alignment,
    CompatibilityReport,
    DistanceStats,
    check_ingredients,
    label_list,
    normalize_key,
    ties_embeddings,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..ingredients import ResolvedIngredient

logger = logging.getLogger(__name__)


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
        return numel(self.shape) * self.dtype.itemsize


@dataclass
class MergePlan:
    """The aligned plan shared by every recipe.

    Attributes:
        tensors (`list[TensorPlan]`): how each output tensor is made, in output order.
        config (`dict`): the soup's config.json.
        reference_index (`int`): the member whose names, label order and config the soup takes.
        names (`list[str]`): the members' display names, in plan order.
        report ([`CompatibilityReport`], *optional*): the checker's findings (warnings only, since the plan exists).
        distances ([`DistanceStats`], *optional*): filled by the engine while it streams the tensors; warns when
            the members cannot share one pre-trained starting point.
    """

    tensors: list[TensorPlan]
    config: dict[str, Any]
    reference_index: int
    names: list[str]
    report: CompatibilityReport | None = None
    distances: DistanceStats | None = None


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
        [`IncompatibleIngredientsError`]: the first fatal problem of [`check_ingredients`] (architecture,
            tensor names, shapes, labels, vocabulary, tokenizers), naming the ingredient and the tensor.
        [`CorruptCheckpointError`], [`IngredientNotFoundError`]: a weight file cannot be read.
    """
    report, alignment = check_ingredients(ingredients, reference_index=reference_index)
    report.raise_first_fatal()
    report.log_warnings()
    assert alignment is not None
    return plan_from_alignment(ingredients, report, alignment, dtype=dtype, reference_index=reference_index)


def plan_from_alignment(
    ingredients: Sequence[ResolvedIngredient],
    report: CompatibilityReport,
    alignment: Alignment,
    *,
    dtype: torch.dtype | None = None,
    reference_index: int = 0,
) -> MergePlan:
    """The plan of ingredients that [`check_ingredients`] found compatible (its report and alignment)."""
    ref_info = alignment.infos[reference_index]
    tensors: list[TensorPlan] = []
    for name in alignment.output_names:
        info = ref_info[name]
        floating = info.dtype.is_floating_point
        tensors.append(
            TensorPlan(
                name=name,
                shape=tuple(info.shape),
                dtype=dtype if (floating and dtype is not None) else info.dtype,
                source_keys=[alignment.key_maps[i][name] for i in range(len(ingredients))],
                row_permutations=[
                    perm if name in alignment.head_keys else None for perm in alignment.permutations
                ],
                mergeable=floating,
            )
        )
    config = dict(alignment.config)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    names = [ing.name for ing in ingredients]
    return MergePlan(
        tensors=tensors,
        config=config,
        reference_index=reference_index,
        names=names,
        report=report,
        distances=DistanceStats(names),
    )


def match_live_model(model: Any, plan: MergePlan) -> Any:
    """Untie a live model's output embeddings when the soup is untied and the model (the reference) is tied.

    A soup of tied and untied ingredients is untied (see [`hf_soups.core.compat`]): writing its output embeddings
    into a tied model would overwrite its input embeddings.
    """
    if ties_embeddings(plan.config) or not getattr(model.config, "tie_word_embeddings", False):
        return model
    import torch

    out = model.get_output_embeddings()
    model.config.tie_word_embeddings = False
    if out is not None:
        out.weight = torch.nn.Parameter(out.weight.detach().clone())
    return model
