"""Greedy soup (Wortsman et al. 2022, Recipe 1): add ingredients best-first while the held-out score holds.

Every ingredient is scored once on the selection set (scores already known are reused), the ingredients are
sorted best first, and the soup starts as the best one. Known scores only decide the order: the start is scored
on the selection set like every candidate, so the keep/drop comparisons are between measured numbers. Each next ingredient is tried as
`(n * soup + candidate) / (n + 1)` and kept when the held-out score does not drop (`>=`, the paper's rule;
`strict=True` keeps only strict improvements, like the paper's reference code). A candidate whose selection score
is a sum over examples or tokens is rejected as soon as even a perfect rest of the set could not keep it
(`Evaluator.evaluate_candidate`, same decision as a full evaluation; `full_evaluation=True` scores it to the end).

Memory stays flat in the number of ingredients: one float32 running sum of the kept ingredients, one live
model whose parameters receive each candidate in place (no `from_pretrained` per candidate), and one tensor
of the candidate at a time read from its (memory-mapped) checkpoint. A rejected candidate never enters the
running sum; the live model is restored from the sum, never reloaded.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import EvaluationError, IncompatibleIngredientsError, InvalidArgumentError, NonFiniteTensorError
from ..options import option
from ..utils import numel
from .base import RecipeParams, register_recipe
from .uniform import MODEL_SOUPS_URL

if TYPE_CHECKING:  # pragma: no cover
    from ..kitchen import Kitchen
    from ..soup import Soup

logger = logging.getLogger(__name__)


@dataclass
class GreedyParams(RecipeParams):
    """Parameters of the greedy soup."""

    scores: dict[str, float] | None = option(
        help="Held-out scores already known, by ingredient name (those ingredients are not evaluated alone).",
        kind="scores",
        cli=False,
    )
    strict: bool = option(
        False,
        help="Keep a candidate only on strict improvement (the paper's code; default >=).",
        kind="bool",
        cli={"action": "store_true"},
    )
    ensemble_baseline: bool = option(
        False,
        help="Also score the logit ensemble of the ingredients (reported only).",
        kind="bool",
        cli={"action": "store_true"},
    )
    full_evaluation: bool = option(
        False,
        help="Score every candidate to the end on every eval set (default: a candidate whose accuracy, loss or "
        "perplexity can no longer match the soup is rejected as soon as that is certain; same decisions).",
        kind="bool",
        cli={"action": "store_true"},
    )


def _check(options: dict[str, Any]) -> None:
    if not options.get("has_eval"):
        raise InvalidArgumentError(
            "eval_dataset: method='greedy' chooses ingredients on held-out data: pass eval_dataset= (a "
            "datasets.Dataset with labels, or a dict of them with select_on=)."
        )


class RunningSoup:
    """A float32 running sum of kept ingredients, and the live model that candidate soups are written into.

    Args:
        kitchen ([`Kitchen`]): the aligned plan and the ingredients' tensor sources.
        model (`PreTrainedModel`): the live model (its parameters are overwritten in place).
    """

    def __init__(self, kitchen: Kitchen, model: Any):
        import torch

        self.plan = kitchen.plan
        self.sources = kitchen.sources
        self.names = kitchen.plan.names
        self.model = model
        self.sums: dict[str, torch.Tensor] = {}
        self.members: list[int] = []
        max_numel = max((numel(t.shape) for t in self.plan.tensors if t.mergeable), default=1)
        self._scratch = torch.empty(max_numel, dtype=torch.float32)
        self._live_is_sum = False

    @property
    def targets(self) -> dict[str, Any]:
        # fresh each time: the evaluator may have moved the model to another device since the last step
        return self.model.state_dict()

    @property
    def n(self) -> int:
        return len(self.members)

    def _read(self, tp, index: int):
        import torch

        from ..core.engine import read_aligned

        t = read_aligned(tp, index, self.sources[index])
        if tp.mergeable and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteTensorError(
                f"Ingredient {self.names[index]!r} has {bad} NaN/inf value(s) in tensor {tp.name!r}; leave it out "
                "of the soup.",
                ingredient=self.names[index],
                tensor_name=tp.name,
            )
        return t

    def start(self, index: int, *, running: bool = True) -> None:
        """The soup is ingredient `index` alone (written into the live model).

        Args:
            index (`int`): the ingredient.
            running (`bool`, defaults to `True`): also start the running sum from it (`False`: only load the
                ingredient into the live model, to score it on its own).
        """
        import torch

        self.sums.clear()
        targets = self.targets
        with torch.no_grad():
            for tp in self.plan.tensors:
                t = self._read(tp, index)
                target = targets.get(tp.name)
                if running and tp.mergeable:
                    self.sums[tp.name] = t.to(torch.float32, copy=True)
                if target is not None:
                    target.copy_(t)
        self.members = [index] if running else []
        self._live_is_sum = running

    def try_candidate(self, index: int) -> None:
        """Write `(sum + candidate) / (n + 1)` into the live model; the running sum is left untouched."""
        import torch

        n = self.n
        targets = self.targets
        with torch.no_grad():
            for tp in self.plan.tensors:
                target = targets.get(tp.name)
                t = self._read(tp, index)
                if not tp.mergeable:
                    if target is not None and not torch.equal(target.cpu(), t.to(target.dtype)):
                        raise IncompatibleIngredientsError(
                            f"Integer/boolean tensor {tp.name!r} of {self.names[index]!r} differs from the soup's; "
                            "such buffers cannot be averaged. Re-save the ingredients from the same base model.",
                            ingredient=self.names[index],
                            tensor_name=tp.name,
                        )
                    continue
                if target is None:
                    continue
                acc = self._scratch[: t.numel()].view(t.shape)
                torch.add(self.sums[tp.name], t, out=acc)
                acc.div_(n + 1)
                target.copy_(acc)
        self._live_is_sum = False

    def accept(self, index: int) -> None:
        """Add the candidate to the running sum (its tensors are read again, one at a time)."""
        import torch

        with torch.no_grad():
            for tp in self.plan.tensors:
                if tp.mergeable:
                    self.sums[tp.name].add_(self._read(tp, index))
        self.members.append(index)
        self._live_is_sum = True  # the live model already holds (sum + candidate) / (n + 1)

    def restore(self) -> None:
        """Write the current soup (`sum / n`) back into the live model after a rejected candidate."""
        import torch

        if self._live_is_sum:
            return
        n = self.n
        targets = self.targets
        with torch.no_grad():
            for tp in self.plan.tensors:
                target = targets.get(tp.name)
                if target is None or not tp.mergeable:
                    continue
                acc = self._scratch[: target.numel()].view(target.shape)
                torch.div(self.sums[tp.name], n, out=acc)
                target.copy_(acc)
        self._live_is_sum = True


class _Progress:
    """A line as each phase of a greedy soup starts, and one bar over its evaluations.

    Both are progress display: off with `progress=False` or `HF_HUB_DISABLE_PROGRESS_BARS=1` (the bar is
    `huggingface_hub`'s, in the `hf_soups` group); each phase is also logged at INFO level.
    """

    def __init__(self, enabled: bool, total: int):
        from huggingface_hub.utils import are_progress_bars_disabled, tqdm

        self.shown = enabled and not are_progress_bars_disabled("hf_soups")
        self.bar = tqdm(
            total=total, desc="Greedy soup", unit="evaluation", disable=not self.shown, name="hf_soups"
        )

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()

    def phase(self, text: str) -> None:
        logger.info("Greedy soup: %s", text)
        if self.shown:
            self.bar.write(f"Greedy soup: {text}", file=sys.stderr)

    def done(self, n: int = 1) -> None:
        self.bar.update(n)


def _known_scores(kitchen: Kitchen) -> dict[int, float]:
    """Scores given with `scores=` (by ingredient name) or already set on the ingredients."""
    given = dict(kitchen.options.get("scores") or {})
    names = kitchen.names
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise InvalidArgumentError(
            f"scores= names {unknown} that are not ingredients; the ingredient names are {names}."
        )
    known: dict[int, float] = {}
    for i, member in enumerate(kitchen.ingredients):
        if names[i] in given:
            known[i] = float(given[names[i]])
        elif member.ingredient.score is not None:
            known[i] = float(member.ingredient.score)
    return known


@register_recipe(
    "greedy",
    pretty_name="Greedy soup",
    reference_url=MODEL_SOUPS_URL,
    check=_check,
    description="Add ingredients best-first while the held-out score does not drop (strict=True: improves).",
    params=GreedyParams,
)
def cook_greedy(kitchen: Kitchen) -> Soup:
    n = len(kitchen.ingredients)
    # the bar's first total: n alone + the uniform soup + n - 1 candidates (settled once the known scores are)
    with _Progress(kitchen.progress, total=2 * n) as progress:
        return _cook_greedy(kitchen, progress)


def _cook_greedy(kitchen: Kitchen, progress: _Progress) -> Soup:
    evaluator = kitchen.evaluator
    if evaluator is None:
        raise EvaluationError("method='greedy' needs an eval set: pass eval_dataset=.")
    strict = bool(kitchen.options.get("strict", False))
    full_evaluation = bool(kitchen.options.get("full_evaluation", False))
    want_ensemble = bool(kitchen.options.get("ensemble_baseline", False))
    if want_ensemble and not evaluator.supports_ensemble():
        raise InvalidArgumentError(
            f"ensemble_baseline=True needs a classification or token-classification model (task: {evaluator.task})."
        )
    known = _known_scores(kitchen)
    started = time.perf_counter()
    first_timing = len(evaluator.timings)
    members = kitchen.ingredients
    names = kitchen.names
    n_total = len(members)

    live = kitchen.new_live_model()
    soup = RunningSoup(kitchen, live)

    # 1. every ingredient once (reusing known scores)
    to_score = [i for i in range(n_total) if want_ensemble or i not in known]
    progress.bar.total = len(to_score) + (1 if n_total > 1 else 0) + n_total - 1
    progress.phase(
        f"scoring {len(to_score)} ingredient(s) alone on {len(evaluator.set_names)} eval set(s)"
        + (f" ({n_total - len(to_score)} score(s) given)" if len(to_score) < n_total else "")
    )
    ensemble_sum = None
    for i, member in enumerate(members):
        ing = member.ingredient
        if i in known and not want_ensemble:
            ing.score = known[i]
            logger.info("Greedy soup: %s scores %.4f (given, not re-evaluated).", names[i], known[i])
            continue
        scores, predictions = kitchen.taste_ingredient(i, live, load=lambda i=i: soup.start(i, running=False))
        progress.done()
        if want_ensemble:
            ensemble_sum = evaluator.add_predictions(ensemble_sum, predictions)
        ing.scores = scores
        ing.score = known[i] if i in known else evaluator.primary(scores)
        logger.info("Greedy soup: %s scores %.4f on %s.", names[i], ing.score, evaluator.select_on)

    order = sorted(range(n_total), key=lambda i: (evaluator.sort_key(members[i].ingredient.score), i))
    baselines: dict[str, Any] = {}
    best = order[0]
    baselines["best_single"] = {
        "name": names[best],
        "score": members[best].ingredient.score,
        "scores": members[best].ingredient.scores or {},
    }

    # 2. the uniform soup of everything, for the report (the paper's comparison point)
    if n_total > 1:
        progress.phase(f"scoring the uniform soup of all {n_total} ingredients (a baseline for the report)")
        kitchen.load_into(live, [1.0 / n_total] * n_total)
        uniform_scores = evaluator.evaluate(live)
        progress.done()
        baselines["uniform"] = {"score": evaluator.primary(uniform_scores), "scores": uniform_scores}
    if ensemble_sum is not None:
        ensemble_scores = evaluator.score_ensemble(ensemble_sum, n_total)
        baselines["ensemble"] = {"score": evaluator.primary(ensemble_scores), "scores": ensemble_scores}
        ensemble_sum = None

    # 3. greedy additions
    soup.start(best)
    current_scores = members[best].ingredient.scores
    if not current_scores:  # the best score was given: measure the start point
        progress.bar.total += 1
        current_scores = evaluator.evaluate(live)
        progress.done()
    # Candidates are measured here, so the soup they must beat is measured here too: a given score (scores=, a
    # Trainer metric) only orders the ingredients, it is never compared with a measured one.
    current = evaluator.primary(current_scores)
    step0: dict[str, Any] = {
        "step": 0,
        "candidate": names[best],
        "candidate_score": current,
        "kept": True,
        "score": current,
        "n_ingredients": 1,
        "scores": current_scores,
    }
    if best in known:
        step0["given_score"] = known[best]
        baselines["best_single"].update(score=current, scores=current_scores, given_score=known[best])
        if known[best] != current:
            logger.info(
                "Greedy soup: %s was given %.4f but measures %.4f on %s; candidates are compared with %.4f.",
                names[best],
                known[best],
                current,
                evaluator.select_on,
                current,
            )
    history: list[dict[str, Any]] = [step0]
    members[best].ingredient.selected = True
    rejected_early = 0
    if n_total > 1:
        progress.phase(
            f"trying {n_total - 1} candidate(s) best first, from {names[best]} "
            f"({'strictly better' if strict else 'not worse'} on {evaluator.select_on} to keep)"
        )
    for step, i in enumerate(order[1:], start=1):
        soup.try_candidate(i)
        if full_evaluation:
            cand_scores, early = evaluator.evaluate(live), None
        else:  # stops as soon as the candidate can no longer be kept (same decision as a full evaluation)
            cand_scores, early = evaluator.evaluate_candidate(live, current, strict=strict)
        # a candidate stopped early is reported with the best score it could still have reached
        cand = early.bound if early is not None else evaluator.primary(cand_scores)
        keep = early is None and evaluator.better(cand, current, strict=strict)
        if keep:
            soup.accept(i)
            current, current_scores = cand, cand_scores
        else:
            soup.restore()
        members[i].ingredient.selected = keep
        logger.info(
            "Greedy soup: step %d/%d, %s -> %s%.4f (soup %.4f): %s",
            step,
            n_total - 1,
            names[i],
            "at best " if early is not None else "",
            cand,
            current,
            "kept"
            if keep
            else "dropped" + (f" after {early.units}/{early.of} {early.unit}" if early else ""),
        )
        entry = {
            "step": step,
            "candidate": names[i],
            "candidate_score": cand,
            "kept": keep,
            "score": current,
            "n_ingredients": soup.n,
            "scores": cand_scores,
        }
        if early is not None:  # `scores` are partial: select_on only, over the units scored
            entry["partial"] = early.as_dict()
            rejected_early += 1
        history.append(entry)
        progress.done()
    soup.restore()
    kept = set(soup.members)
    coefficients = [1.0 / len(kept) if i in kept else 0.0 for i in range(n_total)]
    if len(kept) > 2:
        # The running sum (a + b + c) / k and the served soup a/k + b/k + c/k differ by float32 rounding once
        # k > 2: score the soup that is served, so that soup.model, soup.score and the files agree bit for bit.
        progress.phase(f"scoring the soup of the {len(kept)} kept ingredients as served")
        progress.bar.total += 1
        kitchen.load_into(live, coefficients)
        current_scores = evaluator.evaluate(live)
        current = evaluator.primary(current_scores)
        progress.done()

    timings = evaluator.timings[first_timing:]
    cost = {
        "evaluations": len(timings),
        "evaluation_seconds": round(sum(timings), 3),
        "recipe_seconds": round(time.perf_counter() - started, 3),
        "rejected_early": rejected_early,
    }
    for i, member in enumerate(members):
        member.ingredient.weight = coefficients[i]
        member.ingredient.selected = i in kept
    result = kitchen.serve(
        coefficients,
        method="greedy",
        params={"strict": strict, "order": [names[i] for i in order]},
        history=history,
        score=current,
        scores=current_scores,
        model=live,
        report_extra={"baselines": baselines, "cost": cost},
    )
    return result
