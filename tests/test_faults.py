"""Fault injection: SIGKILL at random points of training and scoring, NaN in training, half-written files.

The kill tests run `main.py` as a chain of subprocesses (kill, restart, kill, ... until it
finishes on its own) and compare the end result with an uninterrupted run: the same
per-step losses, the same exported parameters, the same scored records. Kill points are
drawn from a seeded `random.Random`; JAX's persistent compilation cache keeps each
restart to a few seconds.
"""
import json
import os
import pathlib
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from llm_embedder_jax import encoder, train
from tests.test_train import small_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"\] step (\d+): ")
RESUMED = re.compile(r"resumed from \S+ at step (\d+)")


@pytest.fixture(scope="module")
def job_env(tmp_path_factory):
    """The environment of the subprocesses: the test's 8 fake devices and a shared compilation cache."""
    return {**os.environ, "PYTHONPATH": str(ROOT),
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


class Job:
    """A main.py subprocess; a thread reads its stderr so that the test can wait for log lines."""

    def __init__(self, args, env):
        self.proc = subprocess.Popen([sys.executable, "main.py", *args], cwd=ROOT, env=env, text=True,
                                     errors="replace", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.lines = queue.Queue()
        self.text = []
        self.ended = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.text.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern, count=1, timeout=240):
        """True once `pattern` has matched `count` more lines; False when the process ends first."""
        deadline = time.time() + timeout
        while count > 0:
            if self.ended:
                return False
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.time()))
            except queue.Empty:
                raise TimeoutError(f"no {pattern!r} within {timeout}s:\n{self.tail()}") from None
            if line is None:
                self.ended = True
                return False
            count -= len(re.findall(pattern, line))
        return True

    def kill(self):
        """SIGKILL; True when it hit a running process (not one that had already exited)."""
        alive = self.proc.poll() is None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.reader.join(timeout=60)  # all of its output read
        return alive

    def finish(self, timeout=300):
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self.reader.join(timeout=60)
        return self.proc.returncode

    def tail(self, chars=4000):
        return "".join(self.text)[-chars:]


# ----------------------------------------------------------------------------- training

NUM_STEPS = 24


def write_train_config(path, model_dir, data_file, **overrides):
    path.write_text(
        "import pathlib\n"
        "from tests.test_train import small_config\n"
        "def get_config():\n"
        f"    config = small_config(pathlib.Path({str(model_dir)!r}), pathlib.Path({str(data_file)!r}),\n"
        f"                          **{overrides!r})\n"
        "    config.eval_files = []\n"
        "    return config\n")
    return path


def checkpoint_dirs(workdir):
    """(finished steps, unfinished orbax temporary folders) under workdir/checkpoints."""
    folder = workdir / "checkpoints"
    names = [p.name for p in folder.iterdir()] if folder.exists() else []
    return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if "orbax-checkpoint-tmp" in n)


def exported_params(workdir):
    _, params, _ = encoder.load_hf(workdir / "export")
    return params


def resumed_at(job):
    """The step a run resumed from (0: from scratch); None when it was killed before saying."""
    text = "".join(job.text)
    resumed = RESUMED.findall(text)
    return int(resumed[0]) if resumed else 0 if STEP_LINE.search(text) else None


# Where a kill lands: right after the process logs something, plus a random delay.
STARTUP = r"CheckpointManager created"                                  # restoring, building the input
SAVE_STARTED = r"Creating tmp directory \S+\d\.orbax-checkpoint-tmp"     # mid-save, before the rename
SAVE_FINISHED = r"Finished saving checkpoint"


