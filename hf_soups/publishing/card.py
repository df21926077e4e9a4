"""The model card of a soup: `huggingface_hub.ModelCard` metadata plus a body that carries the evidence.

The metadata follows the Hub's conventions for merged models: `base_model` lists the Hub IDs the soup
was made from, `base_model_relation: merge`, `tags` include `model-soup` and `merge`, `license` is set
only when every ingredient (and the base) declares the same one (otherwise the card says it is unknown and lists
each ingredient's), and `model-index` holds the held-out results when the
soup was evaluated. The body (from `hf_soups/publishing/templates/modelcard_template.md`) describes the recipe,
the ingredients, the soup against its best ingredient, the WiSE-FT curve or greedy steps, how to load
the soup and how to cook it again, and cites the two papers.

Writing a card makes no network call: ingredient licenses are read from the README.md files that are
already on disk (local folders, and the HF cache snapshot of Hub ingredients).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..lm_eval_task import describe_lm_eval
from .reporting import format_value, greater_is_better

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import ModelCard, ModelCardData

    from ..ingredients import Ingredient
    from ..soup import Soup

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).parent / "templates" / "modelcard_template.md"
SOUP_TAGS = ["model-soup", "merge", "hf-soups"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9][\w.\-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

# transformers architecture suffix -> (Hub pipeline tag, Auto class)
_TASKS: list[tuple[str, str | None, str]] = [
    ("ForSequenceClassification", "text-classification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "token-classification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "question-answering", "AutoModelForQuestionAnswering"),
    ("ForMultipleChoice", "multiple-choice", "AutoModelForMultipleChoice"),
    ("ForMaskedLM", "fill-mask", "AutoModelForMaskedLM"),
    ("ForCausalLM", "text-generation", "AutoModelForCausalLM"),
    ("LMHeadModel", "text-generation", "AutoModelForCausalLM"),
    ("ForConditionalGeneration", None, "AutoModelForSeq2SeqLM"),
    ("ForImageClassification", "image-classification", "AutoModelForImageClassification"),
    ("ForAudioClassification", "audio-classification", "AutoModelForAudioClassification"),
    ("ForObjectDetection", "object-detection", "AutoModelForObjectDetection"),
]


def build_model_card(soup: Soup, *, repo_id: str | None = None) -> ModelCard:
    """Build the model card of a soup.

    Args:
        soup ([`Soup`]):
            A cooked soup.
        repo_id (`str`, *optional*):
            The Hub repository the soup is (or will be) pushed to; used in the title and the loading
            snippet. Defaults to a placeholder path.

    Returns:
        `huggingface_hub.ModelCard`: the card; `card.data` holds the metadata, `str(card)` the README.md text.

    Example:

    ```python
    >>> card = soup.model_card()  # doctest: +SKIP
    >>> card.data.base_model_relation, card.data.tags  # doctest: +SKIP
    ('merge', ['model-soup', 'merge', 'hf-soups'])
    ```
    """
    from huggingface_hub import ModelCard

    directory = Path(soup.output_dir) if getattr(soup, "output_dir", None) else None
    return ModelCard(_card_text(*_build(soup, repo_id=repo_id, directory=directory)))


def write_model_card(soup: Soup, directory: str | os.PathLike, *, repo_id: str | None = None) -> Path:
    """Write the soup's model card as `README.md` in `directory` (created when missing).

    `Soup.save_pretrained` calls it on the temporary folder before renaming it into place, and
    `push_to_hub` calls it again with the target `repo_id`.

    Args:
        soup ([`Soup`]):
            A cooked soup.
        directory (`str` or `os.PathLike`):
            The soup folder.
        repo_id (`str`, *optional*):
            The Hub repository the card is written for.

    Returns:
        `Path`: the README.md written.

    Example:

    ```python
    >>> from hf_soups.publishing.card import write_model_card
    >>> write_model_card(soup, "my-soup")  # doctest: +SKIP
    PosixPath('my-soup/README.md')
    ```
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "README.md"
    path.write_text(_card_text(*_build(soup, repo_id=repo_id, directory=directory)), encoding="utf-8")
    return path


