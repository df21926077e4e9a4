"""The compatibility checker: one set of rules, used by `merge_models`, `hf-soups inspect` and `--dry-run`.

[`check_ingredients`] runs every rule over the resolved ingredients and returns a [`CompatibilityReport`]
that lists *every* problem at once, each with its severity (`"fatal"` or `"warning"`), the ingredient and
tensor concerned and a message that says how to fix it. Merging ([`align.build_plan`]) raises the first
fatal problem as an [`IncompatibleIngredientsError`]; `inspect` prints the whole report.

The rules, in the order they are reported:

- `config`: structural config fields ([`STRUCTURAL_CONFIG_KEYS`]) differ.
- `architecture`: the model classes (`config.architectures`) differ.
- `vocab`: the vocabulary sizes differ.
- `tokenizer`: the tokenizer files map tokens to different ids (fatal), or some ingredients have none
  (warning: the check cannot be made for them).
- `labels`: the label sets differ, or a label map that needs re-ordering repeats a label (fatal); label
  orders differ (warning: the head rows are permuted).
- `duplicate`: the same model given twice (warning: it counts twice, doubling its weight).
- `adapter`: adapters mixed with full models (warning).
- `tied-embeddings`: ingredients disagree on `tie_word_embeddings` (warning: the soup is untied, see below).
- `tensors`: a tensor stored twice, missing or extra tensors, shapes, floating point vs integer dtypes.
- `basin` (measured while streaming, see [`DistanceStats`]): the ingredients are too far apart to share
  one pre-trained starting point (warning).

Tied embeddings: a model whose config says `tie_word_embeddings=True` computes exactly what an untied model
whose output embeddings (`lm_head.weight`, ...) equal its input embeddings computes. So the rule is
order-free: when every ingredient is tied the soup is tied (the stored copies of tied heads are ignored, as
`from_pretrained` ignores them); when any ingredient is untied the soup is untied
(`tie_word_embeddings=False`) and each tied ingredient contributes its input embeddings as its output
embeddings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import IncompatibleIngredientsError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..ingredients import ResolvedIngredient
    from .sources import TensorInfo

logger = logging.getLogger(__name__)

FATAL = "fatal"
WARNING = "warning"

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Output-embedding tensors that checkpoints omit when they are tied to the input embeddings.
TIED_OUTPUT_SUFFIXES = (
    "lm_head.weight",
    "cls.predictions.decoder.weight",
    "embed_out.weight",
    "output.weight",
)
INPUT_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "word_embeddings.weight",
    "wte.weight",
    "shared.weight",
    "tok_embeddings.weight",
)
HEAD_NAME_PARTS = ("classifier", "score", "classification_head", "out_proj", "logits", "head")
# Config fields whose difference makes ingredients incompatible (beyond what tensor shapes reveal).
STRUCTURAL_CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)
# How many problems of one kind are listed per ingredient before "and N more".
_MAX_LISTED = 5

# Relative distance ||a - b|| / ((||a|| + ||b||) / 2) (per tensor, averaged weighted by size) above which two
# ingredients cannot come from one pre-trained starting point. Calibrated in benchmarks/basin_calibration.py
# (benchmarks/results/basin_calibration.json): fine-tunes of all-MiniLM-L6-v2 (30 steps, lr 2e-5 to 1e-4,
# three seeds) measure 0.004-0.008 from each other and 0.002-0.008 from their base; independently initialised
# models of its config 1.414 (sqrt(2): unrelated vectors of equal norm), 1.57 from the pre-trained weights;
# the test suite's tiny "fine-tuned-like" models (one init + heavy noise) 0.65, tiny independent inits 1.21.
# 1.0 (a cosine of 0.5 between two weight vectors of equal norm) sits between with a wide margin.
BASIN_THRESHOLD = 1.0


# ================================================================================================ names


def normalize_key(key: str) -> str:
    """Remove wrapper prefixes added by DDP (`module.`) and `torch.compile` (`_orig_mod.`)."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key.replace("._orig_mod.", ".")


def label_list(config: dict[str, Any]) -> list[str] | None:
    """The labels of `config["id2label"]` in id order (None when there is no usable label map)."""
    id2label = config.get("id2label")
    if not id2label or not isinstance(id2label, dict):
        return None
    try:
        return [str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k))]
    except (TypeError, ValueError):
        return None


