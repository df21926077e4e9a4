"""Adapter soups: exact LoRA deltas, checked against PEFT's own merge_and_unload and from_pretrained."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertForSequenceClassification

from hf_soups import merge_models
from hf_soups.adapters import read_adapter
from hf_soups.adapters.export import build_adapter_soup, truncate_pair
from hf_soups.adapters.lora import lora_scaling, pattern_value
from hf_soups.errors import IncompatibleIngredientsError, UnsupportedAdapterError
from tests.tiny_models import make_tiny_bert

warnings.filterwarnings("ignore", module="peft")

INPUT_IDS = torch.tensor([[1, 5, 7, 9, 11, 2], [3, 4, 8, 20, 31, 2]])


# ------------------------------------------------------------------------------------------- fixtures


def _randomise(model, seed: int, scale: float = 0.3) -> None:
    """Give every LoRA factor (and trainable head) random values, as a few training steps would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _make_adapter(base_dir, out_dir, config: LoraConfig, seed: int):
    base = BertForSequenceClassification.from_pretrained(base_dir)
    model = get_peft_model(base, config)
    _randomise(model, seed)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def bert_setup(tmp_path_factory):
    """A tiny BERT base and three LoRA adapters: different ranks, one rsLoRA with a rank/alpha pattern, one
    with modules_to_save on the classification head."""
    root = tmp_path_factory.mktemp("peft_bert")
    base_dir = root / "base"
    make_tiny_bert(noise=0).save_pretrained(base_dir)
    configs = [
        LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False),
        LoraConfig(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["query", "key", "dense"],
            rank_pattern={"layer.1.attention.self.query": 3},
            alpha_pattern={"layer.0.attention.self.key": 2},
            init_lora_weights=False,
        ),
        LoraConfig(
            r=3,
            lora_alpha=5,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
            init_lora_weights=False,
        ),
    ]
    adapters = [_make_adapter(base_dir, root / f"lora-{i}", c, seed=10 + i) for i, c in enumerate(configs)]
    return base_dir, adapters


def _merged_state(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    base = BertForSequenceClassification.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


# ------------------------------------------------------------------------------------------- model-free math


def test_pattern_value_and_scaling_follow_peft():
    assert (
        pattern_value({"layer.1.attention.self.query": 3}, "bert.encoder.layer.1.attention.self.query", 4)
        == 3
    )
    assert (
        pattern_value({"layer.1.attention.self.query": 3}, "bert.encoder.layer.11.attention.self.query", 4)
        == 4
    )
    assert lora_scaling(8, 4, use_rslora=False) == 2.0
    assert lora_scaling(8, 4, use_rslora=True) == 4.0


def test_read_adapter_deltas_match_peft_get_delta_weight(bert_setup):
    base_dir, adapters = bert_setup
    for adapter_dir in adapters:
        adapter = read_adapter(adapter_dir)
        peft_model = PeftModel.from_pretrained(
            BertForSequenceClassification.from_pretrained(base_dir), adapter_dir
        )
        assert adapter.modules, "the adapter has LoRA modules"
        for path, module in adapter.modules.items():
            layer = peft_model.base_model.model.get_submodule(path)
            assert layer.r["default"] == module.rank
            assert layer.scaling["default"] == pytest.approx(module.scaling)
            expected = layer.get_delta_weight("default")
            got = adapter.delta(module.weight_name, tuple(expected.shape))
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_truncate_pair_error_is_the_svd_tail():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 20, generator=gen), torch.randn(15, 6, generator=gen)
    full = b @ a
    for k in (1, 3, 6, 10):
        a_k, b_k, err = truncate_pair(a, b, k)
        recomputed = float(torch.linalg.norm(full - b_k @ a_k) / torch.linalg.norm(full))
        assert err == pytest.approx(recomputed, rel=1e-4, abs=1e-6)
        assert a_k.shape[0] == min(k, 6)
    assert truncate_pair(a, b, 6)[2] < 1e-6
    # a rank-deficient stack (the same adapter twice): the numerical rank is kept, the product is exact
    a2, b2, err = truncate_pair(torch.cat([a, a]), torch.cat([b, b], dim=1) / 2, 12)
    assert a2.shape[0] == 6 and err < 1e-6
    torch.testing.assert_close(b2 @ a2, full, rtol=1e-4, atol=1e-4)
    # more rows than columns: the direct SVD path
    a3, b3, err3 = truncate_pair(torch.randn(30, 20, generator=gen), torch.randn(15, 30, generator=gen), 20)
    assert a3.shape[0] == 15 and err3 < 1e-6
    s = torch.linalg.svdvals(full.double())
    assert truncate_pair(a, b, 2)[2] == pytest.approx(
        float((s[2:] ** 2).sum().sqrt() / (s**2).sum().sqrt()), rel=1e-6
    )


