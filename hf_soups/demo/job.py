"""The main job: LP-FT ingredients of all-MiniLM-L6-v2 on Rotten Tomatoes, souped three ways, one table.

Steps (all offline; every decision is taken on the validation split, never on a test split):

1. split the 12,808 review snippets into train / validation / test, and make two typo-shifted copies of the
   test split (distribution shift);
2. train a linear probe (head only, frozen encoder) and fine-tune a handful of ingredients from it over a
   learning-rate x seed grid;
3. cook a uniform soup, a greedy soup (ingredients ranked and kept on validation) and a WiSE-FT soup (the
   probe as robust end, the best single ingredient as fine-tuned end, alpha chosen on validation) with
   [`hf_soups.merge_models`];
4. print one table (every ingredient, best single, logit ensemble, the soups) on every split, save the soup
   that is best on validation with its model card, `results.md`, `results.json` and `results.png`.

Run it with `hf-soups demo --output-dir demo-output` (or `python -m hf_soups.demo`); `--smoke` runs a tiny
version in well under two minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from ..soup import Soup
    from .train import EncodedSplit, FineTuneResult, ProbeResult

logger = logging.getLogger(__name__)

__all__ = ["DemoConfig", "DemoResult", "Row", "main", "parse_args", "run"]


@dataclass
class DemoConfig:
    """Everything the main job needs (the command-line flags of `hf-soups demo`).

    Args:
        output_dir (`str`): where the soup, `results.md`, `results.json` and `results.png` go.
        data_seed (`int`): seed of the train / validation / test split and of the typos.
        train_size, validation_size, test_size (`int`): split sizes (`test_size=0`: every remaining row).
        learning_rates (`list[float]`), seeds (`list[int]`): the fine-tuning grid (one ingredient per pair).
        steps (`int`): optimisation steps per fine-tune (batch 32).
        alphas (`list[float]`): WiSE-FT values tried on validation.
        typo_rates (`list[float]`): per-letter typo rates of the shifted test sets.
        keep_ingredients (`bool`): keep the probe and the ingredients under `output_dir/ingredients`.
        plot (`bool`): write `results.png` (needs matplotlib).
        smoke (`bool`): the tiny configuration used by the tests.
        device (`str`, *optional*): `"cpu"`, `"cuda"`, ...; default: CUDA when available, else CPU.
    """

    output_dir: str = "demo-output"
    data_seed: int = 0
    train_size: int = 2000
    validation_size: int = 500
    test_size: int = 500
    learning_rates: list[float] = field(default_factory=lambda: [5e-5, 1e-4])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    steps: int = 30
    batch_size: int = 32
    alphas: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0])
    typo_rates: list[float] = field(default_factory=lambda: [0.05, 0.15])
    keep_ingredients: bool = False
    plot: bool = True
    smoke: bool = False
    device: str | None = None

    @classmethod
    def smoke_config(cls, output_dir: str = "demo-output") -> DemoConfig:
        """Tiny sizes: two 3-step fine-tunes, 96 training rows, 64-row evaluation sets."""
        return cls(
            output_dir=output_dir,
            train_size=96,
            validation_size=64,
            test_size=64,
            learning_rates=[1e-4],
            seeds=[0, 1],
            steps=3,
            batch_size=16,
            alphas=[0.5, 1.0],
            smoke=True,
        )

    def check(self) -> None:
        """Raise [`InvalidArgumentError`] on an unusable configuration (before any work)."""
        if not self.learning_rates or not self.seeds:
            raise InvalidArgumentError("--learning-rates and --seeds must each name at least one value.")
        if len(self.learning_rates) * len(self.seeds) < 2:
            raise InvalidArgumentError(
                "A soup needs at least two ingredients: give two learning rates or two seeds."
            )
        if any(not 0.0 <= a <= 1.0 for a in self.alphas) or not self.alphas:
            raise InvalidArgumentError(f"--alphas must be values in [0, 1], got {self.alphas}.")
        if any(not 0.0 < r <= 1.0 for r in self.typo_rates):
            raise InvalidArgumentError(f"--typo-rates must be in (0, 1], got {self.typo_rates}.")
        if self.steps < 1 or self.train_size < 1 or self.validation_size < 1 or self.test_size < 0:
            raise InvalidArgumentError("--steps, --train-size and --validation-size must be positive.")


@dataclass
class Row:
    """One line of the results table.

    Args:
        name (`str`): display name.
        kind (`str`): `probe`, `ingredient`, `best single`, `ensemble`, `uniform`, `greedy` or `wise-ft`.
        accuracy (`dict[str, float]`): accuracy per evaluation set.
        note (`str`): what was chosen (greedy's kept count, WiSE-FT's alpha).
        correct (`dict[str, list[bool]]`): per-example correctness per set (paired tests); not printed.
    """

    name: str
    kind: str
    accuracy: dict[str, float]
    note: str = ""
    correct: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "accuracy": self.accuracy, "note": self.note}


@dataclass
class DemoResult:
    """What [`run`] returns (also written to `results.json`).

    Args:
        rows (`list[Row]`): the table.
        eval_sets (`list[str]`): the column names, validation first.
        sizes (`dict[str, int]`): rows per split.
        chosen (`str`): the soup saved to `output_dir/soup` (best on validation).
        soups (`dict[str, Soup]`): the three soups (only with `keep_ingredients=True`: otherwise their folders
            are removed with the temporary working directory; the chosen one is saved in `output_dir/soup`).
        timings (`dict[str, float]`): seconds per phase, and the measured seconds per training step.
        output_dir (`Path`): where everything was written.
        wise_ft_curve (`list[dict]`): WiSE-FT's validation accuracy per alpha.
        greedy_history (`list[dict]`): greedy's steps.
    """

    rows: list[Row]
    eval_sets: list[str]
    sizes: dict[str, int]
    chosen: str
    soups: dict[str, Any]
    timings: dict[str, float]
    output_dir: Path
    wise_ft_curve: list[dict[str, Any]] = field(default_factory=list)
    greedy_history: list[dict[str, Any]] = field(default_factory=list)

    def row(self, kind: str) -> Row:
        """The first row of a kind (`"best single"`, `"uniform"`, `"greedy"`, `"wise-ft"`, ...)."""
        for row in self.rows:
            if row.kind == kind:
                return row
        raise KeyError(kind)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [r.to_dict() for r in self.rows],
            "eval_sets": self.eval_sets,
            "sizes": self.sizes,
            "chosen": self.chosen,
            "timings": self.timings,
            "wise_ft_curve": self.wise_ft_curve,
            "greedy_history": self.greedy_history,
        }


# ------------------------------------------------------------------------------------------- helpers


def typo_set_name(rate: float) -> str:
    """Column name of a typo-shifted test set, e.g. `test+typos 5%`."""
    return f"test+typos {rate * 100:g}%"


def prepare_data(
    *,
    data_seed: int,
    train_size: int,
    validation_size: int,
    test_size: int | None,
    typo_rates: Sequence[float],
    tokenizer: Any,
) -> tuple[dict[str, EncodedSplit], dict[str, Any]]:
    """Splits, typo-shifted test sets, tokenised once.

    Returns:
        `tuple`: `(encoded, raw)`: [`EncodedSplit`] per set name (`train`, `validation`, `test`, one per typo
        rate) and the raw `datasets.Dataset` per name.
    """
    from .data import load_splits, typo_dataset
    from .train import encode

    splits = load_splits(
        seed=data_seed, train_size=train_size, validation_size=validation_size, test_size=test_size
    )
    raw: dict[str, Any] = {name: splits[name] for name in ("train", "validation", "test")}
    for rate in typo_rates:
        raw[typo_set_name(rate)] = typo_dataset(splits["test"], rate, seed=data_seed)
    encoded = {name: encode(ds, tokenizer) for name, ds in raw.items()}
    return encoded, raw


def evaluation_dataset(split: EncodedSplit) -> Any:
    """A pre-tokenised `datasets.Dataset` (`input_ids`, `attention_mask`, `label`) for `merge_models`.

    The same token ids as [`predict`] sees, so `merge_models`' validation scores and the table agree.
    """
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "input_ids": split.input_ids,
            "attention_mask": [[1] * len(ids) for ids in split.input_ids],
            "label": split.labels,
        }
    )


def score_model(
    model: Any, sets: dict[str, EncodedSplit], bar: Any = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Accuracy and per-example correctness of `model` on every set (`bar`: advanced by one per set)."""
    return _accuracy_from_logits(logits_on(model, sets, bar), sets)


