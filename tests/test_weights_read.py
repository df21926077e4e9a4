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
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_soups import CorruptCheckpointError, NonFiniteTensorError, merge_models
from hf_soups.core import engine as engine_module
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


# ------------------------------------------------------------------------ defect 7: which files are read


def _from_pretrained_mean(dirs) -> dict[str, torch.Tensor]:
    """The independent reference: each ingredient loaded by transformers itself, averaged in float64."""
    from transformers import BertForSequenceClassification

    sds = [BertForSequenceClassification.from_pretrained(d).state_dict() for d in dirs]
    return {k: sum(sd[k].double() for sd in sds) / len(sds) for k in sds[0]}


def _assert_soup_is(out_dir, expected):
    got = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        got.update(load_file(f))
    assert got and set(got) <= set(expected)
    for k, v in got.items():
        if v.is_floating_point():
            torch.testing.assert_close(v.double(), expected[k], rtol=0, atol=1e-6, msg=k)
        else:
            assert torch.equal(v, expected[k].to(v.dtype)), k


def _save_bin_sharded(model, folder):
    """`pytorch_model-0000i-of-00002.bin` shards and their index, as older transformers wrote them."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    keys = list(sd)
    shards = {
        "pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
        "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :],
    }
    for name, ks in shards.items():
        torch.save({k: sd[k].clone() for k in ks}, folder / name)
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def _two_forms(root, seed: int, stale: str):
    """A checkpoint folder holding a single weights file and an index with shards, one of them stale.

    stale="index": an index + shards of older weights beside the current model.safetensors.
    stale="single": an older model.safetensors beside the current index + shards.
    stale="bin-index": an index + .bin shards of older weights beside the current pytorch_model.bin.
    """
    folder = root / f"{stale}-{seed}"
    current, old = make_tiny_bert(seed=seed), make_tiny_bert(seed=seed + 50)
    if stale == "index":
        old.save_pretrained(folder, max_shard_size="20KB")
        current.save_pretrained(root / "tmp-single")
        shutil.copy(root / "tmp-single" / "model.safetensors", folder)
    elif stale == "single":
        current.save_pretrained(folder, max_shard_size="20KB")
        old.save_pretrained(root / "tmp-single")
        shutil.copy(root / "tmp-single" / "model.safetensors", folder)
    else:
        current.config.save_pretrained(folder)
        torch.save(current.state_dict(), folder / "pytorch_model.bin")
        _save_bin_sharded(old, folder)
    shutil.rmtree(root / "tmp-single", ignore_errors=True)
    return folder


@pytest.mark.parametrize("stale", ["index", "single", "bin-index"])
def test_soup_reads_what_from_pretrained_reads_and_warns(tmp_path, caplog, stale):
    dirs = [_two_forms(tmp_path, seed, stale) for seed in (0, 1)]
    with caplog.at_level(logging.WARNING):
        merge_models(dirs, output_dir=tmp_path / "soup", progress=False)
    _assert_soup_is(tmp_path / "soup", _from_pretrained_mean(dirs))
    single, index = (
        ("pytorch_model.bin", "pytorch_model.bin.index.json")
        if stale == "bin-index"
        else ("model.safetensors", "model.safetensors.index.json")
    )
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and index in r.getMessage()
    ]
    assert any(str(dirs[0]) in w and single in w and "from_pretrained" in w for w in warnings), warnings


def test_config_transformers_weights_names_the_file(tmp_path):
    """transformers honours config.json's `transformers_weights`; so does the soup, confined to the folder."""
    dirs = []
    for seed in (0, 1):
        d = make_tiny_bert_dir(tmp_path / f"named-{seed}", seed=seed)
        (d / "model.safetensors").rename(d / "weights.safetensors")
        shutil.copy(make_tiny_bert_dir(tmp_path / f"decoy-{seed}", seed=seed + 50) / "model.safetensors", d)
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, "transformers_weights": "weights.safetensors"}))
        dirs.append(d)
    merge_models(dirs, output_dir=tmp_path / "soup", progress=False)
    _assert_soup_is(tmp_path / "soup", _from_pretrained_mean(dirs))

    config = json.loads((dirs[1] / "config.json").read_text())
    (dirs[1] / "config.json").write_text(
        json.dumps({**config, "transformers_weights": "../decoy-1/model.safetensors"})
    )
    with pytest.raises(CorruptCheckpointError, match="transformers_weights") as e:
        merge_models(dirs, progress=False)
    assert str(dirs[1] / "config.json") in str(e.value)


# ----------------------------------------------------------------------- defect 5: confined, unambiguous index


def _sharded(root, name, seed=0):
    folder = root / name
    make_tiny_bert(seed=seed).save_pretrained(folder, max_shard_size="20KB")
    index = folder / "model.safetensors.index.json"
    assert index.is_file()
    return folder, index