def test_stacked_factors_have_no_cross_terms(bert_setup):
    """Three copies of one adapter at 1/3 each: the exact adapter form equals the adapter (PEFT's linear
    add_weighted_adapter, which averages A and B separately, would be 3x too strong here)."""
    _, adapters = bert_setup
    adapter = read_adapter(adapters[0])
    soup = build_adapter_soup([adapter] * 3, [1 / 3] * 3)
    for path, module in adapter.modules.items():
        a = soup.tensors[f"base_model.model.{path}.lora_A.weight"]
        b = soup.tensors[f"base_model.model.{path}.lora_B.weight"]
        assert a.shape[0] == 3 * module.rank
        torch.testing.assert_close(b @ a, adapter.delta_lora(module), rtol=1e-5, atol=1e-6)


def test_peft_linear_combination_is_n_times_too_strong_where_ours_is_exact(bert_setup):
    """The motivating bug: PEFT's add_weighted_adapter("linear") of 3 copies at 1/3 triples the delta."""
    base_dir, adapters = bert_setup
    model = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base_dir), adapters[0])
    for name in ("b", "c"):
        model.load_adapter(adapters[0], adapter_name=name)
    model.add_weighted_adapter(["default", "b", "c"], [1 / 3] * 3, "avg", combination_type="linear")
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    own = layer.get_delta_weight("default")
    torch.testing.assert_close(layer.get_delta_weight("avg"), 3 * own, rtol=1e-4, atol=1e-6)
    ours = build_adapter_soup([read_adapter(adapters[0])] * 3, [1 / 3] * 3)
    path = "bert.encoder.layer.0.attention.self.query"
    a = ours.tensors[f"base_model.model.{path}.lora_A.weight"]
    b = ours.tensors[f"base_model.model.{path}.lora_B.weight"]
    torch.testing.assert_close(b @ a, own, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- merged form


def test_merged_soup_equals_mean_of_merge_and_unload(bert_setup):
    base_dir, adapters = bert_setup
    expected = [_merged_state(base_dir, a) for a in adapters]
    soup = merge_models([str(a) for a in adapters], progress=False)
    got = soup.model.state_dict()
    assert set(expected[0]) <= set(got)
    for name in expected[0]:
        mean = sum(e[name].float() for e in expected) / 3
        torch.testing.assert_close(got[name].float(), mean, rtol=0, atol=2e-6, msg=name)
    assert soup.ingredients[0].metadata["adapter"]["ranks"] == [2]


def test_copies_of_one_adapter_give_that_adapter(bert_setup, tmp_path):
    base_dir, adapters = bert_setup
    expected = _merged_state(base_dir, adapters[1])
    soup = merge_models([str(adapters[1])] * 3, output_dir=tmp_path / "merged", progress=False)
    got = soup.model.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)
    ad = merge_models(
        [str(adapters[1])] * 3, adapter_output="adapter", output_dir=tmp_path / "ad", progress=False
    )
    peft_model = PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(base_dir), ad.output_dir
    )
    own = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base_dir), adapters[1])
    torch.testing.assert_close(_logits(peft_model), _logits(own), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- adapter form


def test_exact_adapter_form_loads_in_peft_and_matches_merged(bert_setup, tmp_path):
    base_dir, adapters = bert_setup
    merged = merge_models([str(a) for a in adapters], progress=False)
    soup = merge_models(
        [str(a) for a in adapters], adapter_output="adapter", output_dir=tmp_path / "soup", progress=False
    )
    out = soup.output_dir
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    assert "classifier" in config["modules_to_save"]
    peft_model = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base_dir), out)
    # rank = sum of ranks: query of layer 1 is adapted by all three (2 + 3 from rank_pattern + 3)
    query = peft_model.base_model.model.bert.encoder.layer[1].attention.self.query
    assert query.r["default"] == 2 + 3 + 3
    assert query.scaling["default"] == 1.0
    torch.testing.assert_close(_logits(peft_model), _logits(merged.model), rtol=0, atol=1e-5)
    # and soup.model is that PeftModel
    torch.testing.assert_close(_logits(soup.model), _logits(merged.model), rtol=0, atol=1e-5)
    assert "adapter_svd_error" not in soup.report_extra


