"""The train step and loop: sharding equivalence, GradCache, non-finite guard, self-paced LR, resume, SIGTERM."""
import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import llm_embedder
from llm_embedder_jax import Embedder, encoder, sharding, train
from llm_embedder_jax.data import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]


def small_config(model_dir, data_file, **overrides):
    """The tiny recipe on a random 3-layer BERT and one qa file of docstrings."""
    config = llm_embedder.get_config("tiny,qa")
    config.model = str(model_dir)
    config.data_dir = str(data_file.parent)
    config.datasets[0].path = data_file.name
    config.eval_files = [ml_collections.ConfigDict(dict(name="qa", path=data_file.name, task="qa"))]
    config.eval_samples = 4
    config.num_steps = 6
    config.checkpoint_every = 2
    config.log_every = 1
    config.eval_every = 0
    config.query_max_len = 32
    config.key_max_len = 48
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def batches(tiny_cls_checkpoint, docstring_jsonl):
    model = Embedder.from_pretrained(tiny_cls_checkpoint)
    it = pipeline.make_train_iterator([dict(path=str(docstring_jsonl), task="qa")], tokenizer=model.tokenizer,
                                      global_batch_size=8, group_size=4, query_max_len=32, key_max_len=48, seed=0)
    return model, [next(it) for _ in range(3)]


def run_steps(model, batches, devices, config, **settings_overrides):
    mesh = sharding.make_mesh(devices=devices)
    tx, _ = train.make_optimizer(config)
    replicated = sharding.replicated(mesh)
    state = jax.jit(lambda p: train.init_state(p, tx), out_shardings=replicated)(
        jax.device_put(model.params, replicated))
    settings = train.step_settings(config, model.config, "qa")
    settings = __import__("dataclasses").replace(settings, **settings_overrides)
    losses = []
    for batch in batches:
        arrays = sharding.global_batch(mesh, {k: batch[k] for k in
                                              ("query_ids", "query_mask", "key_ids", "key_mask", "teacher_scores")})
        state, metrics = train.train_step(state, arrays, 0, settings=settings, tx=tx)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state)


def test_eight_devices_equal_one(batches, tiny_cls_checkpoint, docstring_jsonl):
    model, data = batches
    config = small_config(tiny_cls_checkpoint, docstring_jsonl)
    assert len(jax.devices()) == 8
    losses_1, _ = run_steps(model, data, jax.devices()[:1], config)
    losses_8, _ = run_steps(model, data, jax.devices(), config)
    np.testing.assert_allclose(losses_8, losses_1, atol=1e-5)
    # Parameters: in float32, matmuls blocked differently per shard shape differ by ~1e-7, 1/τ = 100
    # amplifies that, and Adam turns the noise on near-zero gradients into whole +-lr steps. The same
    # step in float64 shows what sharding itself changes: nothing beyond rounding.
    with jax.enable_x64(True):
        model64 = model.with_params(jax.tree.map(lambda p: np.asarray(p, np.float64), model.params))
        data64 = [dict(b, teacher_scores=b["teacher_scores"].astype(np.float64)) for b in data]
        losses_1, state_1 = run_steps(model64, data64, jax.devices()[:1], config, dtype="float64")
        losses_8, state_8 = run_steps(model64, data64, jax.devices(), config, dtype="float64")
    np.testing.assert_allclose(losses_8, losses_1, atol=1e-9)
    for a, b in zip(jax.tree.leaves(state_1["params"]), jax.tree.leaves(state_8["params"])):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # The steps did train: parameters moved.
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(state_1["params"]),
                                                             jax.tree.leaves(jax.device_get(model.params))))
    assert moved > 1e-4


