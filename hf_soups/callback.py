"""`SoupTrainerCallback`: model soups straight out of `transformers.Trainer` runs and hyperparameter searches.

The callback records every run's final model (or its checkpoints) as an *ingredient* on disk, with the run's
hyperparameters, seed and held-out metrics, and cooks a soup with [`merge_models`] when asked
([`SoupTrainerCallback.cook`]) or at the end of every run (`cook_on="train_end"`).

On-disk layout of an ingredients directory (the disk is the source of truth, so trials that run in other
processes, e.g. with Ray Tune, add their ingredients too)::

    soup-ingredients/
        soup_ingredients.json          # marks the folder as an ingredients directory (format, version)
        trial-0-1a2b3c/                # one folder per ingredient: a `save_pretrained` folder
            model.safetensors
            config.json
            tokenizer.json ...
            soup_ingredient.json       # run, step, trial params, seed, hyperparameters, held-out metrics
        trial-1-4d5e6f-checkpoint-20/
            ...

Folders are written under a temporary name and renamed into place, so a crashed run never leaves a
half-written ingredient behind. `merge_models("soup-ingredients")` and [`SoupTrainerCallback.from_dir`] read
such a directory back.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from transformers.trainer_callback import TrainerCallback

from .errors import IncompatibleIngredientsError, IngredientNotFoundError, InvalidArgumentError
from .ingredients import INGREDIENT_METADATA, INGREDIENTS_MANIFEST, read_ingredients_dir

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, Trainer, TrainerControl, TrainerState, TrainingArguments

    from .ingredients import Ingredient
    from .soup import Soup

logger = logging.getLogger(__name__)

MANIFEST_NAME = INGREDIENTS_MANIFEST
"""File that marks a folder as an ingredients directory written by [`SoupTrainerCallback`]."""

INGREDIENT_METADATA_NAME = INGREDIENT_METADATA
"""Per-ingredient metadata file (run, step, trial parameters, seed, metrics)."""

FORMAT_NAME = "hf_soups.ingredients"
FORMAT_VERSION = 1
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


# --------------------------------------------------------------------------------------------------------------
# Reading an ingredients directory (used by `merge_models(<ingredients_dir>)` and `SoupTrainerCallback.from_dir`)
# --------------------------------------------------------------------------------------------------------------


def is_ingredients_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is an ingredients directory written by [`SoupTrainerCallback`].

    Args:
        path (`str` or `os.PathLike`):
            A local folder.

    Returns:
        `bool`: `True` when the folder holds a `soup_ingredients.json` manifest.
    """
    try:
        return (Path(path) / MANIFEST_NAME).is_file()
    except (OSError, ValueError):
        return False


def read_ingredient_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """Read the `soup_ingredient.json` of one ingredient folder.

    Args:
        folder (`str` or `os.PathLike`):
            An ingredient folder inside an ingredients directory.

    Returns:
        `dict`: The recorded metadata (`run`, `kind`, `global_step`, `trial_params`, `seed`, `metrics`, ...).

    Raises:
        [`IngredientNotFoundError`]: The folder has no metadata file.
        [`InvalidArgumentError`]: The metadata file is not valid JSON.
    """
    path = Path(folder) / INGREDIENT_METADATA_NAME
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise IngredientNotFoundError(
            f"{path} does not exist: {folder} is not an ingredient written by SoupTrainerCallback.",
            ingredient=Path(folder).name,
        ) from e
    except json.JSONDecodeError as e:
        raise InvalidArgumentError(
            f"{path} is not valid JSON ({e}). Delete the folder {folder} or fix the file.",
            ingredient=Path(folder).name,
        ) from e


