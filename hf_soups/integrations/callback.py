"""`SoupTrainerCallback`: model soups straight out of `transformers.Trainer` runs and hyperparameter searches.

The callback records every run's final model (or its checkpoints) as an *ingredient* in an ingredients folder
(the format lives in [`hf_soups.ingredients_folder`]), with the run's hyperparameters, seed and held-out
metrics, and cooks a soup with [`merge_models`] when asked ([`SoupTrainerCallback.cook`]) or at the end of
every run (`cook_on="train_end"`).

Three parts, one place each:

- storage: [`~hf_soups.ingredients_folder.IngredientsFolder`] writes and reads the folder;
- hooks: [`SoupTrainerCallback`] decides what to collect from what transformers passes to every hook (`args`,
  `state`, `model`, `processing_class`): no trainer is needed to collect, except under FSDP / DeepSpeed;
- cooking: [`SoupTrainerCallback.cook`] resolves options and calls [`merge_models`]; following the trainer's
  defaults, logging through `trainer.log` and `replace_model` need the trainer, given once with
  [`SoupTrainerCallback.attach`] (transformers does not pass the trainer to callbacks).

Which process writes comes from `args.should_save` in hooks, and from `accelerate.PartialState` otherwise.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from accelerate import PartialState
from transformers.trainer_callback import TrainerCallback

from ..core.sources import find_weight_files
from ..errors import IncompatibleIngredientsError, IngredientNotFoundError, InvalidArgumentError
from ..ingredients import _is_peft_model, list_ingredients
from ..ingredients_folder import (
    INGREDIENT_METADATA,
    INGREDIENTS_MANIFEST,
    IngredientsFolder,
    is_ingredients_dir,
    read_ingredient_metadata,
)
from ..utils import free_disk, human_bytes

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, Trainer, TrainerControl, TrainerState, TrainingArguments

    from ..ingredients import Ingredient
    from ..soup import Soup

logger = logging.getLogger(__name__)

DEFAULT_INGREDIENTS_SUBDIR = "soup-ingredients"

# Files of a Trainer checkpoint that are training state, not part of the model.
_TRAINING_STATE_FILES = {
    "optimizer.pt",
    "optimizer.bin",
    "scheduler.pt",
    "scaler.pt",
    "trainer_state.json",
    "training_args.bin",
}

# TrainingArguments recorded with every ingredient (when present in the installed transformers).
_RECORDED_ARGS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "weight_decay",
    "warmup_steps",
    "lr_scheduler_type",
    "optim",
    "label_smoothing_factor",
    "max_grad_norm",
    "seed",
    "data_seed",
)

_COOK_ON = (None, "train_end")
_COLLECT = ("final", "checkpoints")

_NEEDS_TRAINER = (
    "SoupTrainerCallback needs the Trainer itself for {what}, and transformers does not pass it to callbacks: "
    "give it once with cb.attach(trainer) after building the trainer (it also adds the callback to the trainer "
    "when it is not there yet)."
)


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What the callback knows about the run in progress (reset in `on_train_begin`)."""

    id: str
    evals: dict[int, dict[str, float]] = field(default_factory=dict)  # global_step -> held-out metrics
    folders: list[str] = field(default_factory=list)  # ingredients written for this run, oldest first
    final: tuple[str, int] | None = None  # (folder, metrics step) of the final-model ingredient
    replaced: bool = False  # the model was replaced by a soup: later evaluations are the soup's


def _model_nbytes(model: Any) -> int:
    """Bytes of the weights a `save_pretrained` of `model` writes (0 when unknown)."""
    footprint = getattr(model, "get_memory_footprint", None)  # PreTrainedModel (and PeftModel through it)
    return int(footprint()) if callable(footprint) else 0


def _shards_parameters(args: TrainingArguments, trainer: Trainer | None = None) -> bool:
    """Whether the model's parameters are FSDP / DeepSpeed shards rather than full tensors."""
    from accelerate.utils import parse_flag_from_env

    if trainer is not None:
        return bool(
            getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
        )
    return bool(
        getattr(args, "fsdp", None)
        or getattr(args, "deepspeed", None)
        or parse_flag_from_env("ACCELERATE_USE_FSDP")
        or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    )


def _warn_if_short_of_space(root: Path, needed: int, what: str) -> None:
    free = free_disk(root) if needed else None
    if free is not None and needed > free:
        logger.warning(
            "SoupTrainerCallback: %s need about %s but only %s are free under %s. Free some space, point "
            "ingredients_dir to a larger disk, or keep fewer ingredients (last_k=..., keep_ingredients=False).",
            what,
            human_bytes(needed),
            human_bytes(free),
            root,
        )


def _check_option_names(options: Mapping[str, Any], where: str) -> None:
    """Unknown merge_models options are refused by name, with a suggestion (the configuration's fields)."""
    from ..config import option_names
    from ..options import did_you_mean

    known = option_names()
    unknown = [key for key in options if key not in known]
    if unknown:
        raise InvalidArgumentError(
            "; ".join(f"{key}: unknown merge_models option{did_you_mean(key, known)}" for key in unknown)
            + f" ({where})."
        )


def _preprocessors(processing_class: Any) -> dict[str, Any]:
    """The trainer's `processing_class` as `merge_models` options: a tokenizer, an image processor, or both (a
    multimodal processor such as `CLIPProcessor`)."""
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.processing_utils import ProcessorMixin

    if isinstance(processing_class, ImageProcessingMixin):
        return {"image_processor": processing_class}
    out = {}
    if isinstance(processing_class, ProcessorMixin):
        for key in ("tokenizer", "image_processor"):
            if getattr(processing_class, key, None) is not None:
                out[key] = getattr(processing_class, key)
    return out or {"tokenizer": processing_class}


# Columns of raw (untokenized) chat / instruction data, in the formats TRL's trainers take.
_RAW_TEXT_FORMATS = (("messages",), ("prompt", "completion"), ("conversations",))


