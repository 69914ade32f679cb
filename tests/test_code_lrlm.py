"""lrlm samples from local source files: chunking, candidates, file-level splits, TFDS."""
import json

import pytest

from configs import score as score_config
from llm_embedder_jax import score
from llm_embedder_jax.data import code_lrlm, records, tfds_builder

CHUNK = 8


def _module(name, lines):
    """Source text with distinct names per file and line (so chunks differ)."""
    return "".join(f"def {name}_{i}(value):\n    return value * {i} + {i * i}  # é ✓\n" for i in range(lines))


@pytest.fixture(scope="module")
def tokenizer():
    return code_lrlm.load_chunk_tokenizer("smollm2")


@pytest.fixture()
def source(tmp_path):
    root = tmp_path / "code"
    files = {"alpha.py": 14, "beta.py": 9, "pkg/gamma.py": 12, "pkg/sub/delta.py": 10, "pkg/epsilon.py": 11,
             "zeta.py": 13, "eta.py": 8, "theta.py": 10, "tests/test_alpha.py": 10, "pkg/test/iota.py": 10}
    for name, lines in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_module(path.stem, lines), encoding="utf-8")
    (root / "tiny.py").write_text("x = 1\n", encoding="utf-8")
    (root / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1") + _module("latin", 10).encode("utf-8"))
    (root / "notes.txt").write_text(_module("notes", 10), encoding="utf-8")
    return root


def settings(source, **overrides):
    fields = dict(source=str(source), chunk_tokens=CHUNK, context_chunks=1, gap_chunks=1, min_candidates=2,
                  max_candidates=3,
                  max_samples_per_file=3, max_files=0, validation_fraction=0.0, test_fraction=0.3)
    fields.update(overrides)
    return code_lrlm.CodeLrlmSettings(**fields)


def all_splits(config, tokenizer):
    return {split: code_lrlm.generate_split(split, config, tokenizer, progress=False)
            for split in ("train", "validation", "test")}


def test_chunks_are_exact_substrings_of_chunk_tokens_tokens(tokenizer):
    text = _module("f", 6) + "s = 'naïve ✓ 𝛼𝛽'\n" * 5
    chunks = code_lrlm.chunk_text(text, tokenizer, chunk_tokens=CHUNK)
    num_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert len(chunks) == num_tokens // CHUNK  # the trailing partial chunk is dropped
    joined = "".join(chunks)
    assert text.startswith(joined) and len(text) - len(joined) < len(text) // len(chunks)
    assert "\ufffd" not in joined  # no multi-byte character was cut
    lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in chunks]
    # A character whose bytes span a chunk boundary moves whole into the next chunk.
    assert all(abs(n - CHUNK) <= 3 for n in lengths) and lengths.count(CHUNK) > len(lengths) // 2, lengths


def test_a_sample_is_its_files_chunks_with_the_nearest_earlier_ones_as_candidates(source, tokenizer):
    config = settings(source)
    found = all_splits(config, tokenizer)
    samples = [r for split in found.values() for r in split[0]]
    assert samples
    for record in samples:
        chunks = code_lrlm.chunk_text((source / record["file"]).read_text(), tokenizer, chunk_tokens=CHUNK)
        i = record["chunk"]
        assert record["query"] == chunks[i] and record["answers"] == [chunks[i + 1]]
        assert record["context"] == chunks[i - 1]  # context_chunks = 1
        # The nearest earlier ones short of the gap (chunk i - 2), in file order.
        assert record["neg"] == chunks[max(0, i - 2 - 3):i - 2]
        assert 2 <= len(record["neg"]) <= 3 and record["pos"] == [] and record["task"] == "lrlm"
    per_file = {}
    for record in samples:
        per_file.setdefault(record["file"], []).append(record["chunk"])
    assert all(len(positions) <= 3 and positions == sorted(positions) for positions in per_file.values())


def test_files_split_by_path_hash_and_skips_are_counted(source, tokenizer):
    config = settings(source)
    found = all_splits(config, tokenizer)
    files = {split: {r["file"] for r in recs} for split, (recs, _) in found.items()}
    assert not files["train"] & files["test"] and not files["validation"]
    assert files["train"] and files["test"]
    for split, names in files.items():
        assert all(code_lrlm.split_of(name, config) == split for name in names)
    used = files["train"] | files["test"]
    assert not any("test" in name.split("/")[:-1] or name.endswith(".txt") for name in used)
    reports = [report for _, report in found.values()]
    assert sum(r["not UTF-8"] for r in reports) == 1
    assert sum(r["too short"] for r in reports) == 1
    assert [f for r in reports for f in r["not_utf8_files"]][0].startswith("latin1.py")
    assert sum(r["samples"] for r in reports) == sum(len(recs) for recs, _ in found.values())

    # Adding a file moves no other file to another split.
    (source / "omega.py").write_text(_module("omega", 12), encoding="utf-8")
    again = all_splits(config, tokenizer)
    again_files = {split: {r["file"] for r in recs} - {"omega.py"} for split, (recs, _) in again.items()}
    assert again_files == files


