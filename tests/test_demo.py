"""The demo end to end (`configs/demo.py:quick`): every stage, the report, and a rerun that skips what is done."""
import json
import logging
import math
import shutil

import pytest

from configs import demo as demo_config
from llm_embedder_jax import demo, export, score

STAGES = ("data", "score", "train/seed_0", "eval/none", "eval/bm25", "eval/untrained", "eval/trained_seed_0")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A quick demo run to the end: (workdir, config, report)."""
    workdir = tmp_path_factory.mktemp("demo")
    config = demo_config.get_config("quick")
    return workdir, config, demo.run_demo(config, workdir)


def test_quick_demo_reports_every_row(finished):
    workdir, config, report = finished
    assert list(report["rows"]) == ["none", "bm25", "untrained", "trained"]
    for name, row in report["rows"].items():
        assert math.isfinite(row["perplexity"]["mean"]) and row["perplexity"]["mean"] > 1, name
    assert report["test_samples"] == sum(1 for _ in open(workdir / "data" / "test.jsonl"))
    assert report["data"]["train"]["files_used"] == config.data.train.max_files
    # Retrieval is measured, not assumed: no retrieval and BM25 differ.
    assert report["rows"]["none"]["perplexity"]["mean"] != report["rows"]["bm25"]["perplexity"]["mean"]
    assert json.loads((workdir / "report.json").read_text())["rows"] == report["rows"]
    assert (workdir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (workdir / "export" / "model.safetensors").exists()
    # The export says how its lrlm keys were formed, for the eval mode to form them alike.
    assert export.recorded_lrlm_keys(workdir / "export") is config.key_with_continuation is True
    assert all(not report["stages"][name]["skipped"] for name in STAGES)
    # Every train record was scored, one teacher score per candidate.
    scored = [json.loads(line) for line in open(workdir / "score" / "train.jsonl")]
    assert scored and all(len(r["teacher_scores"]) == len(r["neg"]) for r in scored)


def test_rerun_skips_finished_stages_and_adds_a_seed(finished, caplog, monkeypatch):
    workdir, config, first = finished
    config = config.copy_and_resolve_references()
    config.seeds = 2
    with caplog.at_level(logging.INFO):
        report = demo.run_demo(config, workdir)
    for name in STAGES:
        assert f"skipping {name}: done" in caplog.text
        assert report["stages"][name]["skipped"]
    assert not report["stages"]["train/seed_1"]["skipped"] and not report["stages"]["eval/trained_seed_1"]["skipped"]
    assert (workdir / "train" / "seed_1" / "export" / "model.safetensors").exists()
    trained = report["rows"]["trained"]["perplexity"]
    assert len(trained["values"]) == 2 and trained["values"][0] == first["rows"]["trained"]["perplexity"]["mean"]
    assert trained["std"] == pytest.approx(abs(trained["values"][0] - trained["values"][1]) / 2)
    for name in ("none", "bm25", "untrained"):
        assert report["rows"][name] == first["rows"][name]

    # Everything done: a third run never loads the LLM.
    monkeypatch.setattr(score, "load_reward_lm", lambda config: pytest.fail("the LLM was loaded"))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = demo.run_demo(config, workdir)
    assert all(stage["skipped"] for stage in again["stages"].values())
    assert again["rows"] == report["rows"]


def test_a_moved_workdir_is_reused(finished, tmp_path, monkeypatch):
    workdir, config, first = finished
    moved = tmp_path / "moved"
    shutil.copytree(workdir, moved)
    monkeypatch.setattr(score, "load_reward_lm", lambda config: pytest.fail("the LLM was loaded"))
    report = demo.run_demo(config, moved)
    assert all(stage["skipped"] for stage in report["stages"].values())
    assert report["rows"] == first["rows"]


def test_a_stage_done_under_other_settings_is_an_error(finished):
    workdir, config, _ = finished
    config = config.copy_and_resolve_references()
    config.data.chunk_tokens = 48
    with pytest.raises(ValueError, match=r"data was made with other settings \(chunk_tokens differ\)"):
        demo.run_demo(config, workdir)


def test_variants():
    assert demo_config.get_config().mode == "demo"
    assert demo_config.get_config("quick,rank").score.reward == "rank"
    with pytest.raises(ValueError, match="variant"):
        demo_config.get_config("quick,full")
