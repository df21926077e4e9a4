"""Learned soup (Wortsman et al. 2022, Recipe 3): mixing coefficients learned by gradient descent on held-out loss.

The soup is θ(β) = Σᵢ softmax(β_g)ᵢ θᵢ for every group g of tensors: one group for the whole model
(`granularity="ingredient"`, the paper's *learned soup*) or one group per block of the model
(`granularity="layer"`, the paper's *learned soup by layer*, see [`layer_groups`]). The members are the
ingredients, plus the base model when `include_base=True` (a learned WiSE-FT). β starts at 0 (the uniform soup)
and is optimised with Adam on the task's loss on a part of `eval_dataset[select_on]`; the rest of that set (a
`validation_fraction` the optimiser never sees) picks the step whose validation loss is lowest (the uniform
start included) and stops the run after one epoch without improvement. With `validation_fraction=0` every
example trains and the β after the fixed budget (`epochs`) is served.

Memory does not grow with the number of ingredients. With αᵢ,g = softmax(β_g)ᵢ,

    ∂L/∂αᵢ,g = ⟨∂L/∂θ_g, θᵢ,g⟩,

so one backward pass through the single live model (holding θ(β)) gives ∂L/∂θ, and the N dot products are
computed by streaming each ingredient's tensors (one slice at a time, from the page cache) instead of holding N
models. The dot products are taken against θᵢ − θ_live (a shift common to every member, so the softmax gradient
is unchanged) to keep float32 precision where the fine-tunes are close. Then θ is rewritten in place from the
streamed ingredients.

Cost per optimiser step: `accumulation_steps` forward and backward passes of one model on `batch_size` examples,
plus two streamed reads of the N members' weights (one for the dot products, one to rewrite θ), plus one forward
pass over the validation split. Memory: one model, its gradient, and a few slice buffers, whatever N.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import EvaluationError, InvalidArgumentError, NonFiniteTensorError
from ..options import option
from ..utils import numel
from .base import RecipeParams, register_recipe
from .uniform import MODEL_SOUPS_URL

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..core.plan import MergePlan
    from ..core.sources import TensorSource
    from ..kitchen import Kitchen
    from ..merge_ops import TensorRecipe
    from ..soup import Soup

logger = logging.getLogger(__name__)

GRANULARITIES = ("ingredient", "layer")
EMBEDDING_MODULES = frozenset({"wte", "wpe", "shared"})
"""Module names that are embeddings without saying so (GPT-2's token and position tables, T5's shared table)."""
_SLICE = 1 << 17  # elements per streamed slice


@dataclass
class LearnedParams(RecipeParams):
    """Parameters of the learned soup."""

    granularity: str = option(
        "ingredient",
        help="learned: one coefficient per ingredient ('ingredient'), or per ingredient and per block of the "
        "model ('layer': tensors grouped by module path up to the layer index; embeddings and the rest each "
        "one group).",
        kind="choice",
        choices=GRANULARITIES,
    )
    include_base: bool = option(
        False,
        help="learned: also mix base_model as a member (a learned WiSE-FT).",
        kind="bool",
        cli={"action": "store_true"},
    )
    learning_rate: float = option(
        0.05, help="learned: Adam's learning rate on the mixing logits.", kind="number", cli={"type": float}
    )
    epochs: int = option(
        5,
        help="learned: passes over the training part of the selection set (the budget).",
        kind="positive_int",
        cli={"type": int},
    )
    accumulation_steps: int = option(
        4,
        help="learned: batches whose gradients are summed before one optimiser step (each step reads every "
        "ingredient twice).",
        kind="positive_int",
        cli={"type": int},
    )
    validation_fraction: float = option(
        0.2,
        help="learned: part of the selection set held back from the optimiser to pick the best step and stop "
        "early (0: train on all of it for the fixed budget).",
        kind="number",
        cli={"type": float},
    )
    seed: int | None = option(
        0,
        help="learned: seed of the validation split and the batch order (the soup is reproducible from it).",
        kind="seed",
        cli={"type": int},
    )


def _check(options: dict[str, Any]) -> None:
    if not options.get("has_eval"):
        raise InvalidArgumentError(
            "eval_dataset: method='learned' learns its coefficients on held-out data: pass eval_dataset= (a "
            "datasets.Dataset with labels, or a dict of them with select_on=)."
        )
    if options.get("include_base") and options.get("base_model") is None:
        raise InvalidArgumentError(
            "include_base: include_base=True mixes the base model as a member; pass base_model= too."
        )
    lr = options.get("learning_rate")
    if lr is not None and not lr > 0:
        raise InvalidArgumentError(f"learning_rate: expected a positive number, got {lr!r}.")
    fraction = options.get("validation_fraction")
    if fraction is not None and not 0 <= fraction < 1:
        raise InvalidArgumentError(
            f"validation_fraction: expected a value in [0, 1), got {fraction!r} (0 trains on the whole selection "
            "set for the fixed budget)."
        )
    if options.get("granularity") == "layer" and options.get("adapter_output") == "adapter":
        raise InvalidArgumentError(
            "adapter_output: a learned soup by layer has one coefficient per block, which one LoRA adapter of the "
            "ingredients' stacked factors cannot carry; use adapter_output='merged' or granularity='ingredient'."
        )


# ------------------------------------------------------------------------------------------------ groups


def layer_groups(names: Sequence[str]) -> list[str]:
    """The group ("layer") of every tensor name, as the learned soup by layer uses them.

    - A name with an integer component belongs to the block named by its path up to and including the first
      integer: `bert.encoder.layer.3.attention.self.query.weight` -> `bert.encoder.layer.3`,
      `model.layers.0.mlp.up_proj.weight` -> `model.layers.0`, `transformer.h.7.attn.c_attn.bias` ->
      `transformer.h.7` (towers of a two-tower model stay apart: `vision_model.encoder.layers.0`).
    - Any other name with a component containing `embed` (or named `wte`, `wpe` or `shared`) is in `embeddings`.
    - Everything else (final norms, poolers, projections, classification and LM heads) is in `head`.

    Args:
        names (`Sequence[str]`): tensor names, as the plan (the live model's `state_dict`) spells them.

    Returns:
        `list[str]`: one group name per tensor name.

    Example:

    ```python
    >>> layer_groups(["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.output.dense.weight",
    ...               "bert.encoder.layer.1.output.dense.bias", "bert.pooler.dense.weight", "classifier.bias"])
    ['embeddings', 'bert.encoder.layer.0', 'bert.encoder.layer.1', 'head', 'head']
    ```
    """
    out = []
    for name in names:
        parts = name.split(".")
        index = next((k for k, p in enumerate(parts) if p.isdigit()), None)
        if index is not None:
            out.append(".".join(parts[: index + 1]))
        elif any("embed" in p.lower() or p in EMBEDDING_MODULES for p in parts[:-1]):
            out.append("embeddings")
        else:
            out.append("head")
    return out


# ------------------------------------------------------------------------------------------------ the mixture


class StreamedMixture:
    """θ(β) = Σᵢ softmax(β_g)ᵢ θᵢ per group, its streamed gradient and its rewrite into a live model.

    Args:
        plan ([`MergePlan`]): the aligned plan of the kitchen.
        sources (`Sequence[TensorSource]`): one per plan member (ingredients, then the base when present).
        members (`Sequence[int]`): the plan members mixed (indices into `sources`), in coefficient order.
        granularity (`str`): `"ingredient"` (one group) or `"layer"` ([`layer_groups`]).
        base_is_member (`bool`, *optional*): the last member is the kitchen's base (mixed like an ingredient).

    Attributes:
        groups (`list[str]`): the group names, in order of first appearance in the plan.
        group_of (`dict[str, int]`): tensor name -> group index (mergeable tensors only).
    """

    def __init__(
        self,
        plan: MergePlan,
        sources: Sequence[TensorSource],
        members: Sequence[int],
        granularity: str,
        *,
        base_is_member: bool = False,
    ):
        self.plan = plan
        self.base_is_member = base_is_member
        self.sources = list(sources)
        self.members = list(members)
        self.granularity = granularity
        mergeable = [tp for tp in plan.tensors if tp.mergeable]
        labels = (
            layer_groups([tp.name for tp in mergeable])
            if granularity == "layer"
            else ["all tensors"] * len(mergeable)
        )
        self.groups: list[str] = list(dict.fromkeys(labels))
        index = {g: k for k, g in enumerate(self.groups)}
        self.group_of = {tp.name: index[g] for tp, g in zip(mergeable, labels)}
        self.group_numel = [0] * len(self.groups)
        for tp in mergeable:
            self.group_numel[self.group_of[tp.name]] += numel(tp.shape)
        self.bytes_per_pass = sum(
            self.sources[i].info(tp.source_keys[i]).nbytes for tp in mergeable for i in self.members
        )

    @property
    def shape(self) -> tuple[int, int]:
        """`(groups, members)`: the shape of β and of the coefficients."""
        return len(self.groups), len(self.members)

    # ---------------------------------------------------------------------------------------- mixing

    def mixture(self, coefficients: torch.Tensor, n_members: int) -> list[float] | TensorRecipe:
        """What the kitchen streams for these coefficients (`[groups, members]`, rows summing to 1).

        Args:
            coefficients (`torch.Tensor`): softmax(β), one row per group.
            n_members (`int`): how many members the kitchen has (ingredients, plus the base when given).

        Returns:
            One coefficient per kitchen member (one group), or a one-pass [`TensorRecipe`] that mixes each tensor
            with its group's row.
        """
        rows = [[float(c) for c in row] for row in coefficients.tolist()]
        if len(rows) == 1:
            full = [0.0] * n_members
            for i, c in zip(self.members, rows[0]):
                full[i] = c
            return full
        from ..merge_ops import TensorRecipe

        group_of = dict(self.group_of)

        def combine(base, thetas, stats, offset):
            import torch

            row = rows[group_of[stats.name]]
            inputs = list(thetas) + ([base] if base is not None else [])
            out = torch.zeros(inputs[0].shape, dtype=torch.float32)
            for t, c in zip(inputs, row):
                out.add_(t.to(torch.float32), alpha=c)
            return out

        return TensorRecipe("learned", frozenset(), combine, needs_base=self.base_is_member)

    def gradient(self, dots: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        """∂L/∂β from the dot products ∂L/∂α (`[groups, members]`): the softmax Jacobian, row by row."""
        return coefficients * (dots - (coefficients * dots).sum(dim=1, keepdim=True))

    def dot_products(self, model: Any, names: Sequence[str]) -> torch.Tensor:
        """⟨∂L/∂θ_g, θᵢ,g − θ_live,g⟩ for every group g and member i, from the gradients held by `model`.

        Each member's tensors are streamed (slices of large tensors read with `get_range` when the source can,
        whole tensors otherwise); the gradient and the live tensor are copied to the CPU one tensor at a time.
        Subtracting θ_live (the same vector for every member) leaves the softmax gradient unchanged and keeps the
        float32 dot products precise when the members are close.

        Args:
            model (`PreTrainedModel`): the live model after `backward()` (its parameters hold θ(β) and `.grad`).
            names (`Sequence[str]`): the member names, for errors.

        Returns:
            `torch.Tensor`: float64, `[groups, members]`.

        Raises:
            [`NonFiniteTensorError`]: a member's tensor holds NaN/inf.
            [`EvaluationError`]: the loss gradient is not finite.
        """
        import torch

        from ..core.engine import read_aligned

        params = _parameters(model)
        dots = torch.zeros(self.shape, dtype=torch.float64)
        seen: set[int] = set()
        scratch = torch.empty(_SLICE, dtype=torch.float32)
        buf = None
        with torch.no_grad():
            for tp in self.plan.tensors:
                p = params.get(tp.name)
                if not tp.mergeable or p is None or p.grad is None or id(p) in seen:
                    continue
                seen.add(id(p))  # a tied parameter counts once
                g = p.grad.detach().reshape(-1).to("cpu", torch.float32)
                live = p.detach().reshape(-1).to("cpu", torch.float32)
                if not bool(torch.isfinite(g).all()):
                    raise EvaluationError(
                        f"The loss gradient of tensor {tp.name!r} is not finite; lower learning_rate or check the "
                        "eval data (labels the model cannot score).",
                        tensor_name=tp.name,
                    )
                group = self.group_of[tp.name]
                n = g.numel()
                sliced = not any(
                    tp.row_permutations and tp.row_permutations[i] is not None for i in self.members
                ) and all(self.sources[i].range_readable(tp.source_keys[i]) for i in self.members)
                for k, i in enumerate(self.members):
                    source = self.sources[i]
                    total = 0.0
                    if sliced:
                        for start in range(0, n, _SLICE):
                            count = min(_SLICE, n - start)
                            if buf is None:
                                buf = torch.empty(_SLICE * 8, dtype=torch.uint8)
                            piece = source.get_range(tp.source_keys[i], start, count, buf)
                            diff = scratch[:count]
                            diff.copy_(piece)
                            diff.sub_(live[start : start + count])
                            total += float(torch.dot(g[start : start + count], diff))
                    else:
                        t = read_aligned(tp, i, source).reshape(-1).to(torch.float32)
                        total = float(torch.dot(g, t - live))
                    if not math.isfinite(total):
                        t = read_aligned(tp, i, source)
                        raise NonFiniteTensorError(
                            f"Ingredient {names[k]!r} has NaN/inf values in tensor {tp.name!r}; leave it out of the "
                            "soup."
                            if not bool(torch.isfinite(t).all())
                            else f"The gradient dot product of {names[k]!r} on tensor {tp.name!r} overflowed.",
                            ingredient=names[k],
                            tensor_name=tp.name,
                        )
                    dots[group, k] += total
        return dots


def _parameters(model: Any) -> dict[str, Any]:
    """name -> Parameter, every name of a tied parameter included (the plan may name either)."""
    return dict(model.named_parameters(remove_duplicate=False))


# ------------------------------------------------------------------------------------------------ the recipe


def _batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[k : k + size] for k in range(0, len(items), size)]


def _mean_loss(evaluator: Any, model: Any, examples: list[dict[str, Any]]) -> float:
    """The task loss of `model` on `examples` (mean over what the loss counts), without gradients."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in _batches(examples, evaluator.batch_size):
            loss, n = evaluator.loss_sum(model, batch)
            total += float(loss)
            count += n
    return total / count if count else math.nan


