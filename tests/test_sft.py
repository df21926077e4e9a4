"""SFT runs as soup ingredients: `SoupTrainerCallback` in TRL's `SFTTrainer`, full fine-tunes and LoRA (peft_config).

A tiny Llama with a word-level chat tokenizer (tests/tiny_models.py) is fine-tuned for a few steps per run on a small
chat set made here (the assistant repeats the user's words backwards); the callback collects every run and cooks a
greedy soup on held-out loss. The references are the test's own: the eval sets are tokenized here with the chat
template (not by TRL), the loss is a float64 cross-entropy of the model's logits, LoRA deltas are `scale * B @ A`
from the saved adapter files, and the greedy decisions are replayed on float64 means of the saved ingredients.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

from hf_soups import InvalidArgumentError, SoupTrainerCallback, merge_models  # noqa: E402
from tests.testing_common import (
    QUIET_CPU_RUN,
    assert_state_close,
    float64_mean,
    read_safetensors,
    replay_greedy,
)  # noqa: E402
from tests.tiny_models import CHAT_WORDS, make_tiny_chat_tokenizer, make_tiny_llama_dir  # noqa: E402

WORDS = CHAT_WORDS[6:]  # w0 .. w39


def _rows(n: int, seed: int) -> list[tuple[str, str]]:
    """(user, assistant) pairs: three words, and the same words backwards."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        picked = [WORDS[i] for i in torch.randint(0, len(WORDS), (3,), generator=gen).tolist()]
        out.append((" ".join(picked), " ".join(reversed(picked))))
    return out


def chat_set(n: int, seed: int):
    """A conversational language-modeling set (`messages`): every token is scored."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}
            for u, a in _rows(n, seed)
        ]
    )


def prompt_completion_set(n: int, seed: int):
    """A conversational prompt-completion set: only the completion is scored (SFTConfig's completion_only_loss)."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": u}], "completion": [{"role": "assistant", "content": a}]}
            for u, a in _rows(n, seed)
        ]
    )


def tokenize_here(ds) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of every row, tokenized by the test with the chat template (independent of TRL)."""
    tok = make_tiny_chat_tokenizer()

    def ids(messages, **kwargs) -> list[int]:
        text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
        return tok(text, add_special_tokens=False)["input_ids"]

    out = []
    for row in ds:
        if "messages" in row:
            full = ids(row["messages"])
            out.append((full, list(full)))
        else:
            prompt = ids(row["prompt"], add_generation_prompt=True)
            full = ids(row["prompt"] + row["completion"])
            assert full[: len(prompt)] == prompt
            out.append((full, [-100] * len(prompt) + full[len(prompt) :]))
    return out


def as_tokenized_dataset(examples):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [i for i, _ in examples], "labels": [lab for _, lab in examples]})


@torch.no_grad()
def heldout_loss(model, examples) -> float:
    """Token-level mean cross-entropy of next-token prediction over the whole set, in float64, one example at a
    time (no padding)."""
    model.eval()
    total, count = 0.0, 0
    for ids, labels in examples:
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
        target = torch.tensor(labels[1:])
        keep = target != -100
        logp = torch.log_softmax(logits, dim=-1)
        total += float(-logp[keep].gather(1, target[keep][:, None]).sum())
        count += int(keep.sum())
    return total / count


def loss_of_state(base_dir: Path, examples):
    """score(state_dict) -> held-out loss of a fresh tiny Llama holding that state."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir)
    reference = model.state_dict()

    def score(state) -> float:
        model.load_state_dict({k: v.to(reference[k].dtype) for k, v in state.items()}, strict=True)
        return heldout_loss(model, examples)

    return score


def sft_args(output_dir: Path, **overrides):
    from trl import SFTConfig

    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=12,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=5,  # 12 eval rows: a last partial batch, padded
        **QUIET_CPU_RUN,
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama") / "base")


