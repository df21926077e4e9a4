"""Merge throughput and peak memory: hf_soups streaming vs the I/O floor, a naive soup and mergekit.

Builds N same-config ingredients of a random `LlamaForCausalLM` (float32, or bfloat16 with `--dtype bfloat16`;
sharded safetensors; one
random model plus small independent noise per ingredient; built tensor by tensor, never holding N
models) and caches them under `--work-dir`. Then, for each N, it measures side by side, each command
as a separate process, page cache warm, interleaved round by round:

- the floor: `floor-read` (plain reads of every ingredient byte, no torch), `floor-write` (one
  checkpoint's bytes written as shards) and `import-torch` (`python -c "import torch"`); floor = sum;
- `hf_soups`: `merge_models([...], output_dir=...)` (streaming);
- `naive`: `from_pretrained` every ingredient, average the state dicts, `save_pretrained`;
- `mergekit`: `mergekit-yaml` with `merge_method: linear`, when a Python with mergekit is found
  (`--mergekit-python`, default `/tmp/mk-venv/bin/python`; install it in its own venv, never in ours);
- the task-vector family, when named in `--methods` (`task-arithmetic`, `ties`, `dare-linear`, `dare-ties`,
  `slerp`, `model-stock`): `hf_soups:<method>` is `merge_models(method=<method>, base_model=<base>, ...)` with the
  knobs fixed (density 0.5, scaling 1.0, seed 0, t 0.5; SLERP on the first two ingredients), over the same
  ingredients plus their base (the random model without noise, built once more); `mergekit:<method>` the same
  method in mergekit (at the N values of `--baseline-n`).

It prints the median wall time and peak RSS of each, the ratios to the floor and the goals of issue 2
(hf_soups at most 1.5 x floor, peak RSS under 600 MB, RSS(N=8) within 10% of RSS(N=4)), and checks that
`import hf_soups` loads no torch, transformers model code, peft or torch.distributed. Every merged
output is checked once against the exact float64 mean of the ingredients, so a fast but wrong merge
cannot pass; a task arithmetic output against base + sum of the task vectors in float64, and the other family
methods against `hf_soups.merge_ops.merge_tensor` on whole in-memory tensors (the streamed soup must be the same
bits as the unsliced math, which the test suite checks against float64 definitions). mergekit's TIES, DARE and
Model Stock follow other conventions (weight normalisation, tie-breaking, its own random mask): their distance to
hf_soups' result is printed, not judged.

Usage:

    # full size (about 16 GB of disk under /tmp; check `df -h /tmp` first)
    .venv/bin/python benchmarks/merge_throughput.py --params 400M --n 4,8 --runs 5
    # bfloat16 ingredients (the floor reads and writes half the bytes), outputs written to tmpfs so that the
    # VM's disk write-back does not drown the software's own cost
    .venv/bin/python benchmarks/merge_throughput.py --params 400M --n 4,8 --runs 5 --dtype bfloat16 \
        --output-dir /dev/shm/hf_soups_bench_out
    # smoke test
    .venv/bin/python benchmarks/merge_throughput.py --params 20M --n 2,4 --runs 1 --work-dir /tmp/hf_soups_bench_small
    # the task-vector family beside the uniform soup (and mergekit's, when installed)
    .venv/bin/python benchmarks/merge_throughput.py --params 400M --n 4,8 --runs 3 \
        --methods floor,hf_soups,mergekit,task-arithmetic,ties,dare-ties,dare-linear,slerp,model-stock
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import (  # noqa: E402
    Measurement,
    drop_path,
    fmt_bytes,
    measure_round_robin,
    parse_size,
    settle,
)

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
VOCAB = 32000
BUFFER_BYTES = 2**20  # 1 MiB: the fastest plain read and write size measured here


# ----------------------------------------------------------------------------------------------------------
# model shape
# ----------------------------------------------------------------------------------------------------------
def llama_shape(target_params: int) -> dict:
    """A LlamaConfig (as kwargs) with about `target_params` parameters, untied embeddings, head dim 64."""
    if target_params >= 300_000_000:
        hidden, inter = 1024, 2816
    elif target_params >= 60_000_000:
        hidden, inter = 768, 2048
    elif target_params >= 12_000_000:
        hidden, inter = 256, 688
    else:
        hidden, inter = 128, 344
    vocab = VOCAB if target_params >= 12_000_000 else 8000
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


def count_params(shape: dict) -> int:
    h, i, v, n = (
        shape["hidden_size"],
        shape["intermediate_size"],
        shape["vocab_size"],
        shape["num_hidden_layers"],
    )
    return 2 * v * h + n * (4 * h * h + 3 * h * i + 2 * h) + h


# ----------------------------------------------------------------------------------------------------------
# workers: each runs in its own process, started by the driver
# ----------------------------------------------------------------------------------------------------------
def weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def worker_read(dirs: list[str]) -> None:
    """The floor's read: every byte of every weight file, plain reads into one reused buffer (no torch)."""
    buf = bytearray(BUFFER_BYTES)
    view = memoryview(buf)
    total = 0
    for d in dirs:
        for f in weight_files(Path(d)):
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(view):
                    total += n
    print(f"read {total} bytes")


