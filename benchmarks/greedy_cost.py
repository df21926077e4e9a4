"""What a greedy soup costs beyond its evaluations, and whether its memory grows with the number of ingredients.

A greedy soup of N ingredients needs N individual evaluations and N - 1 candidate evaluations (hf_soups adds
one more: the uniform soup, for the report). Everything else (reading checkpoints, writing candidates into
the live model, the running sum) is overhead. Goals (docs/benchmarks.md):

- overhead beyond the evaluations <= 15% of the evaluations' time;
- peak RSS with N = 8 within 10% of N = 4 (one running sum and one live model, whatever N).

Each N runs in a fresh subprocess so that its peak RSS (`ru_maxrss`) is its own. The ingredients are a
small BERT classifier (large embedding table, so that weights dominate memory: ~11M parameters, 44 MB in
float32) with independent noise, saved once with `save_pretrained`; the eval set is a few thousand
pre-tokenized examples.

Early rejection (`--early`): the same greedy soup cooked twice in one process, side by side, with
`full_evaluation=True` (every candidate scored to the end) and with the default early rejection, for accuracy and
for the loss; the decisions (kept set, soup score, every kept step's scores) are asserted identical and the
evaluation time of each is reported. The eval set is labelled by a teacher model (so that accuracy means
something: the soup of noisy copies recovers it), and the ingredients are copies of the teacher with noise of
growing scale, the last ones ruined, as a hyperparameter sweep with diverged runs would give.

Usage:

    python benchmarks/greedy_cost.py                 # N = 4 and 8, 3000 examples
    python benchmarks/greedy_cost.py --n 4 8 16 --examples 2000 --json results.json
    python benchmarks/greedy_cost.py --early --n 8 --examples 2000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = dict(
    vocab_size=30522,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=1024,
    max_position_embeddings=64,
    num_labels=2,
)
SEQ_LEN = 16


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build_ingredients(root: Path, n: int) -> list[Path]:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(**CONFIG)
    base = BertForSequenceClassification(config)
    paths = []
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        model = BertForSequenceClassification(config)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        path = root / f"ingredient-{i}"
        model.save_pretrained(path)
        paths.append(path)
    return paths


#: noise (times each tensor's std) of the ingredients of `--early`, cycled: accuracies from ~0.96 down to chance
EARLY_NOISE = (0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.016, 0.03)


def _random_ids(examples: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, CONFIG["vocab_size"], (examples, SEQ_LEN), generator=gen)
    ids[:, 0] = 101
    return ids


def build_noisy_copies(root: Path, n: int) -> list[Path]:
    """A teacher (saved as `base`) and `n` copies with relative noise of growing scale.

    The teacher is the random BERT with its classifier's margin centred on random inputs and scaled by 1000, so that
    its argmax (the eval labels) depends on the input and is balanced: a copy's accuracy then falls smoothly with its
    noise (about 0.96, 0.92, 0.83, 0.68, 0.54 at 0.002, 0.004, 0.008, 0.016, 0.03), and averaging copies cancels it.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(**CONFIG)).eval()
    with torch.no_grad():
        base.classifier.weight.mul_(1000.0)
        logits = torch.cat([base(input_ids=chunk).logits for chunk in _random_ids(1024, seed=7).split(256)])
        base.classifier.bias[1] -= float((logits[:, 1] - logits[:, 0]).median())
    base.save_pretrained(root / "base")
    paths = []
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        model = BertForSequenceClassification(base.config)
        model.load_state_dict(base.state_dict())
        scale = EARLY_NOISE[i % len(EARLY_NOISE)]
        with torch.no_grad():
            for p in model.parameters():
                std = float(p.std()) if p.numel() > 1 else 1.0
                p.add_(torch.randn(p.shape, generator=gen) * scale * std)
        path = root / f"noisy-{i}"
        model.save_pretrained(path)
        paths.append(path)
    return paths