def _raw_text_format(dataset: Any) -> tuple[str, ...] | None:
    """The chat / prompt-completion columns of an untokenized eval set (`None`: tokenized or another kind)."""
    columns = list(getattr(dataset, "column_names", None) or [])
    if not columns or "input_ids" in columns:
        return None
    return next((fmt for fmt in _RAW_TEXT_FORMATS if all(c in columns for c in fmt)), None)


def _prepare_like_trainer(trainer: Trainer | None, eval_dataset: Any) -> Any:
    """Untokenized chat / instruction eval sets, tokenized the way `trainer` tokenizes its own eval set.

    TRL's `SFTTrainer` turns `messages` or `prompt`/`completion` rows into `input_ids` and `labels` (chat
    template, completion-only or assistant-only labels, truncation to `max_length`) when it is built; an eval set
    given to the callback (or to `cook`) goes through the same preparation, unpacked, so that the soup is scored on
    the tokens the runs were trained on. Tokenized sets are used as they are.

    Raises:
        [`InvalidArgumentError`]: a raw chat set and no trainer that prepares datasets, or a packed set.
    """
    if eval_dataset is None:
        return None
    single = not isinstance(eval_dataset, Mapping)
    sets = {"eval": eval_dataset} if single else dict(eval_dataset)
    packed = [name for name, ds in sets.items() if "seq_lengths" in (getattr(ds, "column_names", None) or [])]
    if packed:
        raise InvalidArgumentError(
            f"eval_dataset: set {packed[0]!r} is packed (several examples per row, a seq_lengths column: SFTConfig "
            "packing / eval_packing). Scored as one sequence per row, its examples would attend to each other and "
            "its loss would not be the trainer's. Set eval_packing=False in the SFTConfig, or give the callback the "
            "untokenized eval set (eval_dataset=...), which it prepares unpacked."
        )
    raw = {name: fmt for name, ds in sets.items() if (fmt := _raw_text_format(ds)) is not None}
    if not raw:
        return eval_dataset
    prepare = getattr(trainer, "_prepare_dataset", None) if trainer is not None else None
    if prepare is None or getattr(trainer, "_skip_prepare_dataset", False):
        name, fmt = next(iter(raw.items()))
        why = (
            "the trainer skips dataset preparation (dataset_kwargs={'skip_prepare_dataset': True})"
            if prepare is not None
            else "no trainer that prepares chat data (TRL's SFTTrainer) was given"
        )
        raise InvalidArgumentError(
            f"eval_dataset: set {name!r} is untokenized chat / instruction data (columns {list(fmt)}) and {why}. "
            "Give the callback its SFTTrainer (cb.attach(trainer), or cb.set_trainer(trainer) for from_dir) so that "
            "the set is tokenized as the trainer tokenizes its own, or pass a tokenized set (input_ids and labels "
            "columns, such as trainer.eval_dataset)."
        )
    for name in raw:
        try:
            sets[name] = prepare(
                sets[name],
                trainer.processing_class,
                trainer.args,
                False,  # unpacked: packed rows would attend across examples in a plain forward pass
                getattr(trainer, "_formatting_func", None),
                name,
            )
        except TypeError as err:  # a TRL whose private preparation takes other arguments
            raise InvalidArgumentError(
                f"eval_dataset: set {name!r} is untokenized chat / instruction data, and this "
                f"{type(trainer).__name__} could not tokenize it for the soup ({err}). Pass a tokenized set "
                "(input_ids and labels columns, such as trainer.eval_dataset)."
            ) from err
    return sets["eval"] if single else sets


def _strip_eval_prefix(name: str) -> str:
    return name[len("eval_") :] if name.startswith("eval_") else name


# --------------------------------------------------------------------------------------------------------------
# Cooking: a soup from the ingredients on disk (options, merge_models, the trainer's log)
# --------------------------------------------------------------------------------------------------------------


