"""The benchmark harness measures what it claims: per-process peak memory, wall time, and a tiny end-to-end run."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

from _measure import CommandFailed, measure_round_robin, parse_size, run_once  # noqa: E402


def _alloc(mb: int) -> list[str]:
    # touch every page so the memory is resident
    return [sys.executable, "-c", f"b = bytearray({mb} * 10**6)\nfor i in range(0, len(b), 4096): b[i] = 1"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and Linux ru_maxrss semantics")
def test_peak_rss_is_per_process_not_the_maximum_over_all_children():
    # this pytest process is large (torch is imported): the children's pre-exec image must not count
    big = run_once(_alloc(500))
    small = run_once(_alloc(1))
    assert big.peak_rss_bytes > 500 * 10**6
    # RUSAGE_CHILDREN would report the 500 MB child again here; wait4 + VmHWM report this child only
    assert small.peak_rss_bytes < 60 * 10**6
    assert big.peak_anon_bytes is not None and big.peak_anon_bytes > 400 * 10**6


def test_peak_rss_from_a_small_driver():
    """The benchmark's own set-up: a small driver, where ru_maxrss from wait4 is exact."""
    driver = (
        f"import sys; sys.path.insert(0, {str(BENCH)!r}); from _measure import run_once\n"
        f"print(run_once({_alloc(300)!r}).peak_rss_bytes, run_once({_alloc(1)!r}).peak_rss_bytes)"
    )
    res = run_once([sys.executable, "-c", driver])
    big, small = (int(x) for x in res.output.split())
    assert big > 300 * 10**6 and small < 60 * 10**6