def test_svd_adapter_form_full_rank_matches_and_low_rank_reports_error(bert_setup, tmp_path):
    base_dir, adapters = bert_setup
    refs = [str(a) for a in adapters]
    merged = merge_models(refs, progress=False)
    full = merge_models(refs, adapter_output="adapter", rank=16, output_dir=tmp_path / "r16", progress=False)
    assert max(full.report_extra["adapter_svd_error"].values()) < 1e-5
    peft_full = PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(base_dir), full.output_dir
    )
    torch.testing.assert_close(_logits(peft_full), _logits(merged.model), rtol=0, atol=1e-4)

    low = merge_models(refs, adapter_output="adapter", rank=1, output_dir=tmp_path / "r1", progress=False)
    errors = low.report_extra["adapter_svd_error"]
    assert "adapter_svd_error" in low.report()
    assert set(errors) == set(full.report_extra["adapter_svd_error"])
    # recompute each module's error from the written factors and the adapters' own deltas
    from safetensors.torch import load_file

    written = load_file(str(low.output_dir / "adapter_model.safetensors"))
    readers = [read_adapter(a) for a in adapters]
    for path, err in errors.items():
        target = sum(r.delta_lora(r.modules[path]) / 3 for r in readers if path in r.modules)
        a = written[f"base_model.model.{path}.lora_A.weight"]
        b = written[f"base_model.model.{path}.lora_B.weight"]
        assert a.shape[0] == 1
        recomputed = float(torch.linalg.norm(target - b @ a) / torch.linalg.norm(target))
        assert err > 0.01
        assert err == pytest.approx(recomputed, rel=1e-3)


def test_wise_ft_of_an_adapter_scales_its_delta(bert_setup, tmp_path):
    base_dir, adapters = bert_setup
    base_state = BertForSequenceClassification.from_pretrained(base_dir).state_dict()
    tuned = _merged_state(base_dir, adapters[0])
    soup = merge_models(
        [str(adapters[0])], method="wise-ft", base_model=str(base_dir), alpha=0.25, progress=False
    )
    got = soup.model.state_dict()
    for name, value in tuned.items():
        torch.testing.assert_close(
            got[name], base_state[name] + 0.25 * (value - base_state[name]), rtol=0, atol=2e-6
        )
    ad = merge_models(
        [str(adapters[0])],
        method="wise-ft",
        base_model=str(base_dir),
        alpha=0.25,
        adapter_output="adapter",
        output_dir=tmp_path / "wise",
        progress=False,
    )
    peft_model = PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(base_dir), ad.output_dir
    )
    torch.testing.assert_close(_logits(peft_model), _logits(soup.model), rtol=0, atol=1e-5)