def _is_default_labels(labels: list[str]) -> bool:
    return all(label == f"LABEL_{i}" for i, label in enumerate(labels))


def ties_embeddings(config: dict[str, Any]) -> bool:
    """Whether a model ties its output embeddings to its input embeddings (transformers' default: yes)."""
    return bool(config.get("tie_word_embeddings", True))


def tokenizer_vocab_hash(folder: Path | None) -> str | None:
    """A short hash of a tokenizer's vocabulary (token -> id), or None when the folder holds no tokenizer.

    Only the vocabulary counts: truncation, padding or chat-template settings may differ between
    fine-tunes without changing what the token ids mean.
    """
    if folder is None:
        return None
    folder = Path(folder)
    digest = hashlib.sha256()
    found = False
    tok_json = folder / "tokenizer.json"
    if tok_json.is_file():
        try:
            data = json.loads(tok_json.read_text(encoding="utf-8"))
            model = data.get("model", {})
            digest.update(json.dumps(model.get("vocab"), sort_keys=True).encode())
            digest.update(json.dumps(model.get("merges"), sort_keys=False).encode())
            added = sorted((t.get("id"), t.get("content")) for t in data.get("added_tokens", []))
            digest.update(json.dumps(added).encode())
            found = True
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass
    if not found:
        for name in ("vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model"):
            f = folder / name
            if f.is_file():
                digest.update(name.encode())
                digest.update(f.read_bytes())
                found = True
        added = folder / "added_tokens.json"
        if found and added.is_file():
            digest.update(added.read_bytes())
    return digest.hexdigest()[:12] if found else None


# ================================================================================================ report


@dataclass
class Problem:
    """One finding of the checker.

    Attributes:
        severity (`str`): `"fatal"` (the ingredients cannot be souped) or `"warning"` (the soup is made, but
            read the message).
        check (`str`): the rule that found it (`"config"`, `"architecture"`, `"vocab"`, `"tokenizer"`,
            `"labels"`, `"duplicate"`, `"adapter"`, `"tied-embeddings"`, `"tensors"`, `"basin"`, ...).
        message (`str`): what is wrong and how to fix it.
        ingredient (`str`, *optional*): the ingredient concerned.
        tensor_name (`str`, *optional*): the tensor concerned.
    """

    severity: str
    check: str
    message: str
    ingredient: str | None = None
    tensor_name: str | None = None

    @property
    def fatal(self) -> bool:
        return self.severity == FATAL

    def to_error(self) -> IncompatibleIngredientsError:
        """The error `merge_models` raises for this problem."""
        return IncompatibleIngredientsError(
            self.message, ingredient=self.ingredient, tensor_name=self.tensor_name
        )


@dataclass
class CompatibilityReport:
    """Every problem the checker found, in rule order.

    Attributes:
        names (`list[str]`): the ingredients checked (a base model last, when given).
        problems (`list[Problem]`): fatal problems and warnings, in the order the rules ran.
    """

    names: list[str]
    problems: list[Problem] = field(default_factory=list)

    @property
    def fatal(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if not p.fatal]

    @property
    def compatible(self) -> bool:
        """No fatal problem."""
        return not self.fatal

    def add(
        self,
        severity: str,
        check: str,
        message: str,
        *,
        ingredient: str | None = None,
        tensor_name: str | None = None,
    ) -> Problem:
        problem = Problem(severity, check, message, ingredient, tensor_name)
        self.problems.append(problem)
        return problem

    def raise_first_fatal(self) -> None:
        """Raise the first fatal problem as an [`IncompatibleIngredientsError`] (no-op when compatible).

        Raises:
            [`IncompatibleIngredientsError`]: naming the ingredient and the tensor.
        """
        for p in self.problems:
            if p.fatal:
                raise p.to_error()

    def log_warnings(self) -> None:
        for p in self.warnings:
            logger.warning(p.message)

    def to_dict(self) -> dict[str, Any]:
        return {
            "compatible": self.compatible,
            "names": self.names,
            "problems": [asdict(p) for p in self.problems],
        }


