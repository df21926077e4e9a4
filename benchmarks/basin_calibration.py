"""Calibrates the one-basin threshold (hf_soups.core.compat.BASIN_THRESHOLD) on real fine-tunes and independent inits.

Fine-tunes: all-MiniLM-L6-v2 (the demo's real pre-trained model) with a 2-class head, fine-tuned a few dozen
steps on rotten-tomatoes snippets with different learning rates and seeds. Independent inits: the same config,
`from_config` with different seeds. Tiny test models: tests/tiny_models.py ("fine-tuned-like" = one init plus
noise) and tiny models of different inits. The figure is the one `merge_models` and `hf-soups inspect` use:
per tensor ||a - b|| / ((||a|| + ||b||) / 2), averaged weighted by tensor size, measured by `inspect_models`.

    python benchmarks/basin_calibration.py [--steps 30] [--json benchmarks/results/basin_calibration.json]

About two minutes on one core.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def fine_tune(path, tokenizer, texts, labels, *, lr, seed, steps, batch_size=16):
    import torch
    from transformers import AutoModelForSequenceClassification

    from hf_soups.demo.data import ID2LABEL

    torch.manual_seed(0)  # one head init for every fine-tune, as a linear-probe start would give
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()}
    )
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(texts), (batch_size,), generator=gen).tolist()
        batch = tokenizer(
            [texts[i] for i in idx], padding=True, truncation=True, max_length=48, return_tensors="pt"
        )
        loss = model(**batch, labels=torch.tensor([labels[i] for i in idx])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


def independent(path, seed):
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from hf_soups.demo.data import ID2LABEL

    config = AutoConfig.from_pretrained(
        path, num_labels=2, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()}
    )
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config)


def pairs(names, matrix):
    return {f"{names[i]} / {names[j]}": matrix[i][j] for i, j in itertools.combinations(range(len(names)), 2)}


def measure(models, names):
    from hf_soups import Ingredient
    from hf_soups.cli.inspect import inspect_models

    report = inspect_models([Ingredient(m, name=n) for m, n in zip(models, names)], progress=False)
    if report.relative_distances is None:
        raise SystemExit("\n".join(report.problems))
    return pairs(names, report.relative_distances)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from hf_soups.core.compat import BASIN_THRESHOLD
    from hf_soups.demo.data import load_splits, load_tokenizer, minilm_path
    from tests.tiny_models import make_tiny_bert

    start = time.perf_counter()
    path = minilm_path()
    tokenizer = load_tokenizer(path)
    train = load_splits(0, train_size=1000, validation_size=0)["train"]
    texts, labels = list(train["text"]), list(train["label"])
    runs = [("ft lr2e-5 s0", 2e-5, 0), ("ft lr5e-5 s1", 5e-5, 1), ("ft lr1e-4 s2", 1e-4, 2)]
    fts = [fine_tune(path, tokenizer, texts, labels, lr=lr, seed=s, steps=args.steps) for _, lr, s in runs]
    torch.manual_seed(0)
    from transformers import AutoModelForSequenceClassification

    from hf_soups.demo.data import ID2LABEL

    base = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()}
    )
    results = {
        "real fine-tunes (and their base)": measure([*fts, base], [r[0] for r in runs] + ["pre-trained"]),
        "independent inits (and the pre-trained)": measure(
            [independent(path, s) for s in (1, 2, 3)] + [base], ["init 1", "init 2", "init 3", "pre-trained"]
        ),
        "tiny fine-tuned-like (tests/tiny_models.py)": measure(
            [make_tiny_bert(seed=s) for s in range(3)], ["tiny 0", "tiny 1", "tiny 2"]
        ),
        "tiny independent inits": measure(
            [make_tiny_bert(seed=0, base_seed=s) for s in (11, 12, 13)],
            ["tiny init 11", "tiny init 12", "tiny init 13"],
        ),
    }
    print(
        f"threshold (hf_soups.core.compat.BASIN_THRESHOLD): {BASIN_THRESHOLD:g}; {args.steps} fine-tuning steps"
    )
    for group, figures in results.items():
        print(group)
        for pair, value in figures.items():
            flag = "  -> flagged" if value > BASIN_THRESHOLD else ""
            print(f"  {pair:40s} {value:.4f}{flag}")
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        args.json.write_text(
            json.dumps({"threshold": BASIN_THRESHOLD, "steps": args.steps, "results": results}, indent=2)
            + "\n"
        )


if __name__ == "__main__":
    main()
