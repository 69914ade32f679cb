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

from llm_embedder_jax import atomic, encoder, train
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

    def __init__(self, args, env, log_path):
        self.log_path = log_path
        self.proc = subprocess.Popen([sys.executable, "main.py", *args], cwd=ROOT, env=env, text=True,
                                     errors="replace", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.lines = queue.Queue()
        self.text = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.text.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern, count=1, timeout=240):
        """True once `pattern` has matched `count` more lines; False when the process ends first."""
        deadline = time.time() + timeout
        while count > 0:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.time()))
            except queue.Empty:
                raise TimeoutError(f"no {pattern!r} within {timeout}s:\n{self.tail()}") from None
            if line is None:
                return False
            count -= len(re.findall(pattern, line))
        return True

    def kill(self):
        """SIGKILL; True when it hit a running process (not one that had already exited)."""
        alive = self.proc.poll() is None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        while self.lines.get(timeout=30) is not None:
            pass
        return alive

    def finish(self, timeout=300):
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        while self.lines.get() is not None:
            pass
        return self.proc.returncode

    def tail(self, chars=4000):
        return "".join(self.text)[-chars:]


# ----------------------------------------------------------------------------- training

NUM_STEPS = 14


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


def read_step_log(workdir):
    return [json.loads(line) for line in (workdir / train.STEP_LOG).read_text().splitlines()]


def exported_params(workdir):
    _, params, _ = encoder.load_hf(workdir / "export")
    return params


# Where a kill lands: right after the process logs something, plus a random delay.
KILL_POINTS = {
    "startup": r"CheckpointManager created",                             # restoring, building the input
    "checkpoint write": r"Creating tmp directory \S+\d\.orbax-checkpoint-tmp",  # mid-save, before the rename
    "mid-step": STEP_LINE.pattern,                                       # between and inside steps
}


def test_sigkill_at_random_points_resumes_exactly(tmp_path, tiny_cls_checkpoint, docstring_jsonl, job_env):
    rng = random.Random(20261127)
    config_file = write_train_config(tmp_path / "config.py", tiny_cls_checkpoint, docstring_jsonl,
                                     num_steps=NUM_STEPS, checkpoint_every=1, keep_checkpoints=1)
    args = lambda workdir: ["--mode=train", f"--config={config_file}", f"--workdir={workdir}"]

    reference = tmp_path / "reference"
    job = Job(args(reference), job_env, tmp_path / "reference.log")
    assert job.finish() == 0, job.tail()

    workdir = tmp_path / "killed"
    plan = ["startup", "startup"] + ["checkpoint write"] * 3 + ["mid-step"] * 4
    rng.shuffle(plan)
    plan.append("final")  # the last kill lands after the last step: final save, export, report
    outcomes = []
    for point in plan:
        job = Job(args(workdir), job_env, None)
        if point == "final":
            reached = job.wait_for(rf"\] step {NUM_STEPS}: ")
            time.sleep(rng.uniform(0.0, 1.5))
        elif point == "mid-step":
            reached = job.wait_for(STEP_LINE.pattern, count=rng.randint(1, 3))
            time.sleep(rng.uniform(0.0, 0.4))
        else:
            reached = job.wait_for(KILL_POINTS[point])
            time.sleep(rng.uniform(0.0, 0.05 if point == "checkpoint write" else 0.5))
        killed = reached and job.kill()
        resumed = [int(m) for m in RESUMED.findall("".join(job.text))]
        steps_logged = [int(m) for m in STEP_LINE.findall("".join(job.text))]
        finished, unfinished = checkpoint_dirs(workdir)
        outcomes.append(dict(point=point, killed=killed, resumed_at=resumed[0] if resumed else 0,
                             last_step_logged=max(steps_logged, default=None), finished=finished,
                             unfinished=unfinished, exit=job.proc.returncode if not killed else "SIGKILL"))
        if not killed:
            assert job.finish() == 0, job.tail()
            break
    job = Job(args(workdir), job_env, None)
    assert job.finish() == 0, job.tail()
    resumed = [int(m) for m in RESUMED.findall("".join(job.text))]
    outcomes.append(dict(point="end", resumed_at=resumed[0] if resumed else 0))
    print("\n".join(map(str, outcomes)))

    kills = [o for o in outcomes if o.get("killed")]
    assert len(kills) >= 9, outcomes
    # Every restart resumed from the newest finished checkpoint left by the kill before it,
    # never from a half-written one (which restore would fail on, or worse, read).
    for before, after in zip(outcomes, outcomes[1:]):
        if before.get("killed"):
            assert after["resumed_at"] == max(before["finished"], default=0), outcomes
    # Some kills did land in the middle of a checkpoint write.
    assert any(o["unfinished"] for o in kills), outcomes
    # Some restarts redid steps that had run but not been checkpointed (the data position replays).
    assert any(o["last_step_logged"] and o["last_step_logged"] > max(o["finished"], default=0) for o in kills)
    assert checkpoint_dirs(workdir)[1] == []  # temporary folders of killed saves are cleaned up

    # The same steps, each logged once, with the same losses as the uninterrupted run.
    expected, found = read_step_log(reference), read_step_log(workdir)
    assert [e["step"] for e in found] == list(range(1, NUM_STEPS + 1))
    assert [e["dataset"] for e in found] == [e["dataset"] for e in expected]
    np.testing.assert_allclose([e["loss"] for e in found], [e["loss"] for e in expected], rtol=0, atol=1e-6)
    # The same final parameters.
    for a, b in zip(jax.tree.leaves(exported_params(workdir)), jax.tree.leaves(exported_params(reference))):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    report = json.loads((workdir / "train_report.json").read_text())
    assert report["steps"] == NUM_STEPS and report["nonfinite_steps"] == 0
