"""The foundation: uniform and WiSE-FT soups from real (tiny) checkpoints, streamed and checked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from hf_soups import (
    CorruptCheckpointError,
    IncompatibleIngredientsError,
    Ingredient,
    IngredientNotFoundError,
    InvalidArgumentError,
    NonFiniteTensorError,
    merge_models,
)
from tests.testing_common import read_safetensors as _state
from tests.tiny_models import make_tiny_bert, make_tiny_bert_dir


def _expected(dirs, coefficients):
    sds = [_state(d) for d in dirs]
    return {k: sum(c * sd[k].float() for c, sd in zip(coefficients, sds)) for k in sds[0]}


def test_uniform_soup_is_the_mean_and_loads(tiny_bert_dirs, tmp_path):
    soup = merge_models(tiny_bert_dirs, output_dir=tmp_path / "soup", progress=False)
    out = _state(tmp_path / "soup")
    expected = _expected(tiny_bert_dirs, [1 / 3] * 3)
    assert out.keys() == expected.keys()
    for k, v in out.items():
        torch.testing.assert_close(v.float(), expected[k], rtol=0, atol=1e-6)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "soup")
    torch.testing.assert_close(model.classifier.weight, expected["classifier.weight"], rtol=0, atol=1e-6)
    assert soup.method == "uniform"
    assert [i.weight for i in soup.ingredients] == pytest.approx([1 / 3] * 3)
    assert soup.score is None
    assert (tmp_path / "soup" / "config.json").exists()


def test_weighted_soup_and_order_invariance(tiny_bert_dirs):
    a = merge_models(tiny_bert_dirs, weights=[1, 2, 5], progress=False).model.state_dict()
    b = merge_models(tiny_bert_dirs[::-1], weights=[5, 2, 1], progress=False).model.state_dict()
    expected = _expected(tiny_bert_dirs, [1 / 8, 2 / 8, 5 / 8])
    for k, v in expected.items():
        torch.testing.assert_close(a[k].float(), v, rtol=0, atol=1e-6)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_wise_ft_endpoints_are_exact_and_midpoint_interpolates(tiny_bert_dirs):
    base, ft = tiny_bert_dirs[0], tiny_bert_dirs[1]
    base_sd, ft_sd = _state(base), _state(ft)
    s0 = merge_models([ft], method="wise-ft", base_model=base, alpha=0.0, progress=False).model.state_dict()
    s1 = merge_models([ft], method="wise-ft", base_model=base, alpha=1.0, progress=False).model.state_dict()
    for k in base_sd:
        assert torch.equal(s0[k], base_sd[k]), k
        assert torch.equal(s1[k], ft_sd[k]), k
    half = merge_models(tiny_bert_dirs[1:], method="wise-ft", base_model=base, alpha=0.5, progress=False)
    expected = _expected(tiny_bert_dirs, [0.5, 0.25, 0.25])
    sd = half.model.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(sd[k].float(), v, rtol=0, atol=1e-6)
    assert half.params == {"alpha": 0.5}


def test_sharded_in_sharded_out(tmp_path):
    dirs = []
    for i in range(2):
        model = make_tiny_bert(seed=i)
        model.save_pretrained(tmp_path / f"m{i}", max_shard_size="20KB")
        dirs.append(tmp_path / f"m{i}")
    assert (dirs[0] / "model.safetensors.index.json").exists()
    merge_models(dirs, output_dir=tmp_path / "soup", max_shard_size="30KB", progress=False)
    index = json.loads((tmp_path / "soup" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    out = _state(tmp_path / "soup")
    for k, v in _expected(dirs, [0.5, 0.5]).items():
        torch.testing.assert_close(out[k].float(), v, rtol=0, atol=1e-6)
    from transformers import BertForSequenceClassification

    BertForSequenceClassification.from_pretrained(tmp_path / "soup")


def test_bin_in_memory_and_trainer_checkpoint_in(tmp_path):
    a = make_tiny_bert(seed=1)
    a.save_pretrained(tmp_path / "bin", safe_serialization=False) if _supports_bin(a) else _save_bin(
        a, tmp_path / "bin"
    )
    b = make_tiny_bert(seed=2)
    ckpt = tmp_path / "run" / "checkpoint-10"
    b.save_pretrained(ckpt)
    (ckpt / "optimizer.pt").write_bytes(b"not a model")
    (ckpt / "trainer_state.json").write_text("{}")
    c = make_tiny_bert(seed=3)
    soup = merge_models([tmp_path / "bin", ckpt, c], progress=False)
    sd = soup.model.state_dict()
    for k, v in a.state_dict().items():
        expected = (v + b.state_dict()[k] + c.state_dict()[k]) / 3
        torch.testing.assert_close(sd[k], expected, rtol=0, atol=1e-6)
    assert soup.ingredients[1].name == "run/checkpoint-10"


def _supports_bin(model) -> bool:
    import inspect

    return "safe_serialization" in inspect.signature(model.save_pretrained).parameters


def _save_bin(model, path):
    path.mkdir(parents=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")


def test_trainer_output_dir_without_weights_points_at_checkpoint(tmp_path):
    make_tiny_bert_dir(tmp_path / "out" / "checkpoint-5")
    make_tiny_bert_dir(tmp_path / "out" / "checkpoint-20")
    other = make_tiny_bert_dir(tmp_path / "other", seed=4)
    with pytest.raises(IngredientNotFoundError, match="checkpoint-20"):
        merge_models([tmp_path / "out", other], progress=False)


def test_missing_folder_and_bad_reference(tmp_path, tiny_bert_dirs):
    with pytest.raises(IngredientNotFoundError, match="not-here"):
        merge_models([tiny_bert_dirs[0], str(tmp_path / "not-here")], progress=False)


def test_ingredient_objects_keep_names_and_weights(tiny_bert_dirs):
    soup = merge_models(
        [
            Ingredient(tiny_bert_dirs[0], weight=3, name="a"),
            Ingredient(tiny_bert_dirs[1], weight=1, name="b"),
        ],
        progress=False,
    )
    assert [(i.name, i.weight) for i in soup.ingredients] == [("a", 0.75), ("b", 0.25)]


# ----------------------------------------------------------------------------------------------- bad input


def test_architecture_mismatch_names_both(tmp_path, tiny_bert_dirs):
    other = make_tiny_bert_dir(tmp_path / "deep", num_hidden_layers=3)
    with pytest.raises(IncompatibleIngredientsError) as e:
        merge_models([tiny_bert_dirs[0], other], progress=False)
    msg = str(e.value)
    assert "ft-0" in msg and "deep" in msg and "num_hidden_layers" in msg and "2" in msg and "3" in msg


def test_shape_mismatch_names_tensor_and_shapes(tmp_path, tiny_bert_dirs):
    other = make_tiny_bert_dir(tmp_path / "wide", intermediate_size=40)
    cfg = json.loads((other / "config.json").read_text())
    cfg["intermediate_size"] = 37  # lie in the config so that only the tensors differ
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleIngredientsError) as e:
        merge_models([tiny_bert_dirs[0], other], progress=False)
    assert "intermediate.dense" in str(e.value) and "(37" in str(e.value) and "(40" in str(e.value)
    assert "'wide'" in str(e.value) and "'ft-0'" in str(e.value)
    assert "intermediate.dense" in e.value.tensor_name


def test_vocab_mismatch_is_an_error_with_a_fix(tmp_path, tiny_bert_dirs):
    other = make_tiny_bert_dir(tmp_path / "bigvocab", vocab_size=101)
    with pytest.raises(IncompatibleIngredientsError, match="resize_token_embeddings") as e:
        merge_models([tiny_bert_dirs[0], other], progress=False)
    assert "bigvocab" in str(e.value) and "101" in str(e.value)


def test_missing_and_extra_tensors_are_named(tmp_path, tiny_bert_dirs):
    sd = _state(tiny_bert_dirs[1])
    sd.pop("bert.pooler.dense.bias")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert_dirs[1], broken)
    save_file(sd, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(IncompatibleIngredientsError, match="bert.pooler.dense.bias") as e:
        merge_models([tiny_bert_dirs[0], broken], progress=False)
    assert "broken" in str(e.value)


def test_label_order_is_aligned_and_label_sets_checked(tmp_path, tiny_bert_dirs):
    # The same model saved with its labels in another order (head rows permuted accordingly) soups to the same model.
    model = make_tiny_bert(seed=0)
    perm = [2, 0, 1]
    permuted = make_tiny_bert(seed=0)
    with torch.no_grad():
        permuted.classifier.weight.copy_(model.classifier.weight[perm])
        permuted.classifier.bias.copy_(model.classifier.bias[perm])
    permuted.config.id2label = {i: model.config.id2label[p] for i, p in enumerate(perm)}
    permuted.config.label2id = {v: k for k, v in permuted.config.id2label.items()}
    model.save_pretrained(tmp_path / "a")
    permuted.save_pretrained(tmp_path / "b")
    soup = merge_models([tmp_path / "a", tmp_path / "b"], progress=False)
    torch.testing.assert_close(soup.model.classifier.weight, model.classifier.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(soup.model.classifier.bias, model.classifier.bias, rtol=0, atol=1e-6)

    other = make_tiny_bert(seed=1)
    other.config.id2label = {0: "pos", 1: "neg", 2: "neutral"}
    other.config.label2id = {v: k for k, v in other.config.id2label.items()}
    other.save_pretrained(tmp_path / "c")
    with pytest.raises(IncompatibleIngredientsError, match="different labels") as e:
        merge_models([tmp_path / "a", tmp_path / "c"], progress=False)
    assert "'c'" in str(e.value) and "neutral" in str(e.value)


def test_integer_buffers_are_copied_and_must_match(tmp_path, tiny_bert_dirs):
    a, b = _state(tiny_bert_dirs[0]), _state(tiny_bert_dirs[1])
    a["counter"] = torch.tensor([1, 2, 3])
    b["counter"] = torch.tensor([1, 2, 3])
    for name, sd in (("a", a), ("b", b)):
        shutil.copytree(tiny_bert_dirs[0], tmp_path / name)
        save_file(sd, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
    merge_models([tmp_path / "a", tmp_path / "b"], output_dir=tmp_path / "soup", progress=False)
    assert torch.equal(_state(tmp_path / "soup")["counter"], torch.tensor([1, 2, 3]))
    b["counter"] = torch.tensor([1, 2, 4])
    save_file(b, tmp_path / "b" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(IncompatibleIngredientsError, match="counter"):
        merge_models([tmp_path / "a", tmp_path / "b"], progress=False)


def test_nan_is_an_error_naming_ingredient_and_tensor(tmp_path, tiny_bert_dirs):
    sd = _state(tiny_bert_dirs[2])
    sd["bert.encoder.layer.1.output.dense.weight"][0, 0] = float("nan")
    bad = tmp_path / "diverged"
    shutil.copytree(tiny_bert_dirs[2], bad)
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteTensorError) as e:
        merge_models([tiny_bert_dirs[0], bad], output_dir=tmp_path / "soup", progress=False)
    assert e.value.ingredient == "diverged"
    assert e.value.tensor_name == "bert.encoder.layer.1.output.dense.weight"
    assert not (tmp_path / "soup").exists()
    assert not list(tmp_path.glob(".hfsoups-*"))


@pytest.mark.parametrize("damage", ["truncate", "bad_header", "tiny"])
def test_corrupt_weight_files_name_the_file(tmp_path, tiny_bert_dirs, damage):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bert_dirs[1], bad)
    f = bad / "model.safetensors"
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "bad_header":
        f.write_bytes(data[:8] + b"{not json" + data[17:])
    else:
        f.write_bytes(b"abc")
    with pytest.raises(CorruptCheckpointError) as e:
        merge_models([tiny_bert_dirs[0], bad], progress=False)
    assert str(f) in str(e.value)


def test_missing_shard_is_named(tmp_path):
    model = make_tiny_bert(seed=0)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(IngredientNotFoundError, match=shard.name):
        merge_models([tmp_path / "sharded", make_tiny_bert(seed=1)], progress=False)


def test_corrupt_bin_is_named(tmp_path, tiny_bert_dirs):
    bad = tmp_path / "badbin"
    bad.mkdir()
    shutil.copy(tiny_bert_dirs[0] / "config.json", bad)
    (bad / "pytorch_model.bin").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CorruptCheckpointError, match="pytorch_model.bin"):
        merge_models([tiny_bert_dirs[0], bad], progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weights": [1, -1, 1]}, "finite and >= 0"),
        ({"weights": [0, 0, 0]}, "All weights are zero"),
        ({"weights": [1, 2]}, "2 values for 3"),
        ({"method": "wise-ft", "alpha": 0.5}, "base_model"),
        ({"method": "wise-ft", "alpha": 1.5, "base_model": "x"}, "outside"),
        ({"method": "wise-ft", "alpha": [0.1, 0.5], "base_model": "x"}, "eval_dataset"),
        ({"method": "stew"}, "Unknown method 'stew'"),
        ({"dtype": "int8"}, "floating point"),
    ],
)
def test_bad_options_fail_before_any_work(tiny_bert_dirs, tmp_path, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        merge_models(tiny_bert_dirs, output_dir=tmp_path / "soup", progress=False, **kwargs)
    assert not (tmp_path / "soup").exists()


# ----------------------------------------------------------------------------------------------- names, ties, dtypes


def test_wrapper_prefixes_are_normalised(tmp_path, tiny_bert_dirs):
    sd = _state(tiny_bert_dirs[1])
    wrapped = tmp_path / "ddp"
    shutil.copytree(tiny_bert_dirs[1], wrapped)
    save_file(
        {f"module._orig_mod.{k}": v for k, v in sd.items()},
        wrapped / "model.safetensors",
        metadata={"format": "pt"},
    )
    soup = merge_models([tiny_bert_dirs[0], wrapped], output_dir=tmp_path / "soup", progress=False)
    out = _state(soup.output_dir)
    assert set(out) == set(sd)
    for k, v in _expected(tiny_bert_dirs[:2], [0.5, 0.5]).items():
        torch.testing.assert_close(out[k].float(), v, rtol=0, atol=1e-6)


def test_tied_lm_head_absent_from_one_checkpoint(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    models = []
    for i in range(2):
        torch.manual_seed(i)
        m = LlamaForCausalLM(cfg)
        m.save_pretrained(tmp_path / f"t{i}")
        models.append(m)
    sd0 = _state(tmp_path / "t0")
    assert "lm_head.weight" not in sd0
    # the second checkpoint stores the tied head explicitly
    sd1 = _state(tmp_path / "t1")
    sd1["lm_head.weight"] = sd1["model.embed_tokens.weight"].clone()
    save_file(sd1, tmp_path / "t1" / "model.safetensors", metadata={"format": "pt"})
    soup = merge_models([tmp_path / "t0", tmp_path / "t1"], output_dir=tmp_path / "soup", progress=False)
    out = _state(soup.output_dir)
    assert "lm_head.weight" not in out
    merged = soup.model
    torch.testing.assert_close(merged.lm_head.weight, merged.model.embed_tokens.weight)
    # and the other way round: the same soup (both are tied: the stored copy of a tied head is ignored, as
    # from_pretrained ignores it)
    soup2 = merge_models([tmp_path / "t1", tmp_path / "t0"], output_dir=tmp_path / "soup2", progress=False)
    out2 = _state(soup2.output_dir)
    assert out2.keys() == out.keys()
    for k in out:
        torch.testing.assert_close(out2[k], out[k], rtol=0, atol=0)


def test_mixed_dtypes_accumulate_in_float32(tmp_path, tiny_bert_dirs):
    bf = make_tiny_bert(seed=7).to(torch.bfloat16)
    bf.save_pretrained(tmp_path / "bf16")
    soup = merge_models([tmp_path / "bf16", tiny_bert_dirs[0]], output_dir=tmp_path / "soup", progress=False)
    out = _state(soup.output_dir)
    assert all(v.dtype == torch.bfloat16 for v in out.values())
    a, b = _state(tmp_path / "bf16"), _state(tiny_bert_dirs[0])
    k = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(out[k], ((a[k].float() + b[k].float()) / 2).to(torch.bfloat16), rtol=0, atol=0)
    soup32 = merge_models(
        [tmp_path / "bf16", tiny_bert_dirs[0]], dtype="float32", output_dir=tmp_path / "s32", progress=False
    )
    assert all(v.dtype == torch.float32 for v in _state(soup32.output_dir).values())
    assert json.loads((tmp_path / "s32" / "config.json").read_text())["dtype"] == "float32"


# ----------------------------------------------------------------------------------------------- atomic output


def test_interrupted_write_leaves_target_absent_or_unchanged(tmp_path, tiny_bert_dirs, monkeypatch):
    from hf_soups.core import sources as tensors

    calls = {"n": 0}
    original = tensors.ShardedSafetensorsWriter.write

    def exploding_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("interrupted mid-write")
        return original(self, name, tensor)

    monkeypatch.setattr(tensors.ShardedSafetensorsWriter, "write", exploding_write)
    with pytest.raises(KeyboardInterrupt):
        merge_models(tiny_bert_dirs, output_dir=tmp_path / "soup", progress=False)
    assert not (tmp_path / "soup").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hfsoups")] == []

    monkeypatch.setattr(tensors.ShardedSafetensorsWriter, "write", original)
    merge_models(tiny_bert_dirs[:2], output_dir=tmp_path / "soup", progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "soup").iterdir()}
    calls["n"] = 0
    monkeypatch.setattr(tensors.ShardedSafetensorsWriter, "write", exploding_write)
    with pytest.raises(KeyboardInterrupt):
        merge_models(tiny_bert_dirs, output_dir=tmp_path / "soup", progress=False)
    after = {p.name: p.read_bytes() for p in (tmp_path / "soup").iterdir()}
    assert before == after


def test_refuses_to_replace_a_folder_that_is_not_a_model(tmp_path, tiny_bert_dirs):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    with pytest.raises(InvalidArgumentError, match="was not written by hf_soups"):
        merge_models(tiny_bert_dirs, output_dir=target, progress=False)
    assert (target / "notes.txt").read_text() == "precious"


def test_import_is_light():
    code = (
        "import sys, hf_soups; from hf_soups import Ingredient, merge_models; "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'evaluate', 'torch.distributed') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]"