class _SoupCooking:
    """The cooking half of [`SoupTrainerCallback`]: read the ingredients folder, resolve options, cook, report.

    Not used alone: [`SoupTrainerCallback`] sets these attributes in its `__init__` and adds the hooks that
    collect the ingredients.
    """

    _ingredients_dir: Path | None
    _trainer: Trainer | None
    _run: _Run | None
    soup: Soup | None
    method: str
    eval_dataset: Any
    metric: Any
    greater_is_better: bool | None
    replace_model: bool
    push_to_hub: str | bool | None
    keep_ingredients: bool
    merge_options: dict[str, Any]

    # ----------------------------------------------------------------------------------------------------------
    # Public helpers
    # ----------------------------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, ingredients_dir: str | os.PathLike, **kwargs: Any) -> SoupTrainerCallback:
        """A callback over an existing ingredients directory, to cook a soup after (or without) training.

        Args:
            ingredients_dir (`str` or `os.PathLike`):
                A directory written by a [`SoupTrainerCallback`].
            **kwargs:
                Any argument of [`SoupTrainerCallback`] (`method`, `eval_dataset`, `metric`, ...).

        Returns:
            [`SoupTrainerCallback`]: The callback; call [`~SoupTrainerCallback.cook`] on it.

        Raises:
            [`IngredientNotFoundError`]: The folder is not an ingredients directory.

        Example:

        ```python
        >>> cb = SoupTrainerCallback.from_dir("soup-ingredients", method="greedy", eval_dataset=val)  # doctest: +SKIP
        >>> soup = cb.cook()  # doctest: +SKIP
        ```
        """
        if not is_ingredients_dir(ingredients_dir):
            raise IngredientNotFoundError(
                f"{ingredients_dir} is not an ingredients directory (no {INGREDIENTS_MANIFEST}). Point from_dir at "
                "the `ingredients_dir` a SoupTrainerCallback wrote during training.",
                ingredient=str(ingredients_dir),
            )
        return cls(ingredients_dir=ingredients_dir, **kwargs)

    @property
    def ingredients_dir(self) -> Path | None:
        """Where ingredients are stored (`None` until set or until the callback meets its first trainer)."""
        return self._ingredients_dir

    @property
    def ingredients(self) -> list[Ingredient]:
        """The ingredients currently on disk (every run, every process), oldest first."""
        if self._ingredients_dir is None or not is_ingredients_dir(self._ingredients_dir):
            return []
        return list_ingredients(self._ingredients_dir)

    # ----------------------------------------------------------------------------------------------------------
    # Cooking
    # ----------------------------------------------------------------------------------------------------------

    def cook(
        self,
        *,
        run: str | None = None,
        replace_model: bool | None = None,
        keep_ingredients: bool | None = None,
        log: bool = True,
        **options: Any,
    ) -> Soup:
        """Cook a soup from the ingredients on disk with [`merge_models`].

        Options are resolved in this order: the keyword arguments given here, then the callback's own arguments,
        then the trainer's settings (when given with `attach`), then `merge_models`' defaults.

        Args:
            run (`str`, *optional*):
                Only the ingredients of this run id (e.g. the checkpoints of one run). Default: every ingredient.
            replace_model (`bool`, *optional*):
                Load the soup into `trainer.model` in place. Defaults to the callback's `replace_model`.
            keep_ingredients (`bool`, *optional*):
                `False` deletes the ingredient folders used by this soup. Defaults to the callback's setting.
            log (`bool`, *optional*, defaults to `True`):
                Report the soup's metrics through `trainer.log` (keys prefixed `soup_`).
            **options:
                [`merge_models`] options (`method`, `eval_dataset`, `metric`, `weights`, `output_dir`,
                `push_to_hub`, ...).

        Returns:
            [`Soup`]: The soup (also kept as `cb.soup`).

        Raises:
            [`InvalidArgumentError`]: No ingredient to cook, or an unknown option.
            [`IncompatibleIngredientsError`]: `replace_model=True` but the soup does not fit `trainer.model`.
            Any error of [`merge_models`].

        Example:

        ```python
        >>> soup = cb.cook(method="uniform")  # doctest: +SKIP
        >>> soup.save_pretrained("uniform-soup")  # doctest: +SKIP
        ```
        """
        from ..api import merge_models

        _check_option_names(options, "cook()")
        if self._ingredients_dir is None:
            raise InvalidArgumentError(
                "This SoupTrainerCallback has no ingredients_dir yet: add it to a Trainer and train, or build it "
                "with SoupTrainerCallback.from_dir(path)."
            )
        PartialState().wait_for_everyone()  # every process sees every ingredient
        if self._trainer is None and self._run is not None:
            logger.warning(
                "SoupTrainerCallback.cook: the callback collected in a Trainer but was not given it, so this soup "
                "does not follow the trainer's eval_dataset, compute_metrics, metric_for_best_model, "
                "processing_class or push_to_hub, and its metrics are not logged through trainer.log. Call "
                "cb.attach(trainer) once after building the trainer, or pass those options to cook()."
            )
        ingredients = (
            list_ingredients(self._ingredients_dir, run=run)
            if is_ingredients_dir(self._ingredients_dir)
            else []
        )
        if not ingredients:
            where = f" for run {run!r}" if run is not None else ""
            raise InvalidArgumentError(
                f"No ingredient in {self._ingredients_dir}{where}: train at least one run with this callback "
                "(collect='checkpoints' also needs a save_strategy) before cooking."
            )
        kwargs = self._resolve_options(options)
        replace = self.replace_model if replace_model is None else replace_model
        trainer = self._trainer
        if replace:  # checked before cooking: a soup is expensive
            if trainer is None:
                raise InvalidArgumentError(
                    _NEEDS_TRAINER.format(what="replace_model=True (it updates trainer.model)")
                )
            if getattr(trainer, "model", None) is None:
                raise InvalidArgumentError(
                    "replace_model=True, but the trainer holds no model (hyperparameter_search releases it after "
                    "the last trial). Use soup.model, or cook with replace_model=False."
                )
            _check_replaceable(trainer)
        logger.info(
            "SoupTrainerCallback: cooking a %s soup of %d ingredient(s) from %s",
            kwargs.get("method", "uniform"),
            len(ingredients),
            self._ingredients_dir,
        )
        soup = merge_models(ingredients, **kwargs)
        self.soup = soup

        if replace:
            load_soup_into_model(soup, trainer.model, trainer=trainer)
            if self._run is not None:
                self._run.replaced = True
        if log:
            self._log_soup(soup, ingredients, evaluate_with_trainer=replace)
        keep = self.keep_ingredients if keep_ingredients is None else keep_ingredients
        if not keep:
            self._remove_ingredients([Path(str(ing.reference)) for ing in ingredients])
        return soup

    def _resolve_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        trainer = self._trainer
        args = trainer.args if trainer is not None else None

        # 1. the trainer's settings
        if trainer is not None:
            if trainer.eval_dataset is not None:
                kwargs["eval_dataset"] = trainer.eval_dataset
            if trainer.processing_class is not None:
                kwargs.update(_preprocessors(trainer.processing_class))
            kwargs["batch_size"] = args.per_device_eval_batch_size
            best = args.metric_for_best_model
            if trainer.compute_metrics is not None:
                kwargs["compute_metrics"] = trainer.compute_metrics
                if best:
                    kwargs["metric_key"] = _strip_eval_prefix(best)
                    kwargs["greater_is_better"] = args.greater_is_better
            elif best:
                kwargs["metric"] = _strip_eval_prefix(best)
                kwargs["greater_is_better"] = args.greater_is_better
            if args.push_to_hub:
                repo = args.hub_model_id or getattr(trainer, "hub_model_id", None)
                if repo:
                    kwargs["push_to_hub"] = repo
                    kwargs["private"] = args.hub_private_repo
                if args.hub_token:
                    kwargs["token"] = args.hub_token
            device = getattr(args, "device", None)
            if device is not None and getattr(device, "type", "cpu") != "cpu":
                kwargs["device"] = str(device)

        # 2. the callback's own arguments
        kwargs["method"] = self.method
        if self.eval_dataset is not None:
            kwargs["eval_dataset"] = self.eval_dataset
        if self.metric is not None:
            kwargs["metric"] = self.metric
            # an explicit metric replaces the trainer's compute_metrics and metric_for_best_model
            kwargs.pop("compute_metrics", None)
            kwargs.pop("metric_key", None)
            kwargs.pop("greater_is_better", None)
        if self.greater_is_better is not None:
            kwargs["greater_is_better"] = self.greater_is_better
        if self.push_to_hub is False:
            kwargs.pop("push_to_hub", None)
        elif self.push_to_hub is True:
            repo = (args.hub_model_id or getattr(trainer, "hub_model_id", None)) if args is not None else None
            if not repo:
                raise InvalidArgumentError(
                    "SoupTrainerCallback(push_to_hub=True) pushes to the trainer's hub_model_id, which is not set. "
                    "Pass the repository id instead: push_to_hub='org/my-soup'."
                )
            kwargs["push_to_hub"] = repo
        elif isinstance(self.push_to_hub, str):
            kwargs["push_to_hub"] = self.push_to_hub
        kwargs.update(self.merge_options)

        # 3. this call's options
        if "metric" in options:
            for key in ("compute_metrics", "metric_key", "greater_is_better"):
                if key not in options:
                    kwargs.pop(key, None)
        kwargs.update(options)

        kwargs["eval_dataset"] = _prepare_like_trainer(trainer, kwargs.get("eval_dataset"))
        if kwargs.get("eval_dataset") is None:
            # nothing to evaluate on: evaluation-only options would make merge_models complain for nothing
            for key in ("compute_metrics", "metric_key", "greater_is_better"):
                kwargs.pop(key, None)
        return kwargs

    def _log_soup(self, soup: Soup, ingredients: list[Ingredient], *, evaluate_with_trainer: bool) -> None:
        logs: dict[str, float] = {"soup_num_ingredients": float(len(soup.ingredients or ingredients))}
        selected = [ing for ing in soup.ingredients if getattr(ing, "selected", None)]
        if any(getattr(ing, "selected", None) is not None for ing in soup.ingredients):
            logs["soup_num_selected"] = float(len(selected))
        scores = getattr(soup, "scores", None) or {}
        for set_name, metrics in scores.items():
            prefix = "soup_" if len(scores) == 1 else f"soup_{set_name}_"
            for key, value in metrics.items():
                if _is_number(value):
                    logs[prefix + _strip_eval_prefix(key)] = float(value)
        trainer = self._trainer
        if trainer is None:
            logger.info("SoupTrainerCallback: soup metrics %s", logs)
            return
        trainer.log(logs)
        if evaluate_with_trainer and not scores and trainer.eval_dataset is not None:
            # The soup has no held-out score of its own (e.g. uniform without eval_dataset): the trainer's own
            # evaluation of the replaced model gives one, logged as soup_loss, soup_<metric>...
            trainer.evaluate(metric_key_prefix="soup")

    @property
    def _folder(self) -> IngredientsFolder:
        if self._ingredients_dir is None:  # pragma: no cover - set by on_init_end / on_train_begin / attach
            raise InvalidArgumentError("SoupTrainerCallback has no ingredients_dir yet.")
        return IngredientsFolder(self._ingredients_dir)

    def _remove_ingredients(self, folders: list[Path]) -> None:
        should_save = (
            self._trainer.args.should_save if self._trainer is not None else PartialState().is_main_process
        )
        if should_save:
            removed = self._folder.remove(folders)
            logger.info(
                "SoupTrainerCallback: removed %d ingredient folder(s) (keep_ingredients=False)", removed
            )
        PartialState().wait_for_everyone()


