"""Peak memory of a learned soup at N = 4 and N = 8 ingredients: it must not grow with N (goal: within 10%).

Builds a random `BertForSequenceClassification` of a few hundred MB (float32 safetensors) and N noisy copies of
it under `--work-dir` (built one at a time, never holding N models), then runs
`merge_models(method="learned", ...)` on a small synthetic eval set as a separate process per N, page cache warm,
interleaved round by round, and prints the median peak RSS of each (with the anonymous / file-mapped split), the
wall time, and the ratio N=8 / N=4. The learned soup's memory is one live model, its gradient, one float32 copy of
the largest tensor and a few slice buffers, whatever N; the ingredients are streamed (read into buffers, not
mapped), so they stay in the page cache, not in the process.

Usage:

    # the figure recorded in docs/benchmarks.md (about 2.5 GB of disk under the work dir)
    .venv/bin/python benchmarks/learned_memory.py --hidden 768 --layers 6 --n 4,8 --runs 3
    # smoke test
    .venv/bin/python benchmarks/learned_memory.py --hidden 128 --layers 2 --n 2,4 --runs 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import fmt_bytes, measure_round_robin  # noqa: E402

CHILD = r"""
import sys, json, time
from pathlib import Path
import torch
from datasets import Dataset
from hf_soups import merge_models

work, n, granularity, steps = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
gen = torch.Generator().manual_seed(0)
ids = torch.randint(5, 1000, (64, 32), generator=gen)
labels = (ids[:, 1:].float().mean(1) > 500).long()
data = Dataset.from_dict({"input_ids": ids.tolist(), "label": labels.tolist()})
start = time.perf_counter()
soup = merge_models(
    [str(work / f"ft-{i}") for i in range(n)], method="learned", granularity=granularity, eval_dataset=data,
    epochs=steps, accumulation_steps=2, batch_size=16, validation_fraction=0.25, progress=False,
)
print(json.dumps({"seconds": time.perf_counter() - start, "steps": soup.report_extra["learned"]["steps"]}))
"""


def build(work: Path, n: int, hidden: int, layers: int) -> int:
    """The random base and `n` noisy copies (float32), each saved once; returns one checkpoint's bytes."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    work.mkdir(parents=True, exist_ok=True)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden,
        num_labels=2,
    )
    config.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(0)
    model = None
    for i in range(n):
        folder = work / f"ft-{i}"
        if (folder / "model.safetensors").is_file():
            continue
        if model is None:
            model = BertForSequenceClassification(config).eval()
            base = {k: v.clone() for k, v in model.state_dict().items()}
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base[name] + 0.01 * p.std().nan_to_num(0.02) * torch.randn(p.shape, generator=gen))
        model.save_pretrained(folder)
    return (work / "ft-0" / "model.safetensors").stat().st_size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--n", default="4,8", help="numbers of ingredients, comma separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--granularity", default="layer", choices=("ingredient", "layer"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--work-dir", default="/tmp/hf_soups_learned_memory")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    ns = [int(x) for x in args.n.split(",")]
    work = Path(args.work_dir) / f"h{args.hidden}-l{args.layers}"
    size = build(work, max(ns), args.hidden, args.layers)
    print(f"one checkpoint: {fmt_bytes(size)}; N = {ns}", flush=True)
    commands = {
        f"N={n}": (
            lambda n=n: [sys.executable, "-c", CHILD, str(work), str(n), args.granularity, str(args.epochs)]
        )
        for n in ns
    }
    results = measure_round_robin(commands, runs=args.runs, warmup=1)
    rows = {}
    for label, m in results.items():
        rows[label] = {
            "peak_rss_bytes": m.peak_rss_bytes,
            "peak_anon_bytes": m.peak_anon_bytes,
            "peak_file_bytes": m.peak_file_bytes,
            "wall_s": m.wall_s,
        }
        print(
            f"{label}: peak RSS {fmt_bytes(m.peak_rss_bytes)} (anon {fmt_bytes(m.peak_anon_bytes)}, file "
            f"{fmt_bytes(m.peak_file_bytes)}), {m.wall_s:.1f} s"
        )
    first, last = f"N={ns[0]}", f"N={ns[-1]}"
    ratio = rows[last]["peak_rss_bytes"] / rows[first]["peak_rss_bytes"]
    ok = ratio <= 1.10
    print(f"peak RSS {last} / {first} = {ratio:.3f} ({'within' if ok else 'NOT within'} the 10% goal)")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"checkpoint_bytes": size, "rows": rows, "ratio": ratio}, indent=1)
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