def test_gradcache_step_equals_plain_step(batches, tiny_cls_checkpoint, docstring_jsonl):
    model, data = batches
    config = small_config(tiny_cls_checkpoint, docstring_jsonl)
    plain_losses, plain = run_steps(model, data[:2], jax.devices(), config)
    cached_losses, cached = run_steps(model, data[:2], jax.devices(), config, gradcache_chunk=8)
    np.testing.assert_allclose(cached_losses, plain_losses, atol=1e-5)
    for a, b in zip(jax.tree.leaves(plain["params"]), jax.tree.leaves(cached["params"])):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_nonfinite_step_is_skipped(batches, tiny_cls_checkpoint, docstring_jsonl):
    model, data = batches
    config = small_config(tiny_cls_checkpoint, docstring_jsonl)
    poisoned = dict(data[0], teacher_scores=np.full_like(data[0]["teacher_scores"], np.nan))
    losses, state = run_steps(model, [poisoned], jax.devices(), config)
    assert not np.isfinite(losses[0])
    assert int(state["nonfinite_steps"]) == 1 and int(state["step"]) == 1
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(jax.device_get(model.params))):
        np.testing.assert_array_equal(a, b)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["opt_state"]))


def test_self_paced_scale_follows_loss_ratio():
    settings = train.StepSettings(model_config=None, loss=(), self_paced=tuple(sorted(dict(
        enabled=True, interval=4, smoothing=0.5, min_scale=0.5, max_scale=2.0).items())))
    state = {"step": jnp.asarray(0), "task_loss_ema": jnp.zeros(6), "task_loss_ref": jnp.zeros(6)}
    ema, ref, scale = train._self_paced_update(state, 2, jnp.asarray(4.0), settings)
    assert float(ref[2]) == 4.0 and float(scale) == 1.0          # first visit sets the reference
    state = {"step": jnp.asarray(1), "task_loss_ema": ema, "task_loss_ref": ref}
    ema, ref, scale = train._self_paced_update(state, 2, jnp.asarray(1.0), settings)
    assert float(ema[2]) == 2.5 and float(ref[2]) == 4.0
    assert float(scale) == pytest.approx(2.5 / 4.0)               # learned fast: lower LR
    state = {"step": jnp.asarray(2), "task_loss_ema": ema, "task_loss_ref": ref}
    _, _, scale = train._self_paced_update(state, 2, jnp.asarray(100.0), settings)
    assert float(scale) == 2.0                                     # clipped at max_scale
    state = {"step": jnp.asarray(4), "task_loss_ema": ema, "task_loss_ref": ref}
    _, ref, scale = train._self_paced_update(state, 2, jnp.asarray(2.5), settings)
    assert float(ref[2]) == 2.5 and float(scale) == 1.0            # every `interval` steps: new reference
    off = train.StepSettings(model_config=None, loss=())
    assert float(train._self_paced_update(state, 2, jnp.asarray(9.0), off)[2]) == 1.0


def final_params(workdir):
    config, params, _ = encoder.load_hf(workdir / "export")
    return params


def test_resume_after_stop_equals_uninterrupted(tmp_path, tiny_cls_checkpoint, docstring_jsonl):
    full = tmp_path / "full"
    train.train_and_evaluate(small_config(tiny_cls_checkpoint, docstring_jsonl), full)
    staged = tmp_path / "staged"
    assert train.train_and_evaluate(small_config(tiny_cls_checkpoint, docstring_jsonl, stop_after_steps=3),
                                    staged) is None
    assert not (staged / "export").exists()
    train.train_and_evaluate(small_config(tiny_cls_checkpoint, docstring_jsonl), staged)

    full_report = json.loads((full / "train_report.json").read_text())
    staged_report = json.loads((staged / "train_report.json").read_text())
    assert [h["step"] for h in staged_report["losses"]] == [4, 5, 6]
    # The step log spans both invocations, each step once, a file per checkpoint interval.
    staged_log = train.read_step_log(staged)
    assert [e["step"] for e in staged_log] == list(range(1, 7))
    np.testing.assert_allclose([e["loss"] for e in staged_log], [h["loss"] for h in full_report["losses"]],
                               atol=1e-6)
    assert len(list((staged / train.STEP_LOG).glob("*.jsonl"))) >= 3
    np.testing.assert_allclose([h["loss"] for h in staged_report["losses"]],
                               [h["loss"] for h in full_report["losses"][3:]], atol=1e-6)
    for a, b in zip(jax.tree.leaves(final_params(full)), jax.tree.leaves(final_params(staged))):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # The export loads with the public API and differs from the starting model.
    trained = Embedder.from_pretrained(full / "export").encode(["a query"])
    assert np.abs(trained - Embedder.from_pretrained(tiny_cls_checkpoint).encode(["a query"])).max() > 1e-4
    assert set(full_report["eval_mrr@10"]) == {"qa"}


