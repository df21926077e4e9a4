"""Zero-shot image classification with a CLIP-family model (`CLIPModel`, `SiglipModel`, `AlignModel`, ...).

A model that exposes `get_text_features` and `get_image_features` is scored without a classification head, as in
the CLIP paper: every class name is put into every prompt template (`"a photo of a {}."`), the prompts are
embedded by the model's own text tower, L2-normalised, averaged per class and normalised again; an image's logits
are `exp(logit_scale) * <image embedding, class embedding>` (plus `logit_bias` for SigLIP), which is the model's
own `logits_per_image` when there is one template.

The prompts are tokenized once, when the evaluator is bound (with the ingredients' tokenizer, padded as the
transformers zero-shot pipeline pads them); the class embeddings are computed again for every model evaluated, so
each candidate of a WiSE-FT sweep or a greedy soup is scored with its own (interpolated) text tower.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ...errors import EvaluationError
from ..checks import check_ranges, input_limits, input_ranges
from .base import TaskContext
from .classification import Classification

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: the prompt template used when `templates=` is not given
DEFAULT_TEMPLATES = ("a photo of a {}.",)


def is_dual_encoder(architecture: str | None, model: Any = None) -> bool:
    """Whether a model (or the transformers class an architecture names) has `get_text_features` and
    `get_image_features`: a CLIP-family model that can classify images zero-shot."""

    def both(obj: Any) -> bool:
        return callable(getattr(obj, "get_text_features", None)) and callable(
            getattr(obj, "get_image_features", None)
        )

    if model is not None:
        return both(model)
    if not architecture or not architecture.endswith("Model"):
        return False
    import transformers

    try:
        cls = getattr(transformers, architecture, None)
    except Exception:  # an optional dependency of that model is missing
        return False
    return cls is not None and both(cls)


def class_label_names(ds: Any, label_column: str | None) -> list[str] | None:
    """The names of a `datasets.ClassLabel` label column, else `None`."""
    feature = (getattr(ds, "features", None) or {}).get(label_column) if label_column else None
    names = getattr(feature, "names", None)
    return list(names) if names else None


def features(output: Any) -> torch.Tensor:
    """The embedding `get_text_features` / `get_image_features` return (a tensor, or an output's `pooler_output`)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        pooled = output[0] if isinstance(output, (tuple, list)) else None
    if not isinstance(pooled, torch.Tensor):
        raise EvaluationError(
            f"Zero-shot classification needs embeddings from get_text_features/get_image_features, got "
            f"{type(output).__name__}; pass compute_metrics= to score this model another way."
        )
    return pooled


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(p=2, dim=-1, keepdim=True)


class ZeroShotClassification(Classification):
    """CLIP-family models: images classified by similarity to class prompts embedded by the model's text tower.

    Labels are class ids in the order of `class_names` (or the class names themselves); the metric sees the argmax of
    the zero-shot logits, and `loss` is their cross-entropy.
    """

    name = "zero-shot-classification"

    def __init__(self, **kwargs: Any):
        kwargs["problem_type"] = "single_label_classification"
        kwargs["label2id"] = None  # a CLIP config's id2label says nothing of the eval classes
        kwargs["num_labels"] = None
        super().__init__(**kwargs)
        self.class_names: list[str] | None = None
        self.templates: list[str] = list(DEFAULT_TEMPLATES)
        self.prompts: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(class_names={self.class_names}, templates={self.templates})"

    def configure(self, options: Mapping[str, Any], context: TaskContext) -> None:
        """Settle the class names and templates, and tokenize the prompts once (class-major: every template of
        class 0, then of class 1, ...).

        Raises:
            [`EvaluationError`]: no class names (neither `class_names=` nor a `ClassLabel` label column), or prompt
                token ids outside the text tower's vocabulary.
        """
        names = options.get("class_names") or class_label_names(
            context.sets[context.select_on], context.label_columns.get(context.select_on)
        )
        if not names:
            raise EvaluationError(
                f"Zero-shot classification of a {context.architecture or 'CLIP-family model'} needs the class "
                "names: pass class_names= (in label order), or an eval set whose label column is a "
                "datasets.ClassLabel."
            )
        templates = options.get("templates") or DEFAULT_TEMPLATES
        self.class_names = list(names)
        self.templates = [templates] if isinstance(templates, str) else list(templates)
        self.num_labels = len(self.class_names)
        self.label2id = {name: i for i, name in enumerate(self.class_names)}
        tokenizer = context.tokenizers.get(
            f"tokenize the zero-shot prompts ({len(self.class_names)} classes x {len(self.templates)} templates)"
        )
        tokenizer = getattr(tokenizer, "tokenizer", None) or tokenizer  # a CLIPProcessor: its tokenizer
        prompts = [t.replace("{}", c) for c in self.class_names for t in self.templates]
        config = dict(context.config)
        text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else {}
        max_positions = text.get("max_position_embeddings", config.get("max_position_embeddings"))
        padding: dict[str, Any] = {"padding": True}
        if "siglip" in str(
            config.get("model_type", "")
        ):  # as transformers' zero-shot pipeline tokenizes SigLIP
            padding = {"padding": "max_length", "max_length": int(max_positions or 64)}
        elif isinstance(max_positions, int) and max_positions > 0:
            padding["max_length"] = max_positions
        enc = tokenizer(prompts, truncation=True, return_tensors="pt", **padding)
        keep = ("input_ids", "attention_mask", "position_ids")
        self.prompts = {k: enc[k] for k in keep if k in enc}
        rows = [{"input_ids": ids} for ids in self.prompts["input_ids"].tolist()]
        check_ranges(
            "zero-shot prompts",
            input_ranges("zero-shot prompts", rows),
            input_limits(config),
            "the model config",
        )

    def forward(self, model: Any, *, device: Any, batch_size: int) -> Callable[[dict], torch.Tensor]:
        """Embed the class prompts with `model`'s text tower, then map each batch of images to zero-shot logits."""
        import torch

        classes = self.class_embeddings(model, device=device, batch_size=batch_size)
        scale = getattr(model, "logit_scale", None)
        scale = scale.detach().float().exp().reshape(()) if isinstance(scale, torch.Tensor) else 1.0
        bias = getattr(model, "logit_bias", None)
        bias = bias.detach().float().reshape(()) if isinstance(bias, torch.Tensor) else 0.0

        def zero_shot_logits(inputs: dict) -> torch.Tensor:
            embeds = _normalise(
                features(model.get_image_features(pixel_values=inputs["pixel_values"])).float()
            )
            return embeds @ classes.T * scale + bias

        return zero_shot_logits

    def class_embeddings(self, model: Any, *, device: Any, batch_size: int) -> torch.Tensor:
        """`[num_classes, dim]`: each class's prompt embeddings normalised, averaged over templates, normalised."""
        import torch

        n = len(self.prompts["input_ids"])
        parts = []
        for start in range(0, n, batch_size):
            chunk = {k: v[start : start + batch_size].to(device) for k, v in self.prompts.items()}
            parts.append(_normalise(features(model.get_text_features(**chunk)).float()))
        embeds = torch.cat(parts).reshape(len(self.class_names), len(self.templates), -1)
        return _normalise(embeds.mean(dim=1))


__all__ = ["DEFAULT_TEMPLATES", "ZeroShotClassification", "class_label_names", "features", "is_dual_encoder"]
