"""Ingredients: what users pass to `merge_models`, and how each reference is resolved to files or a model.

A reference may be a Hub model ID with an optional `@revision`, a local folder saved with
`save_pretrained`, a `transformers.Trainer` checkpoint folder (`checkpoint-N`), an in-memory
`PreTrainedModel`, or an [`Ingredient`] wrapping any of these with a weight and a display name.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

from .core.sources import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    StateDictSource,
    TensorSource,
    find_weight_files,
    open_weight_files,
)
from .errors import IngredientNotFoundError, InvalidArgumentError, SoupError
from .ingredients_folder import INGREDIENT_METADATA as INGREDIENT_METADATA  # re-exported for recipe_file
from .ingredients_folder import INGREDIENTS_MANIFEST as INGREDIENTS_MANIFEST  # re-exported for recipe_file
from .ingredients_folder import is_ingredients_dir, read_ingredients_dir

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

# Files a soup needs from a Hub repository: config, weights and their index, tokenizer and generation
# files, the adapter files of PEFT repos, and the README (for the ingredient's license in the model card).
HUB_CONFIG_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
    "*.tiktoken",
    "chat_template.*",
    "preprocessor_config.json",
    "processor_config.json",
    "adapter_config.json",
    "README.md",
]
HUB_SAFETENSORS_PATTERNS = ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
HUB_ADAPTER_PATTERNS = ["adapter_model.safetensors", "adapter_model.bin"]
HUB_BIN_PATTERNS = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]

_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass
class Ingredient:
    """One model in a soup: a reference, an optional weight, and what the soup learned about it.

    Args:
        reference (`str`, `os.PathLike` or `PreTrainedModel`):
            A Hub model ID (`"org/name"` or `"org/name@revision"`), a local folder saved with
            `save_pretrained` (a `Trainer` checkpoint folder works too), or an in-memory model.
        weight (`float`, *optional*):
            Relative weight in a uniform soup (normalised over all ingredients). After cooking, the
            normalised coefficient this ingredient received.
        name (`str`, *optional*):
            Display name in reports and model cards. Defaults to the reference.
        revision (`str`, *optional*):
            Hub revision (branch, tag or commit). After resolution, the resolved commit hash.
        score (`float`, *optional*):
            Held-out score on the selection set (filled by evaluation, or given to skip it).
        scores (`dict[str, dict[str, float]]`):
            Every metric on every eval set, filled by evaluation.
        selected (`bool`, *optional*):
            Whether the recipe kept the ingredient (greedy soups).
        metadata (`dict`):
            Free-form information (hyperparameters, seed, adapter details ...).

    Example:

    ```python
    >>> from hf_soups import Ingredient
    >>> Ingredient("org/model-lr3e-5@v2", weight=2.0, name="lr=3e-5").revision
    'v2'
    ```
    """

    reference: Any
    weight: float | None = None
    name: str | None = None
    revision: str | None = None
    score: float | None = None
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    selected: bool | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.reference, Ingredient):
            raise InvalidArgumentError("An Ingredient cannot wrap another Ingredient.")
        if isinstance(self.reference, os.PathLike):
            self.reference = os.fspath(self.reference)
        if isinstance(self.reference, str):
            path, rev = parse_reference(self.reference)
            if rev is not None:
                if self.revision is not None and self.revision != rev:
                    raise InvalidArgumentError(
                        f"Ingredient {self.reference!r} names revision {rev!r} and revision={self.revision!r}."
                    )
                self.reference, self.revision = path, rev
        if self.name is None:
            self.name = _default_name(self.reference, self.revision)
        if self.weight is not None:
            self.weight = float(self.weight)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (in-memory references are described, not serialised)."""
        ref = (
            self.reference
            if isinstance(self.reference, str)
            else f"<in-memory {type(self.reference).__name__}>"
        )
        return {
            "name": self.name,
            "reference": ref,
            "revision": self.revision,
            "weight": self.weight,
            "score": self.score,
            "scores": self.scores,
            "selected": self.selected,
            "metadata": self.metadata,
        }


ModelReference = Union[str, os.PathLike, "PreTrainedModel", Ingredient]