def test_graded_loss_without_teacher_scores_is_rejected(tmp_path, tiny_cls_checkpoint, real_texts):
    from tests.conftest import docstring_records
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in docstring_records(real_texts, count=16, teacher=False)))
    with pytest.raises(ValueError, match="has no teacher_scores.*loss='graded'"):
        train.train_and_evaluate(small_config(tiny_cls_checkpoint, data), tmp_path / "run")


def test_sigterm_saves_and_exits_cleanly(tmp_path, tiny_cls_checkpoint, docstring_jsonl):
    workdir = tmp_path / "run"
    config_file = tmp_path / "sigterm_config.py"
    config_file.write_text(
        "from tests.test_train import small_config\n"
        "import pathlib\n"
        "def get_config():\n"
        f"    return small_config(pathlib.Path({str(tiny_cls_checkpoint)!r}), pathlib.Path({str(docstring_jsonl)!r}),\n"
        "                        num_steps=1000, checkpoint_every=1000)\n")
    proc = subprocess.Popen([sys.executable, "main.py", f"--config={config_file}", f"--workdir={workdir}"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 300
    for line in proc.stderr:
        if "step 2:" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    tail = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, tail[-2000:]
    assert "SIGTERM: saving step" in tail
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and max(steps) >= 2


def test_tiny_config_trains_on_toy_files(tmp_path, toy_dir):
    config = llm_embedder.get_config("tiny")
    config.data_dir = str(toy_dir)
    export_dir = train.train_and_evaluate(config, tmp_path / "tiny")
    report = json.loads((tmp_path / "tiny" / "train_report.json").read_text())
    assert report["steps"] == config.num_steps and report["nonfinite_steps"] == 0
    by_task = {}
    for entry in report["losses"]:
        by_task.setdefault(entry["task"], []).append(entry["loss"])
    assert set(by_task) == set(llm_embedder.RECIPE)        # all six tasks were trained
    losses = [entry["loss"] for entry in report["losses"]]
    quarter = len(losses) // 4
    # The loss falls: the last quarter of steps averages well under the first (the same task mix).
    assert np.mean(losses[-quarter:]) < 0.5 * np.mean(losses[:quarter]), losses
    assert list((tmp_path / "tiny" / "tensorboard").glob("events.out.tfevents.*"))
    assert set(report["eval_mrr@10"]) == {"chat", "icl"}
    vectors = Embedder.from_pretrained(export_dir).encode(["a question"], kind="query", task="qa")
    assert vectors.shape == (1, 384) and np.isfinite(vectors).all()


def test_bad_training_data_names_file_and_line(tmp_path, tiny_cls_checkpoint, docstring_jsonl):
    lines = docstring_jsonl.read_text().splitlines()
    bad = tmp_path / "qa.jsonl"
    bad.write_text("\n".join(lines[:5] + ['{"query": "q", "pos": ["p"], "neg": '] + lines[5:]) + "\n")
    with pytest.raises(ValueError, match=r"qa.jsonl:6"):
        train.train_and_evaluate(small_config(tiny_cls_checkpoint, bad), tmp_path / "run")
    config = small_config(tiny_cls_checkpoint, bad, skip_bad_records=True, num_steps=1)
    config.eval_files = []
    assert train.train_and_evaluate(config, tmp_path / "skipping") is not None
