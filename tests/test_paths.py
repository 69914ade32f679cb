"""Remote paths (gs://...) through etils.epath, on a fake bucket: epath.testing.mock_epath serves every
scheme from the local disk (gs://bucket/x is ./gs:/bucket/x under the test's folder), and a folder
rename fails, as it cannot be done atomically on an object store."""
import json
import os

import numpy as np
import pytest
from etils import epath
from etils.epath import testing as epath_testing

from llm_embedder_jax import Embedder, atomic, paths, score, sharding
from llm_embedder_jax.data import records
from llm_embedder_jax.llm import RewardLM
from tests.test_score import small_config as score_config


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """A fake gs://bucket; yields the local folder that holds its objects."""
    monkeypatch.chdir(tmp_path)

    def no_folder_rename(original, path, dst, *args):
        if os.path.isdir(path):
            raise AssertionError(f"folder rename {path} -> {dst}: not atomic on an object store")
        return original(path, dst, *args)

    with epath_testing.mock_epath(rename=no_folder_rename, replace=no_folder_rename):
        yield tmp_path / "gs:" / "bucket"


def test_paths_keep_their_scheme(tmp_path, monkeypatch):
    remote = paths.as_path("gs://bucket/run")
    assert paths.is_remote(remote) and str(remote / "checkpoints") == "gs://bucket/run/checkpoints"
    monkeypatch.chdir(tmp_path)
    local = paths.as_path("runs/x")
    assert not paths.is_remote(local) and local == epath.Path(tmp_path / "runs" / "x")


def test_remote_file_is_all_or_nothing(bucket):
    target = "gs://bucket/run/report.json"
    with atomic.atomic_file(target) as f:
        f.write("first")
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(target) as f:
            f.write("half of the second")
            raise RuntimeError("killed mid-write")
    assert (bucket / "run" / "report.json").read_text() == "first"
    assert os.listdir(bucket / "run") == ["report.json"]               # the temporary object is gone
    with atomic.atomic_file(target, "wb") as f:
        np.save(f, np.arange(3))
    assert np.load(bucket / "run" / "report.json").tolist() == [0, 1, 2]


def test_remote_folder_is_marked_complete_last(bucket, monkeypatch):
    target = "gs://bucket/export"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "stale.bin").write_bytes(b"old")
    assert atomic.is_complete(target)
    assert json.loads((bucket / "export" / atomic.COMPLETE_MARKER).read_text()) == {"config.json": 2, "stale.bin": 3}

    # Upload fails part-way: the folder is no longer marked, and readers must not trust it.
    remote_path = type(epath.Path("gs://bucket/export"))
    real_open = remote_path.open

    def failing_open(self, mode="r", *args, **kwargs):
        if "w" in mode and self.name == "model.safetensors":
            raise OSError("connection reset")
        return real_open(self, mode, *args, **kwargs)

    def write_new(tmp):
        (tmp / "config.json").write_text('{"new": 1}')
        (tmp / "sub").mkdir()
        (tmp / "sub" / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(remote_path, "open", failing_open)
    with pytest.raises(OSError, match="connection reset"):
        with atomic.atomic_dir(target) as tmp:
            write_new(tmp)
    assert not atomic.is_complete(target)
    monkeypatch.setattr(remote_path, "open", real_open)

    # Written again: complete, and nothing of the first folder survives.
    with atomic.atomic_dir(target) as tmp:
        write_new(tmp)
    assert atomic.is_complete(target)
    assert sorted(p.relative_to(bucket / "export").as_posix() for p in (bucket / "export").rglob("*") if p.is_file()) \
        == [atomic.COMPLETE_MARKER, "config.json", "sub/model.safetensors"]
    # A failure inside the block touches nothing remote.
    with pytest.raises(ValueError):
        with atomic.atomic_dir(target) as tmp:
            raise ValueError("no")
    assert atomic.is_complete(target) and (bucket / "export" / "config.json").read_text() == '{"new": 1}'


def test_export_to_a_bucket_loads_back(bucket, tiny_cls_checkpoint):
    model = Embedder.from_pretrained(tiny_cls_checkpoint)
    assert str(model.save_pretrained("gs://bucket/models/tiny")) == "gs://bucket/models/tiny"
    assert atomic.is_complete("gs://bucket/models/tiny")
    texts = ["what is a bucket?", "an object store"]
    np.testing.assert_array_equal(Embedder.from_pretrained(bucket / "models" / "tiny").encode(texts),
                                  model.encode(texts))


def test_training_data_reads_from_a_bucket(bucket, docstring_jsonl):
    (bucket / "data").mkdir(parents=True)
    (bucket / "data" / "qa.jsonl").write_bytes(docstring_jsonl.read_bytes())
    remote = list(records.read_jsonl("gs://bucket/data/qa.jsonl", task="qa"))
    local = list(records.read_jsonl(docstring_jsonl, task="qa"))
    assert [r["query"] for r in remote] == [r["query"] for r in local] and len(remote) == 32
    assert remote[0]["source"].startswith("gs://bucket/data/qa.jsonl:")


def test_score_job_on_a_bucket_equals_local(bucket, tmp_path, smollm2_gguf, docstring_jsonl):
    """Inputs, shards, merged outputs and report all in the bucket; the bytes equal a local run's."""
    (bucket / "data").mkdir(parents=True)
    (bucket / "data" / "qa.jsonl").write_text("".join(docstring_jsonl.read_text().splitlines(keepends=True)[:3]))
    lm = RewardLM.from_pretrained(smollm2_gguf, mesh=sharding.make_mesh())
    overrides = dict(max_candidates=1, shard_size=2)
    report = score.score_files(score_config("gs://bucket/data/qa.jsonl", **overrides), "gs://bucket/score", lm=lm)
    assert report["files"]["gs://bucket/data/qa.jsonl"]["output"] == "gs://bucket/score/qa.jsonl"
    score.score_files(score_config(bucket / "data" / "qa.jsonl", **overrides), tmp_path / "local", lm=lm)
    assert (bucket / "score" / "qa.jsonl").read_bytes() == (tmp_path / "local" / "qa.jsonl").read_bytes()
    assert len((bucket / "score" / "qa.jsonl").read_text().splitlines()) == 3
    assert sorted(p.name for p in (bucket / "score" / "shards" / "qa").iterdir()) == [
        "00000.jsonl", "00001.jsonl", "manifest.json"]
    assert json.loads((bucket / "score" / "score_report.json").read_text())["skipped"] == 0
    # A restarted job finds the finished shards in the bucket and only merges.
    shards = {p.name: p.stat().st_mtime_ns for p in (bucket / "score" / "shards" / "qa").glob("0*.jsonl")}
    again = score.score_files(score_config("gs://bucket/data/qa.jsonl", **overrides), "gs://bucket/score", lm=lm)
    assert again["files"]["gs://bucket/data/qa.jsonl"]["scored"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in (bucket / "score" / "shards" / "qa").glob("0*.jsonl")} == shards
    assert (bucket / "score" / "qa.jsonl").read_bytes() == (tmp_path / "local" / "qa.jsonl").read_bytes()