def _card_text(card_data: ModelCardData, template_kwargs: dict[str, Any]) -> str:
    """`str(ModelCard.from_template(card_data, template_path=TEMPLATE_PATH, **template_kwargs))`, the same text,
    without importing `huggingface_hub.repocard` (which pulls in the Hub client and its HTTP stack: a visible share
    of a local merge's time).

    As `from_template`, the template is rendered with the metadata's fields and `template_kwargs`; as
    `ModelCard(content)`, the metadata block is then parsed and written again from a `ModelCardData`, in its order.
    """
    import jinja2
    from huggingface_hub import ModelCardData

    values = card_data.to_dict().copy()
    values.update(template_kwargs)
    template = jinja2.Template(TEMPLATE_PATH.read_text(encoding="utf-8"))
    content = template.render(card_data=card_data.to_yaml(), **values)
    meta, body = _metadata_block(content)
    data = ModelCardData(**meta).to_yaml(line_break="\n", original_order=list(meta))
    return f"---\n{data}\n---\n{body}"


# the YAML block at the top of a card, as huggingface_hub.repocard.REGEX_YAML_BLOCK finds it
_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")


def _metadata_block(content: str) -> tuple[dict[str, Any], str]:
    """The metadata of a card's text (its leading YAML block, safely loaded; {} when none) and the body after it.

    Raises:
        `ValueError`: the block is not a mapping.
    """
    import yaml

    match = _YAML_BLOCK.search(content)
    if not match:
        return {}, content
    meta = yaml.safe_load(match.group(2)) or {}
    if not isinstance(meta, dict):
        raise ValueError("the card's metadata block is not a mapping")
    return meta, content[match.end() :]


# --------------------------------------------------------------------------------------------------
# ingredient facts
# --------------------------------------------------------------------------------------------------
def hub_id(ingredient: Ingredient | None) -> str | None:
    """The Hub repository ID of an ingredient, or None for local folders and in-memory models."""
    if ingredient is None:
        return None
    ref = ingredient.reference
    if not isinstance(ref, str) or not _HUB_ID.match(ref) or ref.startswith((".", "~")):
        return None
    if Path(ref).expanduser().exists():
        return None
    return ref


def _readme_path(ingredient: Ingredient) -> Path | None:
    """The README.md of an ingredient already on disk (local folder or HF cache snapshot), without network."""
    ref = ingredient.reference
    snapshot = ingredient.metadata.get("snapshot_path") if isinstance(ingredient.metadata, dict) else None
    candidates: list[Path] = []
    if snapshot:
        candidates.append(Path(snapshot) / "README.md")
    if isinstance(ref, str) and Path(ref).expanduser().is_dir():
        candidates.append(Path(ref).expanduser() / "README.md")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    repo = hub_id(ingredient)
    if repo is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    revision = ingredient.revision or ingredient.metadata.get("requested_revision") or "main"
    cache_dir = ingredient.metadata.get("cache_dir")
    try:
        found = try_to_load_from_cache(repo, "README.md", cache_dir=cache_dir, revision=revision)
    except Exception:  # a malformed cache must not break card writing
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def ingredient_metadata(ingredient: Ingredient | None) -> dict[str, Any]:
    """The YAML metadata of an ingredient's README.md when it is on disk ({} otherwise)."""
    if ingredient is None:
        return {}
    path = _readme_path(ingredient)
    if path is None:
        return {}
    try:
        return _metadata_block(path.read_text(encoding="utf-8"))[0]
    except Exception as e:  # a broken ingredient card only costs us its metadata
        logger.warning("Could not read the metadata of %s (%s); ignoring it in the soup's card.", path, e)
        return {}


@dataclass
class _LicenseVerdict:
    license: str | None
    license_name: str | None
    license_link: str | None
    note: str | None


def _declared_license(meta: dict[str, Any]) -> tuple[str, str | None, str | None] | None:
    """`(license, license_name, license_link)` one ingredient's card declares, or `None`."""
    lic = meta.get("license")
    if isinstance(lic, list):
        lic = lic[0] if len(lic) == 1 else None
    if isinstance(lic, str) and lic:
        return lic, meta.get("license_name"), meta.get("license_link")
    return None


