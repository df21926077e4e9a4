"""Causal and masked language models, scored on their own token loss (perplexity), optionally token accuracy.

Without labels the inputs are the targets: the collator shifts nothing and labels the input ids (causal, the
logits are shifted here), or 15% of the tokens are masked once with a fixed seed (masked).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..checks import check_token_labels, labels_of
from ..data import mask_tokens, tokenize_text
from .base import Collector, Gather, MetricFn, Predictions, Task

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..data import TokenizerSource


def perplexity(loss: float) -> float:
    """`exp(loss)`, capped so that a diverged model gives a huge number rather than an overflow."""
    return math.exp(min(loss, 700.0)) if not math.isnan(loss) else float("nan")


class LMCollector(Collector):
    """Sums the token loss and keeps the argmax of the scored tokens (the logits are too large to keep)."""

    def __init__(self, gather: Gather, keep_raw: bool, shift: bool):
        import torch

        super().__init__(gather, keep_raw)
        self.shift = shift
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        self.loss_count = torch.zeros((), dtype=torch.float64)
        self.pred_parts: list = []

    def add(self, logits: torch.Tensor, labels: torch.Tensor | None) -> None:
        import torch

        if self.shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        tok_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
        ).view(labels.shape)
        valid = labels != -100
        per_example = torch.stack([tok_loss.sum(-1).double(), valid.sum(-1).double()], dim=-1)
        preds = torch.where(valid, logits.argmax(-1), torch.full_like(labels, -100))
        if self.keep_raw:
            g_logits, g_labels = self.gather((logits, labels), pad_dims=(1, 1), pad_values=(-100, -100))
            self.out.raw_logits.append(g_logits.cpu().numpy())
            self.out.raw_labels.append(g_labels.cpu().numpy())
        g_stats, g_preds, g_labels = self.gather(
            (per_example, preds, labels), pad_dims=(None, 1, 1), pad_values=(0, -100, -100)
        )
        self.loss_sum += g_stats[:, 0].sum().cpu()
        self.loss_count += g_stats[:, 1].sum().cpu()
        mask = g_labels != -100
        self.pred_parts.append(g_preds[mask].cpu().numpy())
        self.label_parts.append(g_labels[mask].cpu().numpy())
        self.count_parts.append(mask.sum(1).cpu().numpy())

    def finish(self) -> Predictions:
        import numpy as np

        out = self.out
        out.loss_sum, out.loss_count = float(self.loss_sum), float(self.loss_count)
        out.preds = np.concatenate(self.pred_parts) if self.pred_parts else np.zeros(0, dtype=np.int64)
        out.labels = np.concatenate(self.label_parts) if self.label_parts else np.zeros(0, dtype=np.int64)
        return self.restore_order()


class _LanguageModel(Task):
    needs_labels = False

    @property
    def n_classes(self) -> int | None:
        return None

    def check_label_ranges(self, name: str, examples: list[dict]) -> None:
        labels = labels_of(name, examples)
        if labels is not None:
            check_token_labels(
                name,
                examples,
                labels,
                task=self.name,
                limit=self.vocab_size,
                what="the model config's vocab_size",
                fix="the labels were tokenized with another tokenizer than the ingredients' (a tokenizer mismatch)",
            )

    def collector(self, gather: Gather, keep_raw: bool) -> Collector:
        return LMCollector(gather, keep_raw, shift=self.labels_from_inputs)

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        from .token_classification import token_loss_sum

        if self.labels_from_inputs:
            logits, labels = logits[:, :-1], labels[:, 1:]
        return token_loss_sum(logits, labels)

    def score(self, out: Predictions, metric: MetricFn | None) -> dict[str, float]:
        loss = out.loss_sum / out.loss_count if out.loss_count else float("nan")
        result = {"loss": loss, "perplexity": perplexity(loss)}
        if metric is not None and out.preds is not None:
            result.update(metric(out.preds, out.labels))
        return result

    def add_own_scores(self, result: dict[str, float], out: Predictions) -> None:
        if out.loss_count:
            result.setdefault("loss", out.loss_sum / out.loss_count)
            result.setdefault("perplexity", perplexity(result["loss"]))

    def dry_outputs(self) -> Predictions:
        import numpy as np

        refs = np.arange(8) % 4
        return Predictions(loss_sum=8.0, loss_count=4.0, preds=(refs + np.arange(8) % 2) % 4, labels=refs)


class CausalLM(_LanguageModel):
    """`*ForCausalLM`, `*LMHeadModel`: each token predicts the next."""

    name = "causal-lm"
    labels_from_inputs = True


class MaskedLM(_LanguageModel):
    """`*ForMaskedLM`: masked tokens are predicted."""

    name = "masked-lm"

    def tokenize(
        self, tok: Any, columns: list[list[Any]], labels: list[Any] | None, max_length: int
    ) -> list[dict]:
        return tokenize_text(tok, columns, labels, max_length, special_tokens_mask=True)

    def complete_unlabelled(self, examples: list[dict], tokenizers: TokenizerSource) -> list[dict]:
        return mask_tokens(examples, tokenizers.get("mask tokens of a masked-LM eval set without labels"))


__all__ = ["CausalLM", "LMCollector", "MaskedLM", "perplexity"]
