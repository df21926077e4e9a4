"""Soups whose held-out evaluation runs on a CUDA device: the same decisions and the same files as on the CPU.

Skipped without a GPU (CI has none); run on a machine with one: `pytest -m gpu tests/test_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch

from hf_soups import merge_models
from tests.test_battery import _classification_eval
from tests.testing_common import float64_mean, read_safetensors
from tests.tiny_models import make_tiny_bert_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def case(tmp_path):
    base = make_tiny_bert_dir(tmp_path / "base", noise=0.0)
    ingredients = [str(make_tiny_bert_dir(tmp_path / f"ft-{i}", seed=i, noise=0.0005)) for i in range(4)]
    return base, ingredients


def test_greedy_soup_on_cuda_decides_and_writes_as_on_cpu(case, tmp_path):
    base, ingredients = case
    cpu = merge_models(
        ingredients,
        method="greedy",
        output_dir=tmp_path / "cpu",
        progress=False,
        **_classification_eval(base),
    )
    gpu = merge_models(
        ingredients,
        method="greedy",
        output_dir=tmp_path / "gpu",
        device="cuda",
        progress=False,
        **_classification_eval(base),
    )
    assert [i.selected for i in gpu.ingredients] == [i.selected for i in cpu.ingredients]
    for a, b in zip(gpu.ingredients, cpu.ingredients):
        assert a.score == pytest.approx(b.score, abs=1e-6)
    assert gpu.score == pytest.approx(cpu.score, abs=1e-6)
    written_gpu, written_cpu = read_safetensors(gpu.output_dir), read_safetensors(cpu.output_dir)
    assert written_gpu.keys() == written_cpu.keys()
    for name in written_cpu:
        assert torch.equal(written_gpu[name], written_cpu[name]), name
    kept = [p for p, i in zip(ingredients, gpu.ingredients) if i.selected]
    expected = float64_mean([read_safetensors(p) for p in kept])
    for name, value in written_gpu.items():
        if value.is_floating_point():
            torch.testing.assert_close(value.double(), expected[name], rtol=0, atol=1e-6)


def test_in_memory_soup_evaluated_on_cuda_is_the_cpu_soup(case):
    base, ingredients = case
    soup = merge_models(
        ingredients, method="greedy", device="cuda", progress=False, **_classification_eval(base)
    )
    state = {k: v.detach().cpu() for k, v in soup.model.state_dict().items()}
    kept = [p for p, i in zip(ingredients, soup.ingredients) if i.selected]
    expected = float64_mean([read_safetensors(p) for p in kept])
    for name, value in expected.items():
        if name in state and state[name].is_floating_point():
            torch.testing.assert_close(state[name].double(), value, rtol=0, atol=1e-6)
