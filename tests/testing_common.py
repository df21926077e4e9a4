"""Helpers shared by the test modules: independent references (safetensors read directly, float64 sums), tiny
text models and eval files, and an independent replay of a greedy soup's history.

Nothing here calls hf_soups: these are the references the library is checked against.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import yaml

# ------------------------------------------------------------------------------------------------ tensors


def read_safetensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every `*.safetensors` file in `folder`, read with safetensors itself (shards included)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def float64_combination(
    states: Sequence[Mapping[str, torch.Tensor]], coefficients: Sequence[float]
) -> dict[str, torch.Tensor]:
    """`sum_i c_i * theta_i` in float64 for every floating tensor; other tensors are taken from the first state."""
    assert len(states) == len(coefficients) and states
    out = {}
    for k, first in states[0].items():
        if first.is_floating_point():
            out[k] = sum(float(c) * s[k].double() for c, s in zip(coefficients, states))
        else:
            out[k] = first.clone()
    return out


def float64_mean(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform soup of `states`, computed independently in float64."""
    return float64_combination(states, [1.0 / len(states)] * len(states))


def assert_same_tensors(a: str | Path, b: str | Path) -> None:
    """The safetensors files of folders `a` and `b` hold the same names, dtypes and bits."""
    ta, tb = read_safetensors(a), read_safetensors(b)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert ta[k].dtype == tb[k].dtype, k
        assert torch.equal(ta[k], tb[k]), k


def assert_state_close(
    got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *, atol: float = 1e-6
) -> None:
    """Every tensor of `got` is in `expected` and equal to it (floating tensors within `atol`, in float64)."""
    assert got and set(got) <= set(expected), sorted(set(got) - set(expected))
    for k, v in got.items():
        if v.is_floating_point():
            torch.testing.assert_close(v.double(), expected[k].double(), rtol=0, atol=atol, msg=k)
        else:
            assert torch.equal(v, expected[k].to(v.dtype)), k


# ------------------------------------------------------------------------------------------------ trainers

#: TrainingArguments of the tests' short CPU runs: no saving, evaluation, logging, reporting or progress bars
QUIET_CPU_RUN = dict(
    save_strategy="no",
    eval_strategy="no",
    logging_strategy="no",
    report_to="none",
    disable_tqdm=True,
    use_cpu=True,
    dataloader_num_workers=0,
)


# --------------------------------------------------------------------------------------- text models, eval files

VOCAB_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(5, 99)]


def save_tokenizer(folder: Path) -> None:
    """A 99-token WordPiece tokenizer matching the tiny BERT's vocabulary (so raw-text eval files work)."""
    from transformers import BertTokenizerFast

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(VOCAB_TOKENS) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)


def make_text_models(root: Path, n: int = 3, *, base: bool = False, **overrides) -> list[Path]:
    """`n` tiny BERT classifiers (shared init + seeded noise) with a tokenizer; `base=True` adds `root/base`."""
    from tests.tiny_models import make_tiny_bert_dir

    out = []
    for i in range(n):
        folder = make_tiny_bert_dir(root / f"ft-{i}", seed=i, **overrides)
        save_tokenizer(folder)
        out.append(folder)
    if base:
        folder = make_tiny_bert_dir(root / "base", seed=0, noise=0.0, **overrides)
        save_tokenizer(folder)
    return out


def write_eval_csv(
    path: Path, rows: int = 24, seed: int = 0, text: str = "sentence", label: str = "label"
) -> Path:
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([text, label])
        for _ in range(rows):
            writer.writerow([" ".join(f"w{rng.randrange(5, 99)}" for _ in range(6)), rng.randrange(3)])
    return path


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    return path


def read_json(path: Path):
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------------------------ greedy replay


def replay_greedy(
    soup,
    states: Mapping[str, Mapping[str, torch.Tensor]],
    score: Callable[[Mapping[str, torch.Tensor]], float],
    *,
    greater_is_better: bool = True,
    strict: bool = False,
    rel: float = 1e-5,
) -> list[str]:
    """Replays a greedy soup's history independently and returns the names it keeps.

    For every step, the candidate soup (float64 mean of the members kept so far plus the candidate) is scored
    with `score` (the test's own evaluation of a state dict) and compared with the score the library recorded;
    the keep decision is re-derived from these independent scores with the paper's rule (`>=`, or `>` when
    `strict`). A candidate rejected early (`partial`) must be one the replay drops, and its recorded best reachable
    score must be at least as good as its real one. The soup's kept set, weights and final score must match the replay. Unlike checking the recorded
    fields against each other, this fails when the library scores the wrong weights or keeps the wrong set.
    """
    import pytest

    history = soup.history
    start = history[0]["candidate"]
    members = [start]
    current = score(float64_mean([states[start]]))
    assert history[0]["score"] == pytest.approx(current, rel=rel), (start, history[0]["score"], current)
    for step in history[1:]:
        candidate = step["candidate"]
        measured = score(float64_mean([states[m] for m in [*members, candidate]]))
        if step.get(
            "partial"
        ):  # rejected early: its number is the best it could reach, at least its real score
            assert step["kept"] is False and step["candidate_score"] == step["partial"]["bound"]
            assert 0 < step["partial"]["units"] < step["partial"]["of"]
            beyond = (
                measured <= step["candidate_score"]
                if greater_is_better
                else measured >= step["candidate_score"]
            )
            assert beyond or measured == pytest.approx(step["candidate_score"], rel=rel), (
                candidate,
                step,
                measured,
            )
        else:
            assert step["candidate_score"] == pytest.approx(measured, rel=rel), (candidate, step, measured)
        if strict:
            keep = measured > current if greater_is_better else measured < current
        else:
            keep = measured >= current if greater_is_better else measured <= current
        assert step["kept"] == keep, (candidate, measured, current)
        if keep:
            members.append(candidate)
            current = measured
    by_name = {i.name: i for i in soup.ingredients}
    assert sorted(n for n, i in by_name.items() if i.selected) == sorted(members)
    for name, ing in by_name.items():
        assert ing.weight == pytest.approx(1.0 / len(members) if name in members else 0.0)
    assert soup.score == pytest.approx(current, rel=rel)
    return members