def test_mixed_soup_of_full_fine_tune_and_adapter(bert_setup, tmp_path):
    base_dir, adapters = bert_setup
    full_ft = make_tiny_bert(seed=5)  # base + noise: a "full fine-tune" of the same base
    full_dir = tmp_path / "full"
    full_ft.save_pretrained(full_dir)
    tuned = _merged_state(base_dir, adapters[2])
    soup = merge_models([str(full_dir), str(adapters[2])], weights=[1, 3], progress=False)
    got = soup.model.state_dict()
    full_state = full_ft.state_dict()
    for name, value in tuned.items():
        torch.testing.assert_close(got[name], 0.25 * full_state[name] + 0.75 * value, rtol=0, atol=2e-6)
    with pytest.raises(Exception, match="mix full fine-tunes and adapters"):
        merge_models([str(full_dir), str(adapters[2])], adapter_output="adapter", progress=False)


def test_peft_model_ingredient(bert_setup):
    base_dir, adapters = bert_setup
    live = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base_dir), adapters[0])
    soup = merge_models([live, str(adapters[1])], progress=False)
    expected = [_merged_state(base_dir, a) for a in adapters[:2]]
    got = soup.model.state_dict()
    for name in expected[0]:
        torch.testing.assert_close(got[name], (expected[0][name] + expected[1][name]) / 2, rtol=0, atol=2e-6)


