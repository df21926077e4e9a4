"""`merge_models`: the one function most users call."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .ingredients import ModelReference
    from .publishing.recipe_file import RecipeFile
    from .soup import Soup

logger = logging.getLogger(__name__)


def merge_models(
    models: Sequence[ModelReference] | str | os.PathLike,
    *,
    method: str | Sequence[str] = "uniform",
    weights: Sequence[float] | None = None,
    base_model: ModelReference | None = None,
    alpha: float | Sequence[float] | None = None,
    scaling: float | Sequence[float] | None = None,
    density: float | Sequence[float] | None = None,
    seed: int | None = None,
    t: float | Sequence[float] | None = None,
    granularity: str = "ingredient",
    include_base: bool = False,
    learning_rate: float = 0.05,
    epochs: int = 5,
    accumulation_steps: int = 4,
    validation_fraction: float = 0.2,
    eval_dataset: Any = None,
    metric: Any = None,
    metric_key: str | None = None,
    greater_is_better: bool | None = None,
    select_on: str | None = None,
    compute_metrics: Callable[..., dict[str, float]] | None = None,
    tokenizer: Any = None,
    text_columns: str | Sequence[str] | None = None,
    label_column: str | None = None,
    image_processor: Any = None,
    class_names: Sequence[str] | None = None,
    templates: str | Sequence[str] | None = None,
    batch_size: int = 32,
    device: str | None = None,
    sort_by_length: bool = True,
    eval_dtype: str | torch.dtype | None = None,
    autocast: str | torch.dtype | None = None,
    scores: Mapping[str, float] | None = None,
    strict: bool = False,
    ensemble_baseline: bool = False,
    full_evaluation: bool = False,
    prediction_cache_dir: str | os.PathLike | None = None,
    adapter_output: str = "merged",
    rank: int | None = None,
    output_dir: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "50GB",
    push_to_hub: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> Soup:
    """Cook a model soup from fine-tuned models.

    Ingredients are resolved (Hub downloads go through the HF cache), checked against each other (architecture,
    tensor names and shapes, labels, vocabulary) into one plan, then merged one tensor at a time: memory does
    not grow with the number of ingredients.

    Args:
        models (`Sequence`, or `str`):
            The ingredients: Hub model IDs (`"org/name"`, `"org/name@revision"`), local folders written by
            `save_pretrained` (Trainer `checkpoint-N` folders too), in-memory `PreTrainedModel`s, PEFT adapters,
            or [`Ingredient`] objects. A single folder written by [`SoupTrainerCallback`] expands into its
            ingredients.
        method (`str` or `Sequence[str]`, *optional*, defaults to `"uniform"`):
            `"uniform"` (mean, or weighted mean with `weights`), `"greedy"` (greedy soup chosen on
            `eval_dataset`), `"wise-ft"` (interpolation with `base_model` by `alpha`), or one of the task-vector
            family: `"task-arithmetic"`, `"ties"`, `"dare-linear"`, `"dare-ties"`, `"slerp"`, `"model-stock"`,
            or `"learned"` (coefficients learned on `eval_dataset`'s loss) (see docs/methods.md). A list of methods cooks each (with the knobs it takes, sweeps included), scores
            each on `eval_dataset` with one live model, and keeps the best on `select_on`; `soup.comparison` and
            the report list every method beside the best single ingredient.
        weights (`Sequence[float]`, *optional*):
            Relative weights of the ingredients (normalised; must be >= 0 and not all zero). Task arithmetic,
            TIES and DARE use them as given (default 1 each), and a list of weight lists is a sweep.
        base_model (*optional*):
            WiSE-FT's zero-shot (or linear-probe) end; θ₀ of task arithmetic, TIES, DARE and Model Stock; for
            adapters, their base model.
        alpha (`float` or `Sequence[float]`, *optional*):
            WiSE-FT mixing coefficient in [0, 1] (1 = fine-tuned). A list is a sweep chosen on `eval_dataset`.
        scaling (`float` or `Sequence[float]`, *optional*):
            Task arithmetic, TIES, DARE: λ, the factor on the merged task vector (default 1). A list is a sweep.
        density (`float` or `Sequence[float]`, *optional*):
            TIES, DARE (required): fraction of each task vector kept per tensor, in (0, 1]. A list is a sweep.
        seed (`int`, *optional*):
            DARE (required): seed of the random drop; the soup is reproducible bit for bit from it. Learned soups:
            seed of the validation split and the batch order (default 0).
        t (`float` or `Sequence[float]`, *optional*):
            SLERP (required): interpolation in [0, 1] between the two ingredients. A list is a sweep.
        granularity (`str`, *optional*, defaults to `"ingredient"`):
            Learned soups: one coefficient per ingredient, or per ingredient and per block (`"layer"`; see
            docs/methods.md for how tensors are grouped).
        include_base (`bool`, *optional*, defaults to `False`): learned soups: mix `base_model` as a member too.
        learning_rate (`float`, *optional*, defaults to 0.05): learned soups: Adam's step on the mixing logits.
        epochs (`int`, *optional*, defaults to 5): learned soups: passes over the training part of `select_on`.
        accumulation_steps (`int`, *optional*, defaults to 4): learned soups: batches per optimiser step (each
            step streams every ingredient twice).
        validation_fraction (`float`, *optional*, defaults to 0.2): learned soups: part of `select_on` held back
            to pick the best step and stop early (0: the fixed budget, no early stopping).
        eval_dataset (`datasets.Dataset` or `dict[str, datasets.Dataset]`, *optional*):
            Held-out data for greedy soups, sweeps and reporting.
        metric (`str`, `tuple`, `evaluate.EvaluationModule` or callable, *optional*):
            The metric to maximise (works offline for common classification metrics). Default: the task's,
            `"perplexity"` (held-out loss, no labels needed) for causal and masked language models, `"accuracy"`
            for every other model.
        metric_key (`str`, *optional*): which number of the metric's output to maximise.
        greater_is_better (`bool`, *optional*): set to `False` for losses.
        select_on (`str`, *optional*): the eval set that drives decisions when several are given.
        compute_metrics (`Callable`, *optional*): a Trainer-style `compute_metrics(EvalPrediction) -> dict`.
        tokenizer (*optional*): tokenizer for raw-text eval sets (defaults to the ingredients' tokenizer).
        text_columns (`str` or `Sequence[str]`, *optional*): text column(s) of a raw eval set.
        label_column (`str`, *optional*): label column of the eval set (default `label`/`labels`).
        image_processor (*optional*): image processor (or its folder / Hub ID) for eval sets with an image column
            (default: the ingredients' own `preprocessor_config.json`); images are preprocessed once.
        class_names (`Sequence[str]`, *optional*): zero-shot classification of CLIP-family models (`CLIPModel`,
            `SiglipModel`, ...): the class names in label order (default: the label column's `ClassLabel` names).
        templates (`str` or `Sequence[str]`, *optional*): zero-shot prompt templates with one `{}` (default
            `"a photo of a {}."`); each candidate model embeds the prompts with its own text tower.
        batch_size (`int`, *optional*, defaults to 32): evaluation batch size.
        device (`str`, *optional*): evaluation device (CPU by default, CUDA when asked).
        sort_by_length (`bool`, *optional*, defaults to `True`): batch eval examples longest first (less
            padding); predictions and scores keep the set's own order (docs/evaluation.md).
        eval_dtype (`str` or `torch.dtype`, *optional*): the dtype the live model is evaluated in (`"float32"`,
            `"bfloat16"`, `"float16"`, `"float64"`; default: the ingredients' own). Soup scores are then those of
            the soup in that dtype; the written soup keeps `dtype`.
        autocast (`str` or `torch.dtype`, *optional*): `"bfloat16"` or `"float16"`: forward passes run under
            `torch.autocast` (mixed precision) on the evaluation device.
        scores (`Mapping[str, float]`, *optional*): held-out scores already known, by ingredient name (greedy).
        strict (`bool`, *optional*, defaults to `False`): greedy keeps a candidate only on strict improvement.
        ensemble_baseline (`bool`, *optional*): also score the logit ensemble of the ingredients (reported only).
        full_evaluation (`bool`, *optional*, defaults to `False`): greedy: score every candidate on every set to
            the end, even one that can no longer be kept (by default a candidate whose accuracy, loss or
            perplexity can no longer match the soup is rejected as soon as that is certain; docs/evaluation.md).
        prediction_cache_dir (`str` or `os.PathLike`, *optional*): opt-in folder where ingredients' predictions
            on the eval sets are kept (keyed by their commit or content hash, the eval set, task and metric) and
            reused by later runs, e.g. cooking the same ingredients with another recipe.
        adapter_output (`str`, *optional*, defaults to `"merged"`): for adapter soups, `"merged"` (a full model)
            or `"adapter"` (one LoRA adapter; exact, or truncated to `rank`).
        rank (`int`, *optional*): rank of the SVD-truncated adapter form.
        output_dir (`str` or `os.PathLike`, *optional*): stream the soup there as sharded safetensors (atomic).
        dtype (`str` or `torch.dtype`, *optional*): output dtype (default: the first ingredient's).
        max_shard_size (`int` or `str`, *optional*, defaults to `"50GB"`): shard size limit.
        push_to_hub (`str`, *optional*): push the soup with its model card to this repository.
        private (`bool`, *optional*): visibility of a repository created by `push_to_hub`.
        token (`str` or `bool`, *optional*): Hub token (defaults to `HF_TOKEN` / the stored login).
        cache_dir (`str`, *optional*): HF cache folder.
        revision (`str`, *optional*): revision for Hub references that name none.
        progress (`bool`, *optional*, defaults to `True`): progress bars (also off with
            `HF_HUB_DISABLE_PROGRESS_BARS=1`).
        trust_remote_code (`bool`, *optional*, defaults to `False`): allow metric scripts (local folders or Hub
            metrics that are not bundled with hf_soups) to run, like `trust_remote_code` in transformers.

    Every option is declared once, in [`SoupConfig`] / [`EvalConfig`] / the recipe's parameters
    (`hf_soups.config`): the same checks run for this function, `hf-soups`, recipe files and
    [`SoupTrainerCallback`]. Options the chosen method does not take (`alpha=` with `method="uniform"`) are
    refused by name.

    Returns:
        [`Soup`]: `.model`, `.ingredients`, `.score`, `.save_pretrained()`, `.push_to_hub()`, `.report()`.

    Raises:
        [`InvalidArgumentError`]: bad options (checked before any download or tensor work).
        [`IngredientNotFoundError`]: a reference cannot be found.
        [`IncompatibleIngredientsError`]: the ingredients cannot be souped together.
        [`CorruptCheckpointError`], [`NonFiniteTensorError`]: broken weights.
        [`EvaluationError`]: evaluation cannot run as asked.

    Example:

    ```python
    >>> from hf_soups import merge_models
    >>> soup = merge_models(["org/ft-lr1e-5", "org/ft-lr3e-5", "./runs/ft-c"], output_dir="./soup")  # doctest: +SKIP
    >>> soup.model  # doctest: +SKIP
    ```
    """
    options = {name: value for name, value in locals().items() if name != "models"}  # every keyword argument
    from .adapters.resolve import bind_adapter_bases
    from .config import SoupConfig, check_models
    from .core.output_dir import check_output_dir
    from .core.sources import parse_dtype
    from .ingredients import as_ingredients, resolve
    from .kitchen import Kitchen
    from .lm_eval_task import LMEvalTask
    from .recipes import get_recipe

    check_models(models)
    ingredients = as_ingredients(models)
    if weights is None and any(i.weight is not None for i in ingredients):
        options["weights"] = [1.0 if i.weight is None else i.weight for i in ingredients]
    config = SoupConfig.from_options(options, n_models=len(ingredients))
    recipes = [get_recipe(m) for m in config.methods]
    out_dtype = parse_dtype(config.dtype)
    output_dir = Path(config.output_dir).expanduser() if config.output_dir is not None else None
    check_output_dir(output_dir, ingredients, base=config.base_model)  # before any download or tensor read
    ev = config.eval

    evaluator = None
    if ev.eval_dataset is not None or isinstance(
        ev.metric, LMEvalTask
    ):  # an lm-eval task brings its own data
        from .evaluation import build_evaluator

        evaluator = build_evaluator(
            ev.eval_dataset,
            metric=ev.metric,
            metric_key=ev.metric_key,
            greater_is_better=ev.greater_is_better,
            select_on=ev.select_on,
            compute_metrics=ev.compute_metrics,
            tokenizer=ev.tokenizer,
            text_columns=ev.text_columns,
            label_column=ev.label_column,
            image_processor=ev.image_processor,
            class_names=ev.class_names,
            templates=ev.templates,
            batch_size=ev.batch_size,
            device=ev.device,
            sort_by_length=ev.sort_by_length,
            eval_dtype=ev.eval_dtype,
            autocast=ev.autocast,
            progress=progress,
            trust_remote_code=config.trust_remote_code,
            prediction_cache_dir=ev.prediction_cache_dir,
        )

    hub_kwargs = {"token": token, "cache_dir": cache_dir, "revision": revision}
    resolved = [resolve(ing, **hub_kwargs) for ing in ingredients]
    base = None
    if base_model is not None:
        from .ingredients import Ingredient

        base_ing = base_model if isinstance(base_model, Ingredient) else Ingredient(base_model)
        base = resolve(base_ing, **hub_kwargs)
    if any(r.kind == "adapter" for r in resolved):
        bind_adapter_bases(resolved, base, **hub_kwargs)
    if evaluator is not None and hasattr(evaluator, "bind"):
        evaluator.bind(resolved, base=base, tokenizer=tokenizer)

    kitchen = Kitchen(
        ingredients=resolved,
        base=base,
        options=config.recipe_options(),
        evaluator=evaluator,
        output_dir=output_dir,
        dtype=out_dtype,
        max_shard_size=config.max_shard_size,
        progress=progress,
        reference_index=len(resolved) if (any(r.needs_base for r in recipes) and base is not None) else 0,
        tokenizer=tokenizer,
    )
    try:
        adapter_form = any(r.kind == "adapter" for r in resolved) and config.adapter_output == "adapter"
        if config.compared is not None:
            from .kitchen import AdapterKitchen, cook_comparison

            soup = cook_comparison(
                AdapterKitchen.wrap(kitchen) if adapter_form else kitchen,
                {m: config.recipe_options(m) for m in config.methods},
            )
        elif adapter_form:
            from .kitchen import cook_adapter_soup

            soup = cook_adapter_soup(kitchen, recipes[0])
        else:
            soup = recipes[0].cook(kitchen)
    finally:
        for r in kitchen.members:
            r.close()
    if push_to_hub:
        soup.push_to_hub(push_to_hub, private=private, token=token)
    return soup


def cook_recipe(
    recipe: RecipeFile | str | os.PathLike, *, trust_remote_code: bool = False, **overrides: Any
) -> Soup:
    """Cooks a recipe: `merge_models(**recipe.to_merge_kwargs(), **overrides)`.

    The soup written to disk carries this recipe (with resolved revisions) as `soup_recipe.yaml`.

    Args:
        recipe ([`RecipeFile`], `str` or `os.PathLike`):
            A recipe, or the path of a recipe file.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow the recipe file to name code (see [`~publishing.recipe_file.load_recipe`]).
        **overrides:
            `merge_models` keyword arguments that replace the recipe's (`output_dir`, `push_to_hub`, `progress`...).

    Returns:
        [`Soup`]: the soup.

    Example:

    ```python
    >>> from hf_soups.api import cook_recipe
    >>> soup = cook_recipe("recipe.yaml", output_dir="my-soup")  # doctest: +SKIP
    ```
    """
    from .publishing.recipe_file import RecipeFile, active_recipe, load_recipe

    if not isinstance(recipe, RecipeFile):
        recipe = load_recipe(recipe, trust_remote_code=trust_remote_code)
    elif trust_remote_code and not recipe.trust_remote_code:
        recipe = recipe.with_options()
        recipe.trust_remote_code = True
    kwargs = recipe.to_merge_kwargs()
    kwargs.update(overrides)
    with active_recipe(recipe):
        soup = merge_models(**kwargs)
    # later saves (soup.save_pretrained, soup.push_to_hub) record this recipe's eval data and metric too
    soup._source_recipe = recipe  # type: ignore[attr-defined]
    return soup
