"""`Soup.report()` and `Soup.plot()`: the soup against its ingredients, as a table and as a figure.

The report is plain text (monospace table): the ingredients best first with their held-out scores on every
eval set and whether they were kept, the soup against the best single ingredient (and, for greedy soups,
the uniform soup and the optional logit ensemble), then the recipe's steps: greedy additions, or the
WiSE-FT alpha curve. `plot` draws the same curve with matplotlib (an optional dependency).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import EvaluationError, InvalidArgumentError
from ..lm_eval_task import describe_lm_eval

if TYPE_CHECKING:  # pragma: no cover
    from ..soup import Soup


def _title(method: str) -> str:
    """The recipe's display name (as in model cards), or the method itself for an unregistered one."""
    from ..recipes import get_recipe

    try:
        return get_recipe(method).pretty_name
    except InvalidArgumentError:
        return method


def format_value(value: Any, missing: str = "-") -> str:
    """A table cell: 4 decimals for floats, yes/no for booleans, `missing` for None (lists item by item)."""
    if value is None:
        return missing
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v, missing) for v in value) + "]"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> list[str]:
    cells = [[str(h) for h in header]] + [[format_value(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        parts = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append(indent + "  ".join(parts).rstrip())
        if n == 0:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return lines


def _candidate_cell(step: dict[str, Any], greater_is_better: bool) -> str:
    """A greedy candidate's score, or for one rejected early: `<= best reachable (partial: k/n units)`."""
    partial = step.get("partial")
    if not partial:
        return format_value(step.get("candidate_score"))
    bound = format_value(partial.get("bound"))
    return f"{'<=' if greater_is_better else '>='} {bound} (partial: {partial.get('units')}/{partial.get('of')} {partial.get('unit')})"


def _key(soup: Soup) -> str | None:
    return soup.metric_key


def _sets(soup: Soup) -> list[str]:
    names: list[str] = []
    sources: list[Mapping[str, Any]] = [soup.scores or {}]
    sources += [i.scores or {} for i in soup.ingredients]
    sources += [h.get("scores") or {} for h in soup.history if isinstance(h, dict)]
    for src in sources:
        for name in src:
            if name not in names:
                names.append(name)
    if soup.select_on in names:
        names.remove(soup.select_on)
        names.insert(0, soup.select_on)
    return names


def _row_scores(
    scores: Mapping[str, Mapping[str, float]] | None, sets: Sequence[str], key: str | None
) -> list:
    scores = scores or {}
    return [scores.get(s, {}).get(key) if key else None for s in sets]


def greater_is_better(soup: Soup) -> bool:
    """The direction of the soup's selection metric (recorded by evaluation; higher when nothing was evaluated)."""
    return soup.params.get("greater_is_better", True) is not False


def render_report(soup: Soup) -> str:
    """The soup's report as text (what `Soup.report()` returns).

    Args:
        soup ([`Soup`]): a cooked soup.

    Returns:
        `str`: a monospace table; print it.

    Example:

    ```python
    >>> print(soup.report())  # doctest: +SKIP
    Greedy soup: 4 of 5 ingredients kept, accuracy on 'val' (higher is better)
    ...
    ```
    """
    key = _key(soup)
    sets = _sets(soup)
    greater = greater_is_better(soup)
    kept = [i for i in soup.ingredients if i.selected is not False]
    title = _title(soup.method)
    head = f"{title}: {len(kept)} of {len(soup.ingredients)} ingredients kept"
    if soup.method == "wise-ft" and "alpha" in soup.params:
        head = f"{title}: alpha={soup.params['alpha']:g}, {len(soup.ingredients)} fine-tuned ingredient(s)"
    if key:
        head += f", {key} on {soup.select_on!r} ({'higher' if greater else 'lower'} is better)"
    lines = [head, ""]
    cols = [f"{s}/{key}" for s in sets] if key else []

    history = [h for h in soup.history if isinstance(h, dict)]

    # ingredients, best first
    scored = any(i.score is not None for i in soup.ingredients)

    def order(ing):
        if ing.score is None or math.isnan(ing.score):
            return math.inf
        return -ing.score if greater else ing.score

    ingredients = sorted(soup.ingredients, key=order) if scored else list(soup.ingredients)
    rows = []
    for ing in ingredients:
        values = _row_scores(ing.scores, sets, key)
        if ing.scores == {} and ing.score is not None and sets:
            values[0] = ing.score  # a score given with scores=, on the selection set
        rows.append([ing.name, *values, ing.weight, ing.selected])
    lines.append("Ingredients" + (" (best first)" if scored else "") + ":")
    lines += _table(["ingredient", *cols, "weight", "kept"], rows)

    # comparison
    if key and (soup.scores or soup.score is not None):
        lines += ["", "Comparison:"]
        baselines = (soup.report_extra or {}).get("baselines", {})
        comp = []
        best = baselines.get("best_single")
        if best is None and scored:
            top = ingredients[0]
            best = {"name": top.name, "score": top.score, "scores": top.scores}
        if best is not None:
            comp.append([f"best single ({best['name']})", *_row_scores(best.get("scores"), sets, key)])
            if not best.get("scores") and sets:
                comp[-1][1] = best.get("score")
        if "uniform" in baselines:
            comp.append(
                [
                    f"uniform soup ({len(soup.ingredients)})",
                    *_row_scores(baselines["uniform"]["scores"], sets, key),
                ]
            )
        label = (
            f"{soup.method} soup ({len(kept)})"
            if soup.method != "wise-ft"
            else f"wise-ft (alpha={soup.params.get('alpha', '?'):g})"
        )
        soup_row = [label, *_row_scores(soup.scores, sets, key)]
        if not soup.scores and sets:
            soup_row[1] = soup.score
        comp.append(soup_row)
        if soup.method == "wise-ft" and history and "alpha" in history[0]:
            ends = {h["alpha"]: h for h in history}
            for alpha, label in ((0.0, "base (alpha=0)"), (1.0, "fine-tuned (alpha=1)")):
                if alpha in ends:
                    comp.insert(len(comp) - 1, [label, *_row_scores(ends[alpha].get("scores"), sets, key)])
        if "ensemble" in baselines:
            comp.append(
                [
                    f"logit ensemble ({len(soup.ingredients)}, reference)",
                    *_row_scores(baselines["ensemble"]["scores"], sets, key),
                ]
            )
        lines += _table(["model", *cols], comp)

    # several methods compared
    header, rows = method_comparison(soup)
    if rows:
        lines += ["", f"Methods compared (each with its knobs chosen on {soup.select_on!r}; best served):"]
        lines += _table(header, rows)

    # recipe steps
    if soup.method == "greedy" and history:
        lines += [
            "",
            f"Greedy steps ({'strictly better' if soup.params.get('strict') else 'not worse'} to keep):",
        ]
        rows = [
            [
                h.get("step"),
                h.get("candidate"),
                _candidate_cell(h, greater_is_better(soup)),
                h.get("kept"),
                h.get("score"),
                h.get("n_ingredients"),
            ]
            for h in history
        ]
        lines += _table(["step", "candidate", f"with it ({soup.select_on})", "kept", "soup", "size"], rows)
        if any(h.get("partial") for h in history):
            lines.append(
                "  (partial: rejected before the end of the set; the number is the best it could still reach, "
                "the other sets were not scored)"
            )
    elif history and "alpha" in history[0]:
        lines += ["", "Alpha sweep:"]
        rows = [
            [
                f"{h['alpha']:g}",
                *_row_scores(h.get("scores"), sets, key),
                "<- chosen" if h.get("selected") else "",
            ]
            for h in history
        ]
        lines += _table(["alpha", *cols, ""], rows)
    elif history and _swept(soup):
        knobs = _swept(soup)
        lines += ["", f"Sweep of {', '.join(knobs)} (each scored on the eval sets):"]
        rows = [
            [
                *(_knob(h.get(k)) for k in knobs),
                *_row_scores(h.get("scores"), sets, key),
                "<- chosen" if h.get("selected") else "",
            ]
            for h in history
        ]
        lines += _table([*knobs, *cols, ""], rows)
    elif soup.method == "learned" and history:
        lines += [
            "",
            *learned_summary(soup),
            "",
            "Learned coefficients (softmax weights; one row per group):",
        ]
        members = [k for k in history[0] if k != "group"]
        lines += _table(
            ["group", *members], [[h.get("group"), *(h.get(m) for m in members)] for h in history]
        )
    for name, value in (soup.report_extra or {}).items():
        if name == "baselines" or (name == "learned" and soup.method == "learned"):
            continue
        if name == "cost" and isinstance(value, Mapping) and "evaluations" in value:
            lines += [
                "",
                f"Cost: {value['evaluations']} held-out evaluations took {value['evaluation_seconds']:.1f} s of the "
                f"recipe's {value['recipe_seconds']:.1f} s.",
            ]
            continue
        if name == "evaluation" and isinstance(value, Mapping):
            lines += ["", describe_batches(value)]
            continue
        if name == "lm_eval" and isinstance(value, Mapping):
            lines += ["", *describe_lm_eval(value)]
            continue
        lines += ["", f"{name}: {value}"]
    return "\n".join(lines).rstrip() + "\n"


def describe_batches(info: Mapping[str, Any]) -> str:
    """One line on how the eval sets ran (from `report_extra["evaluation"]`): order, padding, dtype."""
    order = "longest first" if info.get("sort_by_length") else "in each set's order"
    padding = "; ".join(
        f"{name}: {p['padded_fraction']:.1%} of the positions run were padding "
        f"({p['padded_fraction_unsorted']:.1%} in the set's order)"
        for name, p in (info.get("padding") or {}).items()
    )
    precision = f"dtype {info.get('eval_dtype') or 'auto'}"
    if info.get("autocast"):
        precision += f", autocast {info['autocast']}"
    return f"Evaluation: batches of {info.get('batch_size')} {order}, {precision}" + (
        f"; {padding}." if padding else "."
    )


def learned_summary(soup: Soup) -> list[str]:
    """What a learned soup's optimisation did, in a few lines (from `report_extra["learned"]`)."""
    info = (soup.report_extra or {}).get("learned") or {}
    if not info:
        return []
    out = [
        f"Learned by {info.get('granularity')} ({info.get('groups')} group(s) x {len(info.get('members') or [])} "
        f"members): {info.get('steps')} Adam step(s) on {info.get('train_examples')} examples of "
        f"{soup.select_on!r}, step {info.get('best_step')} served ({info.get('stopped')})."
    ]
    val = info.get("validation_loss")
    if val:
        out.append(
            f"Validation loss on {info.get('validation_examples')} held-back examples: uniform start "
            f"{val['uniform']:.4f}, served {val['learned']:.4f}."
        )
    if info.get("base_weight") is not None:
        out.append(f"Base model weight (element-weighted mean over groups): {info['base_weight']:.4f}.")
    return out


SETTING_KEYS = ("alpha", "weights", "scaling", "density", "t", "seed", "granularity")
"""The parameters shown as a compared method's chosen setting."""


def method_comparison(soup: Soup) -> tuple[list[str], list[list[Any]]]:
    """The table of a soup cooked from several methods (`soup.comparison`): the best single ingredient, then each
    method with its chosen setting and its score on every eval set, the served one marked.

    Args:
        soup ([`Soup`]): a soup cooked with `method=[...]`.

    Returns:
        `tuple[list[str], list[list]]`: the header and the rows (raw values); no rows for a single method.
    """
    if not soup.comparison:
        return [], []
    key = _key(soup)
    sets = _sets(soup)
    sets += [s for row in soup.comparison for s in (row.get("scores") or {}) if s not in sets]
    header = ["model", "setting", *(f"{s}/{key}" for s in sets), ""]
    rows: list[list[Any]] = []
    best = ((soup.report_extra or {}).get("baselines") or {}).get("best_single")
    if best is not None:
        rows.append([f"best single ({best['name']})", "", *_row_scores(best.get("scores"), sets, key), ""])
    for row in soup.comparison:
        params = row.get("params") or {}
        setting = ", ".join(f"{k}={_knob(params[k])}" for k in SETTING_KEYS if params.get(k) is not None)
        if row["method"] == "greedy":
            setting = f"{row.get('kept')} of {len(soup.ingredients)} kept"
        scores = _row_scores(row.get("scores"), sets, key)
        rows.append([row["method"], setting, *scores, "<- chosen" if row.get("selected") else ""])
    return header, rows


def plot(soup: Soup, path: str | os.PathLike) -> Path:
    """Draw the soup's curve into an image file (format from the suffix: .png, .pdf, .svg ...).

    WiSE-FT sweeps: held-out score against alpha, one line per eval set, the chosen alpha marked. Greedy
    soups: each candidate's score and the soup's score after each step, with the best single ingredient and
    the uniform soup as reference lines. Other evaluated soups: the ingredients' scores against the soup's.

    Args:
        soup ([`Soup`]): a cooked, evaluated soup.
        path (`str` or `os.PathLike`): the image file to write (its folder is created).

    Returns:
        `Path`: the file written.

    Raises:
        `ImportError`: matplotlib is not installed (`pip install "hf-soups[plot]"`).
        [`EvaluationError`]: the soup was not evaluated, so there is nothing to draw.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            'Soup.plot needs matplotlib: pip install "hf-soups[plot]" (or pip install matplotlib).'
        ) from err
    key = soup.metric_key
    history = [h for h in soup.history if isinstance(h, dict)]
    if key is None or not (history or soup.scores or soup.score is not None):
        raise EvaluationError("Nothing to plot: this soup was not evaluated. Cook it with eval_dataset=.")
    sets = _sets(soup)
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    header, rows = method_comparison(soup)
    if rows:  # several methods: one group of bars per model, one bar per eval set
        width = 0.8 / max(len(sets), 1)
        for j, s in enumerate(sets):
            ys = [math.nan if v is None else v for v in (row[2 + j] for row in rows)]
            ax.bar([i + j * width for i in range(len(rows))], ys, width=width, label=s)
        labels = [f"{row[0]}{' (chosen)' if row[-1] else ''}" for row in rows]
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], labels, rotation=30, ha="right")
        ax.set_title("Methods compared (knobs chosen on the held-out data)")
    elif history and "alpha" in history[0]:
        alphas = [h["alpha"] for h in history]
        for s in sets:
            ys = [(h.get("scores") or {}).get(s, {}).get(key, math.nan) for h in history]
            ax.plot(alphas, ys, marker="o", label=s)
        chosen = soup.params.get("alpha")
        if chosen is not None:
            ax.axvline(chosen, color="gray", linestyle="--", linewidth=1, label=f"chosen alpha={chosen:g}")
        ax.set_xlabel("alpha (0 = base, 1 = fine-tuned)")
        ax.set_title("WiSE-FT: held-out score along the interpolation")
    elif history and _swept(soup):
        knobs = _swept(soup)
        single = len(knobs) == 1 and knobs[0] != "weights"
        xs = [h[knobs[0]] for h in history] if single else list(range(len(history)))
        for s in sets:
            ys = [(h.get("scores") or {}).get(s, {}).get(key, math.nan) for h in history]
            ax.plot(xs, ys, marker="o", label=s)
        chosen = next((x for x, h in zip(xs, history) if h.get("selected")), None)
        if chosen is not None:
            ax.axvline(chosen, color="gray", linestyle="--", linewidth=1, label="chosen")
        if single:
            ax.set_xlabel(knobs[0])
        else:
            ax.set_xticks(
                xs, [", ".join(f"{k}={_knob(h.get(k))}" for k in knobs) for h in history], rotation=30
            )
        ax.set_title(f"{_title(soup.method)}: held-out score along the sweep")
    elif soup.method == "greedy" and history:
        steps = list(range(len(history)))
        ax.plot(steps, [h.get("score") for h in history], marker="o", label="greedy soup")
        groups = (
            ("^", "candidate (kept)", lambda h: h.get("kept")),
            ("x", "candidate (dropped)", lambda h: not h.get("kept") and not h.get("partial")),
            # rejected early: drawn at the best score they could still have reached
            ("v", "candidate (dropped early: at best)", lambda h: h.get("partial")),
        )
        for marker, label, member in groups:
            chosen = [i for i, h in enumerate(history) if member(h)]
            if chosen or marker != "v":
                ax.scatter(
                    chosen,
                    [history[i]["candidate_score"] for i in chosen],
                    marker=marker,
                    label=label,
                    zorder=3,
                )
        baselines = (soup.report_extra or {}).get("baselines", {})
        if "uniform" in baselines:
            ax.axhline(
                baselines["uniform"]["score"], color="gray", linestyle="--", linewidth=1, label="uniform soup"
            )
        if "ensemble" in baselines:
            ax.axhline(
                baselines["ensemble"]["score"],
                color="gray",
                linestyle=":",
                linewidth=1,
                label="logit ensemble",
            )
        ax.set_xticks(steps, [str(h.get("candidate")) for h in history], rotation=30, ha="right")
        ax.set_xlabel("candidate, in order of individual score")
        ax.set_title("Greedy soup")
    elif soup.method == "learned" and history:
        members = [k for k in history[0] if k != "group"]
        xs = list(range(len(history)))
        for m in members:
            ax.plot(xs, [h.get(m) for h in history], marker="o", label=m)
        ax.set_xticks(xs, [str(h.get("group")) for h in history], rotation=30, ha="right")
        ax.set_title("Learned soup: coefficients per group")
        ax.set_ylabel("coefficient (softmax weight)")
    else:
        names = [i.name for i in soup.ingredients] + ["soup"]
        values = [i.score if i.score is not None else math.nan for i in soup.ingredients] + [soup.score]
        ax.bar(range(len(names)), values, color=["C0"] * (len(names) - 1) + ["C1"])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(f"{_title(soup.method)} against its ingredients")
    if history and "alpha" in history[0]:
        ax.set_ylabel(f"{key} (alpha chosen on {soup.select_on})" if soup.select_on else key)
    elif soup.method == "learned" and history:
        pass
    else:
        ax.set_ylabel(f"{key} on {soup.select_on}" if soup.select_on else key)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return path


__all__ = ["plot", "render_report"]


def _swept(soup: Soup) -> list[str]:
    """The knobs a task-vector family recipe swept on eval data (`params["sweep"]`), in order."""
    sweep = (soup.params or {}).get("sweep")
    return list(sweep) if isinstance(sweep, Mapping) else []


def _knob(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(f"{float(v):g}" for v in value) + "]"
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)