# ------------------------------------------------------------------------------------------- GPT-2 Conv1D


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=99, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    # attn.c_proj is square (32x32): its layout comes from the layer type. lm_head is a Linear tied to wte:
    # PEFT wraps Conv1D and Linear layers in one adapter, so the saved fan_in_fan_out flag fits only one kind.
    targets = [["c_attn", "c_proj"], ["c_attn", "c_fc", "c_proj", "lm_head"]]
    dirs = []
    for i, target in enumerate(targets):
        model = get_peft_model(
            GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"),
            LoraConfig(
                r=2 + i, lora_alpha=4, target_modules=target, fan_in_fan_out=True, init_lora_weights=False
            ),
        )
        _randomise(model, seed=i)
        model.save_pretrained(tmp_path / f"g{i}")
        dirs.append(tmp_path / f"g{i}")
    expected = []
    for d in dirs:
        m = PeftModel.from_pretrained(
            GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), d
        ).merge_and_unload()
        expected.append(m.state_dict())
    soup = merge_models([str(d) for d in dirs], progress=False)
    got = soup.model.state_dict()
    changed = 0
    for name in expected[0]:
        mean = (expected[0][name] + expected[1][name]) / 2
        torch.testing.assert_close(got[name], mean, rtol=0, atol=2e-6, msg=name)
        base = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").state_dict()[name]
        changed += int(not torch.equal(base, mean))
    assert changed >= 6
    ad = merge_models(
        [str(d) for d in dirs], adapter_output="adapter", output_dir=tmp_path / "ad", progress=False
    )
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), ad.output_dir)
    torch.testing.assert_close(_logits(peft_model), _logits(soup.model), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- refusals


def test_adapter_on_another_base_is_refused(bert_setup, tmp_path):
    base_dir, adapters = bert_setup
    other_base = tmp_path / "other-base"
    make_tiny_bert(noise=0, base_seed=99, hidden_size=48, num_attention_heads=2).save_pretrained(other_base)
    other = _make_adapter(
        other_base,
        tmp_path / "other-lora",
        LoraConfig(r=2, target_modules=["query"], init_lora_weights=False),
        0,
    )
    with pytest.raises(IncompatibleIngredientsError) as info:
        merge_models([str(adapters[0]), str(other)], progress=False)
    assert str(base_dir) in str(info.value) and str(other_base) in str(info.value)
    # forced onto the wrong base: shapes are checked, naming the adapter and the tensor
    with pytest.raises(IncompatibleIngredientsError) as info:
        merge_models([str(other)], base_model=str(base_dir), progress=False)
    assert info.value.ingredient == "other-lora"
    assert info.value.tensor_name and "query" in info.value.tensor_name


def test_dora_and_other_tuners_are_refused(bert_setup, tmp_path):
    base_dir, adapters = bert_setup
    dora = _make_adapter(
        base_dir, tmp_path / "dora", LoraConfig(r=2, target_modules=["query"], use_dora=True), seed=0
    )
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        merge_models([str(dora), str(adapters[0])], progress=False)
    from peft import IA3Config

    ia3 = get_peft_model(
        BertForSequenceClassification.from_pretrained(base_dir),
        IA3Config(target_modules=["query", "output.dense"], feedforward_modules=["output.dense"]),
    )
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(UnsupportedAdapterError, match="IA3") as info:
        merge_models([str(tmp_path / "ia3")], progress=False)
    assert isinstance(info.value, NotImplementedError)
    assert info.value.ingredient == "ia3"


def test_adapter_form_reads_no_base_weights(bert_setup, tmp_path, monkeypatch):
    """The adapter form reads only the base tensors it must average in full (the head of adapters without
    modules_to_save), never the rest of the base model."""
    from hf_soups.core import sources as tensors

    reads: list[str] = []
    original = tensors.SafetensorsSource.get

    def counting_get(self, name, buffer=None):
        reads.append(f"{self.description}:{name}")
        return original(self, name, buffer)

    monkeypatch.setattr(tensors.SafetensorsSource, "get", counting_get)
    _, adapters = bert_setup
    merge_models(
        [str(a) for a in adapters], adapter_output="adapter", output_dir=tmp_path / "ad", progress=False
    )
    base_reads = {r.split(":", 1)[1] for r in reads if not r.startswith("lora-")}
    assert base_reads == {"classifier.weight", "classifier.bias"}


def test_in_memory_adapter_form_is_a_peft_model(bert_setup):
    base_dir, adapters = bert_setup
    merged = merge_models([str(a) for a in adapters[:2]], weights=[2, 1], progress=False)
    soup = merge_models(
        [str(a) for a in adapters[:2]], weights=[2, 1], adapter_output="adapter", progress=False
    )
    assert isinstance(soup.model, PeftModel)
    assert soup.params["adapter_output"] == "adapter"
    torch.testing.assert_close(_logits(soup.model), _logits(merged.model), rtol=0, atol=1e-5)


def test_trained_biases_and_lora_bias(bert_setup, tmp_path):
    """bias="all" stores trained biases as full tensors; lora_bias=True adds scaling * lora_B.bias."""
    base_dir, adapters = bert_setup
    dirs = [
        _make_adapter(
            base_dir,
            tmp_path / "lb",
            LoraConfig(r=2, target_modules=["query"], lora_bias=True, init_lora_weights=False),
            1,
        ),
        _make_adapter(
            base_dir,
            tmp_path / "ball",
            LoraConfig(r=2, target_modules=["value"], bias="all", init_lora_weights=False),
            2,
        ),
    ]
    expected = [_merged_state(base_dir, d) for d in dirs]
    soup = merge_models([str(d) for d in dirs], progress=False)
    got = soup.model.state_dict()
    for name in expected[0]:
        torch.testing.assert_close(got[name], (expected[0][name] + expected[1][name]) / 2, rtol=0, atol=2e-6)
    ad = merge_models(
        [str(d) for d in dirs], adapter_output="adapter", output_dir=tmp_path / "ad", progress=False
    )
    peft_model = PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(base_dir), ad.output_dir
    )
    torch.testing.assert_close(_logits(peft_model), _logits(soup.model), rtol=0, atol=1e-5)