# --------------------------------------------------------------------------------------------------------------
# The callback: Trainer hooks that collect ingredients
# --------------------------------------------------------------------------------------------------------------


# About 320 lines, 80 of them the public docstring of every option: what is left is __init__'s checks, attach and
# the hooks. Cooking is _SoupCooking; writing is _write_ingredient and IngredientsFolder (ingredients_folder.py).
class SoupTrainerCallback(_SoupCooking, TrainerCallback):
    """A [`~transformers.TrainerCallback`] that turns `Trainer` runs into model-soup ingredients and cooks the soup.

    Attach it to a `Trainer` with `cb.attach(trainer)` (or pass it in `callbacks=[cb]`) and run `trainer.train()`
    several times, or `trainer.hyperparameter_search(...)`: every run's final model (`collect="final"`) or every
    checkpoint of a run (`collect="checkpoints"`) is saved as safetensors under `ingredients_dir`, with the run's
    trial parameters (`state.trial_params`), seed, main `TrainingArguments` and held-out metrics. One instance sees
    every trial, so per-run state is reset in `on_train_begin`; the disk is the source of truth, so trials run in
    other processes (Ray Tune pickles the trainer) collect their ingredients too.

    Cook the soup with [`~SoupTrainerCallback.cook`] (same options as [`merge_models`]), or at the end of every
    run with `cook_on="train_end"`. Options left unset follow the trainer: `eval_dataset`, `compute_metrics`,
    `metric_for_best_model`, `greater_is_better`, `processing_class`, `per_device_eval_batch_size`,
    `push_to_hub` / `hub_model_id` / `hub_token`. The soup's metrics go through `trainer.log`, prefixed `soup_`,
    so they reach `state.log_history`, the console, TensorBoard, W&B... like any evaluation metric.

    Transformers passes every hook the `args`, `state`, `model` and `processing_class`, but not the trainer, so
    the trainer is given in one place: [`~SoupTrainerCallback.attach`]. Collecting works without it (the model
    the hook receives is saved with `save_pretrained`); these need it, and say so when it is missing:
    following the trainer's defaults in `cook` (a warning), the soup's metrics in `trainer.log`,
    `replace_model=True`, and collecting under FSDP / DeepSpeed (`trainer.save_model` gathers the shards).

    In distributed training every process runs the hooks, but only the writing process (`args.should_save`)
    writes ingredients; the others wait for it (`accelerate.PartialState().wait_for_everyone()`). Cooking runs
    on every process (evaluation is shared through `accelerate`), and only the main process writes or pushes the
    soup.

    Args:
        ingredients_dir (`str` or `os.PathLike`, *optional*):
            Where ingredients are stored. Defaults to `<args.output_dir>/soup-ingredients` of the first trainer the
            callback meets (an instance shared by several trainers keeps that one directory).
        collect (`str`, *optional*, defaults to `"final"`):
            `"final"`: each run's final model (after `load_best_model_at_end`, when set) is one ingredient.
            `"checkpoints"`: every checkpoint the trainer saves is one ingredient (needs a `save_strategy`).
        last_k (`int`, *optional*):
            With `collect="checkpoints"`: keep only the last `k` checkpoints of each run (older ingredients of the
            run are deleted as new ones arrive).
        method (`str` or `list[str]`, *optional*, defaults to `"uniform"`):
            The soup recipe: `"uniform"`, `"greedy"`, `"wise-ft"`, `"ties"`, ... (see [`merge_models`]); a list
            compares them on the eval data and keeps the best. Their knobs (`density=`, `scaling=`, `seed=`, `t=`,
            `base_model=`) go in `**merge_options`.
        eval_dataset (`datasets.Dataset` or `dict[str, datasets.Dataset]`, *optional*):
            Held-out data for greedy soups, sweeps and the soup's score. Defaults to the trainer's `eval_dataset`.
            Untokenized chat / instruction sets (`messages`, `prompt`/`completion`) are tokenized by an attached
            TRL `SFTTrainer` as it tokenizes its own (same chat template and loss labels, unpacked).
        metric (`str`, `evaluate.EvaluationModule` or callable, *optional*):
            The metric to select on. Defaults to the trainer's `compute_metrics` (keyed by
            `metric_for_best_model`), else `metric_for_best_model`, else `"accuracy"`.
        greater_is_better (`bool`, *optional*):
            Direction of `metric`. Defaults to the trainer's `greater_is_better` when the metric follows
            `metric_for_best_model`.
        cook_on (`str`, *optional*):
            `"train_end"` cooks after every completed run: with `collect="checkpoints"` a soup of that run's
            checkpoints, with `collect="final"` a soup of every ingredient collected so far. `None` (default):
            only when [`~SoupTrainerCallback.cook`] is called.
        replace_model (`bool`, *optional*, defaults to `False`):
            Load the soup's weights into `trainer.model` in place after cooking, so that `trainer.evaluate()`,
            `trainer.save_model()` and `trainer.push_to_hub()` act on the soup. Needs the trainer (`attach`).
        push_to_hub (`str` or `bool`, *optional*):
            Repository to push the soup to; `True` uses the trainer's `hub_model_id`; `False` never pushes.
            Defaults to the trainer's `push_to_hub` setting.
        keep_ingredients (`bool`, *optional*, defaults to `True`):
            `False` deletes the ingredient folders that went into a soup once it is cooked.
        **merge_options:
            Any other [`merge_models`] option (`weights`, `alpha`, `base_model`, `strict`, `output_dir`,
            `select_on`, `batch_size`, `dtype`, ...), used by every cook unless [`~SoupTrainerCallback.cook`]
            overrides it.

    Raises:
        [`InvalidArgumentError`]: An unknown option, or options that contradict each other.

    Example:

    ```python
    >>> from transformers import Trainer, TrainingArguments
    >>> from hf_soups import SoupTrainerCallback
    >>> trainer = Trainer(model_init=model_init, args=args, train_dataset=train,  # doctest: +SKIP
    ...                   eval_dataset=val, compute_metrics=accuracy)
    >>> cb = SoupTrainerCallback(method="greedy", ingredients_dir="soup-ingredients").attach(trainer)  # doctest: +SKIP
    >>> trainer.hyperparameter_search(backend="optuna", n_trials=8, direction="maximize")  # doctest: +SKIP
    >>> soup = cb.cook()  # greedy on the trainer's eval_dataset and compute_metrics  # doctest: +SKIP
    >>> soup.save_pretrained("greedy-soup")  # doctest: +SKIP
    ```
    """

    def __init__(
        self,
        ingredients_dir: str | os.PathLike | None = None,
        *,
        collect: Literal["final", "checkpoints"] = "final",
        last_k: int | None = None,
        method: str | list[str] = "uniform",
        eval_dataset: Any = None,
        metric: Any = None,
        greater_is_better: bool | None = None,
        cook_on: Literal["train_end"] | None = None,
        replace_model: bool = False,
        push_to_hub: str | bool | None = None,
        keep_ingredients: bool = True,
        **merge_options: Any,
    ):
        if collect not in _COLLECT:
            raise InvalidArgumentError(f"collect={collect!r} is not one of {_COLLECT}.")
        if last_k is not None:
            if collect != "checkpoints":
                raise InvalidArgumentError(
                    f"last_k={last_k} only applies to collect='checkpoints' (collect={collect!r} keeps one "
                    "ingredient per run)."
                )
            if isinstance(last_k, bool) or not isinstance(last_k, int) or last_k < 1:
                raise InvalidArgumentError(f"last_k must be a positive integer, got {last_k!r}.")
        if cook_on not in _COOK_ON:
            raise InvalidArgumentError(f"cook_on={cook_on!r} is not one of {_COOK_ON}.")
        if cook_on == "train_end" and collect == "final" and not keep_ingredients:
            raise InvalidArgumentError(
                "keep_ingredients=False with cook_on='train_end' and collect='final' would delete each run's "
                "model right after the first soup, so later soups could not include it. Keep the ingredients "
                "(default) and call cb.cook(keep_ingredients=False) once the sweep is over, or collect "
                "checkpoints for per-run soups."
            )
        from ..recipes import get_recipe

        for name in method if isinstance(method, (list, tuple)) else [method]:
            get_recipe(name)  # an unknown method fails now, not after the sweep
        _check_option_names(merge_options, "SoupTrainerCallback")
        from ..config import SoupConfig

        # the values too, the same way merge_models checks them (ingredient counts are not known yet)
        SoupConfig.from_options(
            {"method": method, "metric": metric, "greater_is_better": greater_is_better, **merge_options},
            cross_checks=False,
        )
        # absolute: Ray Tune runs trials in other working directories
        self._ingredients_dir = _absolute(ingredients_dir) if ingredients_dir is not None else None
        self.collect = collect
        self.last_k = last_k
        self.method = method
        self.eval_dataset = eval_dataset
        self.metric = metric
        self.greater_is_better = greater_is_better
        self.cook_on = cook_on
        self.replace_model = replace_model
        self.push_to_hub = push_to_hub
        self.keep_ingredients = keep_ingredients
        self.merge_options = dict(merge_options)

        self.soup: Soup | None = None
        """The last soup cooked by this callback."""
        self._trainer: Trainer | None = None
        self._run: _Run | None = None

    @property
    def trainer(self) -> Trainer | None:
        """The `Trainer` given with [`~SoupTrainerCallback.attach`] (or `set_trainer`), `None` before."""
        return self._trainer

    def attach(self, trainer: Trainer) -> SoupTrainerCallback:
        """Give the callback its trainer: add it to `trainer`'s callbacks (unless it is there) and bind it.

        Transformers passes hooks the model and the processing class, not the trainer, so this is the one place
        the trainer is given. Call it once per trainer, after building it; a callback shared by several trainers
        is attached to each (the last one attached is the one `cook` follows).

        Args:
            trainer ([`~transformers.Trainer`]):
                The trainer whose defaults (`eval_dataset`, `compute_metrics`, ...) [`~SoupTrainerCallback.cook`]
                follows, whose `log` reports the soup's metrics, whose `save_model` saves FSDP / DeepSpeed
                ingredients and whose model `replace_model=True` updates.

        Returns:
            [`SoupTrainerCallback`]: `self`, so that `cb = SoupTrainerCallback(...).attach(trainer)` reads well.

        Example:

        ```python
        >>> trainer = Trainer(model_init=model_init, args=args, train_dataset=train, eval_dataset=val)  # doctest: +SKIP
        >>> cb = SoupTrainerCallback(method="greedy").attach(trainer)  # doctest: +SKIP
        ```
        """
        if not any(callback is self for callback in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        self.set_trainer(trainer)
        return self

    def set_trainer(self, trainer: Trainer) -> None:
        """Bind the callback to `trainer` without adding it to the trainer's callbacks.

        For a callback that only cooks (e.g. [`~SoupTrainerCallback.from_dir`]) with a trainer's defaults; a
        callback that collects is given its trainer with [`~SoupTrainerCallback.attach`].

        Args:
            trainer ([`~transformers.Trainer`]):
                The trainer whose defaults [`~SoupTrainerCallback.cook`] follows.
        """
        self._trainer = trainer
        if self._ingredients_dir is None:
            self._ingredients_dir = _absolute(trainer.args.output_dir) / DEFAULT_INGREDIENTS_SUBDIR

    def __getstate__(self) -> dict[str, Any]:
        # Ray Tune pickles the trainer and its callbacks: never drag a trainer or a soup model along.
        state = self.__dict__.copy()
        state["_trainer"] = None
        state["soup"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ingredients_dir={str(self._ingredients_dir)!r}, collect={self.collect!r}, "
            f"method={self.method!r}, cook_on={self.cook_on!r}, replace_model={self.replace_model})"
        )

    # ----------------------------------------------------------------------------------------------------------
    # Trainer hooks: they receive args, state, control, model, processing_class, ... (never the trainer)
    # ----------------------------------------------------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._ingredients_dir is None:
            self._ingredients_dir = _absolute(args.output_dir) / DEFAULT_INGREDIENTS_SUBDIR

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._ingredients_dir is None:
            self._ingredients_dir = _absolute(args.output_dir) / DEFAULT_INGREDIENTS_SUBDIR
        if self.collect == "checkpoints" and _strategy(args.save_strategy) == "no":
            raise InvalidArgumentError(
                "SoupTrainerCallback(collect='checkpoints') needs checkpoints, but save_strategy='no'. Set "
                "TrainingArguments(save_strategy='steps' or 'epoch'), or use collect='final'."
            )
        trainer = self._trainer
        if trainer is not None and trainer.args is not args:
            raise InvalidArgumentError(
                "SoupTrainerCallback is attached to another Trainer than the one that is training (an instance "
                "shared by several trainers): call cb.attach(trainer) for each trainer before it trains."
            )
        if trainer is None and self.replace_model:
            raise InvalidArgumentError(
                _NEEDS_TRAINER.format(what="replace_model=True (it updates trainer.model)")
            )
        if self.replace_model:  # before the run, not after a sweep
            _check_not_peft(kwargs.get("model"))
        if trainer is None and _shards_parameters(args):
            raise InvalidArgumentError(
                _NEEDS_TRAINER.format(
                    what="collecting FSDP / DeepSpeed models (trainer.save_model gathers shards)"
                )
            )

        run_id, folders = _resumed_run(self._ingredients_dir, args, state)
        self._run = _Run(id=run_id or _new_run_id(args, state, trainer), folders=folders)
        if args.should_save:
            self._folder.write_manifest()
            count = _expected_ingredients(self.collect, self.last_k, args, state)
            _warn_if_short_of_space(
                self._folder.root,
                _model_nbytes(kwargs.get("model")) * count,
                f"{count} ingredient(s) of run {self._run.id}",
            )
        logger.info("SoupTrainerCallback: run %s collects into %s", self._run.id, self._ingredients_dir)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics=None, **kwargs
    ):
        if not metrics or self._run is None:
            return
        if any(key.startswith("soup_") for key in metrics):
            return  # the soup's own evaluation (metric_key_prefix="soup")
        if self._run.replaced:
            return  # trainer.model is a soup now: these metrics are not the run's
        step = state.global_step
        self._run.evals.setdefault(step, {}).update({k: v for k, v in metrics.items() if _is_number(v)})
        final = self._run.final
        if final is not None and final[1] == step and args.should_save:
            # An evaluation after the run ended (hyperparameter_search evaluates when training did not): attach it.
            if (Path(final[0]) / INGREDIENT_METADATA).is_file():
                self._folder.update_metadata(
                    final[0], {"metrics": self._run.evals[step], "metrics_step": step}
                )

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.collect != "checkpoints" or self._run is None:
            return
        step = state.global_step
        _write_ingredient(
            self._folder,
            self._run,
            self._trainer,
            f"{self._run.id}-checkpoint-{step}",
            args,
            state,
            kind="checkpoint",
            metrics_step=step,
            checkpoint=_checkpoint_dir(args, state, self._trainer),
            **kwargs,
        )
        if self.last_k is not None:
            old = self._run.folders[: -self.last_k]
            del self._run.folders[: -self.last_k]
            if args.should_save and old:
                self._folder.remove(old)
                logger.info("SoupTrainerCallback: removed %s (last_k=%d)", old, self.last_k)
            PartialState().wait_for_everyone()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._run is None:
            return
        if not control.should_training_stop and state.global_step < state.max_steps:
            # Trainer calls on_train_end before raising optuna.TrialPruned: a pruned trial is not an ingredient.
            logger.info(
                "SoupTrainerCallback: run %s stopped at step %d of %d (pruned or interrupted); not collected.",
                self._run.id,
                state.global_step,
                state.max_steps,
            )
            return
        if self.collect == "final":
            metrics_step = state.global_step
            if args.load_best_model_at_end and state.best_global_step:
                metrics_step = state.best_global_step  # trainer.model is the best checkpoint's model now
            folder = _write_ingredient(
                self._folder,
                self._run,
                self._trainer,
                self._run.id,
                args,
                state,
                kind="final",
                metrics_step=metrics_step,
                **kwargs,
            )
            self._run.final = (str(folder), metrics_step)
        if self.cook_on == "train_end":
            self.cook(run=self._run.id if self.collect == "checkpoints" else None)