def logits_on(model: Any, sets: dict[str, EncodedSplit], bar: Any = None) -> dict[str, np.ndarray]:
    """Logits of `model` on every set; `bar` (a tqdm bar), when given, advances by one per set."""
    from .train import predict

    logits = {}
    for name, split in sets.items():
        logits[name] = predict(model, split)
        if bar is not None:
            bar.update(1)
    return logits


def evaluation_bar(total: int, desc: str) -> Any:
    """A progress bar over evaluations (one model on one set), off with `HF_HUB_DISABLE_PROGRESS_BARS=1`."""
    from huggingface_hub.utils import tqdm

    return tqdm(total=total, desc=desc, unit="evaluation", name="hf_soups")


def best_on_validation(rows: Sequence[Row]) -> Row:
    """The row with the highest validation accuracy (ties: the first)."""
    return max(rows, key=lambda r: (r.accuracy["validation"], -rows.index(r)))


def format_table(rows: Sequence[Row], eval_sets: Sequence[str], *, markdown: bool = False) -> str:
    """The results table, as aligned text or as Markdown."""
    header = ["model", *eval_sets, "note"]
    lines = [[r.name, *(f"{100 * r.accuracy[s]:.2f}" for s in eval_sets), r.note] for r in rows]
    if markdown:
        out = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join([" --- "] + [" ---: "] * len(eval_sets) + [" --- "]) + "|",
        ]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = [f"{{:<{widths[0]}}}"] + [f"{{:>{w}}}" for w in widths[1:-1]] + [f"{{:<{widths[-1]}}}"]

    def render(cells):
        return "  ".join(f.format(c) for f, c in zip(fmt, cells)).rstrip()

    rule = "-" * len(render(header))
    return "\n".join([render(header), rule, *(render(line) for line in lines)])