def worker_write(out: str, nbytes: int, shard_bytes: int) -> None:
    """The floor's write: one checkpoint's bytes, as shards of at most `shard_bytes` (no torch)."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True)
    buf = memoryview(os.urandom(BUFFER_BYTES))
    remaining, index = nbytes, 0
    while remaining > 0:
        index += 1
        this = min(remaining, shard_bytes)
        fd = os.open(out_dir / f"shard-{index:05d}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = this
            while left > 0:
                left -= os.write(fd, buf[: min(left, BUFFER_BYTES)])
        finally:
            os.close(fd)
        remaining -= this
    print(f"wrote {nbytes} bytes in {index} files")


HEAVY_MODULE_PREFIXES = ("torch", "transformers", "peft", "accelerate", "evaluate", "datasets", "safetensors")


def loaded_heavy_modules() -> dict[str, bool]:
    mods = sys.modules
    return {
        "torch": "torch" in mods,
        "torch.distributed": "torch.distributed" in mods,
        "transformers": "transformers" in mods,
        "transformers model code": any(
            m.startswith("transformers.models.") and ".modeling_" in m for m in mods
        )
        or "transformers.modeling_utils" in mods,
        "peft": "peft" in mods,
        "accelerate": "accelerate" in mods,
        "evaluate": "evaluate" in mods,
        "datasets": "datasets" in mods,
    }


def worker_hf_soups(out: str, dirs: list[str]) -> None:
    """hf_soups streaming: merge_models(..., output_dir=...)."""
    import hf_soups
    from hf_soups import merge_models

    merge_models(list(dirs), output_dir=out, progress=False)
    print(f"hf_soups from {Path(hf_soups.__file__).parent}")
    print("HEAVY_MODULES " + json.dumps(loaded_heavy_modules()))


FAMILY = ("task-arithmetic", "ties", "dare-linear", "dare-ties", "slerp", "model-stock")
"""The task-vector methods `--methods` accepts (measured as `hf_soups:<method>`, `mergekit:<method>`)."""
FAMILY_KNOBS = {
    "task-arithmetic": dict(scaling=1.0),
    "ties": dict(density=0.5, scaling=1.0),
    "dare-linear": dict(density=0.5, scaling=1.0, seed=0),
    "dare-ties": dict(density=0.5, scaling=1.0, seed=0),
    "slerp": dict(t=0.5),
    "model-stock": {},
}
MERGEKIT_NAMES = {
    "task-arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare-linear": "dare_linear",
    "dare-ties": "dare_ties",
    "slerp": "slerp",
    "model-stock": "model_stock",
}


def family_inputs(method: str, paths: list[str]) -> list[str]:
    """The ingredients a family method merges (SLERP: the first two)."""
    return paths[:2] if method == "slerp" else paths


def worker_family(out: str, method: str, base: str, dirs: list[str]) -> None:
    """hf_soups streaming, one task-vector method with its fixed knobs."""
    from hf_soups import merge_models

    base_model = None if method == "slerp" else base
    merge_models(
        list(dirs),
        method=method,
        base_model=base_model,
        output_dir=out,
        progress=False,
        **FAMILY_KNOBS[method],
    )
    print("HEAVY_MODULES " + json.dumps(loaded_heavy_modules()))


def mergekit_config(method: str, base: str, paths: list[str], dtype: str = "float32") -> str:
    """mergekit's YAML for the same method and knobs (weights 1, no normalisation, as hf_soups)."""
    knobs = FAMILY_KNOBS[method]
    lines = [f"merge_method: {MERGEKIT_NAMES[method]}", f"dtype: {dtype}"]
    if method == "slerp":
        lines += [f"base_model: {paths[0]}", "parameters:", f"  t: {knobs['t']}", "models:"]
        lines += [f"  - model: {p}" for p in paths[:2]]
        return "\n".join(lines) + "\n"
    lines += [f"base_model: {base}", "parameters:", "  normalize: false"]
    if "scaling" in knobs:
        lines.append(f"  lambda: {knobs['scaling']}")
    lines.append("models:")
    for p in paths:
        lines.append(f"  - model: {p}")
        if method != "model-stock":
            lines.append("    parameters:")
            lines.append("      weight: 1.0")
            if "density" in knobs:
                lines.append(f"      density: {knobs['density']}")
    return "\n".join(lines) + "\n"


def worker_naive(out: str, dirs: list[str]) -> None:
    """A naive soup: from_pretrained every ingredient, average the state dicts, save_pretrained."""
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(d, dtype="auto") for d in dirs]
    state_dicts = [m.state_dict() for m in models]
    averaged = {
        k: (sum(sd[k].float() for sd in state_dicts) / len(state_dicts)).to(state_dicts[0][k].dtype)
        for k in state_dicts[0]
    }
    models[0].load_state_dict(averaged)
    models[0].save_pretrained(out)