def test_sigkill_at_random_points_resumes_exactly(tmp_path, tiny_cls_checkpoint, docstring_jsonl, job_env):
    rng = random.Random(20261127)
    config_file = write_train_config(tmp_path / "config.py", tiny_cls_checkpoint, docstring_jsonl,
                                     num_steps=NUM_STEPS, checkpoint_every=1, keep_checkpoints=1)
    args = lambda workdir: ["--mode=train", f"--config={config_file}", f"--workdir={workdir}"]

    reference = tmp_path / "reference"
    job = Job(args(reference), job_env)
    assert job.finish() == 0, job.tail()

    workdir = tmp_path / "killed"
    plan = ["startup", "startup"] + ["checkpoint write"] * 3 + ["mid-step"] * 4
    rng.shuffle(plan)
    plan.append("final")  # the last kill lands after the last step: final save, export, report
    outcomes = []
    for point in plan:
        job = Job(args(workdir), job_env)
        if point == "final":
            reached = job.wait_for(rf"\] step {NUM_STEPS}: ")
            time.sleep(rng.uniform(0.0, 1.5))
        elif point == "mid-step":  # some steps after this run's first finished save: progress
            reached = job.wait_for(SAVE_FINISHED) and job.wait_for(STEP_LINE.pattern, count=rng.randint(1, 3))
            time.sleep(rng.uniform(0.0, 0.4))
        elif point == "checkpoint write":
            reached = job.wait_for(SAVE_STARTED, count=rng.randint(1, 3))
            time.sleep(rng.uniform(0.0, 0.05))
        else:
            reached = job.wait_for(STARTUP)
            time.sleep(rng.uniform(0.0, 0.5))
        killed = reached and job.kill()
        steps_logged = [int(m) for m in STEP_LINE.findall("".join(job.text))]
        finished, unfinished = checkpoint_dirs(workdir)
        outcomes.append(dict(point=point, killed=killed, resumed_at=resumed_at(job),
                             last_step_logged=max(steps_logged, default=None), finished=finished,
                             unfinished=unfinished, exit=job.proc.returncode if not killed else "SIGKILL"))
        # Whatever the kill interrupted, the files it left are whole: the step log parses, steps in
        # order from 1; an export folder loads; a report parses.
        if (workdir / train.STEP_LOG).exists():
            entries = train.read_step_log(workdir)
            assert [e["step"] for e in entries] == list(range(1, len(entries) + 1))
        if (workdir / "export").exists():
            exported_params(workdir)
        if (workdir / "train_report.json").exists():
            json.loads((workdir / "train_report.json").read_text())
        if not killed:
            assert job.finish() == 0, job.tail()
            break
    job = Job(args(workdir), job_env)
    assert job.finish() == 0, job.tail()
    outcomes.append(dict(point="end", resumed_at=resumed_at(job)))
    print("\n".join(map(str, outcomes)))

    kills = [o for o in outcomes if o.get("killed")]
    assert len(kills) >= 9, outcomes
    # Every restart resumed from the newest finished checkpoint left by the kill before it,
    # never from a half-written one (which restore would fail on, or worse, read).
    restarts = [(before, after) for before, after in zip(outcomes, outcomes[1:])
                if before.get("killed") and after["resumed_at"] is not None]
    assert len(restarts) >= 6, outcomes
    for before, after in restarts:
        assert after["resumed_at"] == max(before["finished"], default=0), outcomes
    # Some kills did land in the middle of a checkpoint write.
    assert any(o["unfinished"] for o in kills), outcomes
    # Some restarts redid steps that had run but not been checkpointed (the data position replays).
    assert any(o["last_step_logged"] and o["last_step_logged"] > max(o["finished"], default=0) for o in kills)
    assert checkpoint_dirs(workdir)[1] == []  # temporary folders of killed saves are cleaned up

    # The same steps, each logged once, with the same losses as the uninterrupted run.
    expected, found = train.read_step_log(reference), train.read_step_log(workdir)
    assert [e["step"] for e in found] == list(range(1, NUM_STEPS + 1))
    assert [e["dataset"] for e in found] == [e["dataset"] for e in expected]
    np.testing.assert_allclose([e["loss"] for e in found], [e["loss"] for e in expected], rtol=0, atol=1e-6)
    # The same final parameters.
    pairs = list(zip(jax.tree.leaves(exported_params(workdir)), jax.tree.leaves(exported_params(reference))))
    for a, b in pairs:
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    print(f"{len(kills)} SIGKILLs, {len(restarts)} resumes checked; max |difference| to the uninterrupted run: "
          f"losses {max(abs(e['loss'] - x['loss']) for e, x in zip(found, expected)):.3g}, "
          f"parameters {max(float(np.abs(a - b).max()) for a, b in pairs):.3g}")
    report = json.loads((workdir / "train_report.json").read_text())
    assert report["steps"] == NUM_STEPS and report["nonfinite_steps"] == 0


# ----------------------------------------------------------------------------- NaN in training

