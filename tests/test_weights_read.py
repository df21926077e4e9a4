"""Reading the right weights and writing only finite ones (issue 12, defects 3, 5, 6, 7).

- what is written is checked, after the cast to the output dtype (float16 above 65504 is inf);
- weight indexes stay inside their folder and name every tensor once;
- legacy (non-zip) `pytorch_model.bin` files load, pickles with code do not;
- the files read are the ones `from_pretrained` reads when a folder holds several forms.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_soups import CorruptCheckpointError, NonFiniteTensorError, merge_models
from hf_soups import engine as engine_module
from tests.tiny_models import make_tiny_bert, make_tiny_bert_dir

BIG = "bert.encoder.layer.0.intermediate.dense.weight"  # 37 x 32 = 1184 elements
SMALL = "classifier.bias"


def _with_values(src, dst, values: dict[str, float], dtype=None):
    """A copy of the checkpoint folder `src` with the first element of some tensors set (and an optional dtype)."""
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    for name, value in values.items():
        sd[name].view(-1)[0] = value
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# ----------------------------------------------------------------------------------- defect 3: silent inf


@pytest.mark.parametrize("tensor, sliced", [(SMALL, False), (BIG, False), (BIG, True)])
def test_float16_overflow_is_refused_not_written_as_inf(
    tmp_path, tiny_bert_dirs, monkeypatch, tensor, sliced
):
    """Values above 65504 are finite in the float32 sum but inf once written as float16: refused."""
    if sliced:  # the streaming path (every matrix read in slices of 100 elements)
        monkeypatch.setattr(engine_module, "CHUNK_ELEMENTS", 100)
    a = _with_values(tiny_bert_dirs[0], tmp_path / "a", {tensor: 70000.0})
    b = _with_values(tiny_bert_dirs[1], tmp_path / "b", {tensor: 90000.0})
    with pytest.raises(NonFiniteTensorError) as e:
        merge_models([a, b], dtype="float16", output_dir=tmp_path / "soup", progress=False)
    msg = str(e.value)
    assert e.value.tensor_name == tensor
    assert tensor in msg and "float16" in msg and "80000" in msg and "bfloat16" in msg
    assert not (tmp_path / "soup").exists()
    assert not list(tmp_path.glob(".soup.tmp-*"))
    # the fix the message gives works, and writes the true mean
    merge_models([a, b], dtype="bfloat16", output_dir=tmp_path / "soup", progress=False)
    got = load_file(tmp_path / "soup" / "model.safetensors")[tensor]
    expected = torch.tensor((70000.0 + 90000.0) / 2, dtype=torch.float64).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got.view(-1)[0], expected)


def test_values_that_round_to_the_float16_maximum_are_written(tmp_path, tiny_bert_dirs):
    """65519 rounds to 65504 in float16 (finite): not refused; the check is on the cast, not a threshold."""
    a = _with_values(tiny_bert_dirs[0], tmp_path / "a", {SMALL: 65519.0})
    merge_models([a, a], dtype="float16", output_dir=tmp_path / "soup", progress=False)
    assert float(load_file(tmp_path / "soup" / "model.safetensors")[SMALL][0]) == 65504.0


def test_float16_overflow_in_a_live_model_is_refused(tmp_path, tiny_bert_dirs):
    """The in-memory path (ModelSink): a float16 reference model receives a mean above 65504."""
    ref = make_tiny_bert(seed=0).to(torch.float16)
    with torch.no_grad():
        ref.classifier.bias[0] = 60000.0
    other = _with_values(tiny_bert_dirs[1], tmp_path / "b", {SMALL: 100000.0})  # float32 on disk
    with pytest.raises(NonFiniteTensorError) as e:
        merge_models([ref, other], progress=False)
    assert e.value.tensor_name == SMALL
    assert "float16" in str(e.value) and "80000" in str(e.value)


def test_nan_ingredient_is_still_named_with_a_narrow_dtype(tmp_path, tiny_bert_dirs):
    bad = _with_values(tiny_bert_dirs[1], tmp_path / "bad", {BIG: float("nan")})
    with pytest.raises(NonFiniteTensorError) as e:
        merge_models([tiny_bert_dirs[0], bad], dtype="float16", output_dir=tmp_path / "soup", progress=False)
    assert e.value.ingredient == "bad" and e.value.tensor_name == BIG
