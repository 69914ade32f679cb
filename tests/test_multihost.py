"""Two JAX processes (2 fake CPU devices each, gloo collectives, a coordinator on 127.0.0.1), started by
launch/local.py through main.py, give what one process gives: training, scoring, preemption."""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from launch import local
from llm_embedder_jax import encoder, score, sharding, train
from llm_embedder_jax.llm import RewardLM
from tests.test_score import small_config as score_config
from tests.test_train import small_config as train_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def launch(tmp_path, name, main_flags, *, env=()):
    """Runs main.py as 2 processes × 2 CPU devices; returns the log folder (one file per process)."""
    logs = tmp_path / name / "logs"
    code = local.main(["--num_processes=2", "--cpu_devices=2", f"--log_dir={logs}", f"--env=PYTHONPATH={ROOT}",
                       *(f"--env={e}" for e in env), "--", *main_flags])
    assert code == 0, "\n".join(f"{p.name}:\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*.log")))
    return logs


def config_file(tmp_path, model_dir, data_file, **overrides):
    """A config file for main.py: the tiny training recipe of tests/test_train.py."""
    path = tmp_path / f"config_{len(list(tmp_path.glob('config_*.py')))}.py"
    path.write_text("import pathlib\nfrom tests.test_train import small_config\n\n"
                    "def get_config():\n"
                    f"    return small_config(pathlib.Path({str(model_dir)!r}), pathlib.Path({str(data_file)!r}),\n"
                    f"                        **{overrides!r})\n")
    return path


def test_two_processes_train_like_one(tmp_path, tiny_cls_checkpoint, docstring_jsonl):
    # float64 compute: what is compared is what splitting over processes changes, not float32 rounding
    # (see test_train.test_eight_devices_equal_one), while the weights and Adam stay float32.
    settings = dict(num_steps=4, dtype="float64")
    config = config_file(tmp_path, tiny_cls_checkpoint, docstring_jsonl, **settings)
    launch(tmp_path, "two", ["--mode=train", f"--config={config}", f"--workdir={tmp_path / 'two'}"],
           env=["JAX_ENABLE_X64=1"])
    with jax.enable_x64(True):
        train.train_and_evaluate(train_config(tiny_cls_checkpoint, docstring_jsonl, **settings), tmp_path / "one")

    two = json.loads((tmp_path / "two" / "train_report.json").read_text())
    one = json.loads((tmp_path / "one" / "train_report.json").read_text())
    assert [h["step"] for h in two["losses"]] == [1, 2, 3, 4]
    np.testing.assert_allclose([h["loss"] for h in two["losses"]], [h["loss"] for h in one["losses"]], atol=1e-8)
    assert two["eval_mrr@10"] == pytest.approx(one["eval_mrr@10"], abs=1e-6)
    start = encoder.load_hf(tiny_cls_checkpoint)[1]
    params_two, params_one = (encoder.load_hf(tmp_path / run / "export")[1] for run in ("two", "one"))
    for a, b in zip(jax.tree.leaves(params_two), jax.tree.leaves(params_one)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params_two), jax.tree.leaves(start)))
    assert moved > 1e-4
    # Written once, by process 0: one tensorboard event file; the checkpoint is whole.
    assert len(list((tmp_path / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()] == ["4"]


def test_two_processes_score_like_one(tmp_path, smollm2_gguf, docstring_jsonl):
    data = tmp_path / "data" / "qa.jsonl"
    data.parent.mkdir()
    data.write_text("".join(docstring_jsonl.read_text().splitlines(keepends=True)[:4]))
    overrides = dict(max_candidates=2, shard_size=2, batch_size=4)
    launch(tmp_path, "two", ["--mode=score", f"--config={ROOT / 'configs' / 'score.py'}",
                             f"--workdir={tmp_path / 'two'}", f"--config.inputs=('{data}',)",
                             *(f"--config.{k}={v}" for k, v in overrides.items()), "--config.key_max_tokens=48"])
    lm = RewardLM.from_pretrained(smollm2_gguf, mesh=sharding.make_mesh())
    score.score_files(score_config(data, **overrides), tmp_path / "one", lm=lm)

    read = lambda path: [json.loads(line) for line in path.read_text().splitlines()]
    two, one = read(tmp_path / "two" / "qa.jsonl"), read(tmp_path / "one" / "qa.jsonl")
    assert [r["query"] for r in two] == [r["query"] for r in read(data)]
    assert all(len(r["teacher_scores"]) == 2 for r in two)
    np.testing.assert_allclose([r["teacher_scores"] for r in two], [r["teacher_scores"] for r in one], atol=1e-4)
    # Each process wrote its share of each shard (records i % 2 == p); process 0 merged them.
    shards = tmp_path / "two" / "shards" / "qa"
    assert sorted(p.name for p in shards.glob("0*.jsonl")) == [
        "00000.0-of-2.jsonl", "00000.1-of-2.jsonl", "00001.0-of-2.jsonl", "00001.1-of-2.jsonl"]
    assert [json.loads(line)["i"] for line in (shards / "00001.1-of-2.jsonl").read_text().splitlines()] == [3]
    report = json.loads((tmp_path / "two" / "score_report.json").read_text())
    assert [f["scored"] for f in report["files"].values()] == [4]


def test_sigterm_to_one_process_stops_all_at_one_step(tmp_path, tiny_cls_checkpoint, docstring_jsonl):
    """A preemption notice reaching one host: every process saves the same step and exits cleanly."""
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    config = config_file(tmp_path, tiny_cls_checkpoint, docstring_jsonl, num_steps=1000, checkpoint_every=1000)
    launcher = subprocess.Popen(
        [sys.executable, "launch/local.py", "--num_processes=2", "--cpu_devices=2", f"--log_dir={logs}",
         f"--env=PYTHONPATH={ROOT}", "--", "--mode=train", f"--config={config}", f"--workdir={workdir}"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True)
    pids = {}
    for line in launcher.stderr:
        if match := re.match(r"process (\d): pid (\d+)", line):
            pids[int(match[1])] = int(match[2])
        if len(pids) == 2:
            break
    log_1 = logs / "process_1.log"
    deadline = time.time() + 300
    while time.time() < deadline and not re.search(r"step 2:", log_1.read_text() if log_1.exists() else ""):
        time.sleep(0.2)
    os.kill(pids[1], signal.SIGTERM)
    assert launcher.wait(timeout=300) == 0, launcher.stderr.read()[-3000:]
    saved = [re.findall(r"SIGTERM: saving step (\d+)", (logs / f"process_{p}.log").read_text()) for p in (0, 1)]
    assert saved[0] == saved[1] and len(saved[0]) == 1, saved
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps == [int(saved[0][0])] and steps[0] >= 2
