"""Readers, sample construction and the TFDS round trip."""
import collections
import json
import logging
import pickle
import sys

import numpy as np
import pytest

from llm_embedder_jax import tasks
from llm_embedder_jax.data import records, samples, tfds_builder

TOY_FILES = {"qa.json": "qa", "convsearch.json": "convsearch", "chat.json": "chat",
             "lrlm.json": "lrlm", "icl.json": "icl", "tool.json": "tool"}


def write_jsonl(path, lines):
    """Lines are dicts (written as JSON), str or bytes (written as they are)."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            if isinstance(line, str):
                line = line.encode("utf-8")
            f.write(line + b"\n")
    return path


QA = {"task": "qa", "query": "what is a kettle", "pos": ["p0", "p1"], "neg": ["n0", "n1", "n2"],
      "teacher_scores": [0.5, 0.1, 0.3, -1.0, 0.2], "answers": ["a pot"], "query_id": 7}
CHAT = {"task": "chat", "query": "and then?", "history": ["h0", "h1", "h2"], "teacher_scores": [-3.0, -1.0, -2.0],
        "answers": ["we left"]}
LRLM = {"task": "lrlm", "query": "chunk", "pos": [], "neg": ["c0", "c1", "c2"], "teacher_scores": [-2.0, -1.5, -2.5],
        "answers": ["next chunk"], "context": ""}
TOOL = {"task": "tool", "query": "fetch a page over tor", "pos": ["t0"], "neg": ["u0", "u1"], "qid": "1"}


# ---------------------------------------------------------------- readers

def test_reads_every_toy_file(toy_dir):
    for name, task in TOY_FILES.items():
        got = list(records.read_jsonl(toy_dir / name))
        assert len(got) == 8, name
        for line, record in enumerate(got, start=1):
            assert record["task"] == task
            assert record["source"] == f"{toy_dir / name}:{line}"
            texts, num_pos = records.candidates(record)
            assert texts and all(isinstance(t, str) for t in texts)
            if record["teacher_scores"] is not None:
                assert len(record["teacher_scores"]) == len(texts)
        if task == "chat":
            assert got[0]["pos"] is None and got[0]["history"]
        if task in ("qa", "chat", "lrlm", "icl"):
            assert all(r["teacher_scores"] is not None for r in got), name
        if task == "lrlm":
            assert all(records.candidates(r)[1] == 0 for r in got)


def test_record_fields_are_normalised(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [QA, "", "   ", CHAT, TOOL])
    got = list(records.read_jsonl(path))
    assert [r["source"] for r in got] == [f"{path}:1", f"{path}:4", f"{path}:5"]
    assert got[0] == {"task": "qa", "query": QA["query"], "pos": QA["pos"], "neg": QA["neg"], "history": None,
                      "teacher_scores": QA["teacher_scores"], "answers": ["a pot"], "context": None,
                      "source": f"{path}:1"}
    assert got[1]["history"] == CHAT["history"] and got[1]["neg"] is None
    assert got[2]["teacher_scores"] is None and got[2]["answers"] is None


def test_lrlm_context_is_kept_and_checked(tmp_path):
    record = {"task": "lrlm", "query": "chunk", "pos": [], "neg": ["earlier"], "context": "between"}
    assert next(iter(records.read_jsonl(write_jsonl(tmp_path / "ok.jsonl", [record]))))["context"] == "between"
    with pytest.raises(records.DataError, match=r"bad.jsonl:1: field 'context': expected a string"):
        list(records.read_jsonl(write_jsonl(tmp_path / "bad.jsonl", [dict(record, context=3)])))


def test_task_comes_from_the_caller_when_records_have_none(tmp_path):
    line = {k: v for k, v in TOOL.items() if k != "task"}
    path = write_jsonl(tmp_path / "tool.jsonl", [line])
    assert [r["task"] for r in records.read_jsonl(path, task="tool")] == ["tool"]
    with pytest.raises(records.DataError, match=r"tool.jsonl:1: field 'task': missing"):
        list(records.read_jsonl(path))
    with pytest.raises(ValueError, match="unknown task"):
        records.read_jsonl(path, task="poetry")


BAD_LINES = [
    # (line, reason, field, words in the message)
    ('{"task": "qa", "query": "q", "pos": ["p"],', records.MALFORMED_JSON, None, "malformed JSON"),
    ('["a", "list"]', records.NOT_AN_OBJECT, None, "expected a JSON object, got list"),
    ({"task": "qa", "pos": ["p"], "neg": ["n"]}, records.MISSING_FIELD, "query", "missing"),
    ({"task": "qa", "query": 3, "pos": ["p"], "neg": ["n"]}, records.WRONG_TYPE, "query", "non-empty string"),
    ({"task": "qa", "query": "", "pos": ["p"], "neg": ["n"]}, records.WRONG_TYPE, "query", "non-empty string"),
    ({"task": "qa", "query": "q", "neg": ["n"]}, records.MISSING_FIELD, "pos", "missing"),
    ({"task": "qa", "query": "q", "pos": ["p"]}, records.MISSING_FIELD, "neg", "missing"),
    ({"task": "chat", "query": "q", "pos": ["p"], "neg": ["n"]}, records.MISSING_FIELD, "history", "missing"),
    ({"task": "qa", "query": "q", "pos": "p", "neg": ["n"]}, records.WRONG_TYPE, "pos", "got str"),
    ({"task": "qa", "query": "q", "pos": ["p", 2], "neg": ["n"]}, records.WRONG_TYPE, "pos", "item 1 is int"),
    ({"task": "qa", "query": "q", "pos": [], "neg": []}, records.NO_CANDIDATES, "pos", "no candidates"),
    ({"task": "chat", "query": "q", "history": []}, records.NO_CANDIDATES, "history", "no candidates"),
    ({"task": "qa", "query": "q", "pos": ["p"], "neg": ["n"], "teacher_scores": [1.0]},
     records.TEACHER_LENGTH, "teacher_scores", "has 1 scores but pos + neg has 2"),
    ({"task": "chat", "query": "q", "history": ["a", "b"], "teacher_scores": [1.0, 2.0, 3.0]},
     records.TEACHER_LENGTH, "teacher_scores", "history has 2"),
    ({"task": "qa", "query": "q", "pos": ["p"], "neg": ["n"], "teacher_scores": [1.0, "x"]},
     records.WRONG_TYPE, "teacher_scores", "item 1"),
    ({"task": "qa", "query": "q", "pos": ["p"], "neg": ["n"], "teacher_scores": [1.0, True]},
     records.WRONG_TYPE, "teacher_scores", "item 1"),
    ('{"task": "qa", "query": "q", "pos": ["p"], "neg": ["n"], "teacher_scores": [NaN, 1.0]}',
     records.WRONG_TYPE, "teacher_scores", "finite"),
    ({"task": "qa", "query": "q", "pos": ["p"], "neg": ["n"], "answers": "a"}, records.WRONG_TYPE, "answers", "got str"),
    ({"task": "poetry", "query": "q", "pos": ["p"], "neg": ["n"]}, records.BAD_TASK, "task", "unknown task"),
    (b'{"task": "qa", "query": "caf\xe9", "pos": ["p"], "neg": ["n"]}', records.NOT_UTF8, None, "not valid UTF-8"),
]


@pytest.mark.parametrize("line, reason, field, words", BAD_LINES, ids=[f"{c[1]}-{c[2]}" for c in BAD_LINES])
def test_bad_line_names_file_line_and_field(tmp_path, line, reason, field, words):
    path = write_jsonl(tmp_path / "data.jsonl", [QA, line, QA])
    with pytest.raises(records.DataError) as error:
        list(records.read_jsonl(path))
    message = str(error.value)
    assert message.startswith(f"{path}:2: ")
    if field:
        assert f"field {field!r}" in message
    assert words in message
    assert error.value.reason == reason
    # The same line, skipped: counted by its reason, the good lines kept.
    reader = records.read_jsonl(path, skip_bad=True)
    assert [r["source"] for r in reader] == [f"{path}:1", f"{path}:3"]
    assert reader.skipped == {reason: 1}


def test_task_mismatch_with_the_caller(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [QA])
    with pytest.raises(records.DataError, match=r"qa.jsonl:1: field 'task': the record says 'qa'.*'tool'"):
        list(records.read_jsonl(path, task="tool"))


def test_data_error_survives_pickling():
    # grain worker threads and processes hand errors back pickled.
    error = records.DataError("bad", where="f.jsonl:3", field="pos", reason=records.WRONG_TYPE)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.where, copy.field, copy.reason) == ("f.jsonl:3: field 'pos': bad", "f.jsonl:3", "pos",
                                                                records.WRONG_TYPE)


def test_answers_required_only_on_request(tmp_path):
    path = write_jsonl(tmp_path / "tool.jsonl", [TOOL])
    assert len(list(records.read_jsonl(path))) == 1
    with pytest.raises(records.DataError, match=r"tool.jsonl:1: field 'answers': missing"):
        list(records.read_jsonl(path, require_answers=True))


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_empty_file_is_an_error_even_when_skipping(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    for skip_bad in (False, True):
        with pytest.raises(records.DataError, match=r"empty.jsonl: empty file"):
            list(records.read_jsonl(path, skip_bad=skip_bad))


def test_skip_bad_counts_every_reason_and_logs_them(tmp_path, caplog):
    bad = [line for line, *_ in BAD_LINES]
    path = write_jsonl(tmp_path / "data.jsonl", [QA] + bad + [CHAT])
    reader = records.read_jsonl(path, skip_bad=True)
    with caplog.at_level(logging.WARNING):
        got = list(reader)
    assert [r["task"] for r in got] == ["qa", "chat"]
    assert reader.skipped == collections.Counter(reason for _, reason, *_ in BAD_LINES)
    assert sum(reader.skipped.values()) == len(bad)
    assert f"skipped {len(bad)} bad lines of {len(bad) + 2}" in caplog.text


# ---------------------------------------------------------------- samples

# Unique texts with known scores: positives p*, negatives n*.
RECORD = records.validate_record({
    "task": "qa", "query": "q",
    "pos": ["p0", "p1", "p2"], "neg": ["n0", "n1", "n2", "n3", "n4"],
    "teacher_scores": [0.1, 0.9, 0.5, 0.3, 2.0, -1.0, 0.7, 0.0],
}, where="made.jsonl:1")
SCORE_OF = dict(zip(RECORD["pos"] + RECORD["neg"], RECORD["teacher_scores"]))


def make(record=RECORD, group_size=4, seed=0, instruction=False, **settings):
    settings = samples.SampleSettings(instruction=instruction, **settings)
    return samples.build_sample(record, settings=settings, group_size=group_size,
                                rng=samples.sample_rng(seed, 0, 0, 0))


def assert_teacher_aligned(sample):
    assert sample["teacher_scores"].dtype == np.float32
    np.testing.assert_array_equal(sample["teacher_scores"],
                                  np.float32([SCORE_OF[k] for k in sample["keys"]]))


def test_select_positive_first_and_teacher_pos():
    assert make(select_positive="first")["keys"][0] == "p0"
    assert make(select_positive="teacher-pos")["keys"][0] == "p1"


def test_select_positive_random_draws_every_positive():
    drawn = {make(select_positive="random", seed=seed)["keys"][0] for seed in range(40)}
    assert drawn == {"p0", "p1", "p2"}


def test_select_positive_teacher_takes_the_best_candidate_out_of_the_negatives():
    for seed in range(10):
        sample = make(select_positive="teacher", group_size=5, seed=seed)
        assert sample["keys"][0] == "n1"
        assert set(sample["keys"][1:]) == {"n0", "n2", "n3", "n4"}
        assert_teacher_aligned(sample)


def test_select_negative_orders():
    assert make(select_negative="first", group_size=5)["keys"] == ["p0", "n0", "n1", "n2", "n3"]
    assert make(select_negative="teacher+", group_size=4)["keys"] == ["p0", "n1", "n3", "n0"]
    assert make(select_negative="teacher-", group_size=4)["keys"] == ["p0", "n2", "n4", "n0"]
    # Other positives are never negatives.
    for seed in range(20):
        keys = make(select_negative="random", group_size=4, seed=seed)["keys"]
        assert len(set(keys[1:])) == 3 and set(keys[1:]) <= set(RECORD["neg"])


def test_select_negative_random_varies_with_the_generator_only():
    draws = [tuple(make(select_negative="random", seed=seed)["keys"]) for seed in range(10)]
    assert len(set(draws)) > 1
    assert draws[3] == tuple(make(select_negative="random", seed=3)["keys"])


def test_too_few_negatives_repeat_by_cycling():
    assert make(select_negative="first", group_size=13)["keys"][1:] == ["n0", "n1", "n2", "n3", "n4"] * 2 + ["n0", "n1"]
    assert make(select_negative="teacher+", group_size=8)["keys"][1:] == ["n1", "n3", "n0", "n4", "n2", "n1", "n3"]
    for seed in range(5):
        negatives = make(select_negative="random", group_size=13, seed=seed)["keys"][1:]
        counts = collections.Counter(negatives)
        assert sorted(counts.values()) == [2, 2, 2, 3, 3]
        assert len(set(negatives[:5])) == 5  # every negative once before any repeats


def test_teacher_scores_follow_the_group_order():
    for select_positive in samples.SELECT_POSITIVE:
        for select_negative in samples.SELECT_NEGATIVE:
            for seed in range(3):
                sample = make(select_positive=select_positive, select_negative=select_negative,
                              group_size=9, seed=seed)
                assert len(sample["keys"]) == 9
                assert_teacher_aligned(sample)


def test_no_teacher_scores_gives_none():
    record = records.validate_record(TOOL, where="t:1")
    sample = make(record, group_size=3)
    assert sample["teacher_scores"] is None and sample["keys"][0] == "t0"


def test_instructions_are_prepended():
    sample = make(instruction=True, group_size=2)
    assert sample["query"] == tasks.instruction("qa", "query") + "q"
    assert sample["keys"][0] == tasks.instruction("qa", "key") + "p0"
    assert sample["task"] == "qa"


def test_chat_candidates_are_the_history_and_lrlm_positives_come_from_the_teacher():
    chat = records.validate_record(CHAT, where="c:1")
    sample = make(chat, group_size=3, select_positive="teacher")
    assert sample["keys"][0] == "h1" and sorted(sample["keys"][1:]) == ["h0", "h2"]
    np.testing.assert_array_equal(sample["teacher_scores"][0], np.float32(-1.0))
    lrlm = records.validate_record(LRLM, where="l:1")
    sample = make(lrlm, group_size=3, select_positive="teacher", select_negative="teacher+")
    assert sample["keys"] == ["c1", "c0", "c2"]
    np.testing.assert_array_equal(sample["teacher_scores"], np.float32([-1.5, -2.0, -2.5]))


def test_lrlm_keys_can_carry_their_continuation():
    assert tasks.keys_with_continuation(["c0", "c1", "c2"]) == ["c0c1", "c1c2", "c2"]
    assert tasks.keys_with_continuation([]) == []
    lrlm = records.validate_record(LRLM, where="l:1")
    sample = make(lrlm, group_size=3, select_positive="teacher", select_negative="teacher+",
                  key_with_continuation=True)
    # The same candidates in the same order, each read with the chunk after it; scores unchanged.
    assert sample["keys"] == ["c1c2", "c0c1", "c2"]
    np.testing.assert_array_equal(sample["teacher_scores"], np.float32([-1.5, -2.0, -2.5]))
    with pytest.raises(ValueError, match="key_with_continuation applies to lrlm"):
        samples.task_settings("qa", {"key_with_continuation": True})


def test_filters_drop_whole_records_by_teacher_scores():
    def reason(record, **settings):
        return samples.filter_reason(record, settings=samples.SampleSettings(**settings), group_size=4)
    assert reason(RECORD) is None
    assert reason(RECORD, teacher_scores_min=2.0) is None
    assert reason(RECORD, teacher_scores_min=2.5) == samples.BELOW_MIN
    assert reason(RECORD, teacher_scores_margin=3.0) is None  # scores span 3.0
    assert reason(RECORD, teacher_scores_margin=3.1) == samples.WITHIN_MARGIN
    single = records.validate_record({**CHAT, "history": ["h0"], "teacher_scores": [1.0]}, where="c:1")
    assert reason(single, select_positive="teacher") == samples.NO_NEGATIVES
    assert samples.filter_reason(single, settings=samples.SampleSettings(select_positive="teacher"),
                                 group_size=1) is None


def test_settings_a_record_cannot_serve_are_errors_naming_it():
    tool = records.validate_record(TOOL, where="tool.jsonl:4")
    with pytest.raises(records.DataError, match=r"tool.jsonl:4: field 'teacher_scores': missing"):
        samples.filter_reason(tool, settings=samples.SampleSettings(select_negative="teacher+"), group_size=2)
    lrlm = records.validate_record(LRLM, where="lrlm.jsonl:2")
    with pytest.raises(records.DataError, match=r"lrlm.jsonl:2: field 'pos': no labelled positive"):
        make(lrlm, select_positive="first")


def test_settings_are_checked():
    with pytest.raises(ValueError, match="select_positive"):
        samples.SampleSettings(select_positive="best")
    with pytest.raises(ValueError, match="select_negative"):
        samples.SampleSettings(select_negative="hard")
    with pytest.raises(ValueError, match=r"unknown sample settings \['group'\]"):
        samples.task_settings("qa", {"group": 3})
    lrlm = samples.task_settings("lrlm", {"select_negative": "teacher-"})
    assert (lrlm.select_positive, lrlm.select_negative, lrlm.teacher_scores_margin, lrlm.max_sample_num) == (
        "teacher", "teacher-", 0.1, 10_000)


def test_sample_generator_depends_on_its_position():
    def draw(*position):
        return samples.sample_rng(*position).integers(1 << 30, size=4).tolist()
    assert draw(1, 0, 2, 5) == draw(1, 0, 2, 5)
    assert len({str(draw(*p)) for p in [(1, 0, 2, 5), (2, 0, 2, 5), (1, 1, 2, 5), (1, 0, 3, 5), (1, 0, 2, 6)]}) == 5


# ---------------------------------------------------------------- TFDS

def test_tfds_round_trip_by_random_access_without_tensorflow(tmp_path):
    import tensorflow_datasets as tfds
    path = write_jsonl(tmp_path / "Mixed-Set.jsonl", [QA, CHAT, "not json", LRLM, TOOL])
    directory = tfds_builder.build_tfds(path, tmp_path / "tfds", skip_bad=True)
    assert directory.name == "1.0.0" and directory.parent.name == "mixed_set"
    expected = list(records.read_jsonl(path, skip_bad=True))
    stored = tfds_builder.TfdsRecords(directory)
    assert len(stored) == 4
    assert [stored[i] for i in (3, 0, 2, 1)] == [expected[i] for i in (3, 0, 2, 1)]
    assert stored.skipped == {records.MALFORMED_JSON: 1}
    source = tfds.data_source("llm_embedder_jsonl/mixed_set", data_dir=tmp_path / "tfds")["train"]
    raw = source[1]
    assert raw["query"] == CHAT["query"].encode() and json.loads(raw["history"]) == CHAT["history"]
    assert raw["source"] == f"{path}:2".encode()
    assert "tensorflow" not in sys.modules


def test_tfds_build_reports_bad_lines(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [QA, {"task": "qa", "query": "q", "pos": "p", "neg": []}])
    with pytest.raises(records.DataError, match=r"qa.jsonl:2: field 'pos'"):
        tfds_builder.build_tfds(path, tmp_path / "tfds")


def test_tfds_records_need_a_prepared_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a prepared TFDS dataset"):
        tfds_builder.TfdsRecords(tmp_path)
