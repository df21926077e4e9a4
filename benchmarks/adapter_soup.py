"""Adapter soups: time and peak memory of the merged and adapter forms for K LoRA adapters of one base.

Builds (once, cached under `--work-dir`) a random `LlamaForCausalLM` base of about `--params` parameters
(float32, sharded safetensors, written tensor by tensor) and K LoRA adapters on every linear projection
(q, k, v, o, gate, up, down) with different ranks (8, 16, 32, 16, ...; lora_alpha = 2 r; every fourth
adapter uses rsLoRA), their `adapter_config.json` written by `peft.LoraConfig`. Then it measures, each
command a separate process, page cache warm, interleaved round by round:

- `import-torch`: `python -c "import torch"` (the floor every command pays);
- `merged`: `merge_models(adapters, output_dir=...)`: a full model, base + mean of the exact deltas;
- `adapter`: `merge_models(adapters, adapter_output="adapter", output_dir=...)`: one exact LoRA adapter
  (rank = sum of ranks);
- `adapter-svd`: the same truncated to `--rank` by SVD (errors reported);
- `naive` (with `--naive`): what people do by hand: `PeftModel.from_pretrained` + `merge_and_unload()` of
  each adapter on a fresh base, average the state dicts, `save_pretrained`.

Every output is checked once against an independent float64 computation (`base + mean_k s_k B_k A_k`
on sampled modules, the untouched tensors bit for bit, `B @ A` of the adapter form), so a fast but
wrong soup cannot pass. Goals (issue 4): the adapter forms never load the base weights (peak RSS well
under the base's size: under half of it), the merged form within the foundation memory goal (600 MB).

Usage:

    .venv/bin/python benchmarks/adapter_soup.py --params 400M --k 8 --runs 3
    # smoke test
    .venv/bin/python benchmarks/adapter_soup.py --params 20M --k 3 --runs 1 --work-dir /tmp/hf_soups_adapter_small
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import drop_path, fmt_bytes, measure_round_robin, parse_size, settle  # noqa: E402

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANKS = [8, 16, 32, 16]
MERGED_GOAL_BYTES = 600 * 10**6


# ----------------------------------------------------------------------------------------------------------
# building the base and the adapters
# ----------------------------------------------------------------------------------------------------------
def llama_shape(target_params: int) -> dict:
    """LlamaConfig kwargs with about `target_params` parameters (untied embeddings, head dim 64)."""
    if target_params >= 300_000_000:
        hidden, inter, vocab = 1024, 2816, 32000
    elif target_params >= 60_000_000:
        hidden, inter, vocab = 768, 2048, 32000
    else:
        hidden, inter, vocab = 256, 688, 8000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((target_params - 2 * vocab * hidden - hidden) / per_layer))
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def worker_build(spec_json: str) -> None:
    """Write the base (tensor by tensor, never a whole model in memory) and the adapters."""
    import torch
    from accelerate import init_empty_weights
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_soups.core.sources import ShardedSafetensorsWriter

    spec = json.loads(spec_json)
    base_dir, k = Path(spec["base"]), spec["k"]
    config = LlamaConfig(**spec["shape"])
    config.architectures = ["LlamaForCausalLM"]
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    shapes = {n: tuple(p.shape) for n, p in skeleton.state_dict().items()}
    gen = torch.Generator().manual_seed(spec["seed"])
    if not (base_dir / "config.json").exists():
        tmp = base_dir.with_name(base_dir.name + ".tmp")
        drop_path(tmp)
        tmp.mkdir(parents=True)
        writer = ShardedSafetensorsWriter(
            tmp, [(n, s, torch.float32) for n, s in shapes.items()], max_shard_size=spec["max_shard_bytes"]
        )
        for name, shape in shapes.items():
            t = (
                torch.ones(shape)
                if name.endswith("norm.weight")
                else torch.randn(shape, generator=gen) * 0.02
            )
            writer.write(name, t)
        writer.close()
        config.save_pretrained(tmp)
        os.replace(tmp, base_dir)
    modules = [n[: -len(".weight")] for n in shapes if n.endswith(".weight") and n.split(".")[-2] in TARGETS]
    for i in range(k):
        out = Path(spec["adapters"][i])
        if (out / "adapter_model.safetensors").exists():
            continue
        r = RANKS[i % len(RANKS)]
        tensors = {}
        for m in modules:
            out_f, in_f = shapes[f"{m}.weight"]
            tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) / in_f**0.5
            tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * 0.01
        tmp = out.with_name(out.name + ".tmp")
        drop_path(tmp)
        tmp.mkdir(parents=True)
        LoraConfig(
            r=r,
            lora_alpha=2 * r,
            use_rslora=(i % 4 == 3),
            target_modules=TARGETS,
            task_type="CAUSAL_LM",
            base_model_name_or_path=str(base_dir),
        ).save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        os.replace(tmp, out)


# ----------------------------------------------------------------------------------------------------------
# measured workers (each its own process)
# ----------------------------------------------------------------------------------------------------------
def worker_soup(form: str, out: str, adapters: list[str], rank: int | None) -> None:
    from hf_soups import merge_models

    soup = merge_models(
        adapters,
        adapter_output="adapter" if form != "merged" else "merged",
        rank=rank if form == "adapter-svd" else None,
        output_dir=out,
        progress=False,
    )
    errors = soup.report_extra.get("adapter_svd_error")
    if errors:
        (Path(out) / "svd_errors.json").write_text(json.dumps(errors))


def worker_naive(out: str, base: str, adapters: list[str]) -> None:
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    acc = None
    for a in adapters:
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), a).merge_and_unload()
        sd = model.state_dict()
        if acc is None:
            acc = {k: v.float().clone() / len(adapters) for k, v in sd.items()}
        else:
            for k, v in sd.items():
                acc[k].add_(v.float(), alpha=1 / len(adapters))
        del model, sd
    model = LlamaForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(acc[k])
    model.save_pretrained(out)


def worker_verify(form: str, out: str, base: str, adapters: list[str]) -> None:
    """Check an output against float64 math on sampled modules; prints VERIFY <json>."""
    import random

    import torch
    from safetensors import safe_open

    from hf_soups.adapters import read_adapter
    from hf_soups.core.sources import find_weight_files, open_weight_files

    readers = [read_adapter(a) for a in adapters]
    k = len(readers)
    paths = sorted(readers[0].modules)
    random.seed(0)
    sample = random.sample(paths, min(6, len(paths)))
    base_src = open_weight_files(find_weight_files(Path(base)), "base")
    result: dict = {"form": form, "checked_modules": len(sample)}

    def mean_delta(path: str) -> torch.Tensor:
        total = None
        for r in readers:
            m = r.modules[path]
            a, b = r.factors(m)
            d = (b.double() @ a.double()) * m.scaling / k
            total = d if total is None else total + d
        return total

    if form in ("merged", "naive"):
        out_src = open_weight_files(find_weight_files(Path(out)), "soup")
        worst = 0.0
        for p in sample:
            expected = base_src.get(f"{p}.weight").double() + mean_delta(p)
            got = out_src.get(f"{p}.weight").double()
            worst = max(worst, float((got - expected).abs().max()))
        untouched = [n for n in base_src.keys() if not any(n.startswith(p + ".") for p in paths)][:3]
        # untouched tensors: the mean of K copies, equal to the base up to float32 rounding
        untouched_err = max(
            float((base_src.get(n).double() - out_src.get(n).double()).abs().max()) for n in untouched
        )
        result.update(max_abs_err=worst, untouched_max_abs_err=untouched_err)
        result["ok"] = worst < 1e-5 and untouched_err < 1e-6
    else:
        errors = {}
        with safe_open(str(Path(out) / "adapter_model.safetensors"), "pt") as f:
            for p in sample:
                a = f.get_tensor(f"base_model.model.{p}.lora_A.weight").double()
                b = f.get_tensor(f"base_model.model.{p}.lora_B.weight").double()
                expected = mean_delta(p)
                errors[p] = float(torch.linalg.norm(b @ a - expected) / torch.linalg.norm(expected))
            rank = f.get_tensor(f"base_model.model.{sample[0]}.lora_A.weight").shape[0]
        worst = max(errors.values())
        result.update(max_rel_err=worst, rank=rank)
        if form == "adapter":
            result["ok"] = worst < 1e-5 and rank == sum(r.modules[sample[0]].rank for r in readers)
        else:
            # the reported error of every module is the one recomputed here from the written factors
            reported = json.loads((Path(out) / "svd_errors.json").read_text())
            gap = max(abs(reported[p] - errors[p]) for p in sample)
            result.update(reported_max=max(reported.values()), reported_vs_recomputed=gap)
            result["ok"] = len(reported) == len(paths) and gap < 1e-4
    print("VERIFY " + json.dumps(result))


WORKERS = {
    "build": lambda a: worker_build(a.spec),
    "soup": lambda a: worker_soup(a.label, a.out, a.paths, a.rank),
    "naive": lambda a: worker_naive(a.out, a.paths[0], a.paths[1:]),
    "verify": lambda a: worker_verify(a.label, a.out, a.paths[0], a.paths[1:]),
}


# ----------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------
def worker_cmd(name: str, *args: str) -> list[str]:
    return [sys.executable, str(HERE), "--worker", name, *args]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="400M", help="base model size (default 400M parameters)")
    parser.add_argument("--k", type=int, default=8, help="number of adapters (default 8)")
    parser.add_argument("--rank", type=int, default=16, help="rank of the SVD-truncated adapter form")
    parser.add_argument("--runs", type=int, default=3, help="measured rounds (median reported)")
    parser.add_argument("--naive", action="store_true", help="also measure the by-hand merge_and_unload soup")
    parser.add_argument("--work-dir", default="/tmp/hf_soups_adapter_bench")
    parser.add_argument("--max-shard-size", default="500MB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write every figure to this JSON file")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--label", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        WORKERS[args.worker](args)
        return 0

    shape = llama_shape(parse_size(args.params))
    root = Path(args.work_dir) / f"llama-{args.params}-k{args.k}-seed{args.seed}"
    base = root / "base"
    adapters = [root / f"lora-{i}" for i in range(args.k)]
    spec = dict(
        shape=shape,
        seed=args.seed,
        k=args.k,
        base=str(base),
        adapters=[str(a) for a in adapters],
        max_shard_bytes=parse_size(args.max_shard_size),
    )
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["nice", *worker_cmd("build", "--spec", json.dumps(spec))], check=True, cwd=REPO)
    base_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    adapter_bytes = sum((a / "adapter_model.safetensors").stat().st_size for a in adapters)
    ranks = [RANKS[i % len(RANKS)] for i in range(args.k)]
    print(
        f"base: {fmt_bytes(base_bytes)} float32 ({base_bytes // 4 / 1e6:.0f}M params, {shape['num_hidden_layers']} "
        f"layers); {args.k} adapters, ranks {ranks}, {fmt_bytes(adapter_bytes)} in all"
    )

    outs = {label: root / f"out-{label}" for label in ("merged", "adapter", "adapter-svd", "naive")}
    refs = [str(a) for a in adapters]
    commands = {
        "import-torch": lambda: [sys.executable, "-c", "import torch"],
        "merged": lambda: worker_cmd("soup", "--label", "merged", "--out", str(outs["merged"]), *refs),
        "adapter": lambda: worker_cmd("soup", "--label", "adapter", "--out", str(outs["adapter"]), *refs),
        "adapter-svd": lambda: worker_cmd(
            "soup",
            "--label",
            "adapter-svd",
            "--out",
            str(outs["adapter-svd"]),
            "--rank",
            str(args.rank),
            *refs,
        ),
    }
    if args.naive:
        commands["naive"] = lambda: worker_cmd("naive", "--out", str(outs["naive"]), str(base), *refs)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONPATH=str(REPO))
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

    def before(label: str) -> None:
        if label in outs:
            drop_path(outs[label])
        settle()

    verified: dict[str, dict] = {}

    def after(label: str, run) -> None:
        if label in outs and label not in verified:
            res = subprocess.run(
                worker_cmd("verify", "--label", label, "--out", str(outs[label]), str(base), *refs),
                capture_output=True,
                text=True,
                env=env,
                cwd=REPO,
            )
            line = next((li for li in res.stdout.splitlines() if li.startswith("VERIFY ")), None)
            if line is None:
                raise SystemExit(f"verification of {label} failed:\n{res.stdout}\n{res.stderr}")
            verified[label] = json.loads(line[len("VERIFY ") :])
            if not verified[label]["ok"]:
                raise SystemExit(f"{label} output is wrong: {verified[label]}")

    print(f"measuring {', '.join(commands)}: {args.runs} run(s) after 1 warm-up, interleaved")
    results = measure_round_robin(commands, runs=args.runs, before_each=before, after_each=after, env=env)

    print(f"\n  {'command':<13} {'wall':>8} {'peak RSS':>10} {'anon':>9} {'file':>9}   vs base size")
    for label, m in results.items():
        print(
            f"  {label:<13} {m.wall_s:7.2f}s {fmt_bytes(m.peak_rss_bytes):>10} {fmt_bytes(m.peak_anon_bytes):>9} "
            f"{fmt_bytes(m.peak_file_bytes):>9}   {m.peak_rss_bytes / base_bytes:6.2f} x"
        )
    print("\nchecks:", json.dumps(verified, indent=None))
    goals = {}
    for label in ("adapter", "adapter-svd"):
        worst = results[label].max_peak_rss_bytes
        goals[f"{label}_rss_under_half_base"] = worst < base_bytes / 2
        print(
            f"  [{'ok' if goals[f'{label}_rss_under_half_base'] else 'MISSED'}] {label}: peak RSS {fmt_bytes(worst)} "
            f"(worst run) < half the base ({fmt_bytes(base_bytes // 2)})"
        )
    worst = results["merged"].max_peak_rss_bytes
    goals["merged_rss_under_600MB"] = worst < MERGED_GOAL_BYTES
    print(
        f"  [{'ok' if goals['merged_rss_under_600MB'] else 'MISSED'}] merged: peak RSS {fmt_bytes(worst)} (worst run) "
        f"< {fmt_bytes(MERGED_GOAL_BYTES)}"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                dict(
                    params=args.params,
                    k=args.k,
                    ranks=ranks,
                    base_bytes=base_bytes,
                    adapter_bytes=adapter_bytes,
                    results={
                        label: dict(
                            wall_s=m.wall_s,
                            walls=m.walls,
                            peak_rss_bytes=m.peak_rss_bytes,
                            max_peak_rss_bytes=m.max_peak_rss_bytes,
                            peak_anon_bytes=m.peak_anon_bytes,
                        )
                        for label, m in results.items()
                    },
                    checks=verified,
                    goals=goals,
                ),
                indent=2,
            )
        )
    for label in outs.values():
        drop_path(label)
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