def plot_results(
    rows: Sequence[Row],
    eval_sets: Sequence[str],
    path: str | os.PathLike,
    *,
    wise_ft_points: Sequence[tuple[float, dict[str, float]]] = (),
    title: str = "",
) -> Path:
    """Two panels: in-distribution test vs. the hardest shifted set per model, and the WiSE-FT alpha curve.

    Args:
        rows (`Sequence[Row]`): the table rows.
        eval_sets (`Sequence[str]`): set names; `test` and the last set are the panels' axes.
        path (`str` or `os.PathLike`): the PNG to write.
        wise_ft_points (`Sequence[tuple[float, dict[str, float]]]`): `(alpha, accuracy per set)` points; the
            second panel draws one line per set present.
        title (`str`): figure title.

    Returns:
        `Path`: the written file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifted = eval_sets[-1]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    style = {
        "probe": ("s", "tab:gray", 60),
        "ingredient": ("o", "tab:blue", 35),
        "ensemble": ("P", "tab:purple", 90),
        "uniform": ("D", "tab:orange", 90),
        "greedy": ("*", "tab:red", 220),
        "wise-ft": ("^", "tab:green", 110),
    }
    labelled: set[str] = set()
    for row in rows:
        if row.kind not in style:
            continue
        marker, color, size = style[row.kind]
        label = row.kind if row.kind == "ingredient" else row.name
        ax1.scatter(
            100 * row.accuracy["test"],
            100 * row.accuracy[shifted],
            marker=marker,
            color=color,
            s=size,
            label=None if label in labelled else label,
            edgecolor="black",
            linewidth=0.5,
            zorder=3,
        )
        labelled.add(label)
    ax1.set_xlabel("test accuracy (%)")
    ax1.set_ylabel(f"{shifted} accuracy (%)")
    ax1.set_title("In distribution vs. shifted")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8, loc="lower right")
    if wise_ft_points:
        alphas = [a for a, _ in wise_ft_points]
        for name in eval_sets:
            if all(name in acc for _, acc in wise_ft_points):
                ax2.plot(alphas, [100 * acc[name] for _, acc in wise_ft_points], marker="o", label=name)
        ax2.set_xlabel("alpha (0 = linear probe, 1 = fine-tuned)")
        ax2.set_ylabel("accuracy (%)")
        ax2.set_title("WiSE-FT interpolation")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    else:
        ax2.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------- the job


def train_ingredients(
    config: DemoConfig, encoded: dict[str, EncodedSplit], tokenizer: Any, workdir: Path
) -> tuple[ProbeResult, list[FineTuneResult]]:
    """The linear probe, then one fine-tune per (learning rate, seed), all saved under `workdir`."""
    from .train import FineTuneConfig, fine_tune, train_linear_probe

    grid = [(lr, seed) for lr in config.learning_rates for seed in config.seeds]
    print(
        f"Training a linear probe on the frozen encoder, then {len(grid)} fine-tunes from it "
        f"({config.steps} steps of batch {config.batch_size} each)",
        flush=True,
    )
    probe = train_linear_probe(
        encoded["train"],
        encoded["validation"],
        output_dir=workdir / "probe",
        tokenizer=tokenizer,
        seed=0,
        device=config.device,
    )
    print(
        f"Linear probe: validation accuracy {100 * probe.validation_accuracy:.2f} "
        f"(L2 {probe.weight_decay:g}, {probe.seconds:.0f} s)",
        flush=True,
    )
    runs = []
    for k, (lr, seed) in enumerate(grid, start=1):
        ft_config = FineTuneConfig(
            learning_rate=lr, steps=config.steps, seed=seed, batch_size=config.batch_size
        )
        run = fine_tune(
            probe.path,
            encoded["train"],
            ft_config,
            output_dir=workdir / ft_config.name,
            tokenizer=tokenizer,
            device=config.device,
        )
        print(
            f"Fine-tune {k}/{len(grid)} {run.name}: {run.seconds_per_step:.2f} s/step, "
            f"final train loss {run.final_loss:.3f}",
            flush=True,
        )
        runs.append(run)
    return probe, runs


def cook_soups(
    probe_path: Path,
    runs: Sequence[FineTuneResult],
    validation: EncodedSplit,
    validation_scores: dict[str, float],
    best_name: str,
    alphas: Sequence[float],
    workdir: Path | None,
    tokenizer: Any,
    device: str | None = None,
) -> dict[str, Soup]:
    """Uniform, greedy and WiSE-FT soups with `merge_models`; greedy and alpha are chosen on validation.

    The soups are written under `workdir` when it is given, and kept in memory otherwise.
    """
    from .. import Ingredient, merge_models
    from .train import EVAL_BATCH_SIZE

    refs = [Ingredient(str(r.path), name=r.name, metadata=asdict(r.config)) for r in runs]
    eval_set = {"validation": evaluation_dataset(validation)}
    common = {
        "metric": "accuracy",
        "batch_size": EVAL_BATCH_SIZE,
        "progress": False,
        "tokenizer": tokenizer,
        "device": device,
    }
    soups: dict[str, Soup] = {}
    soups["uniform"] = merge_models(
        refs, method="uniform", output_dir=workdir and workdir / "uniform-soup", progress=False
    )
    refs = [Ingredient(str(r.path), name=r.name, metadata=asdict(r.config)) for r in runs]
    soups["greedy"] = merge_models(
        refs,
        method="greedy",
        eval_dataset=eval_set,
        scores=validation_scores,  # already measured: greedy only evaluates the candidate soups
        output_dir=workdir and workdir / "greedy-soup",
        **common,
    )
    best = next(r for r in runs if r.name == best_name)
    soups["wise-ft"] = merge_models(
        [Ingredient(str(best.path), name=best.name, metadata=asdict(best.config))],
        method="wise-ft",
        base_model=Ingredient(str(probe_path), name="linear-probe"),
        alpha=list(alphas),
        eval_dataset=eval_set,
        output_dir=workdir and workdir / "wise-ft-soup",
        **common,
    )
    return soups


def run(config: DemoConfig) -> DemoResult:
    """Run the main job (see the module docstring) and write its outputs.

    Args:
        config ([`DemoConfig`]): sizes, grid and output folder.

    Returns:
        [`DemoResult`]: the table and what was written.

    Raises:
        [`InvalidArgumentError`]: a bad configuration, or the demo's packages are missing.
    """
    config.check()
    from .data import load_tokenizer

    if config.device is None:
        import torch

        config.device = "cuda" if torch.cuda.is_available() else None

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer()
    encoded, _raw = prepare_data(
        data_seed=config.data_seed,
        train_size=config.train_size,
        validation_size=config.validation_size,
        test_size=config.test_size or None,
        typo_rates=config.typo_rates,
        tokenizer=tokenizer,
    )
    sizes = {name: len(split) for name, split in encoded.items()}
    eval_sets = [name for name in encoded if name != "train"]
    eval_encoded = {name: encoded[name] for name in eval_sets}
    print(
        "Rotten Tomatoes snippets (fresh vs rotten): "
        + ", ".join(f"{name} {n}" for name, n in sizes.items() if name in ("train", "validation", "test"))
        + f"; typo-shifted copies of test at {', '.join(f'{100 * r:g}%' for r in config.typo_rates)}",
        flush=True,
    )
    timings["data_s"] = time.perf_counter() - t0

    if config.keep_ingredients:
        workdir = out / "ingredients"
        if workdir.exists():
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True)
        cleanup = None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="hf_soups_demo_")
        workdir = Path(cleanup.name)
    try:
        t = time.perf_counter()
        probe, runs = train_ingredients(config, encoded, tokenizer, workdir)
        timings["train_s"] = time.perf_counter() - t
        timings["seconds_per_step"] = sum(r.seconds_per_step for r in runs) / len(runs)

        # every ingredient (and the probe) on every set; decisions use "validation" only
        t = time.perf_counter()
        print(f"Scoring the probe and {len(runs)} fine-tunes on {', '.join(eval_sets)}", flush=True)
        import numpy as np

        from .train import load_classifier

        rows: list[Row] = []
        # the probe's validation logits come from the features it was fitted on: no second forward pass
        shifted_sets = {name: split for name, split in eval_encoded.items() if name != "validation"}
        bar = evaluation_bar(len(shifted_sets) + len(runs) * len(eval_sets), "Scoring the ingredients")
        probe_logits = {"validation": probe.validation_logits, **logits_on(probe.model, shifted_sets, bar)}
        ingredient_logits = []
        for run_ in runs:
            model = _on(load_classifier(run_.path), config.device)
            logits = logits_on(model, eval_encoded, bar)
            ingredient_logits.append(logits)
            accuracy, correct = _accuracy_from_logits(logits, eval_encoded)
            rows.append(Row(run_.name, "ingredient", accuracy, correct=correct))
        accuracy, correct = _accuracy_from_logits(probe_logits, eval_encoded)
        probe_row = Row("linear probe (LP)", "probe", accuracy, note="WiSE-FT alpha=0", correct=correct)
        best_row = best_on_validation(rows)
        ensemble_logits = {s: np.mean([lg[s] for lg in ingredient_logits], axis=0) for s in eval_sets}
        accuracy, correct = _accuracy_from_logits(ensemble_logits, eval_encoded)
        ensemble_row = Row(
            f"logit ensemble ({len(runs)}x cost)", "ensemble", accuracy, note="reference", correct=correct
        )
        bar.close()
        timings["eval_ingredients_s"] = time.perf_counter() - t

        t = time.perf_counter()
        print(
            f"Cooking soups of the {len(runs)} fine-tunes: uniform, greedy and WiSE-FT (chosen on validation)",
            flush=True,
        )
        validation_scores = {r.name: r.accuracy["validation"] for r in rows}
        soups = cook_soups(
            probe.path,
            runs,
            encoded["validation"],
            validation_scores,
            best_row.name,
            config.alphas,
            workdir if config.keep_ingredients else None,  # the chosen soup is saved from memory
            tokenizer,
            config.device,
        )
        timings["cook_s"] = time.perf_counter() - t

        t = time.perf_counter()
        soup_rows = {}
        kept = [i.name for i in soups["greedy"].ingredients if i.selected]
        alpha = soups["wise-ft"].params["alpha"]
        notes = {
            "uniform": f"{len(runs)} ingredients",
            "greedy": f"kept {len(kept)}/{len(runs)}",
            "wise-ft": f"alpha={alpha:g} of {best_row.name}",
        }
        names = {"uniform": "uniform soup", "greedy": "greedy soup", "wise-ft": "WiSE-FT (LP <-> best)"}
        # what is left to score: nothing for a soup with the weights of a row already scored, and not
        # validation for one scored there while the soups were cooked (greedy, WiSE-FT: the number that chose
        # them; the uniform soup: greedy's baseline)
        same = {m: _same_weights_as(m, soup, kept, best_row, probe_row) for m, soup in soups.items()}
        if same["greedy"] is None and _equal_weights(soups["greedy"].model, soups["uniform"].model):
            same["greedy"] = "uniform"  # greedy kept every ingredient: the uniform soup, bit for bit
        on_validation = {m: soup.score for m, soup in soups.items()}
        if on_validation["uniform"] is None:
            on_validation["uniform"] = (
                soups["greedy"].report_extra.get("baselines", {}).get("uniform", {}).get("score")
            )
        todo = {
            m: (eval_encoded if on_validation[m] is None else shifted_sets) for m in soups if same[m] is None
        }
        print(
            f"Scoring the soups: {', '.join(todo) or 'none'}"
            + "".join(
                f"; {m} has the weights of {s if isinstance(s, str) else s.name}"
                for m, s in same.items()
                if s
            ),
            flush=True,
        )
        bar = evaluation_bar(sum(len(sets) for sets in todo.values()), "Scoring the soups")
        for method, soup in soups.items():
            if same[method] is not None:  # identical weights: reuse the scores instead of evaluating again
                twin = same[method]
                twin = soup_rows[twin] if isinstance(twin, str) else twin
                accuracy, correct = twin.accuracy, twin.correct
            else:
                accuracy, correct = score_model(_on(soup.model, config.device), todo[method], bar)
                if "validation" not in accuracy:
                    accuracy = {"validation": float(on_validation[method]), **accuracy}
            soup_rows[method] = Row(names[method], method, accuracy, note=notes[method], correct=correct)
        bar.close()
        timings["eval_soups_s"] = time.perf_counter() - t
        table = [
            probe_row,
            *rows,
            Row(
                "best single (on validation)",
                "best single",
                best_row.accuracy,
                note=best_row.name,
                correct=best_row.correct,
            ),
            ensemble_row,
            soup_rows["uniform"],
            soup_rows["greedy"],
            soup_rows["wise-ft"],
        ]
        chosen = best_on_validation([soup_rows["greedy"], soup_rows["uniform"], soup_rows["wise-ft"]]).kind
        soups[chosen].save_pretrained(out / "soup")
        curve = [
            {"alpha": p["alpha"], "validation": p["score"], "selected": p.get("selected", False)}
            for p in soups["wise-ft"].history
        ]
        greedy_history = [
            {k: p[k] for k in ("step", "candidate", "candidate_score", "kept", "score", "n_ingredients")}
            for p in soups["greedy"].history
        ]
    finally:
        if cleanup is not None:
            cleanup.cleanup()

    timings["total_s"] = time.perf_counter() - t0
    result = DemoResult(
        rows=table,
        eval_sets=eval_sets,
        sizes=sizes,
        chosen=chosen,
        soups=soups if config.keep_ingredients else {},  # their folders are gone with the temporary workdir
        timings=timings,
        output_dir=out,
        wise_ft_curve=curve,
        greedy_history=greedy_history,
    )
    _write_outputs(result, config, probe_row, soup_rows["wise-ft"], best_row)
    return result


def _on(model: Any, device: str | None) -> Any:
    return model.to(device) if device is not None else model


def _same_weights_as(method: str, soup: Any, kept: list[str], best_row: Row, probe_row: Row) -> Row | None:
    """The row whose model has exactly the soup's weights (greedy keeping only the best, alpha 0 or 1)."""
    if method == "greedy" and kept == [best_row.name]:
        return best_row
    if method == "wise-ft":
        alpha = float(soup.params["alpha"])
        if alpha == 1.0:
            return best_row
        if alpha == 0.0:
            return probe_row
    return None


