"""Will these soup? Inspecting ingredients without merging them, and planning a merge without running it.

[`inspect_models`] resolves the models with the same code `merge_models` uses, compares what can be compared
without reading weights (architecture, config, label maps, tokenizer vocabularies, adapter bases, tensor
names, shapes and dtypes), runs the engine's own compatibility check ([`align.build_plan`]) and then
streams the tensors, one name at a time, to say which tensors differ and how far apart the ingredients
are: L2 distances, and with a base model the L2 norm and cosine similarity of each ingredient's delta.

[`plan_merge`] answers `--dry-run`: what would be downloaded, how much disk the soup takes and how much
memory cooking needs, from file sizes and safetensors headers only (no weights are read, nothing is written).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.compat import (
    BASIN_THRESHOLD,
    FATAL,
    WARNING,
    DistanceStats,
    Problem,
    check_ingredients,
    label_list,
    normalize_key,
    tokenizer_vocab_hash,
)
from ..core.plan import plan_from_alignment
from ..utils import free_disk, human_bytes
from ..utils import numel as count_elements

if TYPE_CHECKING:  # pragma: no cover
    from ..publishing.recipe_file import RecipeFile

logger = logging.getLogger(__name__)

# config fields shown side by side when they differ between models
_CONFIG_FIELDS = (
    "model_type",
    "architectures",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "num_labels",
)
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
_ST_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_ST_FLOAT = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_ST_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_RUNTIME_BYTES = 400 * 2**20  # Python + torch + transformers, roughly, before any tensor
_CHUNK = 1 << 22  # elements per float64 chunk when computing distances


def _human_count(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


# ======================================================================================== inspect


@dataclass
class ModelSummary:
    """What [`inspect_models`] learned about one model without reading its weights."""

    name: str
    reference: str
    kind: str
    path: str | None
    revision: str | None
    architecture: str | None
    model_type: str | None
    num_tensors: int
    num_parameters: int
    dtypes: dict[str, int]
    labels: list[str] | None
    vocab_size: int | None
    tokenizer_vocab: str | None  # short hash of the tokenizer vocabulary (None when no tokenizer files)
    adapter_base: str | None = None
    adapter_type: str | None = None


@dataclass
class InspectionReport:
    """The answer of [`inspect_models`]: can these models be souped, and how different are they.

    Attributes:
        models (`list[ModelSummary]`): the ingredients, in order.
        base (`ModelSummary`, *optional*): the base model, when given.
        problems (`list[str]`): why the models cannot be souped (empty when they can).
        warnings (`list[str]`): what may hurt the soup without preventing it.
        config_differences (`dict[str, list]`): config fields whose values differ, one value per model.
        tensors_compared (`int`): tensors streamed.
        tensors_differing (`int`): tensors that are not identical across the ingredients.
        identical_tensors (`list[str]`): tensors identical in every ingredient (frozen layers).
        distances (`list[list[float]]`): pairwise L2 distances between the ingredients.
        delta_norms (`list[float]`, *optional*): with a base, the L2 norm of each ingredient's delta.
        relative_delta_norms (`list[float]`, *optional*): the same divided by the base's L2 norm.
        cosine (`list[list[float]]`, *optional*): with a base, the cosine similarity of the deltas.
        distance_to_mean (`list[float]`): L2 distance of each ingredient to the uniform soup.
        top_tensors (`list[dict]`): the tensors where the ingredients differ most (relative spread).
        base_missing (`list[str]`): ingredient tensors the base lacks or has in another shape (left out of deltas).
        relative_distances (`list[list[float]]`, *optional*): `||a - b|| / ((||a|| + ||b||) / 2)` between the
            ingredients (the one-basin figure, see [`hf_soups.core.compat.BASIN_THRESHOLD`]).
        findings (`list[Problem]`): the compatibility checker's problems and warnings, with their rule,
            ingredient and tensor (`problems` and `warnings` hold their messages).
    """

    models: list[ModelSummary]
    base: ModelSummary | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config_differences: dict[str, list[Any]] = field(default_factory=dict)
    tensors_compared: int = 0
    tensors_differing: int = 0
    identical_tensors: list[str] = field(default_factory=list)
    distances: list[list[float]] | None = None
    delta_norms: list[float] | None = None
    relative_delta_norms: list[float] | None = None
    cosine: list[list[float]] | None = None
    distance_to_mean: list[float] | None = None
    top_tensors: list[dict[str, Any]] = field(default_factory=list)
    base_missing: list[str] = field(default_factory=list)
    relative_distances: list[list[float]] | None = None
    findings: list[Problem] = field(default_factory=list)

    def add(self, problem: Problem) -> None:
        """Record a finding of the checker (its message goes to `problems` or `warnings`)."""
        self.findings.append(problem)
        (self.problems if problem.fatal else self.warnings).append(problem.message)

    @property
    def independent(self) -> bool:
        """Whether some models look independently initialised (too far apart for one pre-trained start)."""
        return any(p.check == "basin" for p in self.findings)

    @property
    def compatible(self) -> bool:
        """Whether the models can be souped together."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping of the report."""
        out = asdict(self)
        out["compatible"] = self.compatible
        return out

    def format(self) -> str:
        """The report as text (what `hf-soups inspect` prints)."""
        names = [m.name for m in self.models]
        lines = ["Models:"]
        rows = [("", "name", "kind", "architecture", "params", "dtype", "labels", "vocab")]
        everyone = [*self.models, *([self.base] if self.base else [])]
        for i, m in enumerate(everyone):
            tag = "base" if (self.base is not None and m is self.base) else str(i)
            labels = ",".join(m.labels) if m.labels else "-"
            if len(labels) > 30:
                labels = labels[:27] + "..."
            rows.append(
                (
                    tag,
                    m.name,
                    m.kind + (f" ({m.adapter_type})" if m.adapter_type else ""),
                    m.architecture or "?",
                    _human_count(m.num_parameters),
                    "/".join(m.dtypes) or "?",
                    labels,
                    str(m.vocab_size) if m.vocab_size is not None else "?",
                )
            )
        lines += _table(rows)
        adapters = [m for m in everyone if m.adapter_base]
        for m in adapters:
            lines.append(f"  adapter {m.name!r}: base model {m.adapter_base}")
        if self.config_differences:
            lines.append("Config fields that differ:")
            for key, values in self.config_differences.items():
                shown = ", ".join(
                    f"{n}={v!r}" for n, v in zip(names + (["base"] if self.base else []), values)
                )
                lines.append(f"  {key}: {shown}")
        if self.problems:
            lines.append("NOT compatible: these models cannot be souped together.")
            lines += [f"  - {p}" for p in self.problems]
        elif self.independent:
            worst = max(
                (
                    v
                    for i, row in enumerate(self.relative_distances or [])
                    for j, v in enumerate(row)
                    if j > i
                ),
                default=float("nan"),
            )
            lines.append(
                f"WARNING: these look independently initialised: a soup of them will not work (relative distance "
                f"up to {worst:.2f}; fine-tunes of one pre-trained model measure below {BASIN_THRESHOLD:g})."
            )
        else:
            lines.append("Compatible: these models can be souped together.")
        lines += [f"  warning: {w}" for w in self.warnings]
        if self.tensors_compared:
            lines.append(
                f"Tensors: {self.tensors_compared} compared, {self.tensors_differing} differ between the ingredients, "
                f"{len(self.identical_tensors)} identical in all of them"
                + (f" (e.g. {', '.join(self.identical_tensors[:3])})" if self.identical_tensors else "")
            )
        if self.delta_norms is not None and self.base is not None:
            lines.append(f"Deltas from the base {self.base.name!r} (L2 norm, relative to the base's norm):")
            rel = self.relative_delta_norms or [float("nan")] * len(names)
            rows = [("", "name", "||delta||", "relative", "mean cos to others")]
            for i, n in enumerate(names):
                others = [self.cosine[i][j] for j in range(len(names)) if j != i] if self.cosine else []
                mean_cos = f"{sum(others) / len(others):.3f}" if others else "-"
                rows.append((str(i), n, f"{self.delta_norms[i]:.4g}", f"{rel[i]:.3%}", mean_cos))
            lines += _table(rows)
            if self.cosine and len(names) > 1:
                lines.append("Cosine similarity of the deltas:")
                lines += _matrix(names, self.cosine, "{:.3f}")
            if self.base_missing:
                lines.append(
                    f"  {len(self.base_missing)} tensor(s) left out of the deltas (not in the base, or another "
                    f"shape): {', '.join(self.base_missing[:5])}{' ...' if len(self.base_missing) > 5 else ''}"
                )
        if self.distances is not None and len(names) > 1:
            lines.append("L2 distance between the ingredients:")
            lines += _matrix(names, self.distances, "{:.4g}")
        if self.relative_distances is not None and len(names) > 1:
            lines.append(
                f"Relative distance ||a - b|| / mean(||a||, ||b||) (one pre-trained start: below {BASIN_THRESHOLD:g}; "
                "unrelated models: about 1.41):"
            )
            lines += _matrix(names, self.relative_distances, "{:.4f}")
        if self.distance_to_mean is not None and len(names) > 1:
            lines.append(
                "L2 distance to the uniform soup: "
                + ", ".join(f"{n}={d:.4g}" for n, d in zip(names, self.distance_to_mean))
            )
        if self.top_tensors:
            lines.append("Tensors that differ most (largest relative spread between ingredients):")
            for t in self.top_tensors:
                lines.append(f"  {t['name']}  {tuple(t['shape'])}  spread {t['relative_spread']:.3%}")
        return "\n".join(lines)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[c])) for r in rows) for c in range(len(rows[0]))]
    return ["  " + "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


def _matrix(names: list[str], values: list[list[float]], fmt: str) -> list[str]:
    rows = [("", *names)]
    for n, row in zip(names, values):
        rows.append((n, *(fmt.format(v) for v in row)))
    return _table(rows)


def _summarize(resolved: Any, source: Any) -> ModelSummary:
    ing = resolved.ingredient
    cfg = resolved.config or {}
    dtypes: dict[str, int] = {}
    num_params = 0
    keys = source.keys()
    for k in keys:
        info = source.info(k)
        dt = str(info.dtype).removeprefix("torch.")
        dtypes[dt] = dtypes.get(dt, 0) + 1
        num_params += info.numel
    folder = Path(resolved.path) if resolved.path is not None else None
    adapter_base, adapter_type = _adapter_base(resolved)
    return ModelSummary(
        name=str(ing.name),
        reference=str(ing.reference)
        if isinstance(ing.reference, str)
        else f"<in-memory {type(ing.reference).__name__}>",
        kind=resolved.kind,
        path=str(folder) if folder is not None else None,
        revision=resolved.commit_hash or ing.revision,
        architecture=(cfg.get("architectures") or [None])[0],
        model_type=cfg.get("model_type"),
        num_tensors=len(keys),
        num_parameters=num_params,
        dtypes=dtypes,
        labels=label_list(cfg),
        vocab_size=cfg.get("vocab_size"),
        tokenizer_vocab=tokenizer_vocab_hash(folder),
        adapter_base=adapter_base,
        adapter_type=adapter_type,
    )


def _adapter_base(resolved: Any) -> tuple[str | None, str | None]:
    """(`base_model_name_or_path[@revision]`, peft type) of an adapter ingredient, else (None, None)."""
    info = getattr(resolved, "adapter", None)
    if resolved.kind != "adapter" or info is None:
        return None, None
    adapter = info.adapter
    base = adapter.base_model_name_or_path or "(not recorded)"
    if adapter.base_revision:
        base = f"{base}@{adapter.base_revision}"
    return base, "LoRA"


def _adapter_only_summary(resolved: Any) -> ModelSummary:
    """What is known of an adapter whose base could not be bound (no tensors)."""
    ing = resolved.ingredient
    adapter_base, adapter_type = _adapter_base(resolved)
    return ModelSummary(
        name=str(ing.name),
        reference=str(ing.reference),
        kind=resolved.kind,
        path=str(resolved.path) if resolved.path is not None else None,
        revision=resolved.commit_hash or ing.revision,
        architecture=None,
        model_type=None,
        num_tensors=0,
        num_parameters=0,
        dtypes={},
        labels=None,
        vocab_size=None,
        tokenizer_vocab=None,
        adapter_base=adapter_base,
        adapter_type=adapter_type,
    )


def _config_differences(report: InspectionReport, everyone: list[Any]) -> None:
    """Config fields shown side by side when they differ (display only: the checker decides)."""
    for key in _CONFIG_FIELDS:
        values = [(r.config or {}).get(key) for r in everyone]
        present = [v for v in values if v is not None]
        if len({json.dumps(v, sort_keys=True) for v in present}) > 1:
            report.config_differences[key] = values


def inspect_models(
    models: Sequence[Any],
    *,
    base_model: Any = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    compare_tensors: bool = True,
    top: int = 5,
    progress: bool = True,
) -> InspectionReport:
    """Says whether `models` can be souped, and how far apart they are, without merging them.

    Models are resolved exactly as [`merge_models`] resolves them (Hub downloads go through the HF cache). The
    report lists every incompatibility it sees (architecture, config, label maps, vocabularies and tokenizers,
    adapter bases, tensor names, shapes), confirms with the engine's own check, then streams the tensors one
    name at a time (memory: one tensor per model) to measure the distances.

    Args:
        models (`Sequence`):
            References as `merge_models` takes them: Hub ids (`org/name@rev`), local folders, adapters,
            in-memory models or [`Ingredient`]s.
        base_model (*optional*):
            The shared pre-trained model: deltas, their norms and cosine similarities are measured from it.
        token, cache_dir, revision:
            As in `merge_models`.
        compare_tensors (`bool`, *optional*, defaults to `True`):
            Stream the tensors to measure distances (only when the models are compatible).
        top (`int`, *optional*, defaults to 5):
            How many of the most different tensors to list.
        progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar over tensors.

    Returns:
        [`InspectionReport`]: `report.compatible`, `report.problems`, `report.format()`.

    Raises:
        [`IngredientNotFoundError`]: a model cannot be found or downloaded.

    Example:

    ```python
    >>> from hf_soups.cli.inspect import inspect_models
    >>> report = inspect_models(["./runs/a", "./runs/b"], base_model="./pretrained")  # doctest: +SKIP
    >>> print(report.format())  # doctest: +SKIP
    ```
    """
    from ..adapters.resolve import bind_adapter_bases
    from ..errors import IncompatibleIngredientsError
    from ..ingredients import Ingredient, as_ingredients, resolve

    ingredients = as_ingredients(list(models))
    resolved = [resolve(i, token=token, cache_dir=cache_dir, revision=revision) for i in ingredients]
    base_resolved = None
    if base_model is not None:
        base_ing = base_model if isinstance(base_model, Ingredient) else Ingredient(base_model)
        if base_ing.name in {i.name for i in ingredients}:
            base_ing.name = f"{base_ing.name} (base)"
        base_resolved = resolve(base_ing, token=token, cache_dir=cache_dir, revision=revision)
    try:
        if any(r.kind == "adapter" for r in resolved):
            try:
                bound = bind_adapter_bases(
                    resolved, base_resolved, token=token, cache_dir=cache_dir, revision=revision
                )
            except IncompatibleIngredientsError as e:
                report = InspectionReport(models=[_adapter_only_summary(r) for r in resolved])
                report.add(Problem(FATAL, "adapter", str(e), e.ingredient, e.tensor_name))
                return report
            if base_resolved is None and bound is not None and bound.kind != "memory":
                base_resolved = bound  # deltas of adapters are measured from the model they adapt
        sources = [r.open() for r in resolved]
        base_source = base_resolved.open() if base_resolved is not None else None
        report = InspectionReport(models=[_summarize(r, s) for r, s in zip(resolved, sources)])
        if base_resolved is not None:
            report.base = _summarize(base_resolved, base_source)
        _config_differences(report, resolved + ([base_resolved] if base_resolved is not None else []))
        # the one checker merge_models runs (align.build_plan raises the first fatal problem of this report)
        checked, alignment = check_ingredients(resolved)
        for problem in checked.problems:
            report.add(problem)
        if base_resolved is not None and report.base is not None:
            ref = report.models[0]
            if ref.architecture and report.base.architecture and ref.model_type != report.base.model_type:
                report.add(
                    Problem(
                        FATAL,
                        "base",
                        f"The base {report.base.name!r} is a {report.base.model_type} model but {ref.name!r} is a "
                        f"{ref.model_type}: the ingredients were not fine-tuned from it. Pass the pre-trained "
                        "model they were fine-tuned from as the base.",
                        report.base.name,
                    )
                )
        if alignment is not None and compare_tensors and report.compatible:
            plan = plan_from_alignment(resolved, checked, alignment)
            _compare_tensors(report, plan, sources, base_source, top=top, progress=progress)
        return report
    finally:
        for r in resolved + ([base_resolved] if base_resolved is not None else []):
            r.close()


def _compare_tensors(
    report: InspectionReport, plan: Any, sources: list[Any], base_source: Any, *, top: int, progress: bool
):
    """Streams the tensors, one name at a time, into the checker's [`DistanceStats`] (float64 Gram matrices).

    Integer buffers and non-finite values are checked as the engine checks them when merging. With a base,
    the base is one more row of the Gram matrix (tensors it lacks are left out of every figure).
    """
    import torch
    from huggingface_hub.utils import tqdm

    from ..core.engine import CHUNK_ELEMENTS, read_aligned

    n = len(sources)
    names = [m.name for m in report.models]
    base_keys = {}
    if base_source is not None:
        base_keys = {normalize_key(k): k for k in base_source.keys()}
    stats = DistanceStats(names + ([report.base.name] if base_source is not None else []))
    stats.begin(list(range(len(stats.names))))
    rows = torch.empty(len(stats.names), CHUNK_ELEMENTS, dtype=torch.float64)
    spreads: list[tuple[float, str, tuple]] = []
    for tp in tqdm(
        plan.tensors, desc="Comparing tensors", unit="tensor", disable=not progress, name="hf_soups"
    ):
        tensors = [read_aligned(tp, i, sources[i]).detach() for i in range(n)]
        report.tensors_compared += 1
        if not tp.mergeable:
            if any(not torch.equal(tensors[0], t) for t in tensors[1:]):
                report.tensors_differing += 1
                bad = next(i for i in range(1, n) if not torch.equal(tensors[0], tensors[i]))
                report.add(
                    Problem(
                        FATAL,
                        "tensors",
                        f"Integer/boolean tensor {tp.name!r} differs between {names[0]!r} and {names[bad]!r}; "
                        "such buffers (position ids, counters) cannot be averaged and must be equal. Re-save the "
                        "ingredients from the same base model.",
                        names[bad],
                        tp.name,
                    )
                )
            else:
                report.identical_tensors.append(tp.name)
            continue
        for i, t in enumerate(tensors):
            if not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                report.add(
                    Problem(
                        FATAL,
                        "non-finite",
                        f"Ingredient {names[i]!r} has {bad} NaN/inf value(s) in tensor {tp.name!r}. The checkpoint "
                        "is broken (diverged training or a bad save): leave it out of the soup.",
                        names[i],
                        tp.name,
                    )
                )
        if any(not torch.equal(tensors[0], t) for t in tensors[1:]):
            report.tensors_differing += 1
        elif n > 1:
            report.identical_tensors.append(tp.name)
        if base_source is not None:
            key = base_keys.get(tp.name)
            if key is None or tuple(base_source.info(key).shape) != tuple(tp.shape):
                report.base_missing.append(tp.name)
                continue
            tensors.append(base_source.get(key).detach())
        flat = [t.reshape(-1) for t in tensors]
        for start in range(0, flat[0].numel(), CHUNK_ELEMENTS):
            count = min(CHUNK_ELEMENTS, flat[0].numel() - start)
            for i, f in enumerate(flat):
                rows[i, :count].copy_(f[start : start + count])
            stats.add(tp.name, rows[:, :count])
        # relative spread of this tensor: largest distance between two ingredients over the tensor's RMS norm
        g = stats.tensors[tp.name][:n, :n]
        diag = g.diagonal()
        pair = (diag[:, None] + diag[None, :] - 2 * g).clamp_min(0)
        scale = math.sqrt(float(diag.sum()) / n)
        spread = math.sqrt(float(pair.max())) / scale if scale > 0 else 0.0
        spreads.append((spread, tp.name, tuple(tp.shape)))
    if not report.compatible:
        return
    for problem in stats.end():
        report.add(problem)
    total = stats.gram()
    if total is None:
        return
    gram = total[:n, :n]
    measured = stats.summary(rows=n)
    report.distances = measured["distances"]
    report.relative_distances = measured["relative_distances"]
    diag = gram.diagonal()
    # distance to the uniform mean: ||x_i - mean(x)||^2 = G_ii - 2/n sum_j G_ij + 1/n^2 sum G
    to_mean = (diag - 2 * gram.mean(dim=1) + gram.mean()).clamp_min(0).sqrt()
    report.distance_to_mean = [float(v) for v in to_mean]
    if base_source is not None:
        # deltas from the base (row n): <d_i, d_j> = G_ij - G_ib - G_jb + G_bb
        b = total[n, n]
        deltas = gram - total[:n, n][:, None] - total[n, :n][None, :] + b
        norms = deltas.diagonal().clamp_min(0).sqrt()
        report.delta_norms = [float(v) for v in norms]
        base_norm = math.sqrt(max(float(b), 0.0))
        report.relative_delta_norms = [float(v) / base_norm if base_norm > 0 else float("nan") for v in norms]
        denom = norms[:, None] * norms[None, :]
        cos = torch.where(denom > 0, deltas / denom.clamp_min(1e-300), torch.zeros_like(deltas))
        report.cosine = [[float(v) for v in row] for row in cos]
        near_zero = [names[i] for i in range(n) if float(norms[i]) == 0.0]
        if near_zero:
            report.add(
                Problem(
                    WARNING,
                    "basin",
                    f"{', '.join(map(repr, near_zero))} equal(s) the base exactly (no fine-tuning?)",
                    near_zero[0],
                )
            )
        negative = [
            (names[i], names[j], report.cosine[i][j])
            for i in range(n)
            for j in range(i + 1, n)
            if report.cosine[i][j] < -0.1
        ]
        if negative:
            a, b_name, c = negative[0]
            report.warnings.append(
                f"deltas of {a!r} and {b_name!r} point in opposite directions (cosine {c:.3f}); averaging them "
                "cancels fine-tuning (were they fine-tuned from this base?)"
            )
    spreads = sorted((item for item in spreads if item[0] > 0), reverse=True)
    report.top_tensors = [
        {"name": name, "shape": list(shape), "relative_spread": s} for s, name, shape in spreads[:top]
    ]


# ======================================================================================== dry run


@dataclass
class ModelPlan:
    """What a dry run learned about one reference."""

    role: str  # "ingredient" | "base"
    reference: str
    revision: str | None
    kind: str  # "local" | "hub" | "adapter" | "hub (adapter)"
    location: str | None
    weight_bytes: int | None
    download_bytes: int | None  # None: unknown; 0: nothing to download
    cached: bool | None
    num_tensors: int | None = None
    max_tensor_bytes: int | None = None
    max_tensor_numel: int | None = None
    num_parameters: int | None = None
    float_numel: int | None = None
    other_bytes: int | None = None
    dtype: str | None = None
    note: str | None = None
    adapter_base: str | None = None


@dataclass
class MergePlanSummary:
    """The answer of [`plan_merge`] (`--dry-run`): what cooking a recipe would download, write and use."""

    method: str
    models: list[ModelPlan]
    output_dir: str | None
    push_to_hub: str | None
    soup_bytes: int | None
    peak_memory_bytes: int | None
    download_bytes: int | None
    evaluates: bool
    eval_sets: dict[str, str]
    free_disk_output: int | None = None
    free_disk_cache: int | None = None
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    compatibility_checked: bool = False

    @property
    def compatible(self) -> bool:
        """No fatal problem found by the compatibility checker (True when it could not run)."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["compatible"] = self.compatible
        return out

    def format(self) -> str:
        lines = [
            f"Dry run: a {self.method} soup of {sum(m.role == 'ingredient' for m in self.models)} model(s)."
        ]
        rows = [("role", "model", "kind", "weights", "download", "tensors", "params")]
        for m in self.models:
            if m.download_bytes == 0:
                download = "cached" if m.kind.startswith("hub") else "-"
            else:
                download = human_bytes(m.download_bytes)
            rows.append(
                (
                    m.role,
                    m.reference + (f"@{m.revision}" if m.revision else ""),
                    m.kind,
                    human_bytes(m.weight_bytes),
                    download,
                    str(m.num_tensors) if m.num_tensors is not None else "?",
                    _human_count(m.num_parameters),
                )
            )
        lines += _table(rows)
        for m in self.models:
            if m.note:
                lines.append(f"  {m.reference}: {m.note}")
        if self.eval_sets:
            lines.append("Held-out data: " + ", ".join(f"{k} <- {v}" for k, v in self.eval_sets.items()))
        lines.append(f"Download: {human_bytes(self.download_bytes) if self.download_bytes else 'nothing'}")
        if self.free_disk_cache is not None and self.download_bytes:
            lines.append(f"  free in the HF cache: {human_bytes(self.free_disk_cache)}")
        target = self.output_dir or (f"hub:{self.push_to_hub}" if self.push_to_hub else "memory")
        lines.append(f"Soup on disk: {human_bytes(self.soup_bytes)} -> {target}")
        if self.free_disk_output is not None:
            lines.append(f"  free there: {human_bytes(self.free_disk_output)}")
        lines.append(
            f"Peak memory (estimate): {human_bytes(self.peak_memory_bytes)}"
            + (
                " (includes one live model for evaluation)"
                if self.evaluates
                else " (streaming: one tensor at a time)"
            )
        )
        if self.problems:
            lines.append("NOT compatible: cooking would fail.")
            lines += [f"  - {p}" for p in self.problems]
        elif self.compatibility_checked:
            lines.append("Compatible (config, labels, tokenizers, tensor names and shapes checked).")
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append("Nothing was downloaded or written.")
        return "\n".join(lines)


def _header_stats(plan: ModelPlan, headers: Sequence[dict[str, Any]]) -> None:
    num = params = float_numel = max_bytes = max_numel = other = 0
    dtypes: dict[str, int] = {}
    for header in headers:
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            numel = count_elements(entry["shape"])
            nbytes = numel * _ST_ITEMSIZE.get(entry["dtype"], 4)
            num += 1
            params += numel
            max_bytes = max(max_bytes, nbytes)
            max_numel = max(max_numel, numel)
            if entry["dtype"] in _ST_FLOAT:
                float_numel += numel
                dtypes[entry["dtype"]] = dtypes.get(entry["dtype"], 0) + numel
            else:
                other += nbytes
    plan.num_tensors, plan.num_parameters, plan.float_numel = num, params, float_numel
    plan.max_tensor_bytes, plan.max_tensor_numel, plan.other_bytes = max_bytes, max_numel, other
    if dtypes:
        plan.dtype = _ST_NAMES.get(max(dtypes, key=dtypes.get), "float32")


def _plan_local(role: str, reference: str) -> ModelPlan:
    from ..core.sources import find_weight_files, read_safetensors_header

    folder = Path(reference)
    plan = ModelPlan(role, reference, None, "local", str(folder), None, 0, None)
    weights = find_weight_files(folder)
    if weights is None and (folder / "adapter_config.json").is_file():
        plan.kind = "adapter"
        weights = find_weight_files(folder, prefix="adapter_model")
        files = [
            folder / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (folder / n).is_file()
        ]
        plan.weight_bytes = sum(f.stat().st_size for f in files)
        try:
            acfg = json.loads((folder / "adapter_config.json").read_text())
            plan.adapter_base = acfg.get("base_model_name_or_path") or None
            if plan.adapter_base and acfg.get("revision"):
                plan.adapter_base = f"{plan.adapter_base}@{acfg['revision']}"
            plan.note = f"LoRA adapter of {plan.adapter_base} (its base is read too)"
        except (json.JSONDecodeError, OSError):
            pass
        return plan
    if weights is None:
        plan.note = "no weight files found (cooking will fail)"
        return plan
    plan.weight_bytes = sum(f.stat().st_size for f in weights.files)
    if weights.format == "safetensors":
        _header_stats(plan, [read_safetensors_header(f)[0] for f in weights.files])
    return plan


def _plan_hub(role: str, repo_id: str, revision: str | None, token: Any, cache_dir: Any) -> ModelPlan:
    from huggingface_hub import HfApi, try_to_load_from_cache

    from ..ingredients import (
        HUB_ADAPTER_PATTERNS,
        HUB_BIN_PATTERNS,
        HUB_CONFIG_PATTERNS,
        HUB_SAFETENSORS_PATTERNS,
    )

    plan = ModelPlan(role, repo_id, revision, "hub", None, None, None, None)
    cached = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    snapshot = Path(cached).parent if isinstance(cached, str) else None
    if snapshot is not None:
        plan.location = str(snapshot)
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, token=token)
    except Exception as e:  # noqa: BLE001 - offline, missing, gated: the dry run reports instead of failing
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if snapshot is not None:
            local = _plan_local(role, str(snapshot))
            local.kind, local.reference, local.revision, local.cached = "hub", repo_id, revision, True
            local.note = "in the local cache; the Hub was not reached"
            return local
        plan.note = f"cannot reach the Hub ({reason}); sizes unknown"
        return plan
    plan.revision = info.sha or revision
    siblings = {s.rfilename: (s.size or 0) for s in (info.siblings or [])}
    names = list(siblings)

    def matching(patterns: list[str]) -> list[str]:
        return [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]

    weight_files = matching(HUB_SAFETENSORS_PATTERNS)
    if not [n for n in weight_files if n.endswith(".safetensors")]:
        weight_files = matching(HUB_ADAPTER_PATTERNS) or matching(HUB_BIN_PATTERNS)
        if matching(HUB_ADAPTER_PATTERNS):
            plan.kind = "hub (adapter)"
    needed = matching(HUB_CONFIG_PATTERNS) + weight_files
    plan.weight_bytes = sum(siblings[n] for n in weight_files)
    missing = []
    for n in needed:
        hit = try_to_load_from_cache(repo_id, n, cache_dir=cache_dir, revision=plan.revision)
        if not isinstance(hit, str):
            missing.append(n)
    plan.download_bytes = sum(siblings[n] for n in missing)
    plan.cached = not missing
    if any(n.endswith(".safetensors") for n in weight_files) and plan.kind == "hub":
        try:
            meta = HfApi().get_safetensors_metadata(repo_id, revision=plan.revision, token=token)
            headers = []
            for f in meta.files_metadata.values():
                headers.append({k: {"dtype": v.dtype, "shape": list(v.shape)} for k, v in f.tensors.items()})
            _header_stats(plan, headers)
        except Exception as e:  # noqa: BLE001
            logger.debug("No safetensors metadata for %s: %s", repo_id, e)
    return plan


def plan_merge(recipe: RecipeFile, *, token: str | bool | None = None) -> MergePlanSummary:
    """What cooking `recipe` would download, write and use, without reading weights or writing anything.

    Sizes come from file sizes and safetensors headers (for Hub models: the Hub's file listing and the
    safetensors metadata, fetched with range requests; the cache is checked first). The peak memory is an
    estimate: the engine's reused buffers (the largest stored tensor of each ingredient and one float32
    accumulator), plus one live model and a float32 running sum when the recipe evaluates, plus the runtime.

    Args:
        recipe ([`RecipeFile`]):
            A validated recipe (see [`load_recipe`]).
        token (`str` or `bool`, *optional*):
            Hub token.

    Returns:
        [`MergePlanSummary`]: print it with `.format()`.
    """
    from ..ingredients import parse_reference

    models: list[ModelPlan] = []
    refs: list[tuple[str, Any]] = [("ingredient", s) for s in recipe.ingredients]
    folder = recipe.ingredients_dir()
    if folder is not None:
        from ..ingredients import expand_ingredients_dir
        from ..publishing.recipe_file import IngredientSpec

        expanded = expand_ingredients_dir(Path(folder)) or []
        refs = [("ingredient", IngredientSpec(model=str(i.reference), revision=i.revision)) for i in expanded]
    if recipe.base_model is not None:
        refs.append(("base", recipe.base_model))
    for role, spec in refs:
        assert spec.model is not None
        if os.path.exists(spec.model):
            models.append(_plan_local(role, spec.model))
        else:
            repo_id, rev = parse_reference(spec.model)
            models.append(
                _plan_hub(role, repo_id, spec.revision or rev or recipe.revision, token, recipe.cache_dir)
            )
    adapter_bases = [m.adapter_base for m in models if m.adapter_base]
    if adapter_bases and recipe.base_model is None:
        name, rev = parse_reference(adapter_bases[0])
        if os.path.exists(name):
            models.append(_plan_local("base", name))
        else:
            models.append(_plan_hub("base", name, rev, token, recipe.cache_dir))
    ingredients = [m for m in models if m.role == "ingredient"]
    ref = next((m for m in ingredients if m.float_numel is not None), None)
    if ref is None and adapter_bases:
        ref = next((m for m in models if m.role == "base" and m.float_numel is not None), None)
    soup_bytes = None
    peak = None
    if ref is not None:
        itemsize = _ITEMSIZE.get(recipe.dtype or ref.dtype or "float32", 4)
        soup_bytes = ref.float_numel * itemsize + (ref.other_bytes or 0)
        buffers = max((m.max_tensor_bytes or 0) for m in models) + 4 * (ref.max_tensor_numel or 0)
        peak = _RUNTIME_BYTES + buffers
        if recipe.needs_eval() or recipe.method == "greedy":
            peak += soup_bytes + 4 * ref.float_numel  # live model + float32 running sum
    elif ingredients and all(m.weight_bytes for m in ingredients):
        soup_bytes = ingredients[0].weight_bytes
    downloads = [m.download_bytes for m in models]
    download_total = None if any(d is None for d in downloads) else sum(d for d in downloads if d)
    eval_sets = {name: str(spec.data) for name, spec in (recipe.eval or {}).items()}
    summary = MergePlanSummary(
        method=recipe.method,
        models=models,
        output_dir=recipe.output_dir,
        push_to_hub=recipe.push_to_hub,
        soup_bytes=soup_bytes,
        peak_memory_bytes=peak,
        download_bytes=download_total,
        evaluates=recipe.needs_eval(),
        eval_sets=eval_sets,
    )
    if recipe.output_dir:
        summary.free_disk_output = free_disk(Path(recipe.output_dir))
        if soup_bytes and summary.free_disk_output is not None and summary.free_disk_output < soup_bytes:
            summary.warnings.append(
                f"not enough free disk at {recipe.output_dir}: the soup needs {human_bytes(soup_bytes)}, "
                f"{human_bytes(summary.free_disk_output)} free"
            )
    if download_total:
        from huggingface_hub import constants

        summary.free_disk_cache = free_disk(Path(recipe.cache_dir or constants.HF_HUB_CACHE))
        if summary.free_disk_cache is not None and summary.free_disk_cache < download_total:
            summary.warnings.append(
                f"not enough free disk in the HF cache: {human_bytes(download_total)} to download, "
                f"{human_bytes(summary.free_disk_cache)} free"
            )
    for m in models:
        if m.note and "cannot reach" in m.note:
            summary.warnings.append(f"{m.reference}: {m.note}")
    _dry_run_check(summary, refs, recipe)
    return summary


def _dry_run_check(summary: MergePlanSummary, refs: list[tuple[str, Any]], recipe: Any) -> None:
    """Run the compatibility checker on what is already on disk (local folders, the HF cache): no download."""
    from .. import adapters  # noqa: F401  (adapter ingredients resolve through it)
    from ..errors import SoupError
    from ..ingredients import Ingredient, resolve

    if any(role == "base" for role, _ in refs) and recipe.method != "wise-ft":
        refs = [
            (role, spec) for role, spec in refs if role != "base"
        ]  # a base only measures (adapters: bound)
    resolved = []
    try:
        for _, spec in refs:
            ing = Ingredient(spec.model, revision=spec.revision or None)
            resolved.append(resolve(ing, cache_dir=recipe.cache_dir, local_files_only=True))
        if any(r.kind == "adapter" for r in resolved):
            summary.warnings.append(
                "adapters: compatibility is checked when cooking (their base is bound then)"
            )
            return
        report, _ = check_ingredients(
            resolved, reference_index=len(resolved) - 1 if recipe.method == "wise-ft" else 0
        )
    except SoupError as e:
        summary.warnings.append(f"compatibility not checked before cooking: {str(e).splitlines()[0]}")
        return
    finally:
        for r in resolved:
            r.close()
    summary.compatibility_checked = True
    summary.problems += [p.message for p in report.fatal]
    summary.warnings += [p.message for p in report.warnings]


__all__ = [
    "InspectionReport",
    "MergePlanSummary",
    "ModelSummary",
    "inspect_models",
    "plan_merge",
    "tokenizer_vocab_hash",
]