def worker_build(spec_json: str) -> None:
    """Build the ingredients that are missing (one random model, then base + noise_i, tensor by tensor)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = json.loads(spec_json)
    torch.manual_seed(spec["seed"])
    config = LlamaConfig(**spec["shape"])
    config.architectures = ["LlamaForCausalLM"]
    started = time.perf_counter()
    with torch.device("cpu"):
        base = LlamaForCausalLM(config).to(torch.float32)
    dtype = getattr(torch, spec.get("dtype", "float32"))
    base_state = {
        k: v.detach().to(dtype) if v.is_floating_point() else v.detach() for k, v in base.state_dict().items()
    }
    print(
        f"random base model: {sum(v.numel() for v in base_state.values()):,} params "
        f"({time.perf_counter() - started:.1f} s)",
        flush=True,
    )

    # shard plan (same for every ingredient), in state-dict order, transformers' file names
    shard_limit = spec["max_shard_bytes"]
    shards: list[list[str]] = [[]]
    size = 0
    for k, v in base_state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > shard_limit:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    n_shards = len(shards)
    names = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    total_size = sum(v.numel() * v.element_size() for v in base_state.values())

    for target in spec["missing"]:
        is_base = Path(target).name == "base"  # the task-vector methods' base: the random model itself
        index = -1 if is_base else int(Path(target).name.split("-")[-1])
        started = time.perf_counter()
        tmp = Path(target).with_name(Path(target).name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        gen = torch.Generator().manual_seed(spec["seed"] * 1000 + index + 1)
        weight_map = {}
        for fname, keys in zip(names, shards):
            tensors = {}
            for k in keys:
                v = base_state[k]
                if v.is_floating_point() and not is_base:
                    noisy = torch.randn(v.shape, generator=gen, dtype=torch.float32)
                    noisy.mul_(spec["noise"]).add_(v)
                    tensors[k] = noisy.to(dtype)
                else:
                    tensors[k] = v.clone()
                weight_map[k] = fname
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            del tensors
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2)
        )
        config.dtype = spec.get("dtype", "float32")
        config.save_pretrained(tmp)
        os.replace(tmp, target)
        print(f"built {target} ({time.perf_counter() - started:.1f} s)", flush=True)


def worker_verify(out: str, dirs: list[str], label: str, base: str | None = None) -> None:
    """Check a merged output against the float64 mean of the ingredients (every tensor); a family method's
    (label `hf_soups:<method>` / `mergekit:<method>`) against its reference (see the module docstring)."""
    import torch
    from safetensors import safe_open

    method = label.split(":", 1)[1] if ":" in label else None
    if method is not None:
        dirs = family_inputs(method, list(dirs))

    def index_of(d: Path) -> dict[str, Path]:
        idx = d / "model.safetensors.index.json"
        if idx.exists():
            return {k: d / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
        return {k: d / "model.safetensors" for k in _keys(d / "model.safetensors")}

    def _keys(f: Path) -> list[str]:
        with safe_open(str(f), "pt") as h:
            return list(h.keys())

    def get(mapping: dict[str, Path], name: str) -> torch.Tensor:
        with safe_open(str(mapping[name]), "pt") as h:
            return h.get_tensor(name)

    out_map = index_of(Path(out))
    in_maps = [index_of(Path(d)) for d in dirs]
    expected_keys = set(in_maps[0])
    missing = expected_keys - set(out_map)
    if missing:
        raise SystemExit(f"{label}: output lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    base_map = index_of(Path(base)) if base else None

    def reference(name: str, thetas: list[torch.Tensor]) -> torch.Tensor:
        if method is None:
            return sum(t.double() for t in thetas) / len(thetas)
        b = get(base_map, name) if base_map is not None else None
        if method == "task-arithmetic":  # linear: exact in float64
            return b.double() + sum(t.double() - b.double() for t in thetas)
        if not thetas[0].is_floating_point():
            return thetas[0]
        from hf_soups import merge_ops

        recipes = {
            "ties": lambda: merge_ops.ties_recipe(density=0.5),
            "dare-linear": lambda: merge_ops.dare_recipe(density=0.5, seed=0, form="linear"),
            "dare-ties": lambda: merge_ops.dare_recipe(density=0.5, seed=0, form="ties"),
            "slerp": lambda: merge_ops.slerp_recipe(t=0.5),
            "model-stock": merge_ops.model_stock_recipe,
        }
        return merge_ops.merge_tensor(
            recipes[method](), name, b if method != "slerp" else None, thetas
        ).double()

    judged = method in (None, "task-arithmetic") or label.startswith("hf_soups")
    worst = 0.0
    worst_rounding = 0.0  # low-precision outputs: the largest error as a fraction of the rounding bound
    for name in sorted(expected_keys):
        thetas = [get(m, name) for m in in_maps]  # each ingredient tensor read once
        mean = reference(name, thetas)
        got = get(out_map, name)
        if got.shape != mean.shape:
            raise SystemExit(f"{label}: {name} has shape {tuple(got.shape)}, expected {tuple(mean.shape)}")
        if got.dtype != thetas[0].dtype:
            raise SystemExit(f"{label}: {name} written as {got.dtype}, the ingredients are {thetas[0].dtype}")
        diff = (got.double() - mean).abs()
        err = diff.max().item() if got.numel() else 0.0
        worst = max(worst, err)
        if got.is_floating_point() and got.dtype in (torch.bfloat16, torch.float16) and got.numel():
            # one rounding to the output dtype (its epsilon at the value) plus float32 accumulation error
            # (a few float32 epsilons of the summed magnitudes: where the mean cancels to ~0)
            eps = torch.finfo(got.dtype).eps
            magnitude = sum(t.double().abs() for t in thetas) / len(thetas)
            allowed = mean.abs() * eps + 8 * torch.finfo(torch.float32).eps * magnitude
            worst_rounding = max(worst_rounding, (diff / allowed.clamp_min(1e-45)).max().item())
    what = "the mean" if method is None else f"the {method} reference"
    if not judged:
        print(
            f"{label}: {len(expected_keys)} tensors, max abs difference {worst:.3g} from hf_soups' {method} (not judged)"
        )
        return
    if worst_rounding:  # a bfloat16 / float16 soup: the float64 value rounded once (at most one epsilon away)
        if worst_rounding > 1.0:
            raise SystemExit(
                f"{label}: output differs from {what} by up to {worst_rounding:.2f} x the rounding bound"
            )
        print(
            f"{label}: {len(expected_keys)} tensors equal {what} of {len(dirs)} ingredients rounded to the output "
            f"dtype (max error {worst_rounding:.2f} of the rounding bound)"
        )
        return
    if worst > 1e-5:
        raise SystemExit(f"{label}: output differs from {what} of the ingredients by up to {worst:.3g}")
    print(
        f"{label}: {len(expected_keys)} tensors equal {what} of {len(dirs)} ingredients (max abs err {worst:.2e})"
    )


def worker_imports() -> None:
    import hf_soups  # noqa: F401

    print("HEAVY_MODULES " + json.dumps(loaded_heavy_modules()))


WORKERS = {
    "read": lambda a: worker_read(a.paths),
    "write": lambda a: worker_write(a.out, a.nbytes, a.shard_bytes),
    "hf_soups": lambda a: worker_hf_soups(a.out, a.paths),
    "naive": lambda a: worker_naive(a.out, a.paths),
    "build": lambda a: worker_build(a.spec),
    "verify": lambda a: worker_verify(a.out, a.paths, a.label, a.base),
    "family": lambda a: worker_family(a.out, a.label, a.base, a.paths),
    "imports": lambda a: worker_imports(),
}


# ----------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------
def worker_cmd(name: str, *args: str) -> list[str]:
    return [sys.executable, str(HERE), "--worker", name, *args]


def ensure_ingredients(
    args: argparse.Namespace, n_max: int, with_base: bool = False
) -> tuple[list[Path], dict]:
    target = parse_size(args.params)
    shape = llama_shape(target)
    params = count_params(shape)
    shard_bytes = parse_size(args.max_shard_size)
    short = {"float32": "f32", "bfloat16": "bf16"}[args.dtype]
    itemsize = 4 if args.dtype == "float32" else 2
    tag = (
        f"llama-{params // 10**6}M-{short}-shard{shard_bytes // 10**6}MB-seed{args.seed}-noise{args.noise:g}"
    )
    root = Path(args.work_dir) / tag
    root.mkdir(parents=True, exist_ok=True)
    dirs = [root / f"ingredient-{i}" for i in range(n_max)]
    wanted = dirs + ([root / "base"] if with_base else [])
    missing = [str(d) for d in wanted if not (d / "model.safetensors.index.json").exists()]
    info = dict(
        tag=tag, shape=shape, params=params, bytes_per_ingredient=params * itemsize, base=str(root / "base")
    )
    if missing:
        need = len(missing) * params * itemsize
        free = shutil.disk_usage(root).free
        print(
            f"building {len(missing)} ingredient(s) of {params / 1e6:.0f}M params ({fmt_bytes(params * itemsize)} each) "
            f"under {root} (free disk {fmt_bytes(free)})"
        )
        if need + 3 * params * itemsize > free:
            raise SystemExit(
                f"not enough disk under {root}: need about {fmt_bytes(need + 3 * params * itemsize)}"
            )
        spec = dict(
            shape=shape,
            seed=args.seed,
            noise=args.noise,
            max_shard_bytes=shard_bytes,
            missing=missing,
            dtype=args.dtype,
        )
        subprocess.run(["nice", *worker_cmd("build", "--spec", json.dumps(spec))], check=True)
    else:
        print(f"reusing {n_max} cached ingredients under {root}")
    info["bytes_per_ingredient"] = sum(f.stat().st_size for f in weight_files(dirs[0]))
    return dirs, info


def find_mergekit(python: str | None) -> list[str] | None:
    if not python or not Path(python).exists():
        return None
    probe = subprocess.run([python, "-c", "import mergekit"], capture_output=True)
    if probe.returncode != 0:
        return None
    script = Path(python).parent / "mergekit-yaml"
    return [str(script)] if script.exists() else None


def mergekit_version(python: str) -> str:
    res = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
        capture_output=True,
        text=True,
    )
    return res.stdout.strip() or "?"


def page_cache_fraction(paths: list[Path]) -> float | None:
    """Fraction of the files' bytes resident in the page cache (util-linux `fincore`), or None if unavailable."""
    if not shutil.which("fincore"):
        return None
    files = [str(f) for d in paths for f in weight_files(d)]
    res = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", *files], capture_output=True, text=True
    )
    if res.returncode != 0:
        return None
    res_total = size_total = 0
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            res_total += int(parts[0])
            size_total += int(parts[1])
    return res_total / size_total if size_total else None