def _equal_weights(a: Any, b: Any) -> bool:
    """Whether two models hold the same tensors, bit for bit."""
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _accuracy_from_logits(logits: dict[str, Any], sets: dict[str, EncodedSplit]):
    import numpy as np

    accuracy, correct = {}, {}
    for name, split in sets.items():
        hits = logits[name].argmax(-1) == np.asarray(split.labels)
        accuracy[name] = float(hits.mean())
        correct[name] = hits
    return accuracy, correct


def _write_outputs(
    result: DemoResult, config: DemoConfig, probe_row: Row, wise_row: Row, best_row: Row
) -> None:
    out = result.output_dir
    sizes = result.sizes
    table_md = format_table(result.rows, result.eval_sets, markdown=True)
    se = 100 * math.sqrt(0.8 * 0.2 / max(1, sizes["test"]))
    text = [
        "# hf_soups demo results",
        "",
        f"all-MiniLM-L6-v2, LP-FT, Rotten Tomatoes fresh/rotten; sizes: {sizes}. Accuracy in %.",
        "Every decision (greedy order and kept set, WiSE-FT alpha, best single, the saved soup) used validation.",
        f"Standard error of one test accuracy near 80%: about {se:.1f} points.",
        "",
        table_md,
        "",
        f"Saved soup: `{result.chosen}` (best on validation) in `soup/`.",
        "",
        "Timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()),
    ]
    (out / "results.md").write_text("\n".join(text) + "\n")
    payload = result.to_dict()
    payload["config"] = asdict(config)
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    if config.plot:
        points = [(0.0, probe_row.accuracy)] + [
            (p["alpha"], {"validation": p["validation"]}) for p in result.wise_ft_curve if 0 < p["alpha"] < 1
        ]
        points.append((1.0, best_row.accuracy))
        plot_results(
            result.rows,
            result.eval_sets,
            out / "results.png",
            wise_ft_points=sorted(points, key=lambda p: p[0]),
            title=f"hf_soups demo: all-MiniLM-L6-v2 on Rotten Tomatoes (test n={sizes['test']})",
        )