def _license_verdict(members: list[tuple[str, dict[str, Any]]]) -> _LicenseVerdict:
    """The soup's license: known only when every member (ingredients and base) declares the same one.

    Otherwise the card sets none and its note says the license is unknown, listing each member's.
    """
    declared = {name: _declared_license(meta) for name, meta in members}
    distinct = {d[:2] for d in declared.values() if d is not None}
    if len(distinct) == 1 and all(d is not None for d in declared.values()):
        lic, lic_name, lic_link = next(iter(declared.values()))
        other = lic == "other"
        return _LicenseVerdict(lic, lic_name if other else None, lic_link if other else None, None)
    listing = ", ".join(f"{name}: {d[1] or d[0] if d else 'none declared'}" for name, d in declared.items())
    if not distinct:
        why = "no ingredient declares one"
    elif len(distinct) > 1:
        why = "the ingredients carry different licenses"
    else:
        why = "not every ingredient declares one"
    note = (
        f"**License:** unknown: {why} ({listing}), so this card sets none. A soup is a derivative of every "
        "ingredient: check each license before using or sharing it."
    )
    return _LicenseVerdict(None, None, None, note)


def _agreed(values: list[Any]) -> Any:
    values = [v for v in values if v]
    if not values:
        return None
    first = values[0]
    return first if all(v == first for v in values) else None


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)]


def _soup_config(soup: Soup, directory: Path | None) -> dict[str, Any]:
    config = getattr(soup, "_kitchen_config", None) or {}
    if config:
        return dict(config)
    for folder in (directory, Path(soup.output_dir) if soup.output_dir else None):
        if folder is not None and (folder / "config.json").is_file():
            try:
                return json.loads((folder / "config.json").read_text())
            except ValueError:
                pass
    model = getattr(soup, "_model", None)
    if model is not None and getattr(model, "config", None) is not None:
        return model.config.to_dict()
    return {}


def _task(config: dict[str, Any]) -> tuple[str | None, str, str | None]:
    """(pipeline tag, Auto class name, architecture) from a config."""
    arch = (config.get("architectures") or [None])[0]
    if arch:
        for suffix, tag, auto in _TASKS:
            if arch.endswith(suffix):
                return tag, auto, arch
    return None, "AutoModel", arch


def _is_adapter_soup(soup: Soup, directory: Path | None) -> bool:
    if soup.params.get("adapter_output") == "adapter":
        return True
    for folder in (directory, Path(soup.output_dir) if soup.output_dir else None):
        if (
            folder is not None
            and (folder / "adapter_config.json").is_file()
            and not any((folder / f).exists() for f in ("model.safetensors", "model.safetensors.index.json"))
        ):
            return True
    return False


# PEFT task types -> (Hub pipeline tag, Auto class)
_PEFT_TASKS = {
    "SEQ_CLS": ("text-classification", "AutoModelForSequenceClassification"),
    "TOKEN_CLS": ("token-classification", "AutoModelForTokenClassification"),
    "QUESTION_ANS": ("question-answering", "AutoModelForQuestionAnswering"),
    "CAUSAL_LM": ("text-generation", "AutoModelForCausalLM"),
    "SEQ_2_SEQ_LM": (None, "AutoModelForSeq2SeqLM"),
    "FEATURE_EXTRACTION": ("feature-extraction", "AutoModel"),
}


def _adapter_config(soup: Soup, directory: Path | None) -> dict[str, Any]:
    for folder in (directory, Path(soup.output_dir) if soup.output_dir else None):
        config_file = folder / "adapter_config.json" if folder is not None else None
        if config_file is not None and config_file.is_file():
            try:
                return json.loads(config_file.read_text())
            except ValueError:
                return {}
    return {}


def _adapter_base_id(adapter_config: dict[str, Any]) -> str | None:
    """The Hub ID of an adapter soup's base model, from its adapter_config.json (None for a local base)."""
    name = adapter_config.get("base_model_name_or_path")
    if isinstance(name, str) and _HUB_ID.match(name) and not Path(name).expanduser().exists():
        return name
    return None


# --------------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    return format_value(value, missing="–")