@dataclass
class Alignment:
    """What the rules learned that building the plan needs (only when there is no fatal problem)."""

    output_names: list[str]  # output tensor names, in order
    key_maps: list[dict[str, str]]  # per member: output name -> stored key
    infos: list[dict[str, TensorInfo]]  # per member: output name -> stored shape / dtype
    permutations: list[list[int] | None]  # per member: head rows into the reference's label order
    head_keys: set[str]  # tensors whose rows are permuted
    config: dict[str, Any]  # the soup's config


# ================================================================================================ rules


def check_ingredients(
    members: Sequence[ResolvedIngredient], *, reference_index: int = 0
) -> tuple[CompatibilityReport, Alignment | None]:
    """Run every compatibility rule over `members`; nothing is merged and no tensor is read.

    Args:
        members (`Sequence[ResolvedIngredient]`):
            Every model taking part (a WiSE-FT base included), opened lazily (headers only).
        reference_index (`int`, defaults to 0):
            The member whose tensor names, label order and config the soup takes.

    Returns:
        `tuple[CompatibilityReport, Alignment | None]`: the report, and the alignment the plan is built
        from (None when the report has a fatal problem).

    Raises:
        [`CorruptCheckpointError`], [`IngredientNotFoundError`]: a weight file cannot be read.

    Example:

    ```python
    >>> from hf_soups.core.compat import check_ingredients
    >>> report, _ = check_ingredients(resolved)  # doctest: +SKIP
    >>> [p.message for p in report.fatal]  # doctest: +SKIP
    ```
    """
    report = CompatibilityReport(names=[m.name for m in members])
    ref = members[reference_index]
    perms = _check_configs(report, members, ref)
    _check_tokenizers(report, members)
    _check_duplicates(report, members)
    _check_kinds(report, members, ref)
    alignment = _check_tensors(report, members, reference_index, perms)
    return report, (alignment if report.compatible else None)


def _check_configs(
    report: CompatibilityReport, members: Sequence[ResolvedIngredient], ref: ResolvedIngredient
) -> list[list[int] | None]:
    """Structural fields, architecture class, vocabulary size and labels; returns label permutations."""
    ref_cfg = ref.config or {}
    ref_arch = (ref_cfg.get("architectures") or [None])[0]
    ref_labels = label_list(ref_cfg)
    perms: list[list[int] | None] = []
    for ing in members:
        if ing is ref:
            perms.append(None)
            continue
        cfg = ing.config or {}
        for key in STRUCTURAL_CONFIG_KEYS:
            if key in ref_cfg and key in cfg and ref_cfg[key] != cfg[key]:
                report.add(
                    FATAL,
                    "config",
                    f"Ingredients {ref.name!r} and {ing.name!r} have different architectures: config field "
                    f"{key!r} is {ref_cfg[key]!r} vs {cfg[key]!r}. A soup needs fine-tunes of one pre-trained "
                    "model; leave the odd one out.",
                    ingredient=ing.name,
                )
        arch = (cfg.get("architectures") or [None])[0]
        if ref_arch and arch and ref_arch != arch:
            report.add(
                FATAL,
                "architecture",
                f"Ingredients {ref.name!r} and {ing.name!r} have different architecture classes: {ref_arch} vs "
                f"{arch}. Souping needs the same model class (same head); re-save one with the other's class or "
                "leave it out.",
                ingredient=ing.name,
            )
        if "vocab_size" in ref_cfg and "vocab_size" in cfg and ref_cfg["vocab_size"] != cfg["vocab_size"]:
            report.add(
                FATAL,
                "vocab",
                vocab_message(ref.name, ref_cfg["vocab_size"], ing.name, cfg["vocab_size"]),
                ingredient=ing.name,
            )
        perms.append(_check_labels(report, ref, ing, ref_labels, label_list(cfg)))
    return perms


