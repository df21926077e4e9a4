"""Tiny image models and image sets built in the tests (no network): CLIP, ViT, and scikit-learn's digits.

The digits (8x8 grey levels 0..16) are upsampled to 16x16 RGB PIL images; the shifted copy inverts them.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import torch

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_SIZE = 16


def digit_images(n: int = 60, *, start: int = 0, shift: str | None = None):
    """`(images, labels)`: `n` digits as 16x16 RGB PIL images; `shift="invert"` inverts them, `"noise"` adds noise."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = digits.images[start : start + n] / 16.0  # [n, 8, 8] in [0, 1]
    labels = [int(y) for y in digits.target[start : start + n]]
    if shift == "invert":
        pixels = 1.0 - pixels
    elif shift == "noise":
        pixels = np.clip(pixels + np.random.default_rng(0).normal(0, 0.3, pixels.shape), 0, 1)
    scale = IMAGE_SIZE // 8
    images = []
    for p in pixels:
        grey = np.kron(p, np.ones((scale, scale)))
        images.append(Image.fromarray((grey * 255).astype(np.uint8), mode="L").convert("RGB"))
    return images, labels


def digit_dataset(n: int = 60, *, start: int = 0, shift: str | None = None, class_label: bool = True):
    """A `datasets.Dataset` with an `image` column (the `datasets.Image` feature) and a `label` column."""
    from datasets import ClassLabel, Dataset, Features, Image, Value

    images, labels = digit_images(n, start=start, shift=shift)
    label = ClassLabel(names=DIGIT_NAMES) if class_label else Value("int64")
    features = Features({"image": Image(), "label": label})
    return Dataset.from_dict({"image": images, "label": labels}, features=features)


def tiny_clip_tokenizer():
    """A character-level `CLIPTokenizer` (lowercase letters and '.'), built from a vocabulary in memory."""
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase) + ["."]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip_processor():
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )


def tiny_clip_config():
    from transformers import CLIPConfig

    text = dict(
        vocab_size=56,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=40,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(
        image_size=IMAGE_SIZE,
        patch_size=4,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_channels=3,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def make_tiny_clip(seed: int = 0, base_seed: int = 1234, noise: float = 0.0):
    """A tiny random `CLIPModel`: one shared init (`base_seed`) plus seeded noise (a stand-in fine-tune)."""
    from transformers import CLIPModel

    torch.manual_seed(base_seed)
    model = CLIPModel(tiny_clip_config())
    if noise:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * noise)
    return model.eval()


def save_clip(model, path: Path) -> Path:
    """A CLIP folder as `save_pretrained` writes it, with its tokenizer and image processor."""
    model.save_pretrained(path)
    tiny_clip_tokenizer().save_pretrained(path)
    tiny_clip_processor().save_pretrained(path)
    return Path(path)


def tiny_vit_processor():
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def make_tiny_vit(seed: int = 0, base_seed: int = 1234, noise: float = 0.0):
    """A tiny random `ViTForImageClassification` over the ten digits."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=4,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_labels=10,
        id2label=dict(enumerate(DIGIT_NAMES)),
        label2id={n: i for i, n in enumerate(DIGIT_NAMES)},
    )
    torch.manual_seed(base_seed)
    model = ViTForImageClassification(config)
    if noise:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * noise)
    return model.eval()


def save_vit(model, path: Path, *, processor: bool = True) -> Path:
    model.save_pretrained(path)
    if processor:
        tiny_vit_processor().save_pretrained(path)
    return Path(path)