def list_ingredients(
    ingredients_dir: str | os.PathLike,
    *,
    run: str | None = None,
    kind: Literal["final", "checkpoint"] | None = None,
) -> list[Ingredient]:
    """List the ingredients stored in an ingredients directory, oldest first.

    Every ingredient folder (one with a `soup_ingredient.json`) becomes an [`Ingredient`] whose `reference` is
    the folder, `name` the folder name and `metadata` the recorded run information (`trial_params`, `seed`,
    `hyperparameters`, `metrics`, ...). Held-out metrics recorded during training are kept in
    `metadata["metrics"]` only: a greedy soup re-scores every ingredient on its own evaluation set, so that all
    ingredients are compared on the same data with the same metric.

    Args:
        ingredients_dir (`str` or `os.PathLike`):
            The directory written by [`SoupTrainerCallback`].
        run (`str`, *optional*):
            Keep only the ingredients of this run (a run id as recorded in `metadata["run"]`).
        kind (`str`, *optional*):
            Keep only `"final"` models or only `"checkpoint"`s.

    Returns:
        `list[Ingredient]`: The ingredients, sorted by creation time.

    Raises:
        [`IngredientNotFoundError`]: `ingredients_dir` is not an ingredients directory.

    Example:

    ```python
    >>> from hf_soups.callback import list_ingredients
    >>> for ing in list_ingredients("soup-ingredients"):  # doctest: +SKIP
    ...     print(ing.name, ing.metadata["trial_params"], ing.metadata["metrics"].get("eval_accuracy"))
    ```
    """
    return read_ingredients_dir(Path(ingredients_dir), run=run, kind=kind)


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if hasattr(value, "value") and isinstance(value.value, (str, int, float)):
        return value.value  # enums (IntervalStrategy, SchedulerType, ...)
    if hasattr(value, "item"):
        try:
            return value.item()  # numpy / torch scalars
        except (TypeError, ValueError):
            pass
    return str(value)