# ------------------------------------------------------------------------------------------- CLI


def build_parser(prog: str = "hf-soups demo") -> argparse.ArgumentParser:
    """The `hf-soups demo` argument parser."""
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Model soups on real data, offline: LP-FT ingredients of all-MiniLM-L6-v2 on Rotten Tomatoes "
            "review snippets, uniform / greedy / WiSE-FT soups, one table on validation, test and "
            "typo-shifted test sets. About 330 training-step times with the defaults (the job prints its step "
            "time): about 3 minutes on 2 CPU cores at 0.5 s per step."
        ),
        epilog="Examples:\n  hf-soups demo --output-dir demo-output\n  hf-soups demo --smoke --output-dir /tmp/x",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output-dir", default=defaults.output_dir, help="soup/, results.md/.json/.png")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and steps: an end-to-end check")
    parser.add_argument("--data-seed", type=int, default=defaults.data_seed, help="split and typo seed")
    parser.add_argument("--train-size", type=int, default=defaults.train_size)
    parser.add_argument("--validation-size", type=int, default=defaults.validation_size)
    parser.add_argument("--test-size", type=int, default=defaults.test_size, help="0: every remaining row")
    parser.add_argument("--learning-rates", type=float, nargs="+", default=defaults.learning_rates)
    parser.add_argument("--seeds", type=int, nargs="+", default=defaults.seeds)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="steps per fine-tune (batch 32)")
    parser.add_argument("--alphas", type=float, nargs="+", default=defaults.alphas, help="WiSE-FT sweep")
    parser.add_argument("--typo-rates", type=float, nargs="+", default=defaults.typo_rates)
    parser.add_argument("--keep-ingredients", action="store_true", help="keep probe + ingredients on disk")
    parser.add_argument("--no-plot", action="store_true", help="skip results.png")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> DemoConfig:
    """Command-line arguments to a [`DemoConfig`] (`--smoke` replaces the sizes with tiny ones)."""
    args = build_parser().parse_args(argv)
    if args.smoke:
        config = DemoConfig.smoke_config(args.output_dir)
    else:
        config = DemoConfig(
            output_dir=args.output_dir,
            data_seed=args.data_seed,
            train_size=args.train_size,
            validation_size=args.validation_size,
            test_size=args.test_size,
            learning_rates=list(args.learning_rates),
            seeds=list(args.seeds),
            steps=args.steps,
            alphas=list(args.alphas),
            typo_rates=list(args.typo_rates),
        )
    config.data_seed = args.data_seed
    config.keep_ingredients = args.keep_ingredients
    config.plot = not args.no_plot
    config.device = args.device
    return config