def parse_reference(reference: str) -> tuple[str, str | None]:
    """Split `"org/name@rev"` into `("org/name", "rev")`. Local paths are returned unchanged."""
    if Path(reference).expanduser().exists() or "@" not in reference:
        return reference, None
    head, _, rev = reference.rpartition("@")
    if head and rev and _REPO_ID_RE.match(head) and not Path(head).expanduser().exists():
        return head, rev
    return reference, None


def _default_name(reference: Any, revision: str | None) -> str:
    if isinstance(reference, str):
        path = Path(reference).expanduser()
        if path.exists():
            name = path.name or str(path)
            if re.fullmatch(r"checkpoint-\d+", name) and path.parent.name:
                name = f"{path.parent.name}/{name}"
            return name
        return f"{reference}@{revision}" if revision else reference
    name_or_path = getattr(getattr(reference, "config", None), "_name_or_path", None) or getattr(
        reference, "name_or_path", None
    )
    return (
        f"{type(reference).__name__}({name_or_path})"
        if name_or_path
        else f"<in-memory {type(reference).__name__}>"
    )


def as_ingredients(models: Any) -> list[Ingredient]:
    """Turn the `models` argument of `merge_models` into a list of fresh [`Ingredient`] objects.

    A single string naming a folder that holds ingredients written by [`SoupTrainerCallback`] (it has a
    `soup_ingredients.json` manifest) expands into those ingredients.
    """
    if isinstance(models, (str, os.PathLike)):
        expanded = expand_ingredients_dir(Path(os.fspath(models)).expanduser())
        if expanded is not None:
            return expanded
        models = [models]
    elif isinstance(models, Ingredient) or hasattr(models, "state_dict"):
        models = [models]
    out = []
    for ref in models:
        if isinstance(ref, Ingredient):
            out.append(
                Ingredient(
                    reference=ref.reference,
                    weight=ref.weight,
                    name=ref.name,
                    revision=ref.revision,
                    score=ref.score,
                    scores=dict(ref.scores),
                    selected=None,
                    metadata=dict(ref.metadata),
                )
            )
        else:
            out.append(Ingredient(ref))
    if not out:
        raise InvalidArgumentError("merge_models needs at least one ingredient.")
    names = [i.name for i in out]
    for i, name in enumerate(names):
        if names.count(name) > 1:
            out[i].name = f"{name} #{names[: i + 1].count(name)}"
    return out


def list_ingredients(
    ingredients_dir: str | os.PathLike,
    *,
    run: str | None = None,
    kind: Literal["final", "checkpoint"] | None = None,
) -> list[Ingredient]:
    """The ingredients stored in an ingredients folder written by [`SoupTrainerCallback`], oldest first.

    Every ingredient folder (one with a `soup_ingredient.json`) becomes an [`Ingredient`] whose `reference` is
    the folder, `name` the folder name and `metadata` the recorded run information (`trial_params`, `seed`,
    `hyperparameters`, `metrics`, ...). Held-out metrics recorded during training stay in `metadata["metrics"]`
    (never `score`): a greedy soup re-scores every ingredient on its own evaluation set, so that all ingredients
    are compared on the same data with the same metric. The format itself is [`hf_soups.ingredients_folder`].

    Args:
        ingredients_dir (`str` or `os.PathLike`):
            The folder written by [`SoupTrainerCallback`].
        run (`str`, *optional*):
            Keep only the ingredients of this run (a run id as recorded in `metadata["run"]`).
        kind (`str`, *optional*):
            Keep only `"final"` models or only `"checkpoint"`s.

    Returns:
        `list[Ingredient]`: the ingredients, sorted by creation time.

    Raises:
        [`IngredientNotFoundError`]: `ingredients_dir` is not an ingredients folder.

    Example:

    ```python
    >>> from hf_soups.integrations.callback import list_ingredients
    >>> for ing in list_ingredients("soup-ingredients"):  # doctest: +SKIP
    ...     print(ing.name, ing.metadata["trial_params"], ing.metadata["metrics"].get("eval_accuracy"))
    ```
    """
    stored = read_ingredients_dir(Path(ingredients_dir).expanduser(), run=run, kind=kind)
    return [Ingredient(str(s.path), name=s.name, metadata=s.metadata) for s in stored]


def expand_ingredients_dir(path: Path) -> list[Ingredient] | None:
    """Expand a folder of ingredients collected by `SoupTrainerCallback` (None if `path` is not one)."""
    if not is_ingredients_dir(path):
        return None
    out = list_ingredients(path)
    if not out:
        raise IngredientNotFoundError(
            f"{path} holds no ingredient yet: train with SoupTrainerCallback(ingredients_dir={str(path)!r}) first.",
            ingredient=str(path),
        )
    return out