def _check_labels(
    report: CompatibilityReport,
    ref: ResolvedIngredient,
    ing: ResolvedIngredient,
    ref_labels: list[str] | None,
    labels: list[str] | None,
) -> list[int] | None:
    if ref_labels is None or labels is None or ref_labels == labels:
        return None
    if sorted(ref_labels) != sorted(labels):
        report.add(
            FATAL,
            "labels",
            f"Ingredients {ref.name!r} and {ing.name!r} were fine-tuned for different labels: {ref_labels} vs "
            f"{labels}. Their classification heads cannot be averaged; soup only models trained on the same "
            "label set.",
            ingredient=ing.name,
        )
        return None
    if _is_default_labels(ref_labels) and _is_default_labels(labels):
        return None
    for owner, names in ((ing, labels), (ref, ref_labels)):
        repeated = sorted({label for label in names if names.count(label) > 1})
        if repeated:
            report.add(
                FATAL,
                "labels",
                f"Ingredient {owner.name!r} lists label {repeated[0]!r} more than once in its id2label "
                f"({names}), and {ing.name!r} orders its labels differently from {ref.name!r}: the head rows "
                "cannot be matched one to one. Give every class a distinct name in config.json's id2label "
                "(and label2id) of each ingredient, in the order its head was trained with.",
                ingredient=owner.name,
            )
            return None
    logger.info("Ingredient %r lists its labels in another order; its head rows will be permuted.", ing.name)
    report.add(
        WARNING,
        "labels",
        f"Ingredient {ing.name!r} lists its labels in another order ({labels}) than {ref.name!r} "
        f"({ref_labels}); its head rows are permuted to match.",
        ingredient=ing.name,
    )
    return [labels.index(label) for label in ref_labels]


def vocab_message(ref_name: str, ref_vocab: int, name: str, vocab: int) -> str:
    return (
        f"Ingredient {name!r} has a vocabulary of {vocab} tokens but {ref_name!r} has {ref_vocab}: its embeddings "
        "were resized (tokens added?). hf_soups does not truncate embeddings silently. Use ingredients fine-tuned "
        "with the same tokenizer, or resize every ingredient to one vocabulary with "
        "model.resize_token_embeddings(...) (after adding the same tokens) and re-save them."
    )


def _tokenizer_folder(member: ResolvedIngredient) -> Path | None:
    if member.path is not None and tokenizer_vocab_hash(member.path) is not None:
        return Path(member.path)
    base = getattr(getattr(member, "adapter", None), "base", None)  # an adapter: its base's tokenizer
    if base is not None and base.path is not None:
        return Path(base.path)
    return member.path


def _check_tokenizers(report: CompatibilityReport, members: Sequence[ResolvedIngredient]) -> None:
    """Same vocabulary size is not the same tokenizer: compare the vocabularies (token -> id) themselves."""
    hashes = [tokenizer_vocab_hash(_tokenizer_folder(m)) for m in members]
    known = [(m, h) for m, h in zip(members, hashes) if h is not None]
    if not known:
        return
    if any(p.check == "vocab" for p in report.problems):
        return  # the vocabulary sizes already differ: that is the problem to fix first
    first, first_hash = known[0]
    for m, h in known[1:]:
        if h != first_hash:
            report.add(
                FATAL,
                "tokenizer",
                f"Ingredients {first.name!r} and {m.name!r} have different tokenizers (same vocabulary size, but "
                "their tokenizer files map tokens to different ids): their embedding rows mean different tokens "
                "and cannot be averaged. Soup only models fine-tuned with the same tokenizer (check which "
                "pre-trained model each was fine-tuned from), or leave one out.",
                ingredient=m.name,
            )
    absent = [m.name for m, h in zip(members, hashes) if h is None]
    if absent:
        report.add(
            WARNING,
            "tokenizer",
            f"No tokenizer files for {', '.join(map(repr, absent))} (the others have them): hf_soups cannot check "
            "that every ingredient uses the same tokenizer. Averaging models with different tokenizers gives a "
            f"broken soup; save each ingredient's tokenizer beside it (tokenizer.save_pretrained) to check it.",
            ingredient=absent[0],
        )


def _identity(member: ResolvedIngredient) -> tuple[str, str] | None:
    """What makes two references the same model: the resolved folder, or the object itself."""
    ref = member.ingredient.reference
    if not isinstance(ref, str):
        return ("object", str(id(ref)))
    if member.path is not None:
        return ("path", os.path.realpath(member.path))
    return None