def early_child(n: int, root: Path, examples: int, batch_size: int, threads: int, repeats: int = 2) -> dict:
    """Greedy soups with and without early rejection, side by side in this process; same decisions asserted."""
    import torch
    from datasets import Dataset
    from transformers import BertForSequenceClassification

    from hf_soups import merge_models

    torch.set_num_threads(threads)
    import evaluate  # noqa: F401  (paid before the clock starts)

    ids = _random_ids(examples, seed=1)
    base = BertForSequenceClassification.from_pretrained(root / "base").eval()
    with torch.no_grad():
        labels = torch.cat([base(input_ids=chunk).logits.argmax(-1) for chunk in ids.split(256)])
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "label": labels.tolist()})
    paths = [str(p) for p in sorted(root.glob("noisy-*"), key=lambda p: int(p.name.split("-")[1]))[:n]]
    rows = []
    for metric_key in ("accuracy", "loss"):
        runs: dict[str, list] = {"full": [], "early": []}
        for _ in range(repeats):
            for mode in (
                "full",
                "early",
            ):  # alternated within one process: the machine's load hits both alike
                start = time.perf_counter()
                soup = merge_models(
                    paths,
                    method="greedy",
                    eval_dataset=ds,
                    metric_key=metric_key,
                    batch_size=batch_size,
                    full_evaluation=mode == "full",
                    progress=False,
                )
                runs[mode].append((soup, time.perf_counter() - start))
        # the fastest of the repeats: the least disturbed by other jobs on a shared machine
        (full, full_s), (early, early_s) = (
            min(runs[mode], key=lambda run: run[0].report_extra["cost"]["evaluation_seconds"])
            for mode in runs
        )
        for (f_soup, _), (e_soup, _) in zip(runs["full"], runs["early"]):  # every run: the same decisions
            assert [i.selected for i in f_soup.ingredients] == [i.selected for i in e_soup.ingredients]
            assert f_soup.score == e_soup.score and f_soup.scores == e_soup.scores
            for f, e in zip(f_soup.history, e_soup.history):
                assert f["kept"] == e["kept"]
                if "partial" not in e:
                    assert f["scores"] == e["scores"]
        partial = [h["partial"] for h in early.history if "partial" in h]
        candidates = len(early.history) - 1
        rows.append(
            {
                "metric": metric_key,
                "n": n,
                "examples": examples,
                "kept": sum(1 for i in early.ingredients if i.selected),
                "candidates": candidates,
                "rejected_early": len(partial),
                "candidate_examples_skipped": sum(p["of"] - p["units"] for p in partial)
                / (candidates * examples),
                "full_evaluation_seconds": full.report_extra["cost"]["evaluation_seconds"],
                "early_evaluation_seconds": early.report_extra["cost"]["evaluation_seconds"],
                "full_total_seconds": full_s,
                "early_total_seconds": early_s,
                "full_evaluation_seconds_all": [
                    r[0].report_extra["cost"]["evaluation_seconds"] for r in runs["full"]
                ],
                "early_evaluation_seconds_all": [
                    r[0].report_extra["cost"]["evaluation_seconds"] for r in runs["early"]
                ],
            }
        )
    return {"early": rows}