@dataclass
class ResolvedIngredient:
    """An ingredient with its files (or model) located and its config read."""

    ingredient: Ingredient
    kind: Literal["local", "hub", "memory", "adapter"]
    config: dict[str, Any]
    path: Path | None = None
    model: Any = None
    commit_hash: str | None = None
    adapter: Any = None  # peft_support's adapter description, for kind == "adapter"
    _source: TensorSource | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return str(self.ingredient.name)

    def open(self) -> TensorSource:
        """The lazy tensors of this ingredient (opened once, then cached)."""
        if self._source is None:
            if self.kind == "adapter":  # the adapters layer's description knows how to open it
                self._source = self.adapter.open(self)
            elif self.model is not None:
                self._source = StateDictSource(self.model.state_dict(), description=self.name)
            else:
                assert self.path is not None
                weights = find_weight_files(self.path)
                if weights is None:
                    raise IngredientNotFoundError(
                        _no_weights_message(self.name, self.path), ingredient=self.name
                    )
                self._source = open_weight_files(weights, description=self.name)
        return self._source

    def close(self) -> None:
        if self._source is not None:
            self._source.close()


def weights_fingerprint(member: ResolvedIngredient) -> dict[str, Any]:
    """What fixes an ingredient's weights, for caches of what it predicts (`prediction_cache_dir=`).

    - a Hub ingredient: its repository and resolved commit (a commit fixes every file);
    - a local folder: a SHA-256 of each file `from_pretrained` reads (the weight files [`find_weight_files`]
      picks, with their index), i.e. one sequential read of the weights: hashing runs at disk speed, far less
      than one evaluation, and a file rewritten in place with the same size and time still misses;
    - an adapter: the SHA-256 of its `adapter_config.json` and weight files, plus its base's fingerprint;
    - an in-memory model (or an adapter without files): a SHA-256 of every tensor's name, dtype, shape and bytes.

    The ingredient's `config.json` (as a dict) is part of it in every case.

    Args:
        member ([`ResolvedIngredient`]): a resolved ingredient.

    Returns:
        `dict`: JSON-able; equal for two ingredients only if their weights and config are the same.
    """
    import hashlib

    config = hashlib.sha256(json.dumps(member.config, sort_keys=True, default=str).encode()).hexdigest()
    out: dict[str, Any] = {"kind": member.kind, "config": config}

    def file_digests(paths: list[Path]) -> dict[str, str]:
        digests = {}
        for path in paths:
            with open(path, "rb") as f:
                digests[path.name] = hashlib.file_digest(f, "sha256").hexdigest()
        return digests

    if member.kind == "hub" and member.commit_hash:
        out.update(repo=parse_reference(str(member.ingredient.reference))[0], commit=member.commit_hash)
        return out
    if (
        member.kind in ("local", "hub") and member.path is not None
    ):  # a Hub snapshot without a commit: its files
        weights = find_weight_files(member.path)
        if weights is not None:
            files = ([weights.index] if weights.index is not None else []) + list(weights.files)
            out["files"] = file_digests(files)
            return out
    if member.kind == "adapter" and member.path is not None:
        weights = find_weight_files(member.path, prefix="adapter_model")
        config_file = member.path / "adapter_config.json"
        if weights is not None and config_file.is_file():
            out["files"] = file_digests([config_file, *weights.files])
            base = getattr(member.adapter, "base", None)
            out["base"] = weights_fingerprint(base) if base is not None else None
            return out
    import torch

    source = member.open()
    digest = hashlib.sha256()
    for name in sorted(source.keys()):
        tensor = source.get(name).detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    out["tensors"] = digest.hexdigest()
    return out