@register_recipe(
    "learned",
    pretty_name="Learned soup",
    reference_url=MODEL_SOUPS_URL,
    check=_check,
    description="Mixing coefficients (per ingredient, or per ingredient and layer) learned on held-out loss.",
    params=LearnedParams,
)
def cook_learned(kitchen: Kitchen) -> Soup:
    import torch

    evaluator = kitchen.evaluator
    if evaluator is None:
        raise EvaluationError("method='learned' needs an eval set to learn on: pass eval_dataset=.")
    opts = kitchen.options
    granularity = opts.get("granularity") or "ingredient"
    include_base = bool(opts.get("include_base"))
    lr = float(opts.get("learning_rate") or 0.05)
    epochs = int(opts.get("epochs") or 5)
    accumulate = int(opts.get("accumulation_steps") or 4)
    fraction = float(opts.get("validation_fraction") if opts.get("validation_fraction") is not None else 0.2)
    seed = int(opts.get("seed") or 0)
    if include_base and kitchen.base is None:
        raise InvalidArgumentError(
            "include_base: include_base=True mixes the base model; pass base_model= too."
        )
    started = time.perf_counter()
    first_timing = len(evaluator.timings)

    n_ing = len(kitchen.ingredients)
    members = list(range(n_ing)) + ([n_ing] if include_base else [])
    names = kitchen.names + (["base"] if include_base else [])
    n_members = len(kitchen.members)
    mixture = StreamedMixture(
        kitchen.plan, kitchen.sources, members, granularity, base_is_member=include_base
    )

    # the selection set, split once (seeded) into what the optimiser sees and what picks the step
    examples = list(evaluator.examples())
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=generator).tolist()
    n_val = int(round(len(examples) * fraction)) if fraction > 0 else 0
    if fraction > 0 and (n_val < 1 or n_val >= len(examples)):
        raise EvaluationError(
            f"validation_fraction={fraction} of the {len(examples)} examples of {evaluator.select_on!r} leaves "
            f"{n_val} for validation and {len(examples) - n_val} for training; give more held-out data or set "
            "validation_fraction=0 (fixed budget, no early stopping)."
        )
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    steps_per_epoch = math.ceil(math.ceil(len(train) / evaluator.batch_size) / accumulate)

    live = kitchen.new_live_model()
    params = _parameters(live)
    wanted = {tp.name for tp in kitchen.plan.tensors if tp.mergeable}
    flags = {name: p.requires_grad for name, p in params.items()}
    for name, p in params.items():
        p.requires_grad_(name in wanted and p.is_floating_point())

    beta = torch.zeros(mixture.shape, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([beta], lr=lr)

    def coefficients() -> torch.Tensor:
        return torch.softmax(beta.detach(), dim=1)

    kitchen.load_into(live, mixture.mixture(coefficients(), n_members))
    uniform_scores = evaluator.evaluate(live)
    baselines = {"uniform": {"score": evaluator.primary(uniform_scores), "scores": uniform_scores}}
    best_val = _mean_loss(evaluator, live, val) if val else math.nan
    best_beta, best_step = beta.detach().clone(), 0
    trace: list[dict[str, Any]] = [{"step": 0, "epoch": 0, "validation_loss": best_val}]
    since_best, step, stopped = 0, 0, "budget"
    try:
        for epoch in range(1, epochs + 1):
            batch_order = torch.randperm(len(train), generator=generator).tolist()
            batches = _batches([train[i] for i in batch_order], evaluator.batch_size)
            for chunk in _batches(batches, accumulate):
                live.zero_grad(set_to_none=True)
                total, count = 0.0, 0
                for batch in chunk:
                    loss, n = evaluator.loss_sum(live, batch)
                    loss.backward()
                    total += float(loss.detach())
                    count += n
                dots = mixture.dot_products(live, names) / max(count, 1)
                optimizer.zero_grad()
                beta.grad = mixture.gradient(dots, coefficients())
                optimizer.step()
                step += 1
                kitchen.load_into(live, mixture.mixture(coefficients(), n_members))
                point: dict[str, Any] = {"step": step, "epoch": epoch, "train_loss": total / max(count, 1)}
                if val:
                    point["validation_loss"] = _mean_loss(evaluator, live, val)
                    if point["validation_loss"] < best_val:
                        best_val, best_beta, best_step, since_best = (
                            point["validation_loss"],
                            beta.detach().clone(),
                            step,
                            0,
                        )
                    else:
                        since_best += 1
                trace.append(point)
                logger.info(
                    "Learned soup: step %d (epoch %d), train loss %.4f%s",
                    step,
                    epoch,
                    point["train_loss"],
                    f", validation loss {point['validation_loss']:.4f}" if val else "",
                )
                if val and since_best >= steps_per_epoch:
                    stopped = "early"
                    break
            if stopped == "early":
                break
    finally:
        live.zero_grad(set_to_none=True)
        for name, p in params.items():
            p.requires_grad_(flags[name])
    if not val:
        best_beta, best_step = beta.detach().clone(), step
    final = torch.softmax(best_beta, dim=1)
    served = mixture.mixture(final, n_members)
    frozen_weights = None
    if isinstance(served, list) and not include_base:
        # Served as the uniform soup of these weights would be, so that a recipe file that cannot replay the
        # learning (in-memory eval data) records `uniform` with `weight: softmax(β)ᵢ` and re-cooks the same bits.
        from .uniform import normalized_weights

        frozen_weights = [float(c) for c in final[0].tolist()]
        served = normalized_weights(frozen_weights, n_ing) + ([0.0] if n_members > n_ing else [])
    kitchen.load_into(live, served)  # the served soup is the one scored (bit for bit)

    # what the soup is: the coefficient table, each ingredient's weight (element-weighted mean over groups)
    sizes = torch.tensor(mixture.group_numel, dtype=torch.float64)
    mean = (final * sizes[:, None]).sum(0) / sizes.sum()
    for k, i in enumerate(members[:n_ing]):
        member = kitchen.ingredients[i].ingredient
        member.weight = float(served[i]) if isinstance(served, list) else float(mean[k])
        member.selected = True
    table = [
        {"group": g, **{names[k]: float(final[row, k]) for k in range(len(members))}}
        for row, g in enumerate(mixture.groups)
    ]
    timings = evaluator.timings[first_timing:]
    report = {
        "granularity": granularity,
        "groups": len(mixture.groups),
        "members": names,
        "steps": step,
        "best_step": best_step,
        "stopped": stopped if val else "budget (no validation split)",
        "validation_examples": len(val),
        "train_examples": len(train),
        "validation_loss": {"uniform": trace[0]["validation_loss"], "learned": best_val} if val else None,
        "bytes_read_per_step": 2 * mixture.bytes_per_pass,
        "trace": trace,
    }
    if include_base:
        report["base_weight"] = float(mean[-1])
    cost = {
        "evaluations": len(timings),
        "evaluation_seconds": round(sum(timings), 3),
        "recipe_seconds": round(time.perf_counter() - started, 3),
    }
    params_out = {
        "granularity": granularity,
        "include_base": include_base,
        "learning_rate": lr,
        "epochs": epochs,
        "accumulation_steps": accumulate,
        "validation_fraction": fraction,
        "seed": seed,
    }
    if frozen_weights is not None:
        params_out["weights"] = frozen_weights
    return kitchen.serve(
        served,
        method="learned",
        params=params_out,
        history=table,
        model=live,
        report_extra={"baselines": baselines, "learned": report, "cost": cost},
    )
