"""The streaming engine: every soup is `sum_i c_i * theta_i`, computed one tensor name at a time.

Memory holds one float32 accumulator of the largest tensor, one read buffer and one output buffer,
whatever the number of ingredients. Non-finite values are detected on the accumulated result (one
cheap reduction per tensor); only then are the ingredients searched for the culprit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .errors import IncompatibleIngredientsError, NonFiniteTensorError, SoupError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .align import MergePlan, TensorPlan
    from .tensors import ShardedSafetensorsWriter, TensorSource

logger = logging.getLogger(__name__)


class TensorSink:
    """Receives the soup's tensors in plan order."""

    def write(self, plan: TensorPlan, tensor: torch.Tensor) -> None:
        raise NotImplementedError


class WriterSink(TensorSink):
    """Casts each tensor to its planned dtype (through a reused buffer) and appends it to a writer."""

    def __init__(self, writer: ShardedSafetensorsWriter, max_bytes: int):
        import torch

        self.writer = writer
        self._buf = torch.empty(max(max_bytes, 1), dtype=torch.uint8)

    def write(self, plan: TensorPlan, tensor: torch.Tensor) -> None:
        if tensor.dtype != plan.dtype:
            out = self._buf[: plan.nbytes].view(plan.dtype).view(plan.shape)
            out.copy_(tensor)
            tensor = out
        self.writer.write(plan.name, tensor)


class ModelSink(TensorSink):
    """Copies each tensor into a live model's parameters and buffers, in place.

    Used for in-memory soups and by recipes that evaluate many candidate soups with one model
    (no `from_pretrained` per candidate).
    """

    def __init__(self, model):
        self.model = model
        self._targets = model.state_dict()
        self._missing: list[str] = []

    def write(self, plan: TensorPlan, tensor: torch.Tensor) -> None:
        import torch

        target = self._targets.get(plan.name)
        if target is None:
            self._missing.append(plan.name)
            return
        with torch.no_grad():
            target.copy_(tensor)

    def finish(self) -> None:
        if self._missing:
            raise SoupError(
                f"{len(self._missing)} soup tensors have no counterpart in the live {type(self.model).__name__} "
                f"(e.g. {self._missing[:3]}); the config's 'architectures' does not match the weights. Fix "
                "config.json's architectures field of the first ingredient."
            )


class DictSink(TensorSink):
    """Collects tensors (cast to their planned dtype) in a dict; for small models and tests."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def write(self, plan: TensorPlan, tensor: torch.Tensor) -> None:
        self.tensors[plan.name] = tensor.to(plan.dtype, copy=True)


def read_aligned(
    plan: TensorPlan, index: int, source: TensorSource, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """Ingredient `index`'s tensor for `plan`, with head rows permuted to the reference label order."""
    t = source.get(plan.source_keys[index], buffer)
    perm = plan.row_permutations[index] if plan.row_permutations else None
    if perm is not None:
        import torch

        t = t.index_select(0, torch.tensor(perm, dtype=torch.long))
    return t


def combine(
    plan: MergePlan,
    sources: Sequence[TensorSource],
    coefficients: Sequence[float],
    sink: TensorSink,
    *,
    progress: bool = True,
    desc: str = "Cooking soup",
) -> None:
    """Write `sum_i coefficients[i] * ingredient_i` for every tensor of `plan` into `sink`.

    Floating point tensors are accumulated in float32 and handed to the sink as float32 (sinks cast to the
    planned dtype). Integer and boolean tensors are not averaged: they must be equal in every ingredient
    with a non-zero coefficient, and are copied.

    Args:
        plan ([`MergePlan`]): the aligned plan.
        sources (`Sequence[TensorSource]`): one per ingredient, in plan order.
        coefficients (`Sequence[float]`): one per ingredient; zeros are skipped (never read).
        sink ([`TensorSink`]): where results go.
        progress (`bool`): show a progress bar over tensors (honours `HF_HUB_DISABLE_PROGRESS_BARS`).

    Raises:
        [`NonFiniteTensorError`]: an ingredient tensor holds NaN or inf.
        [`IncompatibleIngredientsError`]: an integer buffer differs between ingredients.
    """
    import torch
    from huggingface_hub.utils import tqdm

    if len(coefficients) != len(sources):
        raise SoupError(f"internal error: {len(coefficients)} coefficients for {len(sources)} ingredients.")
    active = [(i, float(c)) for i, c in enumerate(coefficients) if c != 0]
    if not active:
        raise SoupError("internal error: every coefficient is zero.")
    max_bytes = plan.max_tensor_bytes([sources[i] for i, _ in active]) if plan.tensors else 0
    max_numel = max((_numel(t.shape) for t in plan.tensors), default=0)
    read_buf = torch.empty(max(max_bytes, 1), dtype=torch.uint8)
    acc_buf = torch.empty(max(max_numel, 1), dtype=torch.float32)

    with torch.no_grad():
        for tp in tqdm(plan.tensors, desc=desc, unit="tensor", disable=not progress, name="hf_soups"):
            if not tp.mergeable:
                sink.write(tp, _copy_checked(tp, sources, active, plan.names))
                continue
            acc = acc_buf[: _numel(tp.shape)].view(tp.shape)
            first = True
            for i, c in active:
                t = read_aligned(tp, i, sources[i], read_buf)
                if first:
                    if t.dtype == torch.float32:
                        torch.mul(t, c, out=acc)
                    else:
                        acc.copy_(t)
                        if c != 1.0:
                            acc.mul_(c)
                    first = False
                else:
                    acc.add_(t, alpha=c)
            if not bool(torch.isfinite(acc.sum())) and not bool(torch.isfinite(acc).all()):
                _raise_non_finite(tp, sources, active, plan.names, read_buf)
            sink.write(tp, acc)
    finish = getattr(sink, "finish", None)
    if finish is not None:
        finish()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _copy_checked(tp: TensorPlan, sources, active, names) -> torch.Tensor:
    import torch

    first_i = active[0][0]
    ref = read_aligned(tp, first_i, sources[first_i]).clone()
    for i, _ in active[1:]:
        other = read_aligned(tp, i, sources[i])
        if not torch.equal(ref, other):
            raise IncompatibleIngredientsError(
                f"Integer/boolean tensor {tp.name!r} differs between {names[first_i]!r} and {names[i]!r}; such "
                "buffers (position ids, counters) cannot be averaged and must be equal. Re-save the ingredients from "
                "the same base model.",
                ingredient=names[i],
                tensor_name=tp.name,
            )
    return ref


def _raise_non_finite(tp: TensorPlan, sources, active, names, buf) -> None:
    import torch

    for i, _ in active:
        t = read_aligned(tp, i, sources[i], buf)
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteTensorError(
                f"Ingredient {names[i]!r} has {bad} NaN/inf value(s) in tensor {tp.name!r}. The checkpoint is "
                "broken (diverged training or a bad save): leave it out of the soup.",
                ingredient=names[i],
                tensor_name=tp.name,
            )
    raise NonFiniteTensorError(
        f"Tensor {tp.name!r} overflowed while averaging (every ingredient is finite but the float32 sum is not).",
        tensor_name=tp.name,
    )