def _check_duplicates(report: CompatibilityReport, members: Sequence[ResolvedIngredient]) -> None:
    seen: dict[tuple[str, str], ResolvedIngredient] = {}
    for m in members:
        key = _identity(m)
        if key is None:
            continue
        if key in seen:
            first = seen[key]
            what = "the same object" if key[0] == "object" else f"the same model ({key[1]})"
            report.add(
                WARNING,
                "duplicate",
                f"Ingredients {first.name!r} and {m.name!r} are {what}: it is counted twice, which doubles its "
                "weight in the soup. Pass it once (use weights= to weight it on purpose).",
                ingredient=m.name,
            )
        else:
            seen[key] = m


def _check_kinds(
    report: CompatibilityReport, members: Sequence[ResolvedIngredient], ref: ResolvedIngredient
) -> None:
    for m in members:
        if m is not ref and (ref.kind == "adapter") != (m.kind == "adapter"):
            what = "an adapter" if m.kind == "adapter" else "a full model"
            ref_what = "an adapter" if ref.kind == "adapter" else "a full model"
            report.add(
                WARNING,
                "adapter",
                f"{m.name!r} is {what} and {ref.name!r} is {ref_what}: adapters take part merged into their base "
                "(base + scale * B @ A).",
                ingredient=m.name,
            )


def _output_embeddings(mapping: dict[str, str], info: dict[str, TensorInfo]) -> dict[str, str]:
    """Output-embedding tensor -> the input embedding of the same shape it can be tied to."""
    out = {}
    inputs = [k for k in mapping if k.endswith(INPUT_EMBEDDING_SUFFIXES)]
    for key in mapping:
        if key.endswith(TIED_OUTPUT_SUFFIXES) and not key.endswith(INPUT_EMBEDDING_SUFFIXES):
            for candidate in inputs:
                if info[candidate].shape == info[key].shape:
                    out[key] = candidate
                    break
    return out