def test_generation_is_deterministic_and_capped(source, tokenizer, tmp_path):
    config = settings(source, max_files=2, max_samples_per_file=1, test_fraction=0.0)
    first = code_lrlm.write_jsonl(tmp_path / "a.jsonl", split="train", settings=config, tokenizer=tokenizer,
                                  progress=False)
    second = code_lrlm.write_jsonl(tmp_path / "b.jsonl", split="train", settings=config, tokenizer=tokenizer,
                                   progress=False)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert first == second and first["files_used"] == 2 and first["samples"] == 2
    lines = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    hashes = [code_lrlm.path_hash(r["file"]) for r in lines]
    assert hashes == sorted(hashes)  # files in path-hash order
    # The readers of the score and train jobs take the file as it is.
    assert [r["query"] for r in records.read_jsonl(tmp_path / "a.jsonl", require_answers=True)] == \
        [r["query"] for r in lines]


def test_the_score_job_reads_each_candidates_true_continuation(source, tokenizer, tmp_path):
    config = settings(source, max_candidates=4, test_fraction=0.0)
    path = tmp_path / "train.jsonl"
    code_lrlm.write_jsonl(path, split="train", settings=config, tokenizer=tokenizer, progress=False)
    checked = 0
    for ordinal, line, raw in score.record_lines(path):
        example, _ = score.parse_record(raw, path=path, line=line, ordinal=ordinal,
                                        config=score_config.get_config())
        record = json.loads(raw)
        chunks = code_lrlm.chunk_text((source / record["file"]).read_text(), tokenizer, chunk_tokens=CHUNK)
        end = record["chunk"] - 2  # context chunk i-1, gap chunk i-2
        first = end - len(record["neg"])
        assert list(example.keys) == chunks[first:end]
        # Each candidate but the last is followed by the chunk that follows it in the file.
        assert list(example.continuations[:-1]) == chunks[first + 1:end]
        assert example.continuations[-1] == "" and example.context == chunks[record["chunk"] - 1]
        checked += 1
    assert checked


def test_glob_source_and_bad_settings(source, tokenizer):
    config = settings(f"{source}/pkg/**/*.py", test_fraction=0.0)
    found, report = code_lrlm.generate_split("train", config, tokenizer, progress=False)
    assert {r["file"] for r in found} == {"gamma.py", "sub/delta.py", "epsilon.py"}  # relative to pkg/
    with pytest.raises(ValueError, match="max_candidates"):
        settings(source, max_candidates=1)
    with pytest.raises(ValueError, match="leave some files"):
        settings(source, validation_fraction=0.5, test_fraction=0.5)
    with pytest.raises(FileNotFoundError, match="neither a folder nor a glob"):
        code_lrlm.source_files(settings(source / "missing"))
    with pytest.raises(ValueError, match="unknown split"):
        code_lrlm.generate_split("dev", config, tokenizer)


def test_tfds_builder_matches_the_jsonl_generation(source, tokenizer, tmp_path):
    config = settings(source, validation_fraction=0.2)
    directory = code_lrlm.build_tfds(tmp_path / "tfds", settings=config)
    assert directory.parent.parent.name == "python_code_lrlm"
    for split in ("train", "validation", "test"):
        expected, report = code_lrlm.generate_split(split, config, tokenizer, progress=False)
        assert code_lrlm.read_tfds(directory, split) == expected
    # The train split is also a dataset of the training pipeline.
    train = tfds_builder.TfdsRecords(directory)
    assert len(train) == report_samples(directory, "train")
    assert train[0]["task"] == "lrlm" and train[0]["pos"] == [] and train[0]["neg"]
    # Built once: the same settings reuse the folder.
    assert code_lrlm.build_tfds(tmp_path / "tfds", settings=config) == directory


def report_samples(directory, split):
    import tensorflow_datasets as tfds
    return tfds.builder_from_directory(str(directory)).info.metadata[split]["samples"]


def test_query_positions_sit_mid_part_and_leave_room_for_candidates(source):
    # First valid query: 1 context + 1 gap + min_candidates earlier chunks; last: one chunk before the end.
    config = settings(source, min_candidates=3, max_samples_per_file=1)
    assert code_lrlm.query_positions(25, config) == [14]  # valid 5..23: the middle, not the first
    spread = code_lrlm.query_positions(25, settings(source, min_candidates=3, max_samples_per_file=4))
    assert spread == [7, 12, 16, 21]  # the middles of four equal parts of 5..23
    assert code_lrlm.query_positions(25, settings(source, min_candidates=3, max_samples_per_file=0)) == \
        list(range(5, 24))
    assert code_lrlm.query_positions(6, settings(source, min_candidates=3)) == []  # 5 > 6 - 2
