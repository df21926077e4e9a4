"""The [`Soup`]: what `merge_models` returns."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .ingredients import Ingredient

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import ModelCard
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


@dataclass
class Soup:
    """A cooked model soup.

    Attributes:
        method (`str`): the recipe (`"uniform"`, `"greedy"`, `"wise-ft"`, ...).
        ingredients (`list[Ingredient]`): every ingredient, with its resolved revision, normalised weight,
            held-out score and whether it was kept.
        params (`dict`): the recipe's parameters (e.g. `alpha`).
        base ([`Ingredient`], *optional*): the base model (WiSE-FT's zero-shot end, adapters' base).
        score (`float`, *optional*): the soup's held-out score on the selection set (None when nothing was evaluated).
        scores (`dict[str, dict[str, float]]`): every metric on every eval set.
        history (`list[dict]`): recipe steps (greedy additions, WiSE-FT sweep points).
        coefficients (`list[float]`): the final coefficient of every ingredient (base last when present).
        output_dir (`Path`, *optional*): where the soup was streamed to disk.
        metric_key (`str`, *optional*), select_on (`str`, *optional*): what `score` means (the key of the metric's
            result it is, and the eval set it was measured on).
        report_extra (`dict`): extra report entries (e.g. adapter SVD errors).
        comparison (`list[dict]`): when several methods were compared (`method=[...]`), one row per method:
            `method`, `params` (its chosen setting), `score`, `scores` (every eval set), `selected` (the one
            served), `evaluations`, `kept` (ingredients it kept); `method`, `params` and `history` are then the winner's.
        output_options (`dict`): how the tensors were written (`dtype` override or None, `max_shard_size`);
            recorded in `soup_recipe.yaml` so that a re-cook writes the same tensors.

    Example:

    ```python
    >>> soup = merge_models(["./ft-a", "./ft-b"], output_dir="./soup")  # doctest: +SKIP
    >>> soup.model  # loaded lazily from ./soup  # doctest: +SKIP
    ```
    """

    method: str
    ingredients: list[Ingredient]
    params: dict[str, Any] = field(default_factory=dict)
    base: Ingredient | None = None
    score: float | None = None
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    coefficients: list[float] = field(default_factory=list)
    output_dir: Path | None = None
    metric_key: str | None = None
    select_on: str | None = None
    report_extra: dict[str, Any] = field(default_factory=dict)
    output_options: dict[str, Any] = field(default_factory=dict)
    comparison: list[dict[str, Any]] = field(default_factory=list)
    _model: Any = field(default=None, repr=False)
    _kitchen_config: dict[str, Any] = field(default_factory=dict, repr=False)

    # --------------------------------------------------------------------------------------- model

    @property
    def model(self) -> PreTrainedModel:
        """The soup as a transformers model; loaded lazily from `output_dir` when the soup was streamed.

        A soup written with `adapter_output="adapter"` loads as a `peft.PeftModel` on its base model.
        """
        if self._model is None:
            if self.output_dir is None:
                raise AttributeError("This soup has neither an in-memory model nor an output_dir.")
            if (Path(self.output_dir) / "adapter_config.json").is_file():
                from .adapters.resolve import load_adapter_soup

                # the base this soup was cooked on (a folder, or a Hub ID at its resolved commit)
                base = self.base.reference if self.base is not None else None
                if isinstance(base, str):
                    revision = self.base.revision
                    self._model = load_adapter_soup(self.output_dir, base_model=base, revision=revision)
                else:
                    self._model = load_adapter_soup(self.output_dir)
                return self._model
            import json

            from .loading import model_class_for

            config = json.loads((Path(self.output_dir) / "config.json").read_text())
            self._model = model_class_for(config).from_pretrained(self.output_dir)
            self._model.eval()
        return self._model

    # --------------------------------------------------------------------------------------- saving

    def save_pretrained(
        self, save_directory: str | os.PathLike, *, max_shard_size: int | str = "50GB"
    ) -> Path:
        """Save the soup (weights, config, tokenizer, model card and recipe) into `save_directory`, atomically.

        The folder is written under a temporary name beside it and renamed into place once complete. An
        existing `save_directory` is replaced only when it is empty or holds a soup hf_soups wrote (its
        `.hf_soups` marker, and nothing else); a folder with anything else in it, or one that is, holds or
        lies inside an ingredient's folder, is refused and left untouched.

        Args:
            save_directory (`str` or `os.PathLike`):
                Target folder. A symlink is written through (the folder it points to is replaced).
            max_shard_size (`int` or `str`, *optional*, defaults to `"50GB"`):
                Shard size limit for an in-memory soup (a streamed soup is copied as written).

        Returns:
            `Path`: the folder.

        Raises:
            [`OutputDirError`]: `save_directory` holds something hf_soups did not write, or an ingredient.
            [`OutputWriteError`]: the disk is full or the location is not writable (nothing was replaced).
        """
        from .core.sources import AtomicDirectory
        from .utils import is_main_process

        target = Path(save_directory).expanduser().absolute()
        if not is_main_process():
            return target
        protected = [*self.ingredients, *([self.base] if self.base is not None else [])]
        with AtomicDirectory(target, ingredients=protected, argument="save_directory") as tmp:
            if self.output_dir is not None:
                shutil.copytree(self.output_dir, tmp.path, dirs_exist_ok=True)
            else:
                self.model.save_pretrained(tmp.path, max_shard_size=max_shard_size)
            self._write_extras(tmp.path)
            tmp.commit()
        return target

    def _write_extras(self, directory: Path) -> None:
        """The model card (README.md), the Hub's evaluation-results files and the recipe file that re-cooks it."""
        from .publishing.card import write_eval_results, write_model_card
        from .publishing.recipe_file import write_recipe

        write_model_card(self, directory)
        write_eval_results(self, directory)
        write_recipe(self, directory)

    # --------------------------------------------------------------------------------------- hub

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
    ):
        """Push the soup (weights, config, tokenizer, model card, recipe) to the Hub in one commit.

        Args:
            repo_id (`str`): target repository, created when missing.
            private (`bool`, *optional*): visibility of a newly created repository.
            token (`str` or `bool`, *optional*): Hub token; defaults to `HF_TOKEN` / the stored login.
            revision (`str`, *optional*): branch to push to.
            commit_message (`str`, *optional*): defaults to a summary of the recipe.
            create_pr (`bool`, *optional*, defaults to `False`): open a pull request instead of committing.

        Returns:
            `huggingface_hub.CommitInfo`

        Raises:
            [`HubError`]: authentication, missing revision or network failures (nothing is half-uploaded).
        """
        from .publishing.hub import push_soup

        return push_soup(
            self,
            repo_id,
            private=private,
            token=token,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
        )

    def model_card(self) -> ModelCard:
        """The generated model card (a `huggingface_hub.ModelCard`)."""
        from .publishing.card import build_model_card

        return build_model_card(self)

    # --------------------------------------------------------------------------------------- reports

    def report(self) -> str:
        """A readable table: ingredients, their scores, and the soup against the best single ingredient."""
        from .publishing.reporting import render_report

        return render_report(self)

    def plot(self, path: str | os.PathLike) -> Path:
        """Save a plot of the recipe's curve (WiSE-FT alpha sweep, greedy steps) as an image (needs matplotlib)."""
        from .publishing.reporting import plot

        return plot(self, path)

    def __repr__(self) -> str:
        kept = sum(1 for i in self.ingredients if i.selected is not False)
        where = f", output_dir={str(self.output_dir)!r}" if self.output_dir else ""
        score = f", score={self.score:.4f}" if self.score is not None else ""
        return f"Soup(method={self.method!r}, ingredients={kept}/{len(self.ingredients)}{score}{where})"