def quiet_libraries() -> None:
    """Turn the bars and notices of `transformers` and `datasets` off, and the demo's evaluation bars on.

    `HF_HUB_DISABLE_PROGRESS_BARS=1` keeps the demo's bars off too (the phase lines stay).
    """
    import warnings

    from datasets.utils.logging import disable_progress_bar
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bar()
    hf_logging.disable_progress_bar()  # this turns every huggingface_hub bar off: turn ours back on
    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF_HUB_DISABLE_PROGRESS_BARS=1 has priority: the bars then stay off
        enable_progress_bars("hf_soups")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `hf-soups demo` / `python -m hf_soups.demo`.

    Args:
        argv (`Sequence[str]`, *optional*): arguments without the program name.

    Returns:
        `int`: 0 on success, 2 on a configuration error.
    """
    config = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("transformers", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        quiet_libraries()
        result = run(config)
    except InvalidArgumentError as err:
        print(f"hf-soups demo: error: {err}")
        return 2
    print()
    print(format_table(result.rows, result.eval_sets))
    print()
    print(
        f"Accuracy in %. Validation drove every decision; test sets were never used for one. "
        f"Saved the {result.chosen} soup (best on validation) with its model card to {result.output_dir / 'soup'}"
    )
    extra = ", results.png" if config.plot else ""
    print(
        f"Wrote {result.output_dir / 'results.md'}, results.json{extra}. "
        f"Total {result.timings['total_s']:.0f} s ({result.timings['seconds_per_step']:.2f} s per training step)."
    )
    return 0