def _check_tensors(
    report: CompatibilityReport,
    members: Sequence[ResolvedIngredient],
    reference_index: int,
    perms: list[list[int] | None],
) -> Alignment:
    ref = members[reference_index]
    key_maps: list[dict[str, str]] = []  # normalised -> stored key
    infos: list[dict[str, TensorInfo]] = []
    for ing in members:
        src = ing.open()
        mapping: dict[str, str] = {}
        info: dict[str, TensorInfo] = {}
        for key in src.keys():
            norm = normalize_key(key)
            if norm in mapping:
                report.add(
                    FATAL,
                    "tensors",
                    f"Ingredient {ing.name!r} stores tensor {norm!r} twice (as {mapping[norm]!r} and {key!r}). "
                    "Re-save it with save_pretrained.",
                    ingredient=ing.name,
                    tensor_name=norm,
                )
                continue
            mapping[norm] = key
            info[norm] = src.info(key)
        key_maps.append(mapping)
        infos.append(info)

    # Tied output embeddings: a tied member's stored copy is ignored (from_pretrained ignores it too).
    tied = [ties_embeddings(m.config or {}) for m in members]
    tie_pairs: list[dict[str, str]] = []
    for i, tie in enumerate(tied):
        pairs = _output_embeddings(key_maps[i], infos[i])
        tie_pairs.append(pairs)
        if tie:
            for out_key in pairs:
                key_maps[i].pop(out_key)
                infos[i].pop(out_key)
    soup_tied = all(tied)
    config = dict(ref.config or {})
    output_names = list(key_maps[reference_index])
    if not soup_tied:
        untied_heads = {
            k: infos[i][k]
            for i, tie in enumerate(tied)
            if not tie
            for k in key_maps[i]
            if k.endswith(TIED_OUTPUT_SUFFIXES) and not k.endswith(INPUT_EMBEDDING_SUFFIXES)
        }
        filled = set()
        for i, tie in enumerate(tied):
            if not tie:
                continue
            inputs = [k for k in key_maps[i] if k.endswith(INPUT_EMBEDDING_SUFFIXES)]
            for head, head_info in untied_heads.items():
                if head in key_maps[i]:
                    continue
                source = next((k for k in inputs if infos[i][k].shape == head_info.shape), None)
                if source is not None:
                    key_maps[i][head] = key_maps[i][source]
                    infos[i][head] = infos[i][source]
                    filled.add(head)
        for head in untied_heads:
            if head not in output_names and tied[reference_index]:
                output_names.append(head)
        tied_names = [m.name for m, t in zip(members, tied) if t]
        if tied_names:
            untied_names = [m.name for m, t in zip(members, tied) if not t]
            heads = ", ".join(map(repr, sorted(filled))) or "output embeddings"
            report.add(
                WARNING,
                "tied-embeddings",
                f"{', '.join(map(repr, tied_names))} tie(s) the output embeddings to the input embeddings "
                f"(tie_word_embeddings=True) but {', '.join(map(repr, untied_names))} do(es) not: the soup is "
                f"untied (tie_word_embeddings=False) and each tied ingredient contributes its input embeddings "
                f"as its {heads}. To keep a tied soup, leave out the untied ingredients.",
                ingredient=tied_names[0],
            )
            config["tie_word_embeddings"] = False

    ref_keys = set(output_names)
    for i, ing in enumerate(members):
        if i == reference_index:
            continue
        missing = [k for k in output_names if k not in key_maps[i]]
        extra = [k for k in key_maps[i] if k not in ref_keys]
        if missing:
            hint = ""
            untied_missing = [k for k in missing if k in tie_pairs[i] or k.endswith(TIED_OUTPUT_SUFFIXES)]
            if untied_missing and not tied[i]:
                hint = (
                    f" Its config says tie_word_embeddings=False but it stores no {untied_missing[0]!r}: if its "
                    "output embeddings are tied, set tie_word_embeddings to true in its config.json."
                )
            report.add(
                FATAL,
                "tensors",
                f"Ingredient {ing.name!r} lacks {len(missing)} tensor(s) that {ref.name!r} has: {sample(missing)}. "
                "Ingredients must be the same architecture with the same head; check that every model was saved "
                "from the same model class." + hint,
                ingredient=ing.name,
                tensor_name=missing[0],
            )
        if extra:
            report.add(
                FATAL,
                "tensors",
                f"Ingredient {ing.name!r} has {len(extra)} tensor(s) that {ref.name!r} lacks: {sample(extra)}. "
                "Ingredients must be the same architecture with the same head; check that every model was saved "
                "from the same model class.",
                ingredient=ing.name,
                tensor_name=extra[0],
            )

    ref_info = infos[reference_index]
    ref_labels = label_list(ref.config or {}) or []
    head_keys: set[str] = set()
    if any(p is not None for p in perms):
        head_keys = set(_head_keys(output_names, ref_info, len(ref_labels)))
        if not head_keys:
            report.add(
                FATAL,
                "labels",
                f"Ingredients list their labels in different orders but no classification-head tensor with "
                f"{len(ref_labels)} rows was found in {ref.name!r}; cannot align the heads. Re-save the "
                "ingredients with the same id2label order.",
                ingredient=ref.name,
            )

    for i, ing in enumerate(members):
        if i == reference_index:
            continue
        shapes = dtypes = 0
        for name in output_names:
            other = infos[i].get(name)
            if other is None:
                continue
            want = ref_info[name]
            if tuple(other.shape) != tuple(want.shape):
                shapes += 1
                if shapes <= _MAX_LISTED:
                    report.add(
                        FATAL,
                        "tensors",
                        shape_message(ref, ing, name, tuple(want.shape), tuple(other.shape)),
                        ingredient=ing.name,
                        tensor_name=name,
                    )
            elif want.dtype.is_floating_point and not other.dtype.is_floating_point:
                dtypes += 1
                if dtypes <= _MAX_LISTED:
                    report.add(
                        FATAL,
                        "tensors",
                        f"Tensor {name!r} is floating point in {ref.name!r} but {other.dtype} in {ing.name!r}.",
                        ingredient=ing.name,
                        tensor_name=name,
                    )
        for count, what in ((shapes, "shape"), (dtypes, "dtype")):
            if count > _MAX_LISTED:
                report.add(
                    FATAL,
                    "tensors",
                    f"... and {count - _MAX_LISTED} more tensor {what} difference(s) in {ing.name!r}.",
                    ingredient=ing.name,
                )
    return Alignment(
        output_names=output_names,
        key_maps=key_maps,
        infos=infos,
        permutations=perms,
        head_keys=head_keys,
        config=config,
    )


