"""Time and peak memory of a soup written into a live model (in-memory soups, every greedy candidate).

`merge_models` without `output_dir` builds one model of the soup's architecture and writes the soup into its
parameters (`ModelSink`); a greedy soup does the same once per candidate. This benchmark builds N noisy
bfloat16 copies of one random Llama (`--hidden`, `--layers`, a 32,000-token vocabulary: the embedding and the
LM head are the largest tensors, as in real LMs) under `--work-dir`, then runs `merge_models(paths)` in a
separate process per configuration, interleaved round by round with the page cache warm, and prints each one's
median wall time, the time of the soup alone (the `merge_models` call, without `import torch`) and the peak RSS
when it returns (the process's peak so far: the model, the soup's buffers, the imports); then, as a greedy
soup does for each candidate, the time to write other mixtures (the first 2, 3, ..., N ingredients) into one live
model that is already planned (median over the mixtures and rounds).
Every configuration's soup is checked against the float64 mean of the ingredients (within one bfloat16
rounding of it) on the largest tensor.

`--compare-checkout DIR` (repeatable) measures other checkouts of hf_soups in the same rounds, labelled by
their folder names, for before/after figures.

Usage:

    # the figure in docs/benchmarks.md (about 1.4 GB of disk under the work dir)
    .venv/bin/python benchmarks/live_soup.py --n 4 --runs 3 --compare-checkout /tmp/before
    # smoke test (seconds)
    .venv/bin/python benchmarks/live_soup.py --hidden 64 --layers 1 --n 2 --runs 1 --warmup 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import fmt_bytes, measure_round_robin  # noqa: E402

VOCAB = 32000

CHILD = r"""
import sys, json, time
from pathlib import Path
import torch
import hf_soups
from hf_soups import merge_models

paths = sys.argv[1:]
start = time.perf_counter()
soup = merge_models(paths, progress=False)
model = soup.model
seconds = time.perf_counter() - start
import resource
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the check below, which holds float64 copies
# a greedy soup's candidates: other mixtures written into the same live model (hf_soups' internal Kitchen)
from hf_soups.ingredients import as_ingredients, resolve
from hf_soups.kitchen import Kitchen
kitchen = Kitchen(ingredients=[resolve(i) for i in as_ingredients(paths)], progress=False)
live = kitchen.new_live_model()
kitchen.load_into(live, [1.0] + [0.0] * (len(paths) - 1))  # plans the soup (headers, checks): not timed
candidate_s = []
for k in range(2, len(paths) + 1):
    t0 = time.perf_counter()
    kitchen.load_into(live, [1.0 / k] * k + [0.0] * (len(paths) - k))
    candidate_s.append(time.perf_counter() - t0)
del live, kitchen
name = "model.embed_tokens.weight"
got = model.state_dict()[name]
from safetensors import safe_open
mean = None
for p in paths:
    with safe_open(str(Path(p) / "model.safetensors"), "pt") as f:
        t = f.get_tensor(name).double()
    mean = t if mean is None else mean + t
mean /= len(paths)
half_step = mean.abs().clamp_min(2.0 ** -126) * 2.0 ** -8  # >= half a bfloat16 step (8 significant bits)
ok = got.dtype == torch.bfloat16 and bool(((got.double() - mean).abs() <= half_step + 1e-30).all())
print(json.dumps({"seconds": seconds, "candidate_s": candidate_s, "peak_rss_bytes": peak, "ok": ok, "dtype": str(got.dtype), "hf_soups": hf_soups.__file__}))
"""


def build(work: Path, n: int, hidden: int, layers: int) -> list[str]:
    """N noisy bfloat16 copies of one random Llama, each saved once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    work.mkdir(parents=True, exist_ok=True)
    paths = [work / f"ft-{i}" for i in range(n)]
    if all((p / "model.safetensors").is_file() for p in paths):
        return [str(p) for p in paths]
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 256),
        intermediate_size=(hidden * 11) // 4,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i, folder in enumerate(paths):
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(
                    base[name]
                    + 0.01 * base[name].std().nan_to_num(0.02) * torch.randn(p.shape, generator=gen)
                )
        model.to(torch.bfloat16).save_pretrained(folder)
        model.to(torch.float32)
    return [str(p) for p in paths]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="discarded rounds first")
    parser.add_argument("--work-dir", default="/tmp/hf_soups_live_soup")
    parser.add_argument("--compare-checkout", action="append", default=[], help="another hf_soups checkout")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    paths = build(
        Path(args.work_dir) / f"h{args.hidden}-l{args.layers}-n{args.n}", args.n, args.hidden, args.layers
    )
    one = sum(f.stat().st_size for f in Path(paths[0]).glob("*.safetensors"))
    print(f"one checkpoint: {fmt_bytes(one)} (bfloat16); N = {args.n}", flush=True)
    here = str(Path(__file__).resolve().parent.parent)
    checkouts = {"hf_soups": here}
    for other in args.compare_checkout:
        label = f"hf_soups@{Path(other).resolve().name}"
        if label in checkouts or not (Path(other) / "hf_soups" / "__init__.py").is_file():
            parser.error(
                f"--compare-checkout {other}: not an hf_soups checkout, or a second one named {label!r}"
            )
        checkouts[label] = str(Path(other).resolve())
    # each child imports its own checkout: PYTHONPATH, and `-P` so that the current folder does not come first
    commands = {
        label: (
            lambda path=path: [
                "env",
                f"PYTHONPATH={path}",
                "HF_HUB_OFFLINE=1",
                sys.executable,
                "-P",
                "-c",
                CHILD,
                *paths,
            ]
        )
        for label, path in checkouts.items()
    }
    results = measure_round_robin(commands, runs=args.runs, warmup=args.warmup)
    rows = {}
    for label, m in results.items():
        child = [
            json.loads(next(x for x in r.output.splitlines() if x.startswith('{"seconds"'))) for r in m.runs
        ]
        seconds = statistics.median(c["seconds"] for c in child)
        peak = int(statistics.median(c["peak_rss_bytes"] for c in child))
        candidate = statistics.median(x for c in child for x in c["candidate_s"])
        ok = all(c["ok"] for c in child)
        rows[label] = {
            "wall_s": m.wall_s,
            "soup_s": seconds,
            "candidate_s": candidate,
            "peak_rss_bytes": peak,
            "checked": ok,
            "imported_from": sorted({c["hf_soups"] for c in child}),
            "runs": [{k: c[k] for k in ("seconds", "candidate_s", "peak_rss_bytes")} for c in child],
        }
        print(
            f"{label}: wall {m.wall_s:.2f} s, merge_models {seconds:.2f} s, a candidate {candidate:.3f} s, peak RSS {fmt_bytes(peak)} at its end, "
            f"soup {'= the float64 mean' if ok else 'WRONG'}"
        )
    base = rows["hf_soups"]
    for label, r in rows.items():
        if label != "hf_soups":
            print(
                f"hf_soups vs {label}: merge_models time x{base['soup_s'] / r['soup_s']:.2f}, a candidate "
                f"x{base['candidate_s'] / r['candidate_s']:.2f}, peak RSS {fmt_bytes(base['peak_rss_bytes'])} against "
                f"{fmt_bytes(r['peak_rss_bytes'])}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint_bytes": one, "n": args.n, "rows": rows}, indent=2))
    return 0 if all(r["checked"] for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
