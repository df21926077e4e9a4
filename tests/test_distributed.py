"""Two processes (torchrun, gloo on CPU) give the same scores and the same greedy decisions as one.

`accelerate launch --cpu --num_processes 2` starts a single process on this kind of machine (its multi-CPU
mode wants MPI), so the test launches `torch.distributed.run` directly; `Accelerator(cpu=True)` joins the
gloo process group it sets up, exactly as under `accelerate launch` on GPUs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.synthetic_task import add_noise, save, trained_model

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    from hf_soups import merge_models
    from hf_soups.evaluation import build_evaluator
    from tests.synthetic_task import as_dataset, make_split, pretrained_model

    out = Path(sys.argv[1])
    refs = sys.argv[2:]
    ids, labels = make_split(301, seed=1)  # 301 = 18 full batches of 16 + 13: the last batch is uneven
    ood_ids, ood_labels = make_split(77, seed=2, shift=0.15)
    sets = {"val": as_dataset(ids, labels), "ood": as_dataset(ood_ids, ood_labels)}

    # the batches really are split across processes
    evaluator = build_evaluator(sets, batch_size=16, device="cpu")
    model = pretrained_model()
    seen = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(int(kwargs["input_ids"].shape[0])), with_kwargs=True)
    direct = evaluator.evaluate(model)

    soup = merge_models(
        refs, method="greedy", eval_dataset=sets, batch_size=16, device="cpu", ensemble_baseline=True,
        output_dir=out / "soup", progress=False, prediction_cache_dir=out / "cache",
    )
    # cooked again from the cache: the processes agree set by set on what they reuse (else they would hang)
    again = merge_models(
        refs, method="greedy", eval_dataset=sets, batch_size=16, device="cpu", strict=True, progress=False,
        prediction_cache_dir=out / "cache",
    )
    assert [i.scores for i in again.ingredients] == [i.scores for i in soup.ingredients]
    # examples of many lengths, batched longest first: per-example outputs come back in the set's order on every
    # process (by the indices the batches carry, after gather_for_metrics drops the last batch's duplicates)
    import torch
    from datasets import Dataset
    plain = pretrained_model()  # not the hooked model: its forward passes are counted above
    gen = torch.Generator().manual_seed(5)
    cut = torch.randint(3, ids.shape[1] + 1, (len(ids),), generator=gen).tolist()
    ragged = {"val": Dataset.from_dict({"input_ids": [r[:k].tolist() for r, k in zip(ids, cut)], "label": labels.tolist()})}
    sorted_logits = build_evaluator(ragged, batch_size=16, device="cpu", model=plain).predict(plain)["val"].logits
    ragged_soup = merge_models(refs, method="greedy", eval_dataset=ragged, batch_size=16, device="cpu", progress=False)
    rank = int(os.environ.get("RANK", "0"))
    result = {
        "ragged_logits": sorted_logits.tolist(),
        "ragged_selected": [i.selected for i in ragged_soup.ingredients],
        "ragged_kept": [h["kept"] for h in ragged_soup.history],
        "ragged_scores": ragged_soup.scores,
        "ragged_padding": ragged_soup.report_extra["evaluation"]["padding"],
        "num_processes": evaluator.num_processes,
        "examples_seen": sum(seen),
        "direct": direct,
        "scores": {i.name: i.scores for i in soup.ingredients},
        "selected": {i.name: i.selected for i in soup.ingredients},
        "history": [{k: v for k, v in h.items()} for h in soup.history],
        "soup_scores": soup.scores,
        "baselines": soup.report_extra["baselines"],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result, sort_keys=True))
    """
)


def _run(cmd, out: Path) -> None:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_processes_match_one(tmp_path):
    ft = trained_model()
    refs = [str(save(add_noise(ft, 1.5, seed=i), tmp_path / f"good-{i}")) for i in range(3)]
    refs.append(str(save(add_noise(ft, 12.0, seed=99), tmp_path / "ruined")))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)

    single = tmp_path / "single"
    single.mkdir()
    _run([sys.executable, str(worker), str(single), *refs], single)
    multi = tmp_path / "multi"
    multi.mkdir()
    with socket.socket() as sock:  # a free port for the rendezvous (--master_port 0 is not portable)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    _run([*launch, str(worker), str(multi), *refs], multi)

    one = json.loads((single / "rank0.json").read_text())
    r0 = json.loads((multi / "rank0.json").read_text())
    r1 = json.loads((multi / "rank1.json").read_text())
    assert one["num_processes"] == 1 and r0["num_processes"] == 2 == r1["num_processes"]
    assert one["examples_seen"] == 301 + 77
    # each process ran about half of the batches (the last one padded by accelerate, then dropped by gather_for_metrics)
    assert r0["examples_seen"] < 301 and r1["examples_seen"] < 301
    assert r0["examples_seen"] + r1["examples_seen"] >= 301 + 77

    for other in (r0, r1):
        assert other["selected"] == one["selected"]
        assert [h["candidate"] for h in other["history"]] == [h["candidate"] for h in one["history"]]
        assert [h["kept"] for h in other["history"]] == [h["kept"] for h in one["history"]]
        for a, b in ((one["direct"], other["direct"]), (one["soup_scores"], other["soup_scores"])):
            for set_name in a:
                assert b[set_name]["accuracy"] == a[set_name]["accuracy"]
                assert b[set_name]["loss"] == pytest.approx(a[set_name]["loss"], rel=1e-5)
        for name, scores in one["scores"].items():
            assert other["scores"][name]["val"]["accuracy"] == scores["val"]["accuracy"]
            assert other["scores"][name]["ood"]["accuracy"] == scores["ood"]["accuracy"]
        ens_one = one["baselines"]["ensemble"]["scores"]
        ens = other["baselines"]["ensemble"]["scores"]
        assert ens["val"]["accuracy"] == ens_one["val"]["accuracy"]
    assert one["selected"]["ruined"] is False
    # length-sorted batches: the same per-example logits (in the set's order), kept set and scores as one process
    for other in (r0, r1):
        np.testing.assert_allclose(
            np.array(other["ragged_logits"]), np.array(one["ragged_logits"]), rtol=1e-4, atol=1e-5
        )
        assert (
            other["ragged_selected"] == one["ragged_selected"] and other["ragged_kept"] == one["ragged_kept"]
        )
        assert other["ragged_scores"]["val"]["accuracy"] == one["ragged_scores"]["val"]["accuracy"]
        assert other["ragged_scores"]["val"]["loss"] == pytest.approx(
            one["ragged_scores"]["val"]["loss"], rel=1e-5
        )
        assert other["ragged_padding"] == one["ragged_padding"]
    pad = one["ragged_padding"]["val"]
    assert pad["padded_fraction"] < pad["padded_fraction_unsorted"]
    # early rejection: both processes stopped at the same gathered batch (a step of 2 x 16 examples here, where one
    # process stops after a multiple of 16), and the ruined candidate was rejected early
    assert [h.get("partial") for h in r0["history"]] == [h.get("partial") for h in r1["history"]]
    assert any(h.get("partial") for h in r0["history"]) and any(h.get("partial") for h in one["history"])
    assert len(list((multi / "cache").glob("*.safetensors"))) == 2 * len(
        refs
    )  # written once, by the main process
    # only the main process wrote the soup, once
    assert (multi / "soup" / "config.json").is_file()
    assert not [p for p in multi.iterdir() if p.name.startswith(".soup")]