def merged_lora_state(base_state, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """base + (lora_alpha / r) * B @ A for every LoRA module, in float64, from the saved adapter files."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert not config.get("use_rslora") and not config.get("rank_pattern") and not config.get("alpha_pattern")
    scale = config["lora_alpha"] / config["r"]
    adapter = read_safetensors(adapter_dir)
    state = {k: v.double() for k, v in base_state.items()}
    prefix = "base_model.model."
    modules = {k[len(prefix) : -len(".lora_A.weight")] for k in adapter if k.endswith(".lora_A.weight")}
    assert modules
    for module in modules:
        a = adapter[f"{prefix}{module}.lora_A.weight"].double()
        b = adapter[f"{prefix}{module}.lora_B.weight"].double()
        state[f"{module}.weight"] += scale * (b @ a)
    return state


# ------------------------------------------------------------------------------------------------ full fine-tunes


@pytest.mark.slow
def test_sft_sweep_of_full_fine_tunes_greedy_soup_on_heldout_loss(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    train, raw_eval = chat_set(32, seed=0), chat_set(12, seed=1)
    examples = tokenize_here(raw_eval)
    # the callback follows the trainer's metric_for_best_model (eval_loss: lower is better), and is given the
    # *untokenized* chat eval set: it tokenizes it as the SFTTrainer tokenizes its own
    cb = SoupTrainerCallback(tmp_path / "ingredients", method="greedy", eval_dataset=raw_eval)
    tokenizer = make_tiny_chat_tokenizer()
    for seed, lr in [(0, 3e-2), (1, 3e-2), (2, 1e-2)]:
        args = sft_args(tmp_path / "out", learning_rate=lr, seed=seed, metric_for_best_model="eval_loss")
        trainer = SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(base_dir),
            args=args,
            train_dataset=train,
            eval_dataset=raw_eval,
            processing_class=tokenizer,
        )
        cb.attach(trainer)
        trainer.train()

    soup = cb.cook()
    ingredients = cb.ingredients
    assert len(ingredients) == 3 and soup.metric_key == "loss"
    states = {ing.name: read_safetensors(ing.reference) for ing in ingredients}
    names = {ing.name: str(ing.reference) for ing in ingredients}
    # the greedy decisions, weights and score, replayed on the test's own loss of float64 means of the saved runs
    kept = replay_greedy(soup, states, loss_of_state(base_dir, examples), greater_is_better=False)
    assert_state_close(soup.model.state_dict(), float64_mean([states[n] for n in kept]), atol=1e-6)
    # the reported held-out loss is the loss of the soup's model, computed here
    assert soup.score == pytest.approx(heldout_loss(soup.model, examples), rel=1e-6)
    assert soup.scores["eval"]["loss"] == soup.score
    # the trainer's own eval set (tokenized by TRL when the trainer was built) gives the same loss as the test's
    assert [list(x) for x in trainer.eval_dataset["input_ids"]] == [ids for ids, _ in examples]

    # the independent path: merge_models on the saved ingredient folders, on the test's tokenization
    direct = merge_models(
        [names[ing.name] for ing in ingredients],
        method="greedy",
        eval_dataset=as_tokenized_dataset(examples),
        metric="loss",
        progress=False,
    )
    assert sorted(str(i.reference) for i in direct.ingredients if i.selected) == sorted(
        names[n] for n in kept
    )
    assert direct.score == pytest.approx(soup.score, rel=1e-6)
    assert_state_close(direct.model.state_dict(), soup.model.state_dict(), atol=1e-6)

    # the soup's metrics went through the trainer's log
    logged = [entry for entry in trainer.state.log_history if "soup_loss" in entry]
    assert logged and logged[-1]["soup_loss"] == pytest.approx(soup.score)


# ------------------------------------------------------------------------------------------------ LoRA


@pytest.mark.slow
def test_sft_lora_sweep_greedy_adapter_soup_loads_with_peft(base_dir, tmp_path):
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    train, raw_eval = prompt_completion_set(32, seed=0), prompt_completion_set(12, seed=1)
    examples = tokenize_here(raw_eval)  # completion-only labels
    cb = SoupTrainerCallback(
        tmp_path / "ingredients",
        method="greedy",
        metric="loss",
        adapter_output="adapter",
        output_dir=tmp_path / "lora-soup",
    )
    for seed, (lr, r) in enumerate([(1e-1, 4), (1e-1, 4), (1e-1, 2)]):
        trainer = SFTTrainer(
            model=str(base_dir),  # TRL loads it, and wraps it in a PeftModel from peft_config
            args=sft_args(tmp_path / "out", learning_rate=lr, seed=seed),
            train_dataset=train,
            eval_dataset=raw_eval,  # the trainer tokenizes it: completion-only labels
            processing_class=make_tiny_chat_tokenizer(),
            peft_config=LoraConfig(
                r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
            ),
        )
        assert isinstance(trainer.model, PeftModel)
        cb.attach(trainer)
        trainer.train()

    soup = cb.cook()  # on the trainer's eval_dataset, as TRL prepared it
    ingredients = cb.ingredients
    assert len(ingredients) == 3
    assert all((Path(str(i.reference)) / "adapter_config.json").is_file() for i in ingredients)
    assert all(i.metadata["model_class"].startswith("PeftModel") for i in ingredients)

    base_state = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    states = {i.name: merged_lora_state(base_state, Path(str(i.reference))) for i in ingredients}
    kept = replay_greedy(soup, states, loss_of_state(base_dir, examples), greater_is_better=False)
    assert (
        len(kept) >= 2
    )  # a soup of several adapters (the rejected candidates were checked by the replay too)

    # the adapter soup loads with peft, and its merged weights are the float64 mean of the kept runs' weights
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "lora-soup")
    soup_rank = json.loads((tmp_path / "lora-soup" / "adapter_config.json").read_text())["r"]
    ranks = {
        i.name: json.loads((Path(str(i.reference)) / "adapter_config.json").read_text())["r"]
        for i in ingredients
    }
    assert soup_rank == sum(ranks[n] for n in kept)  # the exact stacked form
    assert soup.score == pytest.approx(heldout_loss(loaded, examples), rel=1e-6)
    merged = loaded.merge_and_unload().state_dict()
    assert_state_close(merged, float64_mean([states[n] for n in kept]), atol=1e-6)

    # the independent path: merge_models on the saved adapter folders
    direct = merge_models(
        [str(i.reference) for i in ingredients],
        method="greedy",
        eval_dataset=as_tokenized_dataset(examples),
        metric="loss",
        progress=False,
    )
    paths = {i.name: str(i.reference) for i in ingredients}
    assert sorted(str(i.reference) for i in direct.ingredients if i.selected) == sorted(
        paths[n] for n in kept
    )
    assert direct.score == pytest.approx(soup.score, rel=1e-6)
    assert_state_close(direct.model.state_dict(), merged, atol=1e-6)


# ------------------------------------------------------------------------------------------------ refusals


def _lora_trainer(base_dir: Path, tmp_path: Path, **args):
    from peft import LoraConfig
    from trl import SFTTrainer

    return SFTTrainer(
        model=str(base_dir),
        args=sft_args(tmp_path / "out", **args),
        train_dataset=chat_set(8, seed=0),
        eval_dataset=chat_set(4, seed=1),
        processing_class=make_tiny_chat_tokenizer(),
        peft_config=LoraConfig(r=2, target_modules=["q_proj"]),
    )


def test_replace_model_with_lora_training_is_refused_before_the_run(base_dir, tmp_path):
    trainer = _lora_trainer(base_dir, tmp_path)
    SoupTrainerCallback(tmp_path / "ingredients", replace_model=True).attach(trainer)
    with pytest.raises(InvalidArgumentError, match="PeftModel.*adapter_output='adapter'"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.slow
def test_raw_chat_eval_set_without_trainer_and_packed_eval_set_are_refused(base_dir, tmp_path):
    trainer = _lora_trainer(base_dir, tmp_path)
    cb = SoupTrainerCallback(tmp_path / "ingredients").attach(trainer)
    trainer.train()
    # cooking from the folder alone: no trainer to tokenize chat rows as training did
    with pytest.raises(
        InvalidArgumentError, match=r"eval_dataset: set 'eval' is untokenized chat.*set_trainer"
    ):
        SoupTrainerCallback.from_dir(tmp_path / "ingredients", eval_dataset=chat_set(4, seed=1)).cook()
    # a packed eval set (eval_packing) would be scored across example boundaries
    packed = _lora_trainer(base_dir, tmp_path, packing=True, max_length=32)
    assert "seq_lengths" in packed.eval_dataset.column_names
    cb.set_trainer(packed)
    with pytest.raises(InvalidArgumentError, match="packed.*eval_packing=False"):
        cb.cook()
    # ... while the untokenized set given to the callback is prepared unpacked, and scores
    soup = cb.cook(eval_dataset=chat_set(4, seed=1), metric="loss")
    assert soup.score == pytest.approx(heldout_loss(soup.model, tokenize_here(chat_set(4, seed=1))), rel=1e-6)