def _write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _free_bytes(path: Path) -> int | None:
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return None
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def _model_nbytes(model: Any) -> int:
    """Bytes of the weights a `save_pretrained` of `model` writes (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    try:
        tensors = list(model.parameters()) + list(model.buffers())
    except AttributeError:
        return 0
    for tensor in tensors:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1024 or unit == "TB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} TB"  # pragma: no cover


def _find_trainer() -> Trainer | None:
    """The `transformers.Trainer` whose callback handler is calling us, found on the call stack.

    Trainer hooks receive the model and the processing class but not the trainer; logging through `trainer.log`,
    saving with `trainer.save_model` (which gathers sharded weights) and loading a soup into `trainer.model` need
    it. The caller chain is `Trainer.<method> -> CallbackHandler.call_event -> <hook>`, so the trainer is the
    `self` of a frame a few levels up.
    """
    from transformers import Trainer

    frame = sys._getframe(1)
    try:
        for _ in range(10):
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            frame = frame.f_back
        return None
    finally:
        del frame


def _check_option_names(options: Mapping[str, Any], where: str) -> None:
    """Unknown merge_models options are refused by name, with a suggestion (the configuration's fields)."""
    from .config import option_names
    from .options import did_you_mean

    known = option_names()
    unknown = [key for key in options if key not in known]
    if unknown:
        raise InvalidArgumentError(
            "; ".join(f"{key}: unknown merge_models option{did_you_mean(key, known)}" for key in unknown)
            + f" ({where})."
        )


def _strip_eval_prefix(name: str) -> str:
    return name[len("eval_") :] if name.startswith("eval_") else name


# --------------------------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------------------------


class SoupTrainerCallback(TrainerCallback):
    """A [`~transformers.TrainerCallback`] that turns `Trainer` runs into model-soup ingredients and cooks the soup.

    Add it to a `Trainer` (`callbacks=[cb]`) and run `trainer.train()` several times, or
    `trainer.hyperparameter_search(...)`: every run's final model (`collect="final"`) or every checkpoint of a
    run (`collect="checkpoints"`) is saved as safetensors under `ingredients_dir`, with the run's trial
    parameters (`state.trial_params`), seed, main `TrainingArguments` and held-out metrics. One instance sees
    every trial, so per-run state is reset in `on_train_begin`; the disk is the source of truth, so trials run in
    other processes (Ray Tune pickles the trainer) collect their ingredients too.

    Cook the soup with [`~SoupTrainerCallback.cook`] (same options as [`merge_models`]), or at the end of every
    run with `cook_on="train_end"`. Options left unset follow the trainer: `eval_dataset`, `compute_metrics`,
    `metric_for_best_model`, `greater_is_better`, `processing_class`, `per_device_eval_batch_size`,
    `push_to_hub` / `hub_model_id` / `hub_token`. The soup's metrics go through `trainer.log`, prefixed `soup_`,
    so they reach `state.log_history`, the console, TensorBoard, W&B... like any evaluation metric.

    In distributed training every process runs the hooks, but only the main process (`args.should_save`) writes
    ingredients; the others wait for it. Cooking runs on every process (evaluation is shared through
    `accelerate`), and only the main process writes or pushes the soup.

    Args:
        ingredients_dir (`str` or `os.PathLike`, *optional*):
            Where ingredients are stored. Defaults to `<args.output_dir>/soup-ingredients` of the first trainer the
            callback is attached to (an instance shared by several trainers keeps that one directory).
        collect (`str`, *optional*, defaults to `"final"`):
            `"final"`: each run's final model (after `load_best_model_at_end`, when set) is one ingredient.
            `"checkpoints"`: every checkpoint the trainer saves is one ingredient (needs a `save_strategy`).
        last_k (`int`, *optional*):
            With `collect="checkpoints"`: keep only the last `k` checkpoints of each run (older ingredients of the
            run are deleted as new ones arrive).
        method (`str`, *optional*, defaults to `"uniform"`):
            The soup recipe: `"uniform"`, `"greedy"`, `"wise-ft"`, ... (see [`merge_models`]).
        eval_dataset (`datasets.Dataset` or `dict[str, datasets.Dataset]`, *optional*):
            Held-out data for greedy soups, sweeps and the soup's score. Defaults to the trainer's `eval_dataset`.
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
            `trainer.save_model()` and `trainer.push_to_hub()` act on the soup.
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
    >>> cb = SoupTrainerCallback(method="greedy", eval_dataset=val, metric="accuracy",  # doctest: +SKIP
    ...                          ingredients_dir="soup-ingredients")
    >>> trainer = Trainer(model_init=model_init, args=args, train_dataset=train,  # doctest: +SKIP
    ...                   eval_dataset=val, callbacks=[cb])
    >>> trainer.hyperparameter_search(backend="optuna", n_trials=8, direction="maximize")  # doctest: +SKIP
    >>> soup = cb.cook()  # doctest: +SKIP
    >>> soup.save_pretrained("greedy-soup")  # doctest: +SKIP
    ```
    """

    def __init__(
        self,
        ingredients_dir: str | os.PathLike | None = None,
        *,
        collect: Literal["final", "checkpoints"] = "final",
        last_k: int | None = None,
        method: str = "uniform",
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
        from .recipes import get_recipe

        get_recipe(method)  # an unknown method fails now, not after the sweep
        _check_option_names(merge_options, "SoupTrainerCallback")
        from .config import SoupConfig

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
        self._run: dict[str, Any] | None = None

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
                f"{ingredients_dir} is not an ingredients directory (no {MANIFEST_NAME}). Point from_dir at the "
                "`ingredients_dir` a SoupTrainerCallback wrote during training.",
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

    @property
    def trainer(self) -> Trainer | None:
        """The `Trainer` the callback last ran in (found when a run begins, or set with `set_trainer`)."""
        return self._trainer

    def set_trainer(self, trainer: Trainer) -> None:
        """Bind the callback to `trainer` (done automatically when the trainer starts a run).

        Args:
            trainer ([`~transformers.Trainer`]):
                The trainer whose defaults (`eval_dataset`, `compute_metrics`, ...) [`~SoupTrainerCallback.cook`]
                follows, whose `log` reports the soup's metrics and whose model `replace_model` updates.
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
    # Trainer hooks
    # ----------------------------------------------------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        trainer = _find_trainer()
        if trainer is not None:
            self.set_trainer(trainer)
        elif self._ingredients_dir is None:
            self._ingredients_dir = _absolute(args.output_dir) / DEFAULT_INGREDIENTS_SUBDIR

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        trainer = _find_trainer()
        if trainer is not None:
            self.set_trainer(trainer)
        elif self._ingredients_dir is None:
            self._ingredients_dir = _absolute(args.output_dir) / DEFAULT_INGREDIENTS_SUBDIR

        if self.collect == "checkpoints" and _strategy(args.save_strategy) == "no":
            raise InvalidArgumentError(
                "SoupTrainerCallback(collect='checkpoints') needs checkpoints, but save_strategy='no'. Set "
                "TrainingArguments(save_strategy='steps' or 'epoch'), or use collect='final'."
            )

        resumed_id, resumed_folders = self._resumed_run(args, state)
        self._run = {
            "id": resumed_id or self._new_run_id(args, state, trainer),
            "started": time.time(),
            "evals": {},  # global_step -> held-out metrics of this run
            "ingredients": resumed_folders,  # folders written for this run, oldest first
            "final": None,  # (folder, global_step) of the final-model ingredient
            "replaced": False,  # the model was replaced by a soup: later evaluations are the soup's
        }
        if args.should_save:
            self._write_manifest()
        self._warn_if_disk_too_small(args, state, kwargs.get("model"))
        logger.info("SoupTrainerCallback: run %s collects into %s", self._run["id"], self._ingredients_dir)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics=None, **kwargs
    ):
        if not metrics or self._run is None:
            return
        if any(key.startswith("soup_") for key in metrics):
            return  # the soup's own evaluation (metric_key_prefix="soup")
        if self._run["replaced"]:
            return  # trainer.model is a soup now: these metrics are not the run's
        step = state.global_step
        self._run["evals"].setdefault(step, {}).update({k: v for k, v in metrics.items() if _is_number(v)})
        final = self._run["final"]
        if final is not None and final[1] == step and args.should_save:
            # An evaluation after the run ended (hyperparameter_search evaluates when training did not): attach it.
            folder = Path(final[0])
            if (folder / INGREDIENT_METADATA_NAME).is_file():
                meta = read_ingredient_metadata(folder)
                meta.setdefault("metrics", {}).update(self._run["evals"][step])
                meta["metrics_step"] = step
                _write_json_atomic(folder / INGREDIENT_METADATA_NAME, meta)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.collect != "checkpoints" or self._run is None:
            return
        step = state.global_step
        name = f"{self._run['id']}-checkpoint-{step}"
        checkpoint = self._checkpoint_dir(args, state)
        self._write_ingredient(
            name, args, state, kwargs.get("model"), kind="checkpoint", copy_from=checkpoint, metrics_step=step
        )
        if self.last_k is not None:
            self._drop_old_checkpoints(args)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._run is None:
            return
        if not control.should_training_stop and state.global_step < state.max_steps:
            # Trainer calls on_train_end before raising optuna.TrialPruned: a pruned trial is not an ingredient.
            logger.info(
                "SoupTrainerCallback: run %s stopped at step %d of %d (pruned or interrupted); not collected.",
                self._run["id"],
                state.global_step,
                state.max_steps,
            )
            return
        if self.collect == "final":
            metrics_step = state.global_step
            if args.load_best_model_at_end and state.best_global_step:
                metrics_step = state.best_global_step  # trainer.model is the best checkpoint's model now
            folder = self._write_ingredient(
                self._run["id"], args, state, kwargs.get("model"), kind="final", metrics_step=metrics_step
            )
            self._run["final"] = (str(folder), metrics_step)
        if self.cook_on == "train_end":
            run = self._run["id"] if self.collect == "checkpoints" else None
            self.cook(run=run)

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
        then the trainer's settings (when the callback has met a trainer), then `merge_models`' defaults.

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
        from .api import merge_models

        _check_option_names(options, "cook()")
        if self._ingredients_dir is None:
            raise InvalidArgumentError(
                "This SoupTrainerCallback has no ingredients_dir yet: add it to a Trainer and train, or build it "
                "with SoupTrainerCallback.from_dir(path)."
            )
        self._barrier()  # every process sees every ingredient
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
                    "replace_model=True needs the trainer: cook from a callback attached to a Trainer (or call "
                    "cb.set_trainer(trainer) first)."
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
                self._run["replaced"] = True
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
                kwargs["tokenizer"] = trainer.processing_class
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

    # ----------------------------------------------------------------------------------------------------------
    # Writing ingredients
    # ----------------------------------------------------------------------------------------------------------

    def _new_run_id(self, args: TrainingArguments, state: TrainerState, trainer: Trainer | None) -> str:
        base = "run"
        trial = getattr(trainer, "_trial", None) if trainer is not None else None
        if state.trial_name:
            base = str(state.trial_name)
        elif trial is not None and hasattr(trial, "number"):
            base = f"trial-{trial.number}"
        elif state.trial_params:
            base = "trial"
        base = "".join(c if (c.isalnum() or c in "-_.") else "-" for c in base).strip(".") or "run"
        run_id = f"{base}-{uuid.uuid4().hex[:6]}"
        if getattr(args, "world_size", 1) > 1:
            from accelerate.utils import broadcast_object_list

            holder = [run_id]
            broadcast_object_list(holder, from_process=0)
            run_id = holder[0]
        return run_id

    def _resumed_run(self, args: TrainingArguments, state: TrainerState) -> tuple[str | None, list[str]]:
        """When training resumes from a checkpoint this callback collected, continue that run (same id)."""
        if (
            state.global_step <= 0
            or self._ingredients_dir is None
            or not is_ingredients_dir(self._ingredients_dir)
        ):
            return None, []
        collected = list_ingredients(self._ingredients_dir, kind="checkpoint")
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

    def _write_manifest(self) -> None:
        root = self._ingredients_dir
        assert root is not None
        root.mkdir(parents=True, exist_ok=True)
        manifest = root / MANIFEST_NAME
        if manifest.is_file():
            return
        from . import __version__

        _write_json_atomic(
            manifest,
            {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "hf_soups_version": __version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "layout": f"one folder per ingredient, each with a save_pretrained model and {INGREDIENT_METADATA_NAME}",
            },
        )

    def _checkpoint_dir(self, args: TrainingArguments, state: TrainerState) -> Path | None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        trainer = self._trainer
        candidates = []
        if trainer is not None:
            try:
                candidates.append(
                    Path(trainer._get_output_dir(trial=getattr(trainer, "_trial", None))) / folder
                )
            except Exception:  # noqa: BLE001 - private API; fall back to output_dir
                pass
        candidates.append(Path(args.output_dir) / folder)
        for candidate in candidates:
            if candidate.is_dir():
                return candidate
        return None

    def _write_ingredient(
        self,
        name: str,
        args: TrainingArguments,
        state: TrainerState,
        model: PreTrainedModel | None,
        *,
        kind: str,
        metrics_step: int,
        copy_from: Path | None = None,
    ) -> Path:
        root = self._ingredients_dir
        assert root is not None and self._run is not None
        target = root / name
        tmp = root / f".{name}.tmp"
        trainer = self._trainer
        model = model if model is not None else getattr(trainer, "model", None)
        nbytes = _model_nbytes(model) if model is not None else 0
        if args.should_save:
            root.mkdir(parents=True, exist_ok=True)
            self._write_manifest()
            self._check_free_space(nbytes, f"ingredient {name}")
            if tmp.exists():
                shutil.rmtree(tmp)
        copied = False
        if copy_from is not None and _has_weights(copy_from):
            if args.should_save:
                tmp.mkdir(parents=True)
                for item in copy_from.iterdir():
                    if (
                        item.is_file()
                        and item.name not in _TRAINING_STATE_FILES
                        and not item.name.startswith("rng_state")
                    ):
                        shutil.copy2(item, tmp / item.name)
            copied = True
        if not copied:
            if trainer is not None:
                # Trainer.save_model gathers sharded weights (FSDP / DeepSpeed) and writes on the main process only.
                trainer.save_model(str(tmp), _internal_call=True)
            elif args.should_save:
                if model is None:
                    raise InvalidArgumentError(
                        f"SoupTrainerCallback cannot save ingredient {name}: the hook received no model.",
                        ingredient=name,
                    )
                model.save_pretrained(str(tmp))
        if args.should_save:
            (tmp / "training_args.bin").unlink(missing_ok=True)  # pickled TrainingArguments: recorded as JSON
            metrics = dict(self._run["evals"].get(metrics_step, {}))
            _write_json_atomic(
                tmp / INGREDIENT_METADATA_NAME,
                self._metadata(name, args, state, kind, metrics_step, metrics, model),
            )
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
            logger.info("SoupTrainerCallback: saved ingredient %s (%s)", target, _human(nbytes))
        self._barrier()
        self._run["ingredients"].append(str(target))
        return target

    def _metadata(
        self,
        name: str,
        args: TrainingArguments,
        state: TrainerState,
        kind: str,
        metrics_step: int,
        metrics: dict[str, float],
        model: Any,
    ) -> dict[str, Any]:
        from . import __version__

        hyperparameters = {key: getattr(args, key) for key in _RECORDED_ARGS if hasattr(args, key)}
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "hf_soups_version": __version__,
            "name": name,
            "run": self._run["id"] if self._run else None,
            "kind": kind,
            "created": time.time(),
            "global_step": state.global_step,
            "epoch": state.epoch,
            "max_steps": state.max_steps,
            "trial_name": state.trial_name,
            "trial_params": dict(state.trial_params) if state.trial_params else None,
            "seed": args.seed,
            "data_seed": args.data_seed,
            "hyperparameters": hyperparameters,
            "metrics": metrics,
            "metrics_step": metrics_step if metrics else None,
            "best_model_checkpoint": state.best_model_checkpoint,
            "model_class": type(model).__name__ if model is not None else None,
            "output_dir": str(args.output_dir),
        }

    def _drop_old_checkpoints(self, args: TrainingArguments) -> None:
        run_folders = self._run["ingredients"] if self._run else []
        while len(run_folders) > self.last_k:
            old = Path(run_folders.pop(0))
            if args.should_save and old.exists():
                shutil.rmtree(old)
                logger.info("SoupTrainerCallback: removed %s (last_k=%d)", old, self.last_k)
        self._barrier()

    def _remove_ingredients(self, folders: list[Path]) -> None:
        if self._is_writer():
            for folder in folders:
                if folder.exists():
                    shutil.rmtree(folder)
            logger.info(
                "SoupTrainerCallback: removed %d ingredient folder(s) (keep_ingredients=False)", len(folders)
            )
        self._barrier()

    # ----------------------------------------------------------------------------------------------------------
    # Disk space
    # ----------------------------------------------------------------------------------------------------------

    def _expected_ingredients(self, args: TrainingArguments, state: TrainerState) -> int:
        if self.collect == "final":
            return 1
        strategy = _strategy(args.save_strategy)
        if strategy == "steps" and state.max_steps and args.save_steps:
            save_steps = (
                args.save_steps if args.save_steps >= 1 else math.ceil(state.max_steps * args.save_steps)
            )
            count = math.ceil(state.max_steps / max(int(save_steps), 1))
        elif strategy == "epoch":
            count = max(math.ceil(state.num_train_epochs or args.num_train_epochs), 1)
        else:
            count = 1
        if self.last_k is not None:
            count = min(count, self.last_k + 1)  # one more while the oldest is being replaced
        return count

    def _warn_if_disk_too_small(self, args: TrainingArguments, state: TrainerState, model: Any) -> None:
        if not args.should_save or model is None:
            return
        count = self._expected_ingredients(args, state)
        self._check_free_space(
            _model_nbytes(model) * count, f"{count} ingredient(s) of run {self._run['id']}"
        )

    def _check_free_space(self, needed: int, what: str) -> None:
        if not needed or self._ingredients_dir is None:
            return
        free = _free_bytes(self._ingredients_dir)
        if free is not None and needed > free:
            logger.warning(
                "SoupTrainerCallback: %s need about %s but only %s are free under %s. Free some space, point "
                "ingredients_dir to a larger disk, or keep fewer ingredients (last_k=..., keep_ingredients=False).",
                what,
                _human(needed),
                _human(free),
                self._ingredients_dir,
            )

    # ----------------------------------------------------------------------------------------------------------
    # Distributed helpers
    # ----------------------------------------------------------------------------------------------------------

    def _is_writer(self) -> bool:
        trainer = self._trainer
        if trainer is not None:
            return bool(trainer.args.should_save)
        from accelerate import PartialState

        return PartialState().is_main_process

    def _barrier(self) -> None:
        trainer = self._trainer
        if trainer is None or getattr(trainer.args, "world_size", 1) <= 1:
            return
        from accelerate import PartialState

        PartialState().wait_for_everyone()


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
        [`InvalidArgumentError`]: The trainer shards its parameters.
    """
    import torch

    if trainer is not None:
        _check_replaceable(trainer)
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


def _check_replaceable(trainer: Trainer) -> None:
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        raise InvalidArgumentError(
            "replace_model=True cannot load a soup into FSDP / DeepSpeed sharded parameters. Cook with "
            "output_dir=... and load the soup with from_pretrained instead."
        )


def _absolute(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().absolute()


def _strategy(value: Any) -> str:
    return str(getattr(value, "value", value))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _has_weights(folder: Path) -> bool:
    return any(
        (folder / name).is_file()
        for name in (
            "model.safetensors",
            "model.safetensors.index.json",
            "adapter_model.safetensors",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
        )
    )


__all__ = [
    "INGREDIENT_METADATA_NAME",
    "MANIFEST_NAME",
    "SoupTrainerCallback",
    "is_ingredients_dir",
    "list_ingredients",
    "load_soup_into_model",
    "read_ingredient_metadata",
]