# --------------------------------------------------------------------------------------------------------------
# Writing one ingredient (the files: IngredientsFolder; here: which process writes, and how the model is saved)
# --------------------------------------------------------------------------------------------------------------


def _write_ingredient(
    folder: IngredientsFolder,
    run: _Run,
    trainer: Trainer | None,
    name: str,
    args: TrainingArguments,
    state: TrainerState,
    *,
    kind: str,
    metrics_step: int,
    model: PreTrainedModel | None = None,
    processing_class: Any = None,
    checkpoint: Path | None = None,
    **_: Any,
) -> Path:
    """Save one ingredient of `run` (called by every process; `args.should_save` writes, the others wait).

    The model comes from, in order: the checkpoint the trainer has just written (copied without its training
    state), `trainer.save_model` (gathers FSDP / DeepSpeed shards), or the hook's `model.save_pretrained`.
    """
    staged = folder.staging_path(name)
    if args.should_save:
        _warn_if_short_of_space(folder.root, _model_nbytes(model), f"ingredient {name}")
        folder.stage(name)
    model_files = _checkpoint_model_files(checkpoint) if checkpoint is not None else []
    if model_files:
        if args.should_save:
            for item in model_files:
                shutil.copy2(item, staged / item.name)
    elif trainer is not None:
        trainer.save_model(str(staged), _internal_call=True)  # every process: it gathers, then one writes
    elif args.should_save:
        if model is None:
            raise InvalidArgumentError(
                f"SoupTrainerCallback cannot save ingredient {name}: the hook received no model.",
                ingredient=name,
            )
        model.save_pretrained(str(staged))
        if processing_class is not None:  # as Trainer.save_model does
            processing_class.save_pretrained(str(staged))
    if args.should_save:
        (staged / "training_args.bin").unlink(missing_ok=True)  # pickled TrainingArguments: recorded as JSON
        metrics = dict(run.evals.get(metrics_step, {}))
        target = folder.commit(
            name, _ingredient_metadata(run.id, args, state, kind, metrics_step, metrics, model)
        )
        logger.info(
            "SoupTrainerCallback: saved ingredient %s (%s)", target, human_bytes(_model_nbytes(model))
        )
    PartialState().wait_for_everyone()
    target = folder.root / name
    run.folders.append(str(target))
    return target