def test_merged_adapter_soup_is_a_loadable_model_with_the_base_files(bert_setup, tmp_path):
    base_dir, adapters = bert_setup
    (base_dir / "tokenizer_config.json").write_text("{}")
    soup = merge_models([str(a) for a in adapters], output_dir=tmp_path / "merged", progress=False)
    assert (soup.output_dir / "model.safetensors").is_file()
    assert (soup.output_dir / "tokenizer_config.json").is_file()
    reloaded = BertForSequenceClassification.from_pretrained(soup.output_dir)
    in_memory = merge_models([str(a) for a in adapters], progress=False)
    torch.testing.assert_close(_logits(reloaded), _logits(in_memory.model), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- greedy over adapters


@pytest.mark.slow
def test_greedy_soup_over_adapters_leaves_out_a_ruined_adapter(tmp_path):
    """Greedy soups of adapters evaluate candidates in one live base model (merged form) and serve the kept
    adapters in adapter form."""
    from safetensors.torch import load_file, save_file

    from tests import synthetic_task as task

    base_dir = task.save(task.pretrained_model(), tmp_path / "base")
    dirs = []
    for seed in range(2):
        model = get_peft_model(
            BertForSequenceClassification.from_pretrained(base_dir),
            LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
        )
        task.train(model, steps=80, seed=seed, lr=1e-2)
        model.save_pretrained(tmp_path / f"good-{seed}")
        dirs.append(tmp_path / f"good-{seed}")
    # a ruined copy of the first adapter: its LoRA B factors blown up
    ruined = tmp_path / "ruined"
    ruined.mkdir()
    (ruined / "adapter_config.json").write_text((dirs[0] / "adapter_config.json").read_text())
    state = load_file(str(dirs[0] / "adapter_model.safetensors"))
    save_file(
        {k: v * 200 if "lora_B" in k else v for k, v in state.items()},
        str(ruined / "adapter_model.safetensors"),
    )

    ids, labels = task.make_split(256, seed=1)
    eval_set = task.as_dataset(ids, labels)
    soup = merge_models(
        [str(d) for d in [ruined, *dirs]],
        method="greedy",
        eval_dataset=eval_set,
        adapter_output="adapter",
        output_dir=tmp_path / "greedy",
        progress=False,
    )
    kept = {i.name for i in soup.ingredients if i.selected}
    assert "ruined" not in kept and kept
    scores = {i.name: i.score for i in soup.ingredients}
    assert scores["ruined"] < min(scores["good-0"], scores["good-1"])
    model = PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(base_dir), soup.output_dir
    )
    assert task.accuracy(model, ids, labels) == pytest.approx(soup.score, abs=1e-6)


# ------------------------------------------------------------------------------------------- Hub


def test_adapters_and_their_base_from_the_hub(hub_server, tmp_path):
    """Adapter repos on the (local) Hub: the base comes from base_model_name_or_path, resolved through the cache."""
    import uuid

    base_id = f"{hub_server.user}/base-{uuid.uuid4().hex[:8]}"
    make_tiny_bert(noise=0).push_to_hub(base_id, token=hub_server.token)
    ids = []
    for i in range(2):
        base = BertForSequenceClassification.from_pretrained(base_id)
        model = get_peft_model(
            base,
            LoraConfig(r=2 + i, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False),
        )
        _randomise(model, seed=30 + i)
        repo = f"{hub_server.user}/lora-{i}-{uuid.uuid4().hex[:8]}"
        model.push_to_hub(repo, token=hub_server.token)
        model.save_pretrained(tmp_path / f"lora-{i}")
        ids.append(repo)
    assert (
        json.loads((tmp_path / "lora-0" / "adapter_config.json").read_text())["base_model_name_or_path"]
        == base_id
    )
    soup = merge_models(ids, progress=False)
    expected = [
        PeftModel.from_pretrained(
            BertForSequenceClassification.from_pretrained(base_id), tmp_path / f"lora-{i}"
        )
        .merge_and_unload()
        .state_dict()
        for i in range(2)
    ]
    got = soup.model.state_dict()
    for name in expected[0]:
        torch.testing.assert_close(got[name], (expected[0][name] + expected[1][name]) / 2, rtol=0, atol=2e-6)
    assert soup.ingredients[0].revision is not None and len(soup.ingredients[0].revision) == 40
    assert soup.ingredients[0].metadata["adapter"]["base_model"] == base_id


