"""The kitchen: resolved ingredients, their aligned plan, and the ways to serve a set of coefficients.

Recipes receive a [`Kitchen`], decide coefficients (evaluating candidates through `load_into` on one live
model when they must) and call [`Kitchen.serve`], which streams the soup to `output_dir` (atomically)
or into an in-memory model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapters.resolve import adapter_members, build_kitchen_adapter, load_base_model
from .core.engine import ModelSink, RecipeMix, WriterSink, combine
from .core.plan import MergePlan, build_plan, match_live_model
from .core.sources import AtomicDirectory, ShardedSafetensorsWriter, copy_companion_files
from .errors import SoupError
from .loading import model_class_for
from .merge_ops import TensorRecipe
from .utils import gc_paused, is_main_process, wait_for_everyone

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .ingredients import ResolvedIngredient
    from .recipes.base import Recipe
    from .soup import Soup

logger = logging.getLogger(__name__)


@dataclass
class Kitchen:
    """Everything a recipe needs.

    Attributes:
        ingredients: the resolved fine-tuned ingredients (the soup's members, in order).
        base: the resolved base model (WiSE-FT's zero-shot end, adapters' base), or None.
        options: the recipe options of `merge_models` (weights, alpha, strict, scores, ...).
        evaluator: the held-out evaluator, or None when no eval set was given.
    """

    ingredients: list[ResolvedIngredient]
    base: ResolvedIngredient | None = None
    options: dict[str, Any] = field(default_factory=dict)
    evaluator: Any = None
    output_dir: Path | None = None
    dtype: torch.dtype | None = None
    max_shard_size: int | str = "50GB"
    progress: bool = True
    reference_index: int = 0
    tokenizer: Any = None
    _plan: MergePlan | None = field(default=None, repr=False)
    # ingredient index -> (scores, predictions): shared by the kitchens of one run (copies keep the same dict)
    _tasted: dict[int, tuple[Any, Any]] = field(default_factory=dict, repr=False)

    @property
    def members(self) -> list[ResolvedIngredient]:
        """Ingredients followed by the base (when given): the order of every coefficient list."""
        return self.ingredients + ([self.base] if self.base is not None else [])

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.ingredients]

    @property
    def plan(self) -> MergePlan:
        if self._plan is None:
            with gc_paused():  # planning creates no reference cycles; see gc_paused
                self._plan = build_plan(self.members, dtype=self.dtype, reference_index=self.reference_index)
        return self._plan

    @property
    def sources(self):
        return [m.open() for m in self.members]

    def full_coefficients(
        self, coefficients: Sequence[float] | TensorRecipe, base: float = 0.0
    ) -> list[float]:
        """Pad ingredient coefficients with the base's (0 unless given) to match `members` (a two-pass method: [])."""
        if isinstance(coefficients, TensorRecipe):
            return []
        coefficients = list(coefficients)
        if len(coefficients) == len(self.members):
            return coefficients
        if len(coefficients) != len(self.ingredients):
            raise SoupError(
                f"internal error: {len(coefficients)} coefficients for {len(self.ingredients)} ingredients."
            )
        return coefficients + ([base] if self.base is not None else [])

    # ------------------------------------------------------------------------------------ live models

    def new_live_model(self):
        """One model instance of the soup's architecture, built once from the reference member.

        Recipes write candidate soups into it with [`load_into`] instead of re-instantiating models.
        """
        ref = self.members[self.reference_index]
        if ref.kind == "adapter":
            return load_base_model(ref)
        if ref.model is not None:
            model = copy.deepcopy(ref.model)
        else:
            model = model_class_for(ref.config).from_pretrained(ref.path)
        model.eval()
        return match_live_model(model, self.plan)

    def _holds_output_dtype(self, model) -> bool:
        """Whether a live model still holds the soup's output dtype (`eval_dtype` may have cast it for evaluation)."""
        if getattr(self.evaluator, "eval_dtype", None) is None:
            return True
        want = next((t.dtype for t in self.plan.tensors if t.mergeable and t.dtype.is_floating_point), None)
        have = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        return want is None or have is None or want == have

    def load_into(
        self, model, coefficients: Sequence[float] | TensorRecipe, *, progress: bool = False
    ) -> None:
        """Write the soup with these coefficients (or this two-pass method) into `model`'s parameters, in place."""
        self.combine(coefficients, ModelSink(model), progress=progress)

    def combine(self, mixture: Sequence[float] | TensorRecipe, sink, *, progress: bool = False) -> None:
        """Stream a soup into `sink`: linear coefficients (per ingredient or per member) or a two-pass method.

        The one place where a [`~hf_soups.merge_ops.TensorRecipe`] (TIES, DARE, SLERP, Model Stock) meets the
        engine: its θ₁..θ_N are the ingredients in order, θ₀ the base when the method takes one.
        """
        if isinstance(mixture, TensorRecipe):
            mixture.check_ingredients(len(self.ingredients), has_base=self.base is not None)
            base = len(self.ingredients) if mixture.needs_base else None
            mix = RecipeMix(mixture, tuple(range(len(self.ingredients))), base)
            combine(self.plan, self.sources, [], sink, progress=progress, mix=mix)
        else:
            combine(self.plan, self.sources, self.full_coefficients(mixture), sink, progress=progress)

    def evaluate_soup(self, model, mixture: Sequence[float] | TensorRecipe) -> dict[str, dict[str, float]]:
        """Write the soup `mixture` into `model` and score it on every eval set.

        A linear mixture that is one member alone (a coefficient of 1 on it, 0 elsewhere: WiSE-FT's alpha = 1 or 0,
        task arithmetic's lambda = 1 on one ingredient) is that member's [`taste_ingredient`] result, so it is
        evaluated once per run whichever recipe asks.
        """
        self.load_into(model, mixture)
        if not isinstance(mixture, TensorRecipe):
            full = self.full_coefficients(mixture)
            ones = [i for i, c in enumerate(full) if c == 1.0]
            if len(ones) == 1 and all(c == 0.0 for i, c in enumerate(full) if i != ones[0]):
                return self.taste_ingredient(ones[0], model, load=lambda: None)[0]
        return self.evaluator.evaluate(model)

    def taste_ingredient(self, index: int, model, *, load=None) -> tuple[dict[str, dict[str, float]], dict]:
        """Member `index` alone (an ingredient; the base is last) on every eval set: `(scores, predictions)`,
        evaluated at most once per run (`model` then holds it only if it was evaluated now).

        Every recipe of a run (the methods of a comparison too) shares these results; with
        `prediction_cache_dir=` they also come from, and go to, the on-disk cache (keyed by
        [`~hf_soups.ingredients.weights_fingerprint`]), so a later run does not score the ingredient again.

        Args:
            index (`int`): the ingredient.
            model (`PreTrainedModel`): the live model it is written into when it must be run.
            load (`Callable[[], None]`, *optional*): writes the ingredient into `model` (default: [`load_into`]
                with a coefficient of 1 on it).
        """
        if index in self._tasted:
            return self._tasted[index]
        from .ingredients import weights_fingerprint

        n = len(self.members)

        def default_load() -> None:
            self.load_into(model, [1.0 if j == index else 0.0 for j in range(n)])

        weights = None
        if getattr(self.evaluator, "prediction_cache", None) is not None:
            weights = {
                "ingredient": weights_fingerprint(self.members[index]),
                "live_config": hashlib.sha256(
                    json.dumps(self.plan.config, sort_keys=True, default=str).encode()
                ).hexdigest(),
            }
        result = self.evaluator.evaluate_member(model, load or default_load, weights=weights)
        self._tasted[index] = result
        return result

    # ------------------------------------------------------------------------------------ serving

    def serve(
        self,
        coefficients: Sequence[float] | TensorRecipe,
        *,
        method: str,
        params: dict[str, Any] | None = None,
        history: list[dict[str, Any]] | None = None,
        score: float | None = None,
        scores: dict[str, dict[str, float]] | None = None,
        model=None,
        report_extra: dict[str, Any] | None = None,
        comparison: list[dict[str, Any]] | None = None,
    ) -> Soup:
        """Make the final soup: stream it to `output_dir` (atomically) or build it in memory.

        Args:
            coefficients: per ingredient (or per member, base last), or a two-pass method.
            method: the recipe name.
            params: the recipe's parameters, recorded on the soup and its card.
            history: recipe steps (greedy additions, sweep points).
            score / scores: the soup's held-out results when the recipe already has them.
            model: a live model that already holds these coefficients (skips rebuilding in memory).
            report_extra: extra report entries (e.g. greedy's best-single / uniform / ensemble baselines).
            comparison: the methods compared, when several were (see [`cook_comparison`]).
        """
        from .soup import Soup

        full = self.full_coefficients(coefficients)
        soup = Soup(
            method=method,
            ingredients=[m.ingredient for m in self.ingredients],
            params=dict(params or {}),
            base=self.base.ingredient if self.base is not None else self._adapters_base(),
            history=list(history or []),
            score=score,
            scores=dict(scores or {}),
            coefficients=full,
            output_options={
                "dtype": str(self.dtype).removeprefix("torch.") if self.dtype is not None else None,
                "max_shard_size": self.max_shard_size,
            },
        )
        if report_extra:
            soup.report_extra.update(report_extra)
        soup.comparison = list(comparison or [])
        if self.evaluator is not None:  # what score means, before the card is written
            soup.metric_key = soup.metric_key or getattr(self.evaluator, "metric_key", None)
            soup.select_on = soup.select_on or getattr(self.evaluator, "select_on", None)
            direction = getattr(self.evaluator, "greater_is_better", None)
            if direction is not None:
                soup.params.setdefault("greater_is_better", direction)
            describe = getattr(
                self.evaluator, "describe", None
            )  # an lm-eval metric: tasks, versions, datasets
            if describe is not None:
                describe(soup)
            how = getattr(self.evaluator, "describe_evaluation", None)  # sorting, padding, dtype
            if how is not None:
                soup.report_extra.setdefault("evaluation", how())
        if self.evaluator is not None and score is None:
            finish = getattr(self.evaluator, "score_soup", None)
            if finish is not None:
                live = model if model is not None else self.new_live_model()
                if model is None:
                    self.load_into(live, coefficients)
                finish(soup, live)
                model = live
        if model is not None and not self._holds_output_dtype(model):
            model = (
                None  # evaluated in another dtype (eval_dtype): soup.model is rebuilt as the soup is written
            )
        soup._kitchen_config = dict(self.plan.config)
        if self.output_dir is not None:
            soup.output_dir = Path(self.output_dir).expanduser().absolute()  # the card names the folder
            if is_main_process():
                self.write(coefficients, self.output_dir, soup)
            wait_for_everyone()
            soup._model = model
        else:
            if model is None:
                model = self.new_live_model()
                self.load_into(model, coefficients, progress=self.progress)
            soup._model = model
        return soup

    def _adapters_base(self):
        """The base model of adapter ingredients (recorded on the soup and its card), or None."""
        for m in self.ingredients:
            if m.kind == "adapter" and m.adapter.base is not None:
                return m.adapter.base.ingredient
        return None

    def write(
        self,
        coefficients: Sequence[float] | TensorRecipe,
        target: str | os.PathLike,
        soup: Soup | None = None,
    ) -> Path:
        """Stream the soup into `target` through a temporary directory renamed into place at the end."""
        plan = self.plan
        ref = self.members[self.reference_index]
        with gc_paused(), AtomicDirectory(target, ingredients=self.members) as tmp:
            writer = ShardedSafetensorsWriter(
                tmp.path,
                [(t.name, t.shape, t.dtype) for t in plan.tensors],
                max_shard_size=self.max_shard_size,
            )
            try:
                sink = WriterSink(writer, max((t.nbytes for t in plan.tensors), default=1))
                self.combine(coefficients, sink, progress=self.progress)
            except BaseException:
                writer.abort()
                raise
            writer.close()
            self.write_companions(tmp.path, ref)
            if soup is not None:
                soup._write_extras(tmp.path)
            return tmp.commit()

    def write_companions(self, directory: Path, ref: ResolvedIngredient) -> None:
        """config.json (the plan's), plus generation config and tokenizer files of the reference member."""
        (directory / "config.json").write_text(
            json.dumps(self.plan.config, indent=2, sort_keys=True, default=str) + "\n"
        )
        if ref.kind == "adapter" and ref.adapter.base is not None:  # an adapter soup: its base's files
            ref = ref.adapter.base
        if ref.path is not None and ref.kind != "adapter":
            copy_companion_files(ref.path, directory, skip=lambda name: name == "config.json")
        elif ref.model is not None:
            gen = getattr(ref.model, "generation_config", None)
            if gen is not None and getattr(ref.model, "can_generate", lambda: False)():
                gen.save_pretrained(directory)
        if self.tokenizer is not None and not (directory / "tokenizer_config.json").exists():
            self.tokenizer.save_pretrained(directory)


# ------------------------------------------------------------------------------------ several methods


class _TastingKitchen(Kitchen):
    """A kitchen that scores a recipe's soup instead of serving it: every candidate of every method is written into
    one shared live model, and `serve` returns the evaluated soup with its mixture (`_mixture`), writing nothing."""

    live: Any = None

    def new_live_model(self):
        return self.live

    def serve(self, coefficients, **kwargs):
        kwargs.pop("model", None)
        soup = super().serve(
            coefficients, model=self.live if kwargs.get("score") is not None else None, **kwargs
        )
        soup._mixture = coefficients  # type: ignore[attr-defined]
        return soup


def cook_comparison(kitchen: Kitchen, options: dict[str, dict[str, Any]]) -> Soup:
    """Cook several recipes over the same ingredients, score each on the same eval sets, serve the best.

    Each recipe runs as it would alone (its own knobs, its own sweeps), but into one live model: its candidates
    and its chosen soup are written into that model in place and scored, nothing is written to disk. Every
    ingredient is also scored alone, for the best single ingredient. The winner on `select_on` (ties: the first
    listed) is then served as usual (streamed to `output_dir`, or the live model itself), with its own curve in
    `history` and every method's chosen setting and scores in `comparison`.

    Args:
        kitchen ([`Kitchen`]): the ingredients (and base), with an evaluator.
        options (`dict[str, dict]`): method name -> that recipe's options (`SoupConfig.recipe_options(method)`),
            in the order given.

    Returns:
        [`Soup`]: the winning method's soup; `soup.comparison` holds one row per method (`method`, `params`,
        `score`, `scores`, `selected`, `evaluations`, `kept`), `soup.params["methods"]` the methods compared and
        `soup.report_extra["baselines"]["best_single"]` the best single ingredient on every eval set.

    Raises:
        [`EvaluationError`]: no eval set.
    """
    import dataclasses

    from .errors import EvaluationError
    from .recipes import get_recipe

    evaluator = kitchen.evaluator
    if evaluator is None:
        raise EvaluationError("Comparing methods needs an eval set to score them: pass eval_dataset=.")
    live = kitchen.new_live_model()
    n = len(kitchen.ingredients)
    # 1. each method, as it would cook alone, into the live model
    tasted: list[tuple[Soup, list[tuple[Any, Any]]]] = []
    rows: list[dict[str, Any]] = []
    for method, method_options in options.items():
        fields = {f.name: getattr(kitchen, f.name) for f in dataclasses.fields(kitchen)}
        fields.update(options=dict(method_options), output_dir=None, _plan=kitchen.plan)
        taster = _TastingKitchen(**fields)
        taster.live = live
        started = len(evaluator.timings)
        soup = get_recipe(method).cook(taster)
        states = [(m.ingredient.weight, m.ingredient.selected) for m in kitchen.ingredients]
        tasted.append((soup, states))
        params = {k: v for k, v in soup.params.items() if k != "greater_is_better"}
        rows.append(
            {
                "method": method,
                "params": params,
                "score": soup.score,
                "scores": dict(soup.scores or {}),
                "evaluations": len(evaluator.timings) - started,
                "kept": sum(1 for _, selected in states if selected),
            }
        )
        logger.info(
            "Compare: %s -> %s %.4f on %s", method, evaluator.metric_key, soup.score, evaluator.select_on
        )
    # 2. every ingredient alone, for the best single ingredient: once per run (a recipe that scored it, e.g. greedy,
    # already did) unless its score was given
    for i, member in enumerate(kitchen.ingredients):
        ing = member.ingredient
        if not ing.scores:
            ing.scores = kitchen.taste_ingredient(i, live)[0]
            ing.score = evaluator.primary(ing.scores)
    best_single = min(
        range(n), key=lambda i: (evaluator.sort_key(kitchen.ingredients[i].ingredient.score), i)
    )
    top = kitchen.ingredients[best_single].ingredient
    best = 0
    for i, row in enumerate(rows):
        if evaluator.better(row["score"], rows[best]["score"], strict=True):
            best = i
    for i, row in enumerate(rows):
        row["selected"] = i == best
    # 3. serve the winner from the live model
    winner, states = tasted[best]
    for member, (weight, selected) in zip(kitchen.ingredients, states):
        member.ingredient.weight, member.ingredient.selected = weight, selected
    kitchen.load_into(live, winner._mixture)  # type: ignore[attr-defined]
    baselines = dict((winner.report_extra or {}).get("baselines") or {})
    baselines.setdefault(
        "best_single", {"name": top.name, "score": top.score, "scores": dict(top.scores or {})}
    )
    soup = kitchen.serve(
        winner._mixture,  # type: ignore[attr-defined]
        method=winner.method,
        params={**winner.params, "methods": list(options)},
        history=winner.history,
        score=winner.score,
        scores=winner.scores,
        model=live,
        report_extra={**(winner.report_extra or {}), "baselines": baselines},
        comparison=rows,
    )
    return soup


# ------------------------------------------------------------------------------------ adapter form


def cook_adapter_soup(kitchen: Kitchen, recipe: Recipe) -> Soup:
    """Run `recipe` unchanged, but serve its final coefficients as one LoRA adapter.

    Candidate soups that a recipe evaluates are still built merged into one live model (greedy, sweeps);
    only the served soup takes the adapter form. With `output_dir`, the adapter is written there
    atomically (`adapter_config.json`, `adapter_model.safetensors`, the base's tokenizer files, the
    model card); without it, `soup.model` is a `PeftModel` on a freshly loaded base.
    """
    return recipe.cook(AdapterKitchen.wrap(kitchen))


class AdapterKitchen(Kitchen):
    """A kitchen whose served soup is a LoRA adapter instead of a full model."""

    _adapter_soup: Any = None

    @classmethod
    def wrap(cls, kitchen: Kitchen) -> AdapterKitchen:
        import dataclasses

        new = cls(**{f.name: getattr(kitchen, f.name) for f in dataclasses.fields(kitchen)})
        adapter_members(new)  # refuse mixed soups before any work
        return new

    def serve(self, coefficients, **kwargs):
        params = dict(kwargs.pop("params", None) or {})
        params["adapter_output"] = "adapter"
        if self.options.get("rank") is not None:
            params["rank"] = self.options["rank"]
        report_extra = dict(kwargs.pop("report_extra", None) or {})
        if self.output_dir is None:  # in memory; on disk, write() streams it and fills the report
            self._adapter_soup = build_kitchen_adapter(self, coefficients)
            report_extra.update(self._adapter_soup.report())
        soup = super().serve(coefficients, params=params, report_extra=report_extra, **kwargs)
        # In memory: a PeftModel on a fresh base; on disk: loaded lazily from output_dir as a PeftModel.
        soup._model = self._peft_model() if self.output_dir is None else None
        return soup

    def _peft_model(self):
        import tempfile

        from peft import PeftModel

        with tempfile.TemporaryDirectory(prefix="hf_soups_adapter_") as tmp:
            self._adapter_soup.save(tmp)
            base = load_base_model(next(r for r in self.members if r.kind == "adapter"))
            model = PeftModel.from_pretrained(base, tmp)
        model.eval()
        return model

    def new_live_model(self):
        if self.output_dir is None and self._adapter_soup is not None and not self.evaluator:
            return None  # serve() builds the PeftModel itself
        return super().new_live_model()

    def load_into(self, model, coefficients, *, progress: bool = False) -> None:
        if model is None:
            return
        super().load_into(model, coefficients, progress=progress)

    def write(self, coefficients, target, soup=None) -> Path:
        base = next(r for r in self.members if r.kind == "adapter").adapter.base
        with AtomicDirectory(target) as tmp:
            adapter_soup = build_kitchen_adapter(self, coefficients, directory=tmp.path)
            if base is not None and base.path is not None:
                copy_companion_files(base.path, tmp.path, skip=lambda name: name == "config.json")
            if self.tokenizer is not None and not (tmp.path / "tokenizer_config.json").exists():
                self.tokenizer.save_pretrained(tmp.path)
            if soup is not None:
                soup.report_extra.update(adapter_soup.report())
                soup.params["adapter_output"] = "adapter"
                soup._write_extras(tmp.path)
            return tmp.commit()
