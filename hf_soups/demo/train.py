"""LP-FT training for the demo: a linear probe, then full fine-tunes started from it.

all-MiniLM-L6-v2 has no zero-shot classification head, so WiSE-FT's "zero-shot" end is replaced by a
**linear probe** (Kumar et al. 2022, LP-FT): the classification head is trained on the frozen encoder's
pooled features, and every full fine-tune starts from that probe. All ingredients then share one
starting point *including the head* (their heads line up, so averaging them is meaningful), and the
probe is WiSE-FT's robust endpoint.

Everything here is a plain PyTorch loop (no `Trainer`): the demo must fit a few CPU minutes, so the probe
precomputes the pooled features once and fits the head with L-BFGS, and evaluation batches examples of
similar length together.

Example:

```python
>>> from hf_soups.demo.data import load_splits, load_tokenizer
>>> from hf_soups.demo.train import FineTuneConfig, encode, fine_tune, train_linear_probe
>>> splits = load_splits(seed=0, train_size=256, validation_size=128, test_size=128)
>>> tokenizer = load_tokenizer()
>>> train, validation = encode(splits["train"], tokenizer), encode(splits["validation"], tokenizer)
>>> probe = train_linear_probe(train, validation, output_dir="runs/probe", tokenizer=tokenizer)
>>> run = fine_tune(probe.path, train, FineTuneConfig(learning_rate=5e-5, steps=8, seed=0), output_dir="runs/ft-0")
```
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError
from .data import ID2LABEL, LABEL2ID, MAX_LENGTH, minilm_path

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

# Examples per forward pass when scoring. Sorted by length, small batches pad least and stay in cache: on 2 CPU
# cores 32 scored the test sets 12% faster than 128 (15% with one thread), 256 was 20% slower.
EVAL_BATCH_SIZE = 32

__all__ = [
    "DivergedError",
    "EncodedSplit",
    "FineTuneConfig",
    "FineTuneResult",
    "ProbeResult",
    "encode",
    "fine_tune",
    "load_classifier",
    "pooled_features",
    "predict",
    "train_linear_probe",
]


@dataclass
class EncodedSplit:
    """A tokenised split kept as plain Python lists (fast to batch on CPU).

    Args:
        input_ids (`list[list[int]]`): token ids per example (truncated, unpadded).
        labels (`list[int]`): gold label per example.
        texts (`list[str]`): the original texts.
    """

    input_ids: list[list[int]]
    labels: list[int]
    texts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, order: Sequence[int] | None = None):
        """Yield `(indices, batch)` with `batch` a dict of padded tensors (`input_ids`, `attention_mask`)."""
        import torch

        order = list(range(len(self))) if order is None else list(order)
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            width = max(len(self.input_ids[i]) for i in indices)
            ids = torch.zeros((len(indices), width), dtype=torch.long)
            mask = torch.zeros((len(indices), width), dtype=torch.long)
            for row, i in enumerate(indices):
                seq = self.input_ids[i]
                ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[row, : len(seq)] = 1
            yield indices, {"input_ids": ids, "attention_mask": mask}

    def length_order(self) -> list[int]:
        """Indices sorted by sequence length (evaluation pads least this way)."""
        return sorted(range(len(self)), key=lambda i: len(self.input_ids[i]))


def encode(
    dataset: Dataset,
    tokenizer: Any,
    *,
    max_length: int = MAX_LENGTH,
    text_column: str = "text",
    label_column: str = "label",
) -> EncodedSplit:
    """Tokenise a split once (truncation to `max_length`, no padding).

    Args:
        dataset (`datasets.Dataset`): rows with a text and a label column.
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.
        max_length (`int`, *optional*, defaults to `48`): truncation length in tokens.
        text_column (`str`, *optional*, defaults to `"text"`): column with the text.
        label_column (`str`, *optional*, defaults to `"label"`): column with the integer label.

    Returns:
        [`EncodedSplit`]: token ids, labels and texts.
    """
    texts = list(dataset[text_column])
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return EncodedSplit(input_ids=ids, labels=[int(y) for y in dataset[label_column]], texts=texts)


def load_classifier(path: str | os.PathLike | None = None, *, num_labels: int = 2) -> PreTrainedModel:
    """A `BertForSequenceClassification` from `path` (default: the bundled MiniLM encoder, new head).

    Args:
        path (`str` or `os.PathLike`, *optional*): a saved classifier or encoder; defaults to
            [`~hf_soups.demo.data.minilm_path`] (pre-trained encoder with a freshly initialised head).
        num_labels (`int`, *optional*, defaults to `2`): number of classes for a new head.

    Returns:
        `BertForSequenceClassification`: the model in eval mode, with the rotten / fresh label names.
    """
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here: the probe trains it
    try:
        model = BertForSequenceClassification.from_pretrained(
            str(path or minilm_path()),
            num_labels=num_labels,
            id2label=dict(ID2LABEL),
            label2id=dict(LABEL2ID),
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    return model


def _inference_batches(split: EncodedSplit, batch_size: int):
    return split.batches(batch_size, split.length_order())


def predict(model: PreTrainedModel, split: EncodedSplit, *, batch_size: int = EVAL_BATCH_SIZE) -> np.ndarray:
    """Logits of `model` on every example of `split`, in the split's order.

    Args:
        model (`PreTrainedModel`): a sequence classifier.
        split ([`EncodedSplit`]): the examples.
        batch_size (`int`, *optional*, defaults to `32`): examples per forward pass (sorted by length).

    Returns:
        `np.ndarray`: `(len(split), num_labels)` float32 logits.
    """
    import numpy as np
    import torch

    was_training = model.training
    model.eval()
    out = np.zeros((len(split), model.config.num_labels), dtype=np.float32)
    with torch.inference_mode():
        for indices, batch in _inference_batches(split, batch_size):
            batch = {k: v.to(model.device) for k, v in batch.items()}
            out[indices] = model(**batch).logits.float().cpu().numpy()
    model.train(was_training)
    return out


def pooled_features(
    model: PreTrainedModel, split: EncodedSplit, *, batch_size: int = EVAL_BATCH_SIZE
) -> torch.Tensor:
    """The pooled `[CLS]` features the classification head sees (`model.bert(...).pooler_output`).

    Args:
        model (`BertForSequenceClassification`): the classifier whose encoder is probed.
        split ([`EncodedSplit`]): the examples.
        batch_size (`int`, *optional*, defaults to `32`): examples per forward pass.

    Returns:
        `torch.Tensor`: `(len(split), hidden_size)` float32 features, in the split's order.
    """
    import torch

    model.eval()
    feats = torch.zeros((len(split), model.config.hidden_size), dtype=torch.float32)
    with torch.inference_mode():
        for indices, batch in _inference_batches(split, batch_size):
            batch = {k: v.to(model.device) for k, v in batch.items()}
            feats[indices] = model.bert(**batch).pooler_output.float().cpu()
    return feats


@dataclass
class ProbeResult:
    """The trained linear probe.

    Args:
        path (`Path`): where the probe classifier was saved (`save_pretrained`).
        model (`PreTrainedModel`): the probe classifier in memory.
        weight_decay (`float`): the L2 strength chosen on validation.
        validation_accuracy (`float`): the probe's validation accuracy.
        sweep (`dict[float, float]`): validation accuracy per L2 strength tried.
        seconds (`float`): wall time.
        validation_logits (`np.ndarray`, *optional*): `(len(validation), num_labels)` logits of the chosen head
            on the validation features (the probe's validation predictions, without another forward pass).
    """

    path: Path
    model: PreTrainedModel
    weight_decay: float
    validation_accuracy: float
    sweep: dict[float, float]
    seconds: float
    validation_logits: np.ndarray | None = field(default=None, repr=False)


def _fit_logistic(features, labels, num_labels: int, l2: float, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    dim = features.shape[1]
    weight = (torch.randn((num_labels, dim), generator=gen) * 0.01).requires_grad_()
    bias = torch.zeros(num_labels, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(features @ weight.T + bias, labels)
        loss = loss + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def train_linear_probe(
    train: EncodedSplit,
    validation: EncodedSplit,
    *,
    output_dir: str | os.PathLike,
    tokenizer: Any = None,
    base_model: str | os.PathLike | None = None,
    weight_decays: Sequence[float] = (1e-4, 1e-3, 1e-2),
    seed: int = 0,
    device: str | None = None,
) -> ProbeResult:
    """Train the classification head on the frozen encoder (the LP of LP-FT) and save the classifier.

    The pooled features of both splits are computed once; a logistic-regression head is fitted with
    full-batch L-BFGS for each L2 strength in `weight_decays`, and the one with the best validation accuracy
    is copied into the model's `classifier`.

    Args:
        train ([`EncodedSplit`]): training examples.
        validation ([`EncodedSplit`]): held-out examples (choose the L2 strength).
        output_dir (`str` or `os.PathLike`): folder for `save_pretrained` (created).
        tokenizer (`PreTrainedTokenizerBase`, *optional*): saved beside the model when given.
        base_model (`str` or `os.PathLike`, *optional*): encoder to probe; defaults to the bundled MiniLM.
        weight_decays (`Sequence[float]`, *optional*): L2 strengths tried.
        seed (`int`, *optional*, defaults to `0`): seed of the head's initialisation.
        device (`str`, *optional*): where the encoder runs (`"cuda"`, ...); default CPU.

    Returns:
        [`ProbeResult`]: the saved probe, its validation accuracy and the L2 sweep.

    Raises:
        [`InvalidArgumentError`]: a split is empty or `weight_decays` is empty.
    """
    import torch

    if not len(train) or not len(validation):
        raise InvalidArgumentError("train_linear_probe needs non-empty train and validation splits.")
    if not weight_decays:
        raise InvalidArgumentError("weight_decays must list at least one L2 strength, e.g. (1e-3,).")
    start = time.perf_counter()
    model = load_classifier(base_model)
    if device is not None:
        model.to(device)
    train_x = pooled_features(model, train)
    val_x = pooled_features(model, validation)
    train_y = torch.tensor(train.labels)
    val_y = torch.tensor(validation.labels)
    num_labels = model.config.num_labels
    sweep: dict[float, float] = {}
    best = None
    for l2 in weight_decays:
        weight, bias = _fit_logistic(train_x, train_y, num_labels, float(l2), seed)
        acc = float(((val_x @ weight.T + bias).argmax(-1) == val_y).float().mean())
        sweep[float(l2)] = acc
        logger.info("linear probe l2=%g: validation accuracy %.4f", l2, acc)
        if best is None or acc > best[0]:
            best = (acc, float(l2), weight, bias)
    assert best is not None
    acc, l2, weight, bias = best
    with torch.no_grad():
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(bias)
    path = Path(output_dir)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return ProbeResult(
        path=path,
        model=model,
        weight_decay=l2,
        validation_accuracy=acc,
        sweep=sweep,
        seconds=time.perf_counter() - start,
        validation_logits=(val_x @ weight.T + bias).numpy(),
    )


@dataclass
class FineTuneConfig:
    """Hyperparameters of one full fine-tune (one soup ingredient).

    Args:
        learning_rate (`float`): peak AdamW learning rate.
        steps (`int`): optimisation steps.
        seed (`int`, *optional*, defaults to `0`): data order and dropout.
        batch_size (`int`, *optional*, defaults to `32`): examples per step.
        warmup_ratio (`float`, *optional*, defaults to `0.1`): linear warm-up share of the steps, then linear
            decay to 0.
        weight_decay (`float`, *optional*, defaults to `0.01`): AdamW weight decay.
    """

    learning_rate: float
    steps: int
    seed: int = 0
    batch_size: int = 32
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        if self.learning_rate <= 0 or self.steps <= 0 or self.batch_size <= 0:
            raise InvalidArgumentError(
                f"learning_rate, steps and batch_size must be positive, got {self.learning_rate}, "
                f"{self.steps}, {self.batch_size}."
            )

    @property
    def name(self) -> str:
        """A short display name, e.g. `ft-lr5e-05-s100-seed0`."""
        return f"ft-lr{self.learning_rate:g}-s{self.steps}-seed{self.seed}"


@dataclass
class FineTuneResult:
    """One trained ingredient.

    Args:
        path (`Path`): the saved classifier folder.
        config ([`FineTuneConfig`]): its hyperparameters.
        seconds_per_step (`float`): measured training speed.
        final_loss (`float`): mean training loss over the last 10% of the steps.
    """

    path: Path
    config: FineTuneConfig
    seconds_per_step: float
    final_loss: float

    @property
    def name(self) -> str:
        return self.config.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            **asdict(self.config),
            "seconds_per_step": self.seconds_per_step,
            "final_loss": self.final_loss,
        }


class DivergedError(InvalidArgumentError):
    """A fine-tune whose training loss became NaN or infinite (too high a learning rate)."""


def _length_grouped_batches(split: EncodedSplit, batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches of similar lengths (less padding), in random order.

    Like `transformers.trainer_pt_utils.LengthGroupedSampler`: shuffle, sort chunks of 50 batches by length,
    cut them into batches, shuffle the batches. Every example is seen once per epoch.
    """
    order = list(range(len(split)))
    rng.shuffle(order)
    chunk = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: len(split.input_ids[i]))
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def fine_tune(
    start: str | os.PathLike,
    train: EncodedSplit,
    config: FineTuneConfig,
    *,
    output_dir: str | os.PathLike,
    tokenizer: Any = None,
    device: str | None = None,
) -> FineTuneResult:
    """Fine-tune every weight of the classifier saved in `start` (the FT of LP-FT) and save the result.

    Args:
        start (`str` or `os.PathLike`): the starting classifier (the linear probe).
        train ([`EncodedSplit`]): training examples; epochs are reshuffled with `config.seed`.
        config ([`FineTuneConfig`]): learning rate, steps, seed, batch size.
        output_dir (`str` or `os.PathLike`): folder for `save_pretrained`.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): saved beside the model when given.
        device (`str`, *optional*): where to train (`"cuda"`, ...); default CPU.

    Returns:
        [`FineTuneResult`]: the saved ingredient and its training speed.
    """
    import torch

    if not len(train):
        raise InvalidArgumentError("fine_tune needs a non-empty training split.")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    model = load_classifier(start)
    if device is not None:
        model.to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
    )
    warmup = max(1, int(round(config.warmup_ratio * config.steps)))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (config.steps - step) / max(1, config.steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    labels = torch.tensor(train.labels)
    queue: list[list[int]] = []
    losses: list[float] = []
    start_time = time.perf_counter()
    for step in range(config.steps):
        if not queue:
            queue = _length_grouped_batches(train, config.batch_size, rng)
        indices = queue.pop(0)
        _, batch = next(train.batches(len(indices), indices))
        batch = {k: v.to(model.device) for k, v in batch.items()}
        loss = model(**batch, labels=labels[indices].to(model.device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise DivergedError(
                f"Fine-tune {config.name} diverged (loss {losses[-1]} at step {step}); lower the learning rate."
            )
    seconds_per_step = (time.perf_counter() - start_time) / config.steps
    model.eval()
    path = Path(output_dir)
    model.cpu().save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    tail = losses[-max(1, len(losses) // 10) :]
    logger.info(
        "fine-tune %s: %.2f s/step, final loss %.4f", config.name, seconds_per_step, sum(tail) / len(tail)
    )
    return FineTuneResult(
        path=path, config=config, seconds_per_step=seconds_per_step, final_loss=sum(tail) / len(tail)
    )