# ------------------------------------------------------------------------------------------- more coverage


def test_embedding_lora(bert_setup, tmp_path):
    base_dir, adapters = bert_setup
    emb = _make_adapter(
        base_dir,
        tmp_path / "emb",
        LoraConfig(r=3, lora_alpha=6, target_modules=["word_embeddings", "query"], init_lora_weights=False),
        seed=4,
    )
    expected = [_merged_state(base_dir, d) for d in (emb, adapters[0])]
    soup = merge_models([str(emb), str(adapters[0])], progress=False)
    got = soup.model.state_dict()
    name = "bert.embeddings.word_embeddings.weight"
    assert not torch.equal(expected[0][name], expected[1][name])
    for key in expected[0]:
        torch.testing.assert_close(got[key], (expected[0][key] + expected[1][key]) / 2, rtol=0, atol=2e-6)
    ad = merge_models(
        [str(emb), str(adapters[0])], adapter_output="adapter", output_dir=tmp_path / "ad", progress=False
    )
    peft_model = PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(base_dir), ad.output_dir
    )
    torch.testing.assert_close(_logits(peft_model), _logits(soup.model), rtol=0, atol=1e-5)


def test_peft_model_without_a_recorded_base_uses_its_own_base_weights():
    base = make_tiny_bert(seed=3)  # built in memory: base_model_name_or_path is empty
    live = get_peft_model(base, LoraConfig(r=2, target_modules=["query"], init_lora_weights=False))
    _randomise(live, seed=8)
    assert not live.peft_config["default"].base_model_name_or_path
    import copy

    expected = copy.deepcopy(live).merge_and_unload().state_dict()
    soup = merge_models([live, live], progress=False)
    got = soup.model.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=2e-6)


def test_adapters_of_different_task_types_or_rank_without_adapter_form_are_refused(bert_setup, tmp_path):
    from hf_soups.errors import InvalidArgumentError

    _, adapters = bert_setup
    config = json.loads((adapters[0] / "adapter_config.json").read_text())
    dirs = []
    for task in ("SEQ_CLS", "TOKEN_CLS"):
        folder = tmp_path / task
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({**config, "task_type": task}))
        (folder / "adapter_model.safetensors").write_bytes(
            (adapters[0] / "adapter_model.safetensors").read_bytes()
        )
        dirs.append(str(folder))
    first, other = dirs
    with pytest.raises(IncompatibleIngredientsError, match="task type") as info:
        merge_models([str(first), str(other)], progress=False)
    assert "SEQ_CLS" in str(info.value) and "TOKEN_CLS" in str(info.value)
    with pytest.raises(InvalidArgumentError, match="adapter_output='adapter'"):
        merge_models([str(a) for a in adapters], rank=4, progress=False)


def test_head_missing_from_the_base_names_the_fix(bert_setup, tmp_path):
    """A classification adapter on a base checkpoint without the head: refused with the way out."""
    import shutil

    from safetensors.torch import load_file, save_file

    base_dir, adapters = bert_setup
    headless = tmp_path / "encoder-only"
    headless.mkdir()
    shutil.copy(base_dir / "config.json", headless / "config.json")
    state = load_file(str(base_dir / "model.safetensors"))
    save_file(
        {k: v for k, v in state.items() if not k.startswith("classifier.")},
        str(headless / "model.safetensors"),
    )
    with pytest.raises(IncompatibleIngredientsError, match="modules_to_save") as info:
        merge_models([str(adapters[2])], base_model=str(tmp_path / "encoder-only"), progress=False)
    assert info.value.tensor_name == "classifier.weight" or info.value.tensor_name == "classifier.bias"
