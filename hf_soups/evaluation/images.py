"""Image eval sets: a `datasets.Dataset` with an image column, preprocessed once into `pixel_values`.

The image column is the one whose feature is `datasets.Image` (else an `image` / `img` column holding PIL images).
Every image is converted to the model's colour mode (`RGB`, or `L` for a one-channel model), as the transformers
image-classification example does, and run through the ingredients' image processor (`AutoImageProcessor` on their
folder, or `image_processor=`) in chunks; the `pixel_values` are kept in memory, so every candidate model of a
greedy soup or a sweep is scored on the same tensors without preprocessing again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import EvaluationError

#: columns tried, in order, when no column has the `datasets.Image` feature
IMAGE_COLUMN_GUESSES = ("image", "img", "images")
#: images preprocessed per processor call (bounds the peak memory of the decoded images)
CHUNK_SIZE = 256


def find_image_column(ds: Any) -> str | None:
    """The image column of a dataset: the first with the `datasets.Image` feature, else `image`/`img` of PIL images."""
    features = getattr(ds, "features", None) or {}
    for name, feature in features.items():
        if type(feature).__name__ == "Image" and type(feature).__module__.startswith("datasets"):
            return name
    columns = list(getattr(ds, "column_names", []) or [])
    for name in IMAGE_COLUMN_GUESSES:
        if name in columns and len(ds) and _is_pil(ds[0][name]):
            return name
    return None


def _is_pil(value: Any) -> bool:
    return any(c.__module__.startswith("PIL.") and c.__name__ == "Image" for c in type(value).__mro__)


def image_mode(config: Mapping[str, Any] | None) -> str:
    """`"L"` for a model whose vision input has one channel (`num_channels` of the config or its vision config), else
    `"RGB"`."""
    config = dict(config or {})
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), Mapping) else {}
    channels = config.get("num_channels", vision.get("num_channels", 3))
    return "L" if channels == 1 else "RGB"


def image_processor_of(processor: Any) -> Any:
    """The image processor of a multimodal processor (`CLIPProcessor.image_processor`), or `processor` itself."""
    inner = getattr(processor, "image_processor", None)
    return inner if inner is not None else processor


def preprocess_images(
    processor: Any,
    ds: Any,
    column: str,
    labels: list[Any] | None,
    *,
    name: str,
    mode: str = "RGB",
    chunk_size: int = CHUNK_SIZE,
) -> list[dict[str, Any]]:
    """The examples of an image eval set: `pixel_values` (and `pixel_mask` when the processor makes one), `labels`.

    Args:
        processor: an image processor (or a processor holding one), called as `processor(images=[...],
            return_tensors="np")`.
        ds (`datasets.Dataset`): the eval set.
        column (`str`): its image column.
        labels (`list`, *optional*): the labels, attached as they are.
        name (`str`): the set's name (for errors).
        mode (`str`, *optional*, defaults to `"RGB"`): PIL mode every image is converted to.
        chunk_size (`int`, *optional*): images per processor call.

    Raises:
        [`EvaluationError`]: a missing image, or the processor fails on the images.
    """
    import torch

    processor = image_processor_of(processor)
    examples: list[dict[str, Any]] = []
    for start in range(0, len(ds), chunk_size):
        images = list(ds[start : start + chunk_size][column])
        for i, image in enumerate(images):
            if image is None:
                raise EvaluationError(
                    f"Eval set {name!r}: example {start + i} has no image (column {column!r}); drop it or fill it."
                )
            if _is_pil(image) and image.mode != mode:
                images[i] = image.convert(mode)
        try:
            out = processor(images=images, return_tensors="np")
        except Exception as err:
            raise EvaluationError(
                f"Eval set {name!r}: the image processor {type(processor).__name__} failed on the images of column "
                f"{column!r} ({type(err).__name__}: {err}); pass image_processor= matching the model, or a "
                "pixel_values column."
            ) from err
        keys = [k for k in ("pixel_values", "pixel_mask") if k in out]
        arrays = {k: torch.from_numpy(out[k]) for k in keys}
        for i in range(len(images)):
            examples.append({k: arrays[k][i] for k in keys})
    if labels is not None:
        for ex, label in zip(examples, labels):
            ex["labels"] = label
    return examples


__all__ = [
    "IMAGE_COLUMN_GUESSES",
    "find_image_column",
    "image_mode",
    "image_processor_of",
    "preprocess_images",
]