def child(n: int, root: Path, examples: int, batch_size: int, threads: int) -> dict:
    import torch
    from datasets import Dataset

    from hf_soups import merge_models

    torch.set_num_threads(threads)
    # one-time import costs (evaluate alone takes ~6 s) are not what this benchmark measures: pay them first
    started = time.perf_counter()
    import accelerate  # noqa: F401
    import evaluate  # noqa: F401
    import transformers  # noqa: F401
    from transformers import BertForSequenceClassification  # noqa: F401

    import_seconds = time.perf_counter() - started
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, CONFIG["vocab_size"], (examples, SEQ_LEN), generator=gen)
    ids[:, 0] = 101
    labels = (ids[:, 1:].float().mean(1) > CONFIG["vocab_size"] / 2).long()
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "label": labels.tolist()})
    paths = sorted(root.glob("ingredient-*"), key=lambda p: int(p.name.split("-")[1]))[:n]
    rss_before = _peak_rss_mb()
    start = time.perf_counter()
    soup = merge_models(
        [str(p) for p in paths], method="greedy", eval_dataset=ds, batch_size=batch_size, progress=False
    )
    total = time.perf_counter() - start
    cost = soup.report_extra["cost"]
    return {
        "n": n,
        "examples": examples,
        "total_seconds": total,
        "evaluations": cost["evaluations"],
        "evaluation_seconds": cost["evaluation_seconds"],
        "recipe_seconds": cost["recipe_seconds"],
        "overhead_seconds": total - cost["evaluation_seconds"],
        "overhead_ratio": (total - cost["evaluation_seconds"]) / cost["evaluation_seconds"],
        "kept": sum(1 for i in soup.ingredients if i.selected),
        "peak_rss_mb": _peak_rss_mb(),
        "import_seconds": import_seconds,
        "rss_before_merge_mb": rss_before,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[4, 8], help="numbers of ingredients to compare")
    parser.add_argument("--examples", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--early",
        action="store_true",
        help="measure early rejection against full evaluation (same decisions)",
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="--early: runs of each mode (the fastest counts)"
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.early:
            result = early_child(
                args.child, args.root, args.examples, args.batch_size, args.threads, args.repeats
            )
        else:
            result = child(args.child, args.root, args.examples, args.batch_size, args.threads)
        print(json.dumps(result))
        return 0

    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS=str(args.threads)
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="greedy_cost_") as tmp:
        root = Path(tmp)
        (build_noisy_copies if args.early else build_ingredients)(root, max(args.n))
        for n in args.n:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                str(n),
                "--root",
                str(root),
                "--examples",
                str(args.examples),
            ]
            cmd += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            cmd += ["--early", "--repeats", str(args.repeats)] if args.early else []
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    if args.early:
        rows = [row for r in results for row in r["early"]]
        print(
            f"{'metric':>8} {'N':>3} {'kept':>4} {'rejected early':>14} {'candidate examples skipped':>26} "
            f"{'eval s full':>11} {'eval s early':>12} {'saved':>6}"
        )
        for r in rows:
            saved = 1 - r["early_evaluation_seconds"] / r["full_evaluation_seconds"]
            print(
                f"{r['metric']:>8} {r['n']:>3} {r['kept']:>4} {r['rejected_early']:>5} of {r['candidates']:<6} "
                f"{100 * r['candidate_examples_skipped']:>25.1f}% {r['full_evaluation_seconds']:>11.1f} "
                f"{r['early_evaluation_seconds']:>12.1f} {100 * saved:>5.1f}%"
            )
        print("decisions identical with and without early rejection: yes (asserted)")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'N':>3} {'evals':>5} {'eval s':>8} {'total s':>8} {'overhead':>9} {'peak RSS MB':>12} {'kept':>5}"
    )
    for r in results:
        print(
            f"{r['n']:>3} {r['evaluations']:>5} {r['evaluation_seconds']:>8.1f} {r['total_seconds']:>8.1f} "
            f"{100 * r['overhead_ratio']:>8.1f}% {r['peak_rss_mb']:>12.0f} {r['kept']:>5}"
        )
    ok = all(r["overhead_ratio"] <= 0.15 for r in results)
    print(f"overhead <= 15% of the evaluations: {'yes' if ok else 'NO'}")
    by_n = {r["n"]: r for r in results}
    if 4 in by_n and 8 in by_n:
        growth = by_n[8]["peak_rss_mb"] / by_n[4]["peak_rss_mb"] - 1
        print(
            f"peak RSS N=8 vs N=4: {100 * growth:+.1f}% ({'within' if growth <= 0.10 else 'OVER'} the 10% goal)"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