def available_memory() -> int | None:
    """`MemAvailable` from /proc/meminfo (Linux), in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_imports(env: dict[str, str]) -> dict[str, bool]:
    res = subprocess.run(worker_cmd("imports"), capture_output=True, text=True, check=True, cwd=REPO, env=env)
    line = next(li for li in res.stdout.splitlines() if li.startswith("HEAVY_MODULES "))
    return json.loads(line.split(" ", 1)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--params", default="400M", help="model size in parameters (default 400M: ~1.6 GB float32)"
    )
    parser.add_argument(
        "--n", default="4,8", help="numbers of ingredients to measure, comma-separated (default 4,8)"
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="measured runs per command; the median is reported"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="discarded warm-up rounds (warm the page cache)"
    )
    parser.add_argument("--work-dir", default="/tmp/hf_soups_bench", help="ingredient cache and outputs")
    parser.add_argument(
        "--output-dir",
        help="where the soups (and the floor's write) are written, instead of --work-dir: e.g. a tmpfs such as "
        "/dev/shm/hf_soups_bench_out, so that the disk's write-back does not drown the software's own cost",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="the ingredients' dtype (the soup keeps it; the floor then reads and writes half the bytes)",
    )
    parser.add_argument("--max-shard-size", default="500MB", help="ingredient shard size (default 500MB)")
    parser.add_argument(
        "--noise", type=float, default=1e-3, help="std of each ingredient's noise (default 1e-3)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--methods",
        default="floor,hf_soups,naive,mergekit",
        help="subset of floor,hf_soups,naive,mergekit (default: all), plus any of the task-vector methods "
        f"{','.join(FAMILY)} (each as hf_soups:<method>, and mergekit:<method> with mergekit)",
    )
    parser.add_argument(
        "--baseline-n",
        default="4",
        help="N values at which naive and mergekit run (naive holds N models: 1.6 GB each)",
    )
    parser.add_argument(
        "--mergekit-python",
        default="/tmp/mk-venv/bin/python",
        help="a Python with mergekit installed (its own venv); skipped when absent",
    )
    parser.add_argument(
        "--build-only", action="store_true", help="build (or find) the ingredients, measure nothing"
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip checking each output against the exact mean"
    )
    parser.add_argument(
        "--compare-checkout",
        help="another hf_soups checkout (e.g. a git worktree of an older commit) measured beside this one "
        "as 'hf_soups@other', for before/after figures of a change",
    )
    parser.add_argument("--json", help="also write every figure to this JSON file")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--nbytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shard-bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--label", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        WORKERS[args.worker](args)
        return 0

    ns = [int(x) for x in args.n.split(",")]
    baseline_ns = {int(x) for x in args.baseline_n.split(",") if x}
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in ("floor", "hf_soups", "naive", "mergekit", *FAMILY)]
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}")
    env = dict(os.environ)
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # measured as installed: `pip install` compiles a package's bytecode, a checkout (with PYTHONDONTWRITEBYTECODE
    # set) would compile hf_soups' sources again in every process (about 0.1 s)
    checkouts = [REPO] + ([Path(args.compare_checkout).resolve()] if args.compare_checkout else [])
    for checkout in checkouts:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(checkout / "hf_soups")], check=True)

    print(
        f"hf_soups merge throughput -- {time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} CPUs, "
        f"python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}"
    )
    imports = check_imports(env)
    loaded = [k for k, v in imports.items() if v]
    print(
        f"import hf_soups loads: {', '.join(loaded) if loaded else 'none of torch, transformers, peft, torch.distributed'}"
    )

    dirs_all, info = ensure_ingredients(args, max(ns), with_base=any(m in FAMILY for m in methods))
    if args.build_only:
        return 0
    ckpt_bytes = info["bytes_per_ingredient"]
    mk = find_mergekit(args.mergekit_python) if "mergekit" in methods else None
    if "mergekit" in methods and mk is None:
        print(
            f"mergekit: not found with {args.mergekit_python}; skipped "
            "(python3 -m venv /tmp/mk-venv && /tmp/mk-venv/bin/pip install torch==2.13.0 && "
            "/tmp/mk-venv/bin/pip install mergekit)"
        )
    mk_version = mergekit_version(args.mergekit_python) if mk else None

    report: dict = dict(
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        cpus=os.cpu_count(),
        model=info,
        dtype=args.dtype,
        output_dir=args.output_dir or args.work_dir,
        runs=args.runs,
        import_hf_soups_loads=imports,
        mergekit_version=mk_version,
        results={},
        command=" ".join(
            [Path(sys.executable).name, "benchmarks/merge_throughput.py", *(argv or sys.argv[1:])]
        ),
        load_average_start=os.getloadavg()[0],
    )
    for n in ns:
        report.setdefault("load_average", {})[str(n)] = os.getloadavg()[0]
        print(
            f"\n== N = {n}: {n} x {fmt_bytes(ckpt_bytes)} ({info['params'] / 1e6:.0f}M params, {args.dtype}), "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        report["results"][str(n)] = measure_n(
            args,
            n,
            dirs_all[:n],
            methods=methods,
            with_baselines=n in baseline_ns,
            mergekit=mk,
            ckpt_bytes=ckpt_bytes,
            env=env,
            base=info["base"],
        )

    print_goals(report, ns)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nfigures written to {args.json}")
    print("\n== Markdown (for docs/benchmarks.md)\n")
    print(markdown_table(report, ns))
    return 0


def markdown_table(report: dict, ns: list[int]) -> str:
    """The results as a Markdown table: one row per N and command, ratios to that N's floor."""
    model = report["model"]
    head = (
        f"{report['date']}, {report['cpus']} CPUs, {model['params'] / 1e6:.0f}M params x "
        f"{fmt_bytes(model['bytes_per_ingredient'])} per ingredient ({report.get('dtype', 'float32')}), output "
        f"in {report.get('output_dir', '?')}, median of {report['runs']} runs "
        f"(load average at each N: {', '.join(f'{v:.1f}' for v in report.get('load_average', {}).values())}); "
        f"`{report.get('command', '')}`"
    )
    rows = [
        "| N | command | wall (median) | x floor | peak RSS | anon / file | runs (s) |",
        "| --- " * 7 + "|",
    ]
    for n in ns:
        r = report["results"].get(str(n)) or {}
        floor = r.get("floor_s")
        if floor:
            rows.append(f"| {n} | **floor** (read + write + import torch) | {floor:.2f} s | 1.00 | | | |")
        for label, m in r.items():
            if not isinstance(m, dict) or "wall_s" not in m:
                continue
            ratio = f"{m['x_floor']:.2f}" if m.get("x_floor") else ""
            name = label if label not in ("hf_soups",) else "**hf_soups**"
            if label == "mergekit" and report.get("mergekit_version"):
                name += f" {report['mergekit_version']}"
            rows.append(
                f"| {n} | {name} | {m['wall_s']:.2f} s | {ratio} | {fmt_bytes(m['peak_rss_bytes'])} | "
                f"{fmt_bytes(m['peak_anon_bytes'])} / {fmt_bytes(m['peak_file_bytes'])} | "
                f"{' '.join(f'{w:.2f}' for w in m['walls'])} |"
            )
    return head + "\n\n" + "\n".join(rows)