def _md(text: str) -> str:
    """Escape what would break a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _ingredient_label(ingredient: Ingredient) -> str:
    repo = hub_id(ingredient)
    name = _md(ingredient.name or str(ingredient.reference))
    if repo:
        return f"[{name}](https://huggingface.co/{repo})"
    return name


def _revision_cell(ingredient: Ingredient) -> str:
    rev = ingredient.revision
    requested = (
        ingredient.metadata.get("requested_revision") if isinstance(ingredient.metadata, dict) else None
    )
    if not rev:
        return "local" if isinstance(ingredient.reference, str) else "in memory"
    cell = f"`{rev[:12]}`" if _COMMIT.match(rev) else f"`{rev}`"
    if requested and requested != rev:
        cell += f" ({_md(requested)})"
    return cell


def _kept(ingredient: Ingredient) -> str:
    if ingredient.selected is not None:
        return "yes" if ingredient.selected else "no"
    if ingredient.weight is not None:
        return "yes" if ingredient.weight > 0 else "no"
    return "yes"


def _params(soup: Soup) -> list[tuple[str, str]]:
    out = []
    for key, value in soup.params.items():
        if value is None or isinstance(value, dict):
            continue
        out.append((key, _fmt(value)))
    return out


def _flatten_point(row: dict[str, Any]) -> dict[str, Any]:
    """One history point with nested `scores` ({eval set: {metric: value}}) spread into `set metric` columns."""
    out: dict[str, Any] = {}
    partial = row.get("partial")
    if isinstance(partial, dict):  # a greedy candidate rejected early: its scores cover part of one set only
        row = {k: v for k, v in row.items() if k not in ("scores", "partial")}
        row["partial"] = (
            f"stopped after {partial.get('units')}/{partial.get('of')} {partial.get('unit')}; "
            f"candidate_score is the best it could reach"
        )
    for key, value in row.items():
        if key == "scores" and isinstance(value, dict):
            for set_name, metrics in value.items():
                if isinstance(metrics, dict):
                    for metric, v in metrics.items():
                        out[f"{set_name} {metric}"] = v
                else:
                    out[str(set_name)] = metrics
        elif value is None or isinstance(value, (int, float, str, bool)):
            out[key] = value
    return out


def _curve(soup: Soup) -> tuple[str | None, list[str], list[list[str]]]:
    history = [_flatten_point(h) for h in (soup.history or []) if isinstance(h, dict)]
    if not history:
        return None, [], []
    header: list[str] = []
    for row in history:
        for key in row:
            if key not in header:
                header.append(key)
    # a nested copy of the primary score adds nothing
    if (
        "score" in header
        and soup.select_on
        and soup.metric_key
        and f"{soup.select_on} {soup.metric_key}" in header
    ):
        header.remove("score")
    rows = [[_md(_fmt(row.get(k))) for k in header] for row in history]
    header = [_md(h) for h in header]
    if soup.method == "wise-ft" or "alpha" in header:
        title = "WiSE-FT curve (held-out results along alpha; alpha = 0 is the base, 1 the fine-tuned end)"
    elif soup.method == "greedy":
        title = "Greedy soup steps (ingredients tried in order of held-out score)"
    elif soup.method == "learned":
        title = "Learned coefficients (softmax weights of each member, one row per group of tensors)"
    elif isinstance(soup.params.get("sweep"), dict):
        title = f"Sweep of {', '.join(soup.params['sweep'])} (each value scored on the held-out sets)"
    else:
        title = "Recipe steps"
    return title, header, rows


def _comparison(soup: Soup, metric: str) -> str | None:
    if soup.score is None:
        return None
    scored = [i for i in soup.ingredients if i.score is not None]
    where = f" on `{soup.select_on}`" if soup.select_on else ""
    text = f"The soup scores **{soup.score:.4f}** {metric}{where}."
    if scored:
        greater = greater_is_better(soup)
        best = (max if greater else min)(scored, key=lambda i: i.score)
        delta = soup.score - best.score
        better = delta > 0 if greater else delta < 0
        verdict = "better than" if better else ("as good as" if delta == 0 else "worse than")
        text += (
            f" The best single ingredient, {_md(best.name)}, scores {best.score:.4f}: the soup is {verdict} it "
            f"({delta:+.4f})."
        )
    baselines = (soup.report_extra or {}).get("baselines") if isinstance(soup.report_extra, dict) else None
    labels = {
        "uniform": "the uniform soup of every ingredient",
        "ensemble": "the output ensemble of every ingredient",
    }
    if isinstance(baselines, dict):
        extra = [
            f"{labels[key]}: {baselines[key]['score']:.4f}"
            for key in ("uniform", "ensemble")
            if isinstance(baselines.get(key), dict) and isinstance(baselines[key].get("score"), (int, float))
        ]
        if extra:
            text += " For reference, " + "; ".join(extra) + "."
    return text


def _eval_results(soup: Soup, task_type: str | None, dataset_ids: dict[str, dict[str, Any]]):
    from huggingface_hub import EvalResult

    results = []
    rows = []
    scores = dict(soup.scores or {})
    if not scores and soup.score is not None:
        scores = {soup.select_on or "eval": {soup.metric_key or "score": soup.score}}
    for set_name, metrics in scores.items():
        info = dataset_ids.get(set_name, {}) if isinstance(dataset_ids, dict) else {}
        for metric, value in (metrics or {}).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            rows.append({"set": _md(set_name), "metric": _md(metric), "value": _fmt(float(value))})
            results.append(
                EvalResult(
                    task_type=task_type or "other",
                    dataset_type=str(info.get("id") or info.get("type") or set_name),
                    dataset_name=str(info.get("name") or set_name),
                    dataset_config=info.get("config"),
                    dataset_split=info.get("split")
                    or (set_name if set_name in ("validation", "test", "train") else None),
                    dataset_revision=info.get("revision"),
                    metric_type=str(metric).split("/")[-1],
                    metric_value=float(value),
                    metric_name=f"held-out {metric}",
                )
            )
    return results, rows


def _eval_datasets(soup: Soup) -> dict[str, dict[str, Any]]:
    """Where each eval set came from, as the evaluator recorded it: `soup.report_extra["eval_datasets"][name]`
    (`id` = Hub dataset ID, `name`, `config`, `split`, `revision`, `task_id`, `metric`); `{}` when unknown."""
    extra = soup.report_extra if isinstance(soup.report_extra, dict) else {}
    info = extra.get("eval_datasets") or {}
    return {k: v for k, v in info.items() if isinstance(v, dict)} if isinstance(info, dict) else {}


# --------------------------------------------------------------------------------------------------
# the Hub's evaluation-results files (.eval_results/*.yaml)
# --------------------------------------------------------------------------------------------------
EVAL_RESULTS_DIR = ".eval_results"


def eval_result_entries(soup: Soup) -> dict[str, list[Any]]:
    """The soup's results in the Hub's `.eval_results/*.yaml` format, per Hub dataset ID.

    Only eval sets whose origin names a Hub dataset ID (`soup.report_extra["eval_datasets"][name]["id"]`, the same
    record the card's `model-index` reads) give an entry; a set known only by its name gives none, since these
    files feed the dataset's leaderboard on the Hub. One entry per such set: the value of its `metric` (when the
    record names the benchmark's metric), else of the soup's selection metric; `task_id` is the record's
    `task_id`, else its `config`, else `"default"`; `dataset_revision` only when it is a commit hash.

    Args:
        soup ([`Soup`]):
            A cooked soup.

    Returns:
        `dict[str, list[huggingface_hub.EvalResultEntry]]`: entries by dataset ID; `{}` when nothing qualifies or
        when the installed `huggingface_hub` has no `EvalResultEntry` (before 1.4).
    """
    try:
        from huggingface_hub import EvalResultEntry
    except ImportError:  # pragma: no cover - huggingface_hub < 1.4
        return {}
    scores = dict(soup.scores or {})
    out: dict[str, list[Any]] = {}
    for set_name, info in _eval_datasets(soup).items():
        dataset_id = info.get("id")
        if not (isinstance(dataset_id, str) and _HUB_ID.match(dataset_id)):
            continue
        metric = info.get("metric") or soup.metric_key
        value = (scores.get(set_name) or {}).get(metric) if metric else None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            logger.info("No .eval_results entry for %s: it has no %s score.", set_name, metric or "selection")
            continue
        revision = info.get("revision")
        split = f" ({info['split']} split)" if info.get("split") else ""
        out.setdefault(dataset_id, []).append(
            EvalResultEntry(
                dataset_id=dataset_id,
                task_id=str(info.get("task_id") or info.get("config") or "default"),
                value=float(value),
                dataset_revision=revision if isinstance(revision, str) and _COMMIT.match(revision) else None,
                notes=f"{metric}{split} of a {soup.method} soup, measured by hf_soups",
            )
        )
    return out


def write_eval_results(soup: Soup, directory: str | os.PathLike) -> list[Path]:
    """Write the soup's `.eval_results/<org>__<dataset>.yaml` files (see [`eval_result_entries`]) in `directory`.

    The folder's previous `.eval_results` (a copy of a streamed soup's) is replaced; nothing is written when no
    result qualifies.

    Args:
        soup ([`Soup`]):
            A cooked soup.
        directory (`str` or `os.PathLike`):
            The soup folder (or the staging folder of a push).

    Returns:
        `list[Path]`: the files written (empty when none).
    """
    import shutil

    import yaml
    from huggingface_hub import eval_result_entries_to_yaml

    folder = Path(directory) / EVAL_RESULTS_DIR
    if folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder)
    written = []
    for dataset_id, entries in eval_result_entries(soup).items():
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (dataset_id.replace("/", "__") + ".yaml")
        path.write_text(
            yaml.safe_dump(eval_result_entries_to_yaml(entries), sort_keys=False), encoding="utf-8"
        )
        written.append(path)
    return written


def _usage(repo: str, auto_class: str, has_tokenizer: bool, adapter_base: str | None) -> str:
    lines = [f"from transformers import {auto_class}" + (", AutoTokenizer" if has_tokenizer else ""), ""]
    if adapter_base is not None:
        lines = ["from peft import PeftModel", *lines]
        lines.append(f'base = {auto_class}.from_pretrained("{adapter_base}")')
        lines.append(f'model = PeftModel.from_pretrained(base, "{repo}")')
    else:
        lines.append(f'model = {auto_class}.from_pretrained("{repo}")')
    if has_tokenizer:
        lines.append(f'tokenizer = AutoTokenizer.from_pretrained("{repo}")')
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# the card
# --------------------------------------------------------------------------------------------------
def _build(
    soup: Soup, *, repo_id: str | None, directory: Path | None
) -> tuple[ModelCardData, dict[str, Any]]:
    """The card's metadata and the template's other values (rendered by [`_card_text`])."""
    from huggingface_hub import ModelCardData

    from ..recipes import get_recipe

    try:
        recipe = get_recipe(soup.method)
        pretty_name, reference_url = recipe.pretty_name, recipe.reference_url
    except Exception:  # an unregistered recipe still gets a card
        pretty_name, reference_url = soup.method, "https://arxiv.org/abs/2203.05482"

    config = _soup_config(soup, directory)
    arch_tag, auto_class, architecture = _task(config)
    adapter = _is_adapter_soup(soup, directory)
    base = soup.base

    members = [(i.name or str(i.reference), i) for i in soup.ingredients]
    if base is not None:
        members.append((base.name or str(base.reference), base))
    metas = {name: ingredient_metadata(ing) for name, ing in members}

    # base_model: the pre-trained base first (WiSE-FT, adapters), then the Hub ingredients
    base_models: list[str] = []
    base_id = hub_id(base)
    if adapter:
        adapter_config = _adapter_config(soup, directory)
        if base_id is None:
            base_id = _adapter_base_id(adapter_config)
        if architecture is None and adapter_config.get("task_type") in _PEFT_TASKS:
            arch_tag, auto_class = _PEFT_TASKS[adapter_config["task_type"]]
    if base_id:
        base_models.append(base_id)
    if not adapter:
        for ing in soup.ingredients:
            repo = hub_id(ing)
            if repo and repo not in base_models and (ing.selected is not False):
                base_models.append(repo)

    verdict = _license_verdict(list(metas.items()))
    pipeline_tag = _agreed([m.get("pipeline_tag") for m in metas.values()]) or arch_tag
    language = _agreed(
        [json.dumps(m.get("language"), sort_keys=True) if m.get("language") else None for m in metas.values()]
    )
    language = json.loads(language) if language else None

    eval_info = _eval_datasets(soup)
    datasets: list[str] = []
    for meta in metas.values():
        datasets.extend(d for d in _as_list(meta.get("datasets")) if d not in datasets)
    for info in eval_info.values():
        ds = info.get("id") if isinstance(info, dict) else None
        if isinstance(ds, str) and _HUB_ID.match(ds) and ds not in datasets:
            datasets.append(ds)

    eval_results, eval_rows = _eval_results(soup, pipeline_tag, eval_info)
    model_name = (
        repo_id.split("/")[-1]
        if repo_id
        else (Path(soup.output_dir).name if soup.output_dir else "model-soup")
    )

    tags = list(SOUP_TAGS)
    if soup.method not in tags:
        tags.append(soup.method)
    card_data = ModelCardData(
        base_model=base_models or None,
        library_name="peft" if adapter else "transformers",
        license=verdict.license,
        license_name=verdict.license_name,
        license_link=verdict.license_link,
        datasets=datasets or None,
        language=language,
        pipeline_tag=pipeline_tag,
        tags=tags,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    if base_models:
        card_data.base_model_relation = "merge"

    # body
    n = len(soup.ingredients)
    kept = [i for i in soup.ingredients if _kept(i) == "yes"]
    summary = f"A **{pretty_name}** of {len(kept)} fine-tuned model{'s' if len(kept) != 1 else ''}"
    if len(kept) != n:
        summary += f" (kept out of {n} candidates)"
    if base is not None:
        summary += (
            f", interpolated with the base model {_ingredient_label(base)}"
            if soup.method == "wise-ft"
            else (f" on the base model {_ingredient_label(base)}")
        )
    summary += "."
    metric = soup.metric_key or "score"
    score_header = f"Held-out {metric}" + (f" ({soup.select_on})" if soup.select_on else "")
    rows = []
    coefficients = list(soup.coefficients or [])
    for idx, ing in enumerate(soup.ingredients, start=1):
        weight = (
            ing.weight
            if ing.weight is not None
            else (coefficients[idx - 1] if idx - 1 < len(coefficients) else None)
        )
        rows.append(
            {
                "index": idx,
                "name": _ingredient_label(ing),
                "revision": _revision_cell(ing),
                "weight": _fmt(weight),
                "score": _fmt(ing.score),
                "kept": _kept(ing),
            }
        )
    selection = None
    if soup.method == "greedy":
        strict = soup.params.get("strict")
        worsen = "lower" if greater_is_better(soup) else "raise"
        rule = "strictly improves" if strict else f"does not {worsen}"
        selection = f"an ingredient is kept when adding it {rule} the held-out {metric}"
    elif soup.method == "wise-ft" and isinstance(soup.history, list) and len(soup.history) > 1:
        selection = f"alpha chosen on the held-out {metric} among {len(soup.history)} values"
    elif soup.method == "learned":
        from .reporting import learned_summary

        selection = " ".join(learned_summary(soup)) or None
    elif isinstance(soup.params.get("sweep"), dict) and len(soup.history) > 1:
        knobs = ", ".join(soup.params["sweep"])
        selection = f"{knobs} chosen on the held-out {metric} among {len(soup.history)} settings"
    curve_title, curve_header, curve_rows = _curve(soup)
    from .reporting import format_value, method_comparison

    methods_header, methods_rows = method_comparison(soup)
    methods_header = [_md(h) for h in methods_header]
    methods_rows = [[_md(format_value(c, "")) for c in row] for row in methods_rows]

    has_tokenizer = False
    for folder in (directory, Path(soup.output_dir) if soup.output_dir else None):
        if folder is not None and (folder / "tokenizer_config.json").is_file():
            has_tokenizer = True
    usage = _usage(
        repo_id or "path/to/this/soup",
        auto_class,
        has_tokenizer,
        (base_id or (base.name if base else None) or "<base model>") if adapter else None,
    )
    template_kwargs = dict(
        title=repo_id.split("/")[-1] if repo_id else f"{pretty_name} of {len(kept)} models",
        summary=summary,
        architecture=architecture,
        method=soup.method,
        recipe_pretty_name=pretty_name,
        recipe_reference_url=reference_url,
        recipe_params=_params(soup),
        base_row=_ingredient_label(base) + f" ({_revision_cell(base)})" if base is not None else None,
        selection=selection,
        score_header=score_header,
        ingredient_rows=rows,
        license_note=verdict.note,
        comparison=_comparison(soup, metric),
        eval_rows=eval_rows,
        curve_title=curve_title,
        curve_header=curve_header,
        curve_rows=curve_rows,
        methods_header=methods_header,
        methods_rows=methods_rows,
        usage_code=usage,
        has_eval=soup.score is not None or bool(soup.scores),
        evaluation_notes=describe_lm_eval((soup.report_extra or {}).get("lm_eval") or {}),
    )
    return card_data, template_kwargs