def test_failures_are_reported_with_the_output():
    with pytest.raises(CommandFailed, match="boom"):
        run_once([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    assert run_once([sys.executable, "-c", "raise SystemExit(2)"], check=False).returncode == 2


def test_round_robin_discards_warmup_and_takes_medians():
    calls = []
    results = measure_round_robin(
        {
            "a": lambda: [sys.executable, "-c", "pass"],
            "b": lambda: [sys.executable, "-c", "import time; time.sleep(0.5)"],
        },
        runs=3,
        warmup=1,
        before_each=calls.append,
        log=lambda _: None,
    )
    assert calls == ["a", "b"] * 4
    assert len(results["a"].runs) == 3 and len(results["b"].runs) == 3
    # b's sleep is inside the measured wall time (a lower bound; comparing timings belongs to benchmarks/)
    assert results["b"].wall_s >= 0.5
    for result in results.values():  # the summary is the middle one of the three measured runs
        assert result.wall_s == sorted(r.wall_s for r in result.runs)[1]


def test_round_robin_keeps_going_past_a_failing_command():
    lines = []
    results = measure_round_robin(
        {
            "bad": lambda: [sys.executable, "-c", "raise SystemExit('no memory')"],
            "ok": lambda: [sys.executable, "-c", "pass"],
        },
        runs=2,
        warmup=0,
        log=lines.append,
        keep_going=True,
    )
    assert results["bad"].runs == [] and "exit status 1" in results["bad"].error
    assert len(results["ok"].runs) == 2
    assert sum("FAILED" in line for line in lines) == 1  # left out after its first failure
    with pytest.raises(CommandFailed):
        measure_round_robin(
            {"bad": lambda: [sys.executable, "-c", "raise SystemExit(1)"]}, runs=1, log=lambda _: None
        )


def test_parse_size():
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("400M") == 400 * 10**6
    assert parse_size("1.5GB") == 15 * 10**8
    assert parse_size("2B") == 2 * 10**9
    assert parse_size(7) == 7


@pytest.mark.slow
def test_tiny_end_to_end_run(tmp_path):
    """Builds 3 tiny sharded ingredients, measures the floor and hf_soups, checks the soup against the exact mean."""
    import merge_throughput

    out = tmp_path / "bench.json"
    code = merge_throughput.main(
        [
            "--params", "3M", "--n", "3", "--runs", "1", "--warmup", "0", "--methods", "floor,hf_soups,ties,slerp",
            "--work-dir", str(tmp_path / "work"), "--max-shard-size", "4MB", "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert report["model"]["shape"]["vocab_size"] == 8000
    built = next((tmp_path / "work").iterdir())
    assert len(list((built / "ingredient-0").glob("*.safetensors"))) > 1  # sharded ingredients
    r = report["results"]["3"]
    assert r["floor_s"] > 0 and r["hf_soups"]["peak_rss_bytes"] > 0
    assert r["floor-read"]["wall_s"] > 0 and r["floor-write"]["wall_s"] > 0
    assert r["heavy_modules_after_hf_soups"]["peft"] is False
    assert r["heavy_modules_after_hf_soups"]["transformers model code"] is False
    assert report["goals"]["lazy_import"] is True
    assert report["goals"]["rss_N3"] is True
    # the task-vector methods, measured and verified beside the uniform soup, over the same ingredients + base
    assert r["hf_soups:ties"]["peak_rss_bytes"] > 0 and r["hf_soups:slerp"]["wall_s"] > 0
    assert (built / "base" / "model.safetensors.index.json").is_file()
    assert "rss_N3_hf_soups:ties" in report["goals"]


def test_mergekit_configs_of_the_family_name_the_same_method_and_knobs():
    import merge_throughput
    import yaml

    paths = ["/m/a", "/m/b", "/m/c"]
    ties = yaml.safe_load(merge_throughput.mergekit_config("ties", "/m/base", paths))
    assert (ties["merge_method"], ties["base_model"], ties["parameters"]) == (
        "ties",
        "/m/base",
        {"normalize": False, "lambda": 1.0},
    )
    assert [m["parameters"] for m in ties["models"]] == [{"weight": 1.0, "density": 0.5}] * 3
    slerp = yaml.safe_load(merge_throughput.mergekit_config("slerp", "/m/base", paths))
    assert slerp["base_model"] == "/m/a" and [m["model"] for m in slerp["models"]] == ["/m/a", "/m/b"]
    assert slerp["parameters"] == {"t": 0.5}
    stock = yaml.safe_load(merge_throughput.mergekit_config("model-stock", "/m/base", paths))
    assert stock["merge_method"] == "model_stock" and "parameters" not in stock["models"][0]


def test_paper_repro_reports_the_family_beside_the_soups(tmp_path):
    """A record of a tiny `--family` run (2 ingredients, 3 steps; written by the script itself) renders every family
    member in the table, with its chosen knobs, its paired tests against the best single and its summary line."""
    import paper_repro

    fixture = Path(__file__).parent / "fixtures" / "paper_repro" / "family_tiny.json"
    doc = tmp_path / "benchmarks.md"
    code = paper_repro.main(["--render-json", str(fixture), "--docs", str(doc), "--img", ""])
    assert code == 0
    text = doc.read_text()
    for label in paper_repro.FAMILY_LABELS.values():
        assert f"| {label} (" in text
        assert f"- {label[0].upper() + label[1:]} vs best single:" in text
    for key in paper_repro.FAMILY_LABELS:
        assert f"| {key} | test | 0 |" in text
    assert "best of the family on validation in 1 of 1" in text
    assert "--family" in text  # the command that made the record


@pytest.mark.slow
def test_live_soup_measures_each_checkout_it_names(tmp_path):
    """`benchmarks/live_soup.py` on a tiny Llama: every soup checked against the float64 mean, and each child
    imports the checkout it is labelled with (not the one it was started from)."""
    import shutil

    import live_soup

    other = tmp_path / "other"
    shutil.copytree(
        BENCH.parent / "hf_soups", other / "hf_soups", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path / "live.json"
    environment = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "PYTHONPATH")}
    code = live_soup.main(
        [
            "--hidden", "64", "--layers", "1", "--n", "2", "--runs", "1", "--warmup", "0",
            "--work-dir", str(tmp_path / "work"), "--compare-checkout", str(other), "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    assert {k: os.environ.get(k) for k in environment} == environment  # the children's settings stay theirs
    rows = json.loads(out.read_text())["rows"]
    assert rows["hf_soups"]["imported_from"] == [str(BENCH.parent / "hf_soups" / "__init__.py")]
    assert rows["hf_soups@other"]["imported_from"] == [str(other / "hf_soups" / "__init__.py")]
    for row in rows.values():
        assert row["checked"] and row["peak_rss_bytes"] > 0 and row["candidate_s"] > 0