def poison_steps(monkeypatch, steps):
    """Makes the given (1-based) steps' teacher scores NaN inside the loop, as a corrupt batch would."""
    real_step, calls = train.train_step, []

    def poisoned(state, batch, task_id, **kwargs):
        calls.append(task_id)
        if len(calls) in steps:
            batch = dict(batch, teacher_scores=batch["teacher_scores"] * np.nan)
        return real_step(state, batch, task_id, **kwargs)

    monkeypatch.setattr(train, "train_step", poisoned)


def restored_checkpoints(workdir):
    import orbax.checkpoint as ocp
    checkpointer = ocp.StandardCheckpointer()
    return {step: checkpointer.restore(workdir / "checkpoints" / str(step) / "state")
            for step in checkpoint_dirs(workdir)[0]}


def all_finite(tree):
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


def test_nan_with_stop_never_reaches_a_checkpoint_or_export(tmp_path, monkeypatch, tiny_cls_checkpoint,
                                                            docstring_jsonl):
    poison_steps(monkeypatch, {3})
    config = small_config(tiny_cls_checkpoint, docstring_jsonl, num_steps=5, checkpoint_every=1, keep_checkpoints=3,
                          on_nonfinite="stop")
    config.eval_files = []
    with pytest.raises(FloatingPointError, match=r"at step 3 .*last good checkpoint is step 2 in .*checkpoints"):
        train.train_and_evaluate(config, tmp_path)
    checkpoints = restored_checkpoints(tmp_path)
    assert sorted(checkpoints) == [1, 2]  # step 2's save was in flight at the NaN: it completed
    assert all(all_finite(state) for state in checkpoints.values())
    assert not (tmp_path / "export").exists() and not (tmp_path / "train_report.json").exists()
    log = train.read_step_log(tmp_path)
    assert [(e["step"], e["finite"]) for e in log] == [(1, True), (2, True), (3, False)]
    assert log[-1]["loss"] is None


def test_nan_with_skip_completes_and_counts(tmp_path, monkeypatch, tiny_cls_checkpoint, docstring_jsonl):
    poison_steps(monkeypatch, {2, 4})
    config = small_config(tiny_cls_checkpoint, docstring_jsonl, num_steps=5, checkpoint_every=1, keep_checkpoints=5,
                          on_nonfinite="skip")
    config.eval_files = []
    train.train_and_evaluate(config, tmp_path)
    report = json.loads((tmp_path / "train_report.json").read_text())
    assert report["steps"] == 5 and report["nonfinite_steps"] == 2
    assert [e["step"] for e in report["losses"]] == [1, 3, 5]
    assert [e["finite"] for e in train.read_step_log(tmp_path)] == [True, False, True, False, True]
    checkpoints = restored_checkpoints(tmp_path)
    assert all(all_finite(state) for state in checkpoints.values())
    # A skipped step leaves the weights and optimizer moments exactly as they were.
    for a, b in zip(jax.tree.leaves(checkpoints[1]["params"]), jax.tree.leaves(checkpoints[2]["params"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(checkpoints[1]["opt_state"]), jax.tree.leaves(checkpoints[2]["opt_state"])):
        np.testing.assert_array_equal(a, b)
    assert all_finite(exported_params(tmp_path))


def test_update_that_overflows_the_weights_is_skipped(tiny_cls_checkpoint, docstring_jsonl):
    """A finite loss and gradient whose update is not finite (here an infinite learning rate)."""
    import optax
    from llm_embedder_jax import Embedder, sharding
    from llm_embedder_jax.data import pipeline
    model = Embedder.from_pretrained(tiny_cls_checkpoint)
    batch = next(pipeline.make_train_iterator(
        [dict(path=str(docstring_jsonl), task="qa")], tokenizer=model.tokenizer, global_batch_size=8, group_size=4,
        query_max_len=32, key_max_len=48, seed=0))
    mesh = sharding.make_mesh()
    tx = optax.sgd(float("inf"))
    state = jax.device_put(train.init_state(model.params, tx), sharding.replicated(mesh))
    before = jax.device_get(state)
    arrays = sharding.global_batch(mesh, {k: batch[k] for k in
                                          ("query_ids", "query_mask", "key_ids", "key_mask", "teacher_scores")})
    settings = train.step_settings(small_config(tiny_cls_checkpoint, docstring_jsonl), model.config, "qa")
    state, metrics = train.train_step(state, arrays, 0, settings=settings, tx=tx)
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert not bool(metrics["finite"]) and int(state["nonfinite_steps"]) == 1
    for a, b in zip(jax.tree.leaves(jax.device_get(state["params"])), jax.tree.leaves(before["params"])):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- scoring

@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory, minilm_dir):
    """A random 2-layer Llama with MiniLM's tokenizer: the score job's faults do not depend on the LLM."""
    import torch
    import transformers
    folder = tmp_path_factory.mktemp("tiny_llama")
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, vocab_size=30522, max_position_embeddings=512,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, folder / name)
    return folder