def _checkpoint_dir(args: TrainingArguments, state: TrainerState, trainer: Trainer | None) -> Path | None:
    """The checkpoint folder the trainer has just written, when it can be found."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    run_dir = Path(args.output_dir)
    if trainer is not None:  # a hyperparameter search writes into <output_dir>/run-<trial>
        try:
            run_dir = Path(trainer._get_output_dir(trial=getattr(trainer, "_trial", None)))
        except Exception:  # noqa: BLE001 - private API; output_dir is right outside searches
            pass
    candidate = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    return candidate if candidate.is_dir() else None


# --------------------------------------------------------------------------------------------------------------
# Runs and their metadata
# --------------------------------------------------------------------------------------------------------------


def _new_run_id(args: TrainingArguments, state: TrainerState, trainer: Trainer | None) -> str:
    """`trial-<n>-<hex>` in an optuna search (with the trainer), `<trial_name>-<hex>`, else `run-<hex>`."""
    base = "run"
    trial = getattr(trainer, "_trial", None) if trainer is not None else None
    if state.trial_name:
        base = str(state.trial_name)
    elif trial is not None and hasattr(trial, "number"):
        base = f"trial-{trial.number}"
    elif state.trial_params:
        base = "trial"
    base = "".join(c if (c.isalnum() or c in "-_.") else "-" for c in base).strip(".") or "run"
    holder = [f"{base}-{uuid.uuid4().hex[:6]}"]
    if PartialState().num_processes > 1:  # every rank names the same folders
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(holder, from_process=0)
    return holder[0]


def _resumed_run(root: Path, args: TrainingArguments, state: TrainerState) -> tuple[str | None, list[str]]:
    """When training resumes from a checkpoint this callback collected, continue that run (same id, folders)."""
    if state.global_step <= 0 or not is_ingredients_dir(root):
        return None, []
    collected = list_ingredients(root, kind="checkpoint")
    resumed = [
        ing
        for ing in collected
        if ing.metadata.get("output_dir") == str(args.output_dir)
        and ing.metadata.get("global_step") == state.global_step
    ]
    if not resumed:
        return None, []
    run_id = resumed[-1].metadata.get("run")
    folders = [
        str(ing.reference)
        for ing in collected
        if ing.metadata.get("run") == run_id and ing.metadata.get("global_step", 0) <= state.global_step
    ]
    logger.info("SoupTrainerCallback: resuming run %s at step %d", run_id, state.global_step)
    return run_id, folders


def _ingredient_metadata(
    run_id: str,
    args: TrainingArguments,
    state: TrainerState,
    kind: str,
    metrics_step: int,
    metrics: dict[str, float],
    model: Any,
) -> dict[str, Any]:
    """What an ingredient records about its run (the format fields are added by `IngredientsFolder.commit`)."""
    return {
        "run": run_id,
        "kind": kind,
        "global_step": state.global_step,
        "epoch": state.epoch,
        "max_steps": state.max_steps,
        "trial_name": state.trial_name,
        "trial_params": dict(state.trial_params) if state.trial_params else None,
        "seed": args.seed,
        "data_seed": args.data_seed,
        "hyperparameters": {key: getattr(args, key) for key in _RECORDED_ARGS if hasattr(args, key)},
        "metrics": metrics,
        "metrics_step": metrics_step if metrics else None,
        "best_model_checkpoint": state.best_model_checkpoint,
        "model_class": type(model).__name__ if model is not None else None,
        "output_dir": str(args.output_dir),
    }


def _expected_ingredients(
    collect: str, last_k: int | None, args: TrainingArguments, state: TrainerState
) -> int:
    """How many ingredients a run will hold at once (to warn early about disk space)."""
    if collect == "final":
        return 1
    strategy = _strategy(args.save_strategy)
    count = 1
    if strategy == "steps" and state.max_steps and args.save_steps:
        save_steps = args.save_steps if args.save_steps >= 1 else math.ceil(state.max_steps * args.save_steps)
        count = math.ceil(state.max_steps / max(int(save_steps), 1))
    elif strategy == "epoch":
        count = max(math.ceil(state.num_train_epochs or args.num_train_epochs), 1)
    return count if last_k is None else min(count, last_k + 1)  # one more while the oldest is being replaced


def _checkpoint_model_files(checkpoint: Path) -> list[Path]:
    """The model files of a Trainer checkpoint (no optimizer, scheduler, RNG or trainer state); [] if no weights."""
    if find_weight_files(checkpoint) is None and find_weight_files(checkpoint, "adapter_model") is None:
        return []
    return [
        item
        for item in sorted(checkpoint.iterdir())
        if item.is_file() and item.name not in _TRAINING_STATE_FILES and not item.name.startswith("rng_state")
    ]


# --------------------------------------------------------------------------------------------------------------
# Loading a soup into a live model
# --------------------------------------------------------------------------------------------------------------


def load_soup_into_model(soup: Soup, model: torch.nn.Module, *, trainer: Trainer | None = None) -> None:
    """Copy a soup's weights into `model` in place (parameters keep their identity, device and dtype).

    Args:
        soup ([`Soup`]):
            A cooked soup.
        model (`torch.nn.Module`):
            The model to update, typically `trainer.model`.
        trainer ([`~transformers.Trainer`], *optional*):
            Used to refuse sharded set-ups (FSDP, DeepSpeed) whose parameters are not full tensors.

    Raises:
        [`IncompatibleIngredientsError`]: The soup's tensors do not match the model's (names or shapes).
        [`InvalidArgumentError`]: The trainer shards its parameters, or `model` is a `PeftModel`.
    """
    import torch

    if trainer is not None:
        _check_replaceable(trainer, model)
    else:
        _check_not_peft(model)
    source = soup.model.state_dict()
    target = model.state_dict()
    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise IncompatibleIngredientsError(
            f"The soup does not fit trainer.model: {len(missing)} tensor(s) of the model are missing from the soup "
            f"(e.g. {missing[:3]}) and {len(unexpected)} soup tensor(s) are unknown to the model "
            f"(e.g. {unexpected[:3]}). Load the soup with from_pretrained instead of replace_model=True.",
            tensor_name=name,
        )
    with torch.no_grad():
        for name, tensor in target.items():
            value = source[name]
            if tuple(value.shape) != tuple(tensor.shape):
                raise IncompatibleIngredientsError(
                    f"Soup tensor {name} has shape {tuple(value.shape)} but trainer.model's has "
                    f"{tuple(tensor.shape)}.",
                    tensor_name=name,
                )
            tensor.copy_(value)
    logger.info("SoupTrainerCallback: loaded the soup's weights into %s", type(model).__name__)


def _check_replaceable(trainer: Trainer, model: Any = None) -> None:
    if _shards_parameters(trainer.args, trainer):
        raise InvalidArgumentError(
            "replace_model=True cannot load a soup into FSDP / DeepSpeed sharded parameters. Cook with "
            "output_dir=... and load the soup with from_pretrained instead."
        )
    _check_not_peft(model if model is not None else getattr(trainer, "model", None))


def _check_not_peft(model: Any) -> None:
    if model is not None and _is_peft_model(model):
        raise InvalidArgumentError(
            "replace_model=True cannot load a soup into trainer.model: it is a PeftModel (LoRA training), whose "
            "adapter has one rank while a soup of adapters is a full model or an adapter of another rank (the sum "
            "of the ingredients' ranks). Cook with replace_model=False: use soup.model (base + the averaged "
            "deltas), or cook with adapter_output='adapter', output_dir=... and load that folder with "
            "PeftModel.from_pretrained(base, folder)."
        )


def _absolute(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().absolute()


def _strategy(value: Any) -> str:
    return str(getattr(value, "value", value))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = [
    "INGREDIENTS_MANIFEST",
    "INGREDIENT_METADATA",
    "SoupTrainerCallback",
    "is_ingredients_dir",
    "list_ingredients",
    "load_soup_into_model",
    "read_ingredient_metadata",
]