@pytest.mark.parametrize("escape", ["parent", "absolute", "nested-parent", "backslash"])
def test_index_naming_a_file_outside_its_folder_is_refused(tmp_path, escape):
    outside, _ = _sharded(tmp_path, "other", seed=9)
    folder, index = _sharded(tmp_path, "ft")
    data = json.loads(index.read_text())
    shard = sorted(set(data["weight_map"].values()))[-1]
    target = {
        "parent": f"../other/{shard}",
        "absolute": str(outside / shard),
        "nested-parent": f"sub/../../other/{shard}",
        "backslash": f"..\\other\\{shard}",
    }[escape]
    (folder / shard).unlink()  # the folder's own shard is gone: only the outside file could be read
    entry = next(k for k, v in data["weight_map"].items() if v == shard)
    data["weight_map"] = {k: (target if v == shard else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    with pytest.raises(CorruptCheckpointError) as e:
        merge_models([folder, tmp_path / "other"], progress=False)
    msg = str(e.value)
    assert str(index) in msg and entry in msg and repr(target) in msg and "inside" in msg
    assert e.value.path == str(index)


def test_index_listing_a_tensor_twice_is_refused(tmp_path):
    folder, index = _sharded(tmp_path, "ft")
    data = json.loads(index.read_text())
    shards = sorted(set(data["weight_map"].values()))
    name = next(iter(data["weight_map"]))
    body = json.dumps(data["weight_map"])[1:-1]
    # JSON with the same key twice: json.loads would silently keep the last
    index.write_text('{"metadata": {}, "weight_map": {' + body + f', "{name}": "{shards[-1]}"' + "}}")
    with pytest.raises(CorruptCheckpointError, match="twice") as e:
        merge_models([folder, make_tiny_bert(seed=1)], progress=False)
    assert str(index) in str(e.value) and e.value.tensor_name == name


def test_tensor_stored_in_two_shards_is_refused(tmp_path):
    folder, index = _sharded(tmp_path, "ft")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    first = load_file(folder / shards[0])
    name = next(iter(first))
    last = load_file(folder / shards[-1])
    last[name] = first[name] + 1.0  # a stale copy in another shard: loaders keep whichever comes last
    save_file(last, folder / shards[-1], metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpointError, match="twice") as e:
        merge_models([folder, make_tiny_bert(seed=1)], progress=False)
    assert e.value.tensor_name == name and shards[0] in str(e.value) and shards[-1] in str(e.value)


# ---------------------------------------------------------------------------------- defect 6: legacy .bin


def _bin_dir(root, name, seed, *, legacy: bool):
    folder = root / name
    model = make_tiny_bert(seed=seed)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    return folder


def test_legacy_non_zip_bin_is_loaded_like_from_pretrained(tmp_path):
    dirs = [_bin_dir(tmp_path, "legacy", 0, legacy=True), _bin_dir(tmp_path, "zip", 1, legacy=False)]
    assert not zipfile.is_zipfile(dirs[0] / "pytorch_model.bin")
    merge_models(dirs, output_dir=tmp_path / "soup", progress=False)
    _assert_soup_is(tmp_path / "soup", _from_pretrained_mean(dirs))


class _RunsCode:
    """A pickle payload that would create `marker` when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("legacy", [True, False])
def test_bin_holding_code_is_refused_without_running_it(tmp_path, legacy):
    folder = _bin_dir(tmp_path, "evil", 0, legacy=legacy)
    marker = tmp_path / "pwned"
    sd = make_tiny_bert(seed=0).state_dict()
    sd["payload"] = _RunsCode(marker)
    torch.save(sd, folder / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CorruptCheckpointError) as e:
        merge_models([folder, make_tiny_bert(seed=1)], progress=False)
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "other than tensors" in msg and "safety" in msg
    assert "truncated" not in msg
    assert not marker.exists()


def test_truncated_legacy_bin_is_named(tmp_path):
    folder = _bin_dir(tmp_path, "cut", 0, legacy=True)
    f = folder / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match="truncated") as e:
        merge_models([folder, make_tiny_bert(seed=1)], progress=False)
    assert e.value.path == str(f)


@pytest.mark.parametrize("stale", ["index", "single", "bin-index", None])
def test_hub_download_fetches_only_the_files_from_pretrained_reads(hub_server, tmp_path, monkeypatch, stale):
    """Pulled from the (local) Hub: the same files as from_pretrained, and never the shards of a stale index."""
    from huggingface_hub import HfApi

    from hf_soups.ingredients import Ingredient, resolve

    monkeypatch.setenv("DISABLE_SAFETENSORS_CONVERSION", "1")  # no conversion thread in from_pretrained
    api = HfApi(token=hub_server.token)
    ids = []
    for seed in (0, 1):
        if stale is None:  # index + shards only: every shard is fetched
            folder, _ = _sharded(tmp_path, f"sharded-{seed}", seed=seed)
        else:
            folder = _two_forms(tmp_path, seed, stale)
        repo_id = f"{hub_server.user}/weights-read-{stale}-{seed}-{tmp_path.name[-12:]}"
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id)
        ids.append(repo_id)
    merge_models(ids, output_dir=tmp_path / "soup", progress=False)
    _assert_soup_is(tmp_path / "soup", _from_pretrained_mean(ids))
    snapshot = resolve(Ingredient(ids[0])).path
    downloaded = {p.name for p in snapshot.iterdir()}
    shards = {n for n in downloaded if "-of-" in n}
    if stale is None:
        assert len(shards) > 1
    else:
        assert not shards, downloaded
        assert ("pytorch_model.bin" if stale == "bin-index" else "model.safetensors") in downloaded


def test_float16_tensor_whose_sum_exceeds_65504_is_not_refused(tmp_path, tiny_bert_dirs, monkeypatch):
    """Every value fits float16 but the slice adds up past 65504: the fast check's overflow is no false alarm."""
    monkeypatch.setattr(engine_module, "CHUNK_ELEMENTS", 100)
    a = _with_values(tiny_bert_dirs[0], tmp_path / "a", {})
    sd = load_file(a / "model.safetensors")
    sd[BIG] = torch.full_like(sd[BIG], 60000.0)
    save_file(sd, a / "model.safetensors", metadata={"format": "pt"})
    merge_models([a, a], dtype="float16", output_dir=tmp_path / "soup", progress=False)
    got = load_file(tmp_path / "soup" / "model.safetensors")[BIG]
    assert torch.equal(got, torch.full(got.shape, 60000.0, dtype=torch.float16))