def _head_keys(keys: Sequence[str], infos: dict[str, TensorInfo], num_labels: int) -> list[str]:
    out = []
    for key in keys:
        info = infos[key]
        if not info.shape or info.shape[0] != num_labels:
            continue
        parts = key.split(".")
        if any(p in HEAD_NAME_PARTS for p in parts[:-1]):
            out.append(key)
    return out


def sample(keys: Sequence[str], n: int = 8) -> str:
    """`'a', 'b', 'c' and 5 more`."""
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def shape_message(ref, ing, name: str, shape: tuple, other: tuple) -> str:
    vocab = (ref.config or {}).get("vocab_size")
    if vocab and shape and other and shape[0] == vocab and other[0] != vocab and shape[1:] == other[1:]:
        return (
            vocab_message(ref.name, shape[0], ing.name, other[0]) + f" (tensor {name!r}: {shape} vs {other})"
        )
    return (
        f"Tensor {name!r} has shape {tuple(shape)} in {ref.name!r} but {tuple(other)} in {ing.name!r}. "
        "Ingredients must share one architecture and head size; leave the odd one out."
    )


# ================================================================================================ one basin


class DistanceStats:
    """How far apart the ingredients are, gathered while their tensors stream by.

    Per tensor, the Gram matrix `G[i, j] = <theta_i, theta_j>` of the members taking part is accumulated in
    float64 (a few dot products on slices the engine has already read); squared distances
    `||theta_i - theta_j||^2 = G_ii + G_jj - 2 G_ij`, norms, task-vector norms and cosines to a base all follow
    from it. While merging, the engine measures a sample (every `engine.STATS_STRIDE`-th element of one slice in
    `engine.STATS_EVERY` of a streamed tensor, an evenly strided sample of a tensor read whole), in float32:
    enough for a verdict at [`BASIN_THRESHOLD`], for a small part of the merge's time. `inspect` measures every element in float64.

    Args:
        names (`Sequence[str]`): the members, in plan order.
        threshold (`float`, *optional*, defaults to [`BASIN_THRESHOLD`]): the relative distance above which
            two members cannot share one pre-trained starting point.
    """

    def __init__(self, names: Sequence[str], threshold: float = BASIN_THRESHOLD):
        self.names = list(names)
        self.threshold = threshold
        self.members: list[int] = []
        self.tensors: dict[str, Any] = {}  # name -> (len(members) x len(members)) float64 Gram matrix
        self.numel: dict[str, int] = {}
        self.measured: dict[str, int] = {}
        self._measured: set[tuple[int, ...]] = set()
        self._warned: set[tuple[int, int]] = set()

    def begin(self, members: Sequence[int]) -> bool:
        """Start measuring `members` (indices into `names`); False when there is nothing new to measure."""
        key = tuple(members)
        if len(key) < 2 or key in self._measured:
            return False
        self.members = list(key)
        self.tensors = {}
        self.numel = {}
        self.measured = {}
        return True

    def add(self, name: str, rows: torch.Tensor, numel: int | None = None) -> None:
        """Add one slice of tensor `name` (one row per member; dot products in the rows' dtype, summed in float64).

        `numel`, when given, is the tensor's full size: the slices added for it are then a sample, scaled up.
        """
        self.add_gram(name, self.slice_gram(rows), rows.shape[1], numel=numel)

    @staticmethod
    def slice_gram(rows: torch.Tensor) -> torch.Tensor:
        """The float64 Gram matrix of one slice's rows (dot products in the rows' dtype): the part of [`add`]
        that may run on any thread; [`add_gram`] then adds it (in a fixed order, for the same sums every run)."""
        import torch

        return (rows @ rows.T).to(torch.float64)  # one matrix product: N^2 dot products at the cost of a few

    def add_gram(self, name: str, gram: torch.Tensor, measured: int, numel: int | None = None) -> None:
        """Add the [`slice_gram`] of one slice of `measured` elements of tensor `name` (see [`add`] for `numel`)."""
        self.measured[name] = self.measured.get(name, 0) + measured
        if numel is not None:
            self.numel[name] = numel
        acc = self.tensors.get(name)
        if acc is None:
            self.tensors[name] = gram
        else:
            acc.add_(gram)

    def tensor_gram(self, name: str):
        """The Gram matrix of one tensor (scaled up from its sample when it was sampled)."""
        return self.tensors[name] * self._scale(name)

    def _scale(self, name: str) -> float:
        numel = self.numel.get(name)
        return numel / self.measured[name] if numel else 1.0

    @property
    def sampled(self) -> set[str]:
        """Tensors measured on a sample of their elements."""
        return {name for name in self.tensors if self._scale(name) != 1.0}

    def end(self) -> list[Problem]:
        """Finish a measurement: the warnings for members too far apart (each pair is reported once, loudly)."""
        self._measured.add(tuple(self.members))
        problems = []
        summary = self.summary()
        if summary is None:
            return problems
        rel = summary["relative_distances"]
        for a in range(len(self.members)):
            for b in range(a + 1, len(self.members)):
                pair = (self.members[a], self.members[b])
                if rel[a][b] > self.threshold and pair not in self._warned:
                    self._warned.add(pair)
                    problem = Problem(
                        WARNING,
                        "basin",
                        basin_message(self.names[pair[0]], self.names[pair[1]], rel[a][b], self.threshold),
                        self.names[pair[1]],
                    )
                    logger.warning(problem.message)
                    problems.append(problem)
        return problems

    def gram(self):
        """The Gram matrix summed over every measured tensor (None before any)."""
        if not self.tensors:
            return None
        total = None
        for name, g in self.tensors.items():
            scaled = g * self._scale(name)
            total = scaled if total is None else total.add_(scaled)
        return total

    def summary(self, rows: int | None = None) -> dict[str, Any] | None:
        """Norms and distances (over all measured tensors) and relative distances of the first `rows` members.

        The relative distance of two members is the per-tensor `||a - b|| / ((||a|| + ||b||) / 2)`, averaged
        over tensors weighted by their number of elements (tensors that are zero in both are left out): every
        weight matrix counts by its size, and tensors that every model initialises alike (LayerNorm weights
        of 1, zero biases) do not mask matrices that share nothing.
        """
        total = self.gram()
        if total is None:
            return None
        n = total.shape[0] if rows is None else rows
        out = distances_from_gram(total[:n, :n])
        weighted = [[0.0] * n for _ in range(n)]
        weights = [[0.0] * n for _ in range(n)]
        for name, g in self.tensors.items():
            rel = distances_from_gram(g[:n, :n])["relative_distances"]
            norms = [float(g[i, i]) for i in range(n)]
            for i in range(n):
                for j in range(n):
                    if norms[i] > 0 or norms[j] > 0:
                        size = self.numel.get(name) or self.measured[name]
                        weighted[i][j] += size * rel[i][j]
                        weights[i][j] += size
        out["relative_distances"] = [
            [weighted[i][j] / weights[i][j] if weights[i][j] > 0 else 0.0 for j in range(n)] for i in range(n)
        ]
        return out