# ------------------------------------------------------------------------------------- the task-vector family


def family_reference(
    method: str,
    base: Mapping[str, torch.Tensor] | None,
    thetas: Sequence[Mapping[str, torch.Tensor]],
    *,
    weights: Sequence[float] | None = None,
    scaling: float = 1.0,
    density: float | None = None,
    seed: int | None = None,
    t: float | None = None,
) -> dict[str, torch.Tensor]:
    """A task-vector method written from its paper's definition, tensor by tensor, in float64 (whole tensors,
    sorting instead of selection, DARE's documented mask from Python integers); see docs/methods.md.

    Task vectors are `theta.float() - base.float()` (the documented float32 subtraction), everything after in
    float64. Non-floating tensors are taken from the first ingredient.
    """
    n = len(thetas)
    ws = [1.0] * n if weights is None else [float(w) for w in weights]
    out: dict[str, torch.Tensor] = {}
    for name, first in thetas[0].items():
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        xs = [th[name] for th in thetas]
        b = None if base is None else base[name]
        taus = None if b is None else [(x.float() - b.float()).double() for x in xs]
        if method == "task-arithmetic":
            out[name] = b.double() + scaling * sum(w * tau for w, tau in zip(ws, taus))
        elif method in ("ties", "dare-ties", "dare-linear"):
            if method == "ties":
                sparse = [tau * _top_k_mask(tau, density) for tau in taus]
            else:
                sparse = [
                    torch.where(_dare_keep(seed, i, name, density, tau.numel()).view(tau.shape), tau, 0.0)
                    / density
                    for i, tau in enumerate(taus)
                ]
            if method == "dare-linear":
                merged = sum(w * s for w, s in zip(ws, sparse))
            else:
                elected = torch.where(sum(sparse) >= 0, 1.0, -1.0).double()
                agree = [torch.sign(s) == elected for s in sparse]
                merged = sum(w * s * a for w, s, a in zip(ws, sparse, agree)) / torch.clamp(
                    sum(a.double() for a in agree), min=1.0
                )
            out[name] = b.double() + scaling * merged
        elif method == "slerp":
            a, c = xs[0].double(), xs[1].double()
            na, nc = float(a.norm()), float(c.norm())
            cos = float((a * c).sum()) / (na * nc) if na > 0 and nc > 0 else 1.0
            if abs(cos) > 0.9995:
                out[name] = (1 - t) * a + t * c
            else:
                omega = math.acos(cos)
                out[name] = (math.sin((1 - t) * omega) * a + math.sin(t * omega) * c) / math.sin(omega)
        elif method == "model-stock":
            pairs = []
            for i in range(n):
                for j in range(i + 1, n):
                    ni, nj = float(taus[i].norm()), float(taus[j].norm())
                    pairs.append(float((taus[i] * taus[j]).sum()) / (ni * nj) if ni > 0 and nj > 0 else 0.0)
            cos = min(1.0, max(0.0, sum(pairs) / len(pairs)))
            ratio = n * cos / (1 + (n - 1) * cos)
            out[name] = ratio * sum(x.double() for x in xs) / n + (1 - ratio) * b.double()
        else:
            raise ValueError(method)
    return out


def _top_k_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """The int(density * numel) largest |tau|, ties broken by the lowest flat index (a stable sort)."""
    flat = tau.reshape(-1).abs()
    k = int(density * flat.numel())
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(-flat, stable=True)[:k]] = True
    return keep.view(tau.shape)


def _dare_keep(seed: int, ingredient: int, name: str, density: float, numel_or_indices) -> torch.Tensor:
    """DARE's documented keep-mask from Python integers (docs/methods.md): lowbias32 over the flat index plus a
    32-bit segment key (splitmix64 of the blake2b key of (seed, ingredient, name)); kept when u >> 1 < ceil(d * 2**31)."""
    import hashlib
    import math

    m32, m64 = (1 << 32) - 1, (1 << 64) - 1
    digest = hashlib.blake2b(f"hf_soups.dare\0{seed}\0{ingredient}\0{name}".encode(), digest_size=8).digest()
    key = int.from_bytes(digest, "little")
    indices = range(numel_or_indices) if isinstance(numel_or_indices, int) else numel_or_indices
    limit = math.ceil(density * 2**31)
    out = []
    for j in indices:
        z = (key + ((j >> 32) + 1) * 0x9E3779B97F4A7C15) & m64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
        k = (z ^ (z >> 31)) & m32
        x = ((j & m32) + k) & m32
        x ^= x >> 16
        x = (x * 0x7FEB352D) & m32
        x ^= x >> 15
        x = (x * 0x846CA68B) & m32
        x ^= x >> 16
        out.append(x >> 1 < limit)
    return torch.tensor(out)