def _no_weights_message(name: str, path: Path) -> str:
    checkpoints = sorted(
        (p for p in path.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    msg = f"Ingredient {name!r}: no model weights (model.safetensors, its index, or pytorch_model.bin) in {path}."
    if checkpoints:
        msg += f" It looks like a Trainer output folder: pass one of its checkpoints, e.g. {checkpoints[-1]}."
    else:
        msg += " Pass a folder written by save_pretrained."
    return msg


def _read_config(path: Path, name: str) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise IngredientNotFoundError(
            f"Ingredient {name!r}: no config.json in {path}. Pass a folder written by save_pretrained.",
            ingredient=name,
        )
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IngredientNotFoundError(
            f"Ingredient {name!r}: {config_file} is not valid JSON ({e}).", ingredient=name
        ) from None
    if not isinstance(config, dict):
        raise IngredientNotFoundError(
            f"Ingredient {name!r}: {config_file} holds a JSON {type(config).__name__}, not the object "
            "save_pretrained writes. Re-save the model, or leave it out.",
            ingredient=name,
        )
    return config


# Adapter ingredients (PEFT folders and `PeftModel`s) are resolved by `hf_soups.adapters`, a higher layer, which
# registers its resolver here when it is imported (`hf_soups.adapters` imports it; `merge_models` and
# `hf-soups inspect` import `hf_soups.adapters`). Lower layers never import higher ones.
_ADAPTER_RESOLVER: Callable[..., ResolvedIngredient] | None = None


def register_adapter_resolver(resolver: Callable[..., ResolvedIngredient]) -> None:
    """Called by `hf_soups.adapters.resolve`: `resolver(ingredient, *, path=None, model=None, token, cache_dir,
    commit_hash=None)` resolves an adapter reference."""
    global _ADAPTER_RESOLVER
    _ADAPTER_RESOLVER = resolver


def _resolve_adapter(ingredient: Ingredient, **kwargs: Any) -> ResolvedIngredient:
    if _ADAPTER_RESOLVER is None:
        raise SoupError(
            f"Ingredient {ingredient.name!r} is a PEFT adapter, and adapter support is not loaded: import "
            "hf_soups.adapters first (merge_models does)."
        )
    return _ADAPTER_RESOLVER(ingredient, **kwargs)


def resolve(
    ingredient: Ingredient,
    *,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
) -> ResolvedIngredient:
    """Locate an ingredient's files (downloading Hub references through the HF cache) and read its config.

    Args:
        ingredient ([`Ingredient`]):
            The ingredient. For Hub references, `ingredient.revision` is replaced by the resolved commit.
        token (`str` or `bool`, *optional*):
            Hub token; defaults to `HF_TOKEN` / the stored login, as in `huggingface_hub`.
        cache_dir (`str`, *optional*):
            HF cache folder.
        revision (`str`, *optional*):
            Revision for Hub references that name none.
        local_files_only (`bool`, *optional*):
            Only use the cache. `HF_HUB_OFFLINE=1` has the same effect.

    Returns:
        [`ResolvedIngredient`]

    Raises:
        [`IngredientNotFoundError`]: a missing folder, repository, revision or weight file.
    """
    ref = ingredient.reference
    if not isinstance(ref, str):
        if _is_peft_model(ref):
            return _resolve_adapter(ingredient, model=ref, token=token, cache_dir=cache_dir)
        if not hasattr(ref, "state_dict") or not hasattr(ref, "config"):
            raise InvalidArgumentError(
                f"Ingredient {ingredient.name!r} is a {type(ref).__name__}; expected a Hub model ID, a folder "
                "written by save_pretrained, or a transformers PreTrainedModel."
            )
        config = ref.config.to_dict()
        return ResolvedIngredient(ingredient, "memory", config, model=ref)

    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise IngredientNotFoundError(
                f"Ingredient {ingredient.name!r}: {path} is a file; pass the folder that holds it (written by "
                "save_pretrained).",
                ingredient=ingredient.name,
            )
        if (path / "adapter_config.json").is_file() and find_weight_files(path) is None:
            return _resolve_adapter(ingredient, path=path, token=token, cache_dir=cache_dir)
        if find_weight_files(path) is None:
            raise IngredientNotFoundError(
                _no_weights_message(ingredient.name, path), ingredient=ingredient.name
            )
        return ResolvedIngredient(
            ingredient, "local", _read_config(path, ingredient.name), path=path.absolute()
        )

    if not _REPO_ID_RE.match(ref) or ref.startswith((".", "/", "~")):
        raise IngredientNotFoundError(
            f"Ingredient {ingredient.name!r}: {ref!r} is neither an existing folder nor a valid Hub model ID "
            "('org/name' or 'org/name@revision').",
            ingredient=ingredient.name,
        )
    snapshot = _download(ingredient, ref, ingredient.revision or revision, token, cache_dir, local_files_only)
    commit = snapshot.name
    ingredient.metadata.setdefault("requested_revision", ingredient.revision or revision or "main")
    ingredient.revision = commit
    if (snapshot / "adapter_config.json").is_file() and find_weight_files(snapshot) is None:
        return _resolve_adapter(
            ingredient, path=snapshot, token=token, cache_dir=cache_dir, commit_hash=commit
        )
    config = _read_config(snapshot, ingredient.name)
    return ResolvedIngredient(ingredient, "hub", config, path=snapshot, commit_hash=commit)


def _download(
    ingredient: Ingredient,
    repo_id: str,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool | None,
) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def fetch(patterns: list[str]) -> Path:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=patterns,
                token=token,
                cache_dir=cache_dir,
                local_files_only=bool(local_files_only),
                library_name="hf_soups",
            )
        )

    def fetch_chosen(snapshot: Path) -> Path:
        """Fetch what find_weight_files (transformers' rule) reads: an explicitly named file, then shards."""
        for _ in range(3):
            weights = find_weight_files(snapshot, require_files=False)
            missing = weights.missing() if weights is not None else []
            if not missing:
                break
            snapshot = fetch([glob.escape(p.relative_to(snapshot).as_posix()) for p in missing])
        return snapshot

    name = ingredient.name
    try:
        # the small files first: configs, model.safetensors or the safetensors index (never shards of an
        # index that model.safetensors makes stale), adapters; then only the shards the rule picks
        snapshot = fetch(
            HUB_CONFIG_PATTERNS + [SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME] + HUB_ADAPTER_PATTERNS
        )
        snapshot = fetch_chosen(snapshot)
        if (
            find_weight_files(snapshot, require_files=False) is None
            and not (snapshot / "adapter_config.json").is_file()
        ):
            snapshot = fetch_chosen(fetch(HUB_CONFIG_PATTERNS + [WEIGHTS_NAME, WEIGHTS_INDEX_NAME]))
    except RevisionNotFoundError:
        raise IngredientNotFoundError(
            f"Ingredient {name!r}: revision {revision!r} does not exist in Hub repository {repo_id!r}.",
            ingredient=name,
        ) from None
    except GatedRepoError:
        raise IngredientNotFoundError(
            f"Ingredient {name!r}: {repo_id!r} is gated; accept its conditions on the Hub and pass token= "
            "(or set HF_TOKEN).",
            ingredient=name,
        ) from None
    except RepositoryNotFoundError:
        raise IngredientNotFoundError(
            f"Ingredient {name!r}: Hub repository {repo_id!r} was not found (or is private: pass token= or set "
            "HF_TOKEN).",
            ingredient=name,
        ) from None
    except LocalEntryNotFoundError:
        raise IngredientNotFoundError(
            f"Ingredient {name!r}: {repo_id!r} (revision {revision or 'main'}) is not in the local cache and the "
            "Hub cannot be reached (offline mode or no connection). Download it once online, or pass a local "
            "folder.",
            ingredient=name,
        ) from None
    except HfHubHTTPError as e:
        raise IngredientNotFoundError(f"Ingredient {name!r}: downloading {repo_id!r} failed: {e}") from None
    except Exception as e:
        if not _is_transport_error(e):
            raise
        from huggingface_hub import constants

        from .errors import HubError

        raise HubError(
            f"Ingredient {name!r}: the connection to the Hub at {constants.ENDPOINT} failed while downloading "
            f"{repo_id!r} ({type(e).__name__}: {e}). Check the network (and HF_ENDPOINT / proxy settings) and run "
            "again: complete files stay in the cache, partial ones are downloaded again.",
            ingredient=name,
        ) from e
    return snapshot


def _is_transport_error(error: BaseException) -> bool:
    """A network failure (connection refused or dropped, timeout) rather than a local or HTTP error."""
    try:
        import httpx2 as httpx
    except ImportError:  # pragma: no cover - older huggingface_hub
        import httpx  # type: ignore[no-redef]

    return isinstance(error, (httpx.TransportError, ConnectionError, TimeoutError))


def _is_peft_model(obj: Any) -> bool:
    cls_names = {c.__name__ for c in type(obj).__mro__}
    return "PeftModel" in cls_names or "PeftMixedModel" in cls_names