def distances_from_gram(g) -> dict[str, Any]:
    """`norms`, `distances` and `relative_distances` (`||a - b|| / ((||a|| + ||b||) / 2)`) from one Gram matrix."""
    n = g.shape[0]
    diag = [float(g[i, i]) for i in range(n)]
    norms = [math.sqrt(max(d, 0.0)) for d in diag]
    dist = [[math.sqrt(max(diag[i] + diag[j] - 2 * float(g[i, j]), 0.0)) for j in range(n)] for i in range(n)]
    rel = [
        [dist[i][j] / ((norms[i] + norms[j]) / 2) if norms[i] + norms[j] > 0 else 0.0 for j in range(n)]
        for i in range(n)
    ]
    return {"norms": norms, "distances": dist, "relative_distances": rel}


def basin_message(a: str, b: str, relative: float, threshold: float = BASIN_THRESHOLD) -> str:
    return (
        f"Ingredients {a!r} and {b!r} look independently initialised: their weights are {relative:.2f} of their "
        f"own norm apart (fine-tunes of one pre-trained model measure well below {threshold:g}; about 1.41 is "
        "two unrelated models). A soup of them will not work: average only fine-tunes of the same pre-trained "
        "checkpoint (check each one's base model), or leave the odd one out."
    )


__all__ = [
    "BASIN_THRESHOLD",
    "Alignment",
    "CompatibilityReport",
    "DistanceStats",
    "Problem",
    "check_ingredients",
    "label_list",
    "normalize_key",
    "tokenizer_vocab_hash",
]
