"""A synthetic classification task a tiny BERT learns in seconds, and ingredients of controlled quality.

Sequences of random token ids; the label says whether most tokens come from the lower half of the vocabulary.
Ingredients are one trained model plus independent Gaussian noise of a known scale (per tensor, relative to
the tensor's standard deviation), so that their quality is controlled: small noise = good but worse than the
trained model, large noise = ruined. Averaging independent noise cancels it, which is why soups help.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 99
SEQ_LEN = 10
LOW, HIGH, SPLIT = 5, VOCAB, 52  # token ids used, and the boundary between the two halves


def make_split(n: int, seed: int, *, shift: float = 0.0):
    """(input_ids [n, SEQ_LEN], labels [n]); `shift` makes an out-of-distribution variant (more ambiguous)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=gen)
    p_low = torch.where(labels == 1, 0.8 - shift, 0.2 + shift)
    low = torch.rand(n, SEQ_LEN, generator=gen) < p_low[:, None]
    low_ids = torch.randint(LOW, SPLIT, (n, SEQ_LEN), generator=gen)
    high_ids = torch.randint(SPLIT, HIGH, (n, SEQ_LEN), generator=gen)
    ids = torch.where(low, low_ids, high_ids)
    ids[:, 0] = 2  # [CLS]-like first token
    labels = (low[:, 1:].float().mean(1) > 0.5).long()  # the label is what the tokens actually say
    return ids, labels


def as_dataset(ids, labels, label_name: str = "label"):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": ids.tolist(), label_name: labels.tolist()})


def tiny_config(num_labels: int = 2):
    from transformers import BertConfig

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=32,
        num_labels=num_labels,
    )
    config.architectures = ["BertForSequenceClassification"]
    return config


def tiny_tagger(num_labels: int = 3, seed: int = 0):
    """A tiny random BERT token classifier, in eval mode."""
    from transformers import BertForTokenClassification

    torch.manual_seed(seed)
    config = tiny_config(num_labels=num_labels)
    config.architectures = ["BertForTokenClassification"]
    return BertForTokenClassification(config).eval()


def pretrained_model(seed: int = 0):
    """The shared 'pre-trained' starting point."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_config())
    model.eval()
    return model


def train(model, steps: int = 150, seed: int = 0, lr: float = 3e-3, batch: int = 64, head_only: bool = False):
    """Fine-tune in place on fresh synthetic data; returns the model in eval mode."""
    ids, labels = make_split(steps * batch, seed=10_000 + seed)
    params = model.classifier.parameters() if head_only else model.parameters()
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(ids), (batch,), generator=gen)
        loss = model(input_ids=ids[idx], labels=labels[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


def add_noise(model, scale: float, seed: int):
    """A copy of `model` with independent Gaussian noise of `scale` x each tensor's std added."""
    import copy

    noisy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in noisy.parameters():
            std = float(p.std()) if p.numel() > 1 else 1.0
            p.add_(torch.randn(p.shape, generator=gen) * scale * std)
    return noisy


def accuracy(model, ids, labels) -> float:
    with torch.no_grad():
        return float((model(input_ids=ids).logits.argmax(-1) == labels).float().mean())


def save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return Path(path)


def tiny_tokenizer():
    """A WordPiece tokenizer whose words `w0 .. w93` are the token ids 5 .. 98 of the synthetic task."""
    from transformers import BertTokenizer

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    vocab.update({f"w{i}": 5 + i for i in range(VOCAB - 5)})
    return BertTokenizer(vocab=vocab)


def ids_to_text(ids) -> list[str]:
    """Sentences of the synthetic task as text (the leading [CLS]-like token dropped)."""
    return [" ".join(f"w{int(t) - 5}" for t in row[1:]) for row in ids]


_TRAINED: dict[tuple, dict] = {}


def trained_model(steps: int = 30, batch: int = 32, seed: int = 0):
    """The fine-tuned model of the task, trained once per process (a few seconds) and copied on each call."""
    key = (steps, batch, seed)
    if key not in _TRAINED:
        _TRAINED[key] = {
            k: v.clone()
            for k, v in train(pretrained_model(), steps=steps, batch=batch, seed=seed).state_dict().items()
        }
    model = pretrained_model()
    model.load_state_dict(_TRAINED[key])
    model.eval()
    return model