NUM_RECORDS = 40


def test_score_sigkill_at_random_points_loses_and_repeats_nothing(tmp_path, tiny_llm, real_texts, job_env):
    from tests.conftest import docstring_records
    rng = random.Random(7)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in docstring_records(real_texts, count=NUM_RECORDS)))
    args = lambda workdir: ["--mode=score", "--config=configs/score.py", f"--workdir={workdir}",
                            f"--config.inputs=('{data}',)", f"--config.llm={tiny_llm}", "--config.max_candidates=2",
                            "--config.shard_size=1", "--config.batch_size=8", "--config.key_max_tokens=32"]
    reference = tmp_path / "reference"
    job = Job(args(reference), job_env)
    assert job.finish() == 0, job.tail()

    workdir = tmp_path / "killed"
    shards = workdir / "shards" / "qa"
    done = lambda: len(list(shards.glob("0*.jsonl")))
    kills = []  # (shards done before, after)
    while True:
        job = Job(args(workdir), job_env)
        if len(kills) == 6:
            break
        before = done()
        # Kill once a random number of further shards is written (0: while loading), plus a random delay.
        target = before + rng.choice([0, 1, 2, 3])
        deadline = time.time() + 240
        while done() < target and job.proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.1))
        if not job.kill():
            break
        kills.append((before, done()))
        # Every shard on disk is whole: its record, once, in order.
        for path in sorted(shards.glob("0*.jsonl")):
            assert [e["i"] for e in map(json.loads, path.read_text().splitlines())] == [int(path.name[:5])]
    assert job.finish() == 0, job.tail()
    print(f"SIGKILLs (shards done before, after): {kills}")
    assert len(kills) >= 5 and any(after > before > 0 for before, after in kills), kills  # resumed mid-file
    assert (workdir / "qa.jsonl").read_bytes() == (reference / "qa.jsonl").read_bytes()
    outputs = [json.loads(line) for line in (workdir / "qa.jsonl").read_text().splitlines()]
    assert [o["query"] for o in outputs] == [json.loads(line)["query"] for line in data.read_text().splitlines()]
    assert all(len(o["teacher_scores"]) == 2 for o in outputs)
    assert not list(shards.glob(".*tmp*"))
    report = json.loads((workdir / "score_report.json").read_text())
    assert report["skipped"] == 0 and list(report["files"].values())[0]["scored"] == NUM_RECORDS


# ----------------------------------------------------------------------------- atomic writes

WRITER = """
import sys
from llm_embedder_jax import atomic
target, kind = sys.argv[1], sys.argv[2]
chunk = b"new" * (1 << 20)
if kind == "file":
    with atomic.atomic_file(target, "wb") as f:
        for i in range(200):
            f.write(chunk)
            f.flush()
            print("writing", flush=True)
else:
    with atomic.atomic_dir(target) as tmp:
        for i in range(200):
            (tmp / f"part{i}").write_bytes(chunk)
            print("writing", flush=True)
"""


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_sigkill_mid_atomic_write_keeps_the_old_version(tmp_path, kind):
    """Reports and exports go through `atomic`: killed mid-write, the old file or folder is intact."""
    target = tmp_path / ("report.json" if kind == "file" else "export")
    if kind == "file":
        target.write_text('{"old": true}')
    else:
        target.mkdir()
        (target / "config.json").write_text('{"old": true}')
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), kind], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    for _ in range(3):  # a few chunks into the write
        assert proc.stdout.readline() == "writing\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if kind == "file":
        assert json.loads(target.read_text()) == {"old": True}
    else:
        assert [p.name for p in target.iterdir()] == ["config.json"]
    # The temporary sibling is left behind (a kill runs no cleanup), never under the target's name.
    assert [p.name.startswith(f".{target.name}.tmp-") for p in tmp_path.iterdir() if p != target] == [True]
