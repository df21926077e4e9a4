"""Tiny transformers models built in the tests (no network)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_BERT = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    max_position_embeddings=64,
    num_labels=3,
)


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    kwargs = dict(TINY_BERT)
    kwargs.update(overrides)
    num_labels = kwargs.pop("num_labels")
    config = BertConfig(**kwargs)
    config.num_labels = num_labels
    config.id2label = {i: f"L{i}" for i in range(num_labels)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    return config


def make_tiny_bert(seed: int = 0, base_seed: int = 1234, noise: float = 0.01, **overrides):
    """A tiny BertForSequenceClassification: one shared 'pre-trained' init plus seeded noise."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(base_seed)
    model = BertForSequenceClassification(tiny_bert_config(**overrides))
    if noise:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * noise)
    model.eval()
    return model


def make_tiny_bert_dir(path: Path, seed: int = 0, **kwargs) -> Path:
    model = make_tiny_bert(seed=seed, **kwargs)
    model.save_pretrained(path)
    return Path(path)


# ------------------------------------------------------------------------------ a tiny chat model (SFT tests)

CHAT_WORDS = ["<pad>", "<eos>", "<unk>", "user", "assistant", ":"] + [f"w{i}" for i in range(40)]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def make_tiny_chat_tokenizer():
    """A word-level `PreTrainedTokenizerFast` with a chat template, built in memory (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(CHAT_WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_llama_dir(path: Path, seed: int = 0) -> Path:
    """A tiny `LlamaForCausalLM` (GQA, 2 layers) and its chat tokenizer, saved in `path`: the 'pre-trained' model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(CHAT_WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    make_tiny_chat_tokenizer().save_pretrained(path)
    return Path(path)


# ------------------------------------------------------------------------------------------ tiny causal LM (Llama)

TINY_WORDS = ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(60)]


def tiny_word_tokenizer():
    """A whitespace word-level tokenizer over `TINY_WORDS` (a fast tokenizer: saves and loads offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TINY_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def make_tiny_llama(seed: int = 0, base_seed: int = 1234, noise: float = 0.02):
    """A tiny random LlamaForCausalLM: one shared 'pre-trained' init plus seeded noise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(TINY_WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(base_seed)
    model = LlamaForCausalLM(config)
    if noise:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * noise)
    return model.eval()


def make_tiny_word_llama_dir(path: Path, seed: int = 0, **kwargs) -> Path:
    """`make_tiny_llama` saved with its tokenizer."""
    make_tiny_llama(seed=seed, **kwargs).save_pretrained(path)
    tiny_word_tokenizer().save_pretrained(path)
    return Path(path)