def measure_n(
    args: argparse.Namespace,
    n: int,
    dirs: list[Path],
    *,
    methods: list[str],
    with_baselines: bool,
    mergekit: list[str] | None,
    ckpt_bytes: int,
    env: dict[str, str],
    base: str | None = None,
) -> dict:
    """Measure every command for N ingredients, round robin, and return the summary."""
    work = Path(args.output_dir or args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    paths = [str(d) for d in dirs]
    shard_bytes = parse_size(args.max_shard_size)
    outs = {label: work / f"out-{label}" for label in ("floor-write", "hf_soups", "naive", "mergekit")}
    commands: dict = {}
    if "floor" in methods:
        commands["floor-read"] = lambda: worker_cmd("read", *paths)
        commands["floor-write"] = lambda: worker_cmd(
            "write",
            "--out",
            str(outs["floor-write"]),
            "--nbytes",
            str(ckpt_bytes),
            "--shard-bytes",
            str(shard_bytes),
        )
        commands["import-torch"] = lambda: [sys.executable, "-c", "import torch"]
    if "hf_soups" in methods:
        commands["hf_soups"] = lambda: worker_cmd("hf_soups", "--out", str(outs["hf_soups"]), *paths)
    if args.compare_checkout:
        other = str(Path(args.compare_checkout).resolve())
        outs["hf_soups@other"] = work / "out-hf_soups-other"
        commands["hf_soups@other"] = lambda: [
            "env",
            f"PYTHONPATH={other}",
            *worker_cmd("hf_soups", "--out", str(outs["hf_soups@other"]), *paths),
        ]
    if "naive" in methods and with_baselines:
        # the naive soup holds N models (and transformers): skip it rather than push the machine into swap
        need = int(n * ckpt_bytes * 1.25) + 10**9
        available = available_memory()
        if available is not None and available < need:
            print(
                f"  naive: skipped, it needs about {fmt_bytes(need)} and {fmt_bytes(available)} is available"
            )
        else:
            commands["naive"] = lambda: worker_cmd("naive", "--out", str(outs["naive"]), *paths)
    if mergekit is not None and with_baselines:
        config = work / f"mergekit-linear-{n}.yml"
        config.write_text(
            f"merge_method: linear\ndtype: {args.dtype}\nmodels:\n"
            + "".join(f"  - model: {p}\n    parameters:\n      weight: 1.0\n" for p in paths)
        )
        commands["mergekit"] = lambda: [
            *mergekit,
            str(config),
            str(outs["mergekit"]),
            "--no-copy-tokenizer",
            "--quiet",
            "--no-write-model-card",
        ]
    for method in (m for m in methods if m in FAMILY):
        label = f"hf_soups:{method}"
        outs[label] = work / f"out-hf_soups-{method}"
        inputs = family_inputs(method, paths)
        commands[label] = lambda label=label, method=method, inputs=inputs: worker_cmd(
            "family", "--out", str(outs[label]), "--label", method, "--base", str(base), *inputs
        )
        if mergekit is not None and with_baselines:
            mk_label = f"mergekit:{method}"
            outs[mk_label] = work / f"out-mergekit-{method}"
            mk_config = work / f"mergekit-{method}-{n}.yml"
            mk_config.write_text(mergekit_config(method, str(base), paths, args.dtype))
            commands[mk_label] = lambda mk_label=mk_label, mk_config=mk_config: [
                *mergekit,
                str(mk_config),
                str(outs[mk_label]),
                "--no-copy-tokenizer",
                "--quiet",
                "--no-write-model-card",
            ]

    verified: set[str] = set()
    heavy_after_merge: dict = {}

    def before_each(label: str) -> None:
        if label in outs:
            drop_path(outs[label])
        settle()

    def after_each(label: str, run) -> None:
        if label == "hf_soups" and "HEAVY_MODULES " in run.output:
            line = next(li for li in run.output.splitlines() if li.startswith("HEAVY_MODULES "))
            heavy_after_merge.update(json.loads(line.split(" ", 1)[1]))
        if (
            (label in ("hf_soups", "hf_soups@other", "naive", "mergekit") or ":" in label)
            and label not in verified
            and not args.no_verify
        ):
            extra = ["--base", str(base)] if ":" in label else []
            cmd = ["nice", *worker_cmd("verify", "--out", str(outs[label]), "--label", label, *extra, *paths)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                raise SystemExit(f"verification failed (N={n}):\n{res.stdout}{res.stderr[-3000:]}")
            print("  check: " + res.stdout.strip().splitlines()[-1])
            verified.add(label)
        if label in outs:
            drop_path(outs[label])

    if not commands:
        return {}
    cached = page_cache_fraction(dirs)
    if cached is not None:
        print(f"  ingredient bytes in page cache before the warm-up: {cached:.0%}")
    results = measure_round_robin(
        commands,
        runs=args.runs,
        warmup=args.warmup,
        before_each=before_each,
        after_each=after_each,
        env=env,
        keep_going=True,
    )
    cached = page_cache_fraction(dirs)
    if cached is not None:
        print(f"  ingredient bytes in page cache after the runs: {cached:.0%}")
    return summarise(n, results, heavy_after_merge, cached)


def summarise(n: int, results: dict[str, Measurement], heavy_after_merge: dict, cached: float | None) -> dict:
    failed = {label: m for label, m in results.items() if not m.runs}
    results = {label: m for label, m in results.items() if m.runs}
    floor_parts = [results[k] for k in ("floor-read", "floor-write", "import-torch") if k in results]
    floor = sum(m.wall_s for m in floor_parts) if len(floor_parts) == 3 else None
    print(f"\n  N = {n}: median of {max((len(m.runs) for m in results.values()), default=0)} runs")
    print(f"  {'command':<14} {'wall':>8} {'x floor':>8} {'peak RSS':>10} {'anon':>9} {'file':>9}   runs (s)")
    if floor is not None:
        print(f"  {'floor (sum)':<14} {floor:7.2f}s {1.0:8.2f}")
    out: dict = dict(
        floor_s=floor, page_cache_after=cached, heavy_modules_after_hf_soups=heavy_after_merge or None
    )
    for label, m in failed.items():
        print(f"  {label:<14} FAILED: {m.error}")
        out[label] = dict(error=m.error)
    for label, m in results.items():
        ratio = m.wall_s / floor if floor else None
        print(
            f"  {label:<14} {m.wall_s:7.2f}s {(f'{ratio:8.2f}' if ratio else '        ')} "
            f"{fmt_bytes(m.peak_rss_bytes):>10} {fmt_bytes(m.peak_anon_bytes):>9} {fmt_bytes(m.peak_file_bytes):>9}"
            f"   {' '.join(f'{w:.2f}' for w in m.walls)}"
        )
        out[label] = dict(
            wall_s=m.wall_s,
            walls=m.walls,
            x_floor=ratio,
            peak_rss_bytes=m.peak_rss_bytes,
            max_peak_rss_bytes=m.max_peak_rss_bytes,
            peak_anon_bytes=m.peak_anon_bytes,
            peak_file_bytes=m.peak_file_bytes,
        )
    if heavy_after_merge:
        loaded = [k for k, v in heavy_after_merge.items() if v]
        print(f"  modules loaded by the end of the hf_soups merge: {', '.join(loaded)}")
    return out


def print_goals(report: dict, ns: list[int]) -> None:
    res = report["results"]
    print("\n== goals (issue 2)")

    def line(ok: bool | None, text: str) -> None:
        print(f"  [{'PASS' if ok else ('FAIL' if ok is not None else ' -- ')}] {text}")

    goals = {}
    for n in ns:
        r = res[str(n)]
        if "wall_s" not in r.get("hf_soups", {}) or "floor_s" not in r:
            continue
        h = r["hf_soups"]
        if r["floor_s"]:
            ok = h["x_floor"] <= 1.5
            goals[f"wall_N{n}"] = ok
            line(
                ok,
                f"N={n}: hf_soups wall {h['wall_s']:.2f} s = {h['x_floor']:.2f} x floor ({r['floor_s']:.2f} s); "
                "goal <= 1.5",
            )
        ok = h["max_peak_rss_bytes"] < 600 * 10**6
        goals[f"rss_N{n}"] = ok
        line(ok, f"N={n}: hf_soups peak RSS {fmt_bytes(h['max_peak_rss_bytes'])} (worst run); goal < 600 MB")
        for other in ("naive", "mergekit"):
            if "wall_s" in r.get(other, {}):
                print(
                    f"         N={n}: hf_soups is {r[other]['wall_s'] / h['wall_s']:.1f} x faster than {other} "
                    f"and uses {r[other]['peak_rss_bytes'] / h['peak_rss_bytes']:.1f} x less peak memory"
                )
    with_h = [n for n in ns if "wall_s" in res[str(n)].get("hf_soups", {})]
    if len(with_h) >= 2:
        lo, hi = min(with_h), max(with_h)
        a, b = res[str(lo)]["hf_soups"]["peak_rss_bytes"], res[str(hi)]["hf_soups"]["peak_rss_bytes"]
        ok = abs(b - a) <= 0.10 * a
        goals["rss_flat"] = ok
        line(
            ok,
            f"peak RSS N={hi} vs N={lo}: {fmt_bytes(b)} vs {fmt_bytes(a)} ({(b - a) / a:+.1%}); goal within 10%",
        )
    family = sorted({label for n in ns for label in res[str(n)] if label.startswith("hf_soups:")})
    for label in family:  # the task-vector methods: the same goals as the uniform soup (issue 14)
        for n in ns:
            m = res[str(n)].get(label, {})
            if "wall_s" not in m:
                continue
            if m.get("x_floor"):
                ok = m["x_floor"] <= 1.5
                goals[f"wall_N{n}_{label}"] = ok
                line(ok, f"N={n}: {label} wall {m['wall_s']:.2f} s = {m['x_floor']:.2f} x floor; goal <= 1.5")
            ok = m["max_peak_rss_bytes"] < 600 * 10**6
            goals[f"rss_N{n}_{label}"] = ok
            line(ok, f"N={n}: {label} peak RSS {fmt_bytes(m['max_peak_rss_bytes'])}; goal < 600 MB")
        with_m = [n for n in ns if "wall_s" in res[str(n)].get(label, {})]
        if len(with_m) >= 2:
            lo, hi = min(with_m), max(with_m)
            a, b = res[str(lo)][label]["peak_rss_bytes"], res[str(hi)][label]["peak_rss_bytes"]
            ok = abs(b - a) <= 0.10 * a
            goals[f"rss_flat_{label}"] = ok
            line(ok, f"{label} peak RSS N={hi} vs N={lo}: {(b - a) / a:+.1%}; goal within 10%")
    imports = report["import_hf_soups_loads"]
    bad = [k for k in ("torch", "transformers model code", "peft", "torch.distributed") if imports.get(k)]
    goals["lazy_import"] = not bad
    line(
        not bad,
        "import hf_soups loads no torch, transformers model code, peft, torch.distributed"
        + (f" (loaded: {', '.join(bad)})" if bad else ""),
    )
    report["goals"] = goals


if __name__ == "__main__":
    sys.exit(main())
