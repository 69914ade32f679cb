"""The grain training pipeline: homogeneous batches, mixtures, state, slicing, buckets."""
import collections
import json
import re

import numpy as np
import pytest
import transformers

from llm_embedder_jax import buckets
from llm_embedder_jax.data import mixture, pipeline, records, tfds_builder


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return transformers.AutoTokenizer.from_pretrained(minilm_dir)


def score(name, i, j):
    # A distinct, known teacher score for candidate j of record i of a dataset.
    return round(float(np.sin(1000 * len(name) + 37 * i + 11 * j)), 4)


def write_dataset(tmp_path, name, task, size, *, teacher=True, num_pos=1, num_neg=4):
    """Markers the tests can decode: queries '<name> query <i> ...', keys '<name> key r<i>c<j>'."""
    lines = []
    for i in range(size):
        filler = " ".join(["more words"] * (i % 5) * 6)  # uneven lengths, so buckets differ
        texts = [f"{name} key r{i}c{j}" for j in range(num_pos + num_neg)]
        record = {"task": task, "query": f"{name} query {i} {filler}"}
        if task == "chat":
            record["history"] = texts
        else:
            record["pos"], record["neg"] = texts[:num_pos], texts[num_pos:]
        if teacher:
            record["teacher_scores"] = [score(name, i, j) for j in range(len(texts))]
        lines.append(json.dumps(record))
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def three(tmp_path):
    return [
        dict(name="alpha", path=write_dataset(tmp_path, "alpha", "qa", 16)),
        dict(name="beta", path=write_dataset(tmp_path, "beta", "tool", 12, teacher=False, num_pos=2)),
        dict(name="gamma", path=write_dataset(tmp_path, "gamma", "chat", 8, num_pos=0, num_neg=5)),
    ]


def iterator(config, tokenizer, *, batch=4, group=3, seed=0, **kwargs):
    return pipeline.make_train_iterator(config, tokenizer=tokenizer, global_batch_size=batch, group_size=group,
                                        query_max_len=64, key_max_len=32, seed=seed, **kwargs)


def take(it, n):
    return [next(it) for _ in range(n)]


def decode(tokenizer, ids, mask):
    return [tokenizer.decode(row[m > 0], skip_special_tokens=True) for row, m in zip(ids, mask)]


def parse_query(text):
    """'<instruction> alpha query 3 ...' → ('alpha', 3)."""
    name, index = re.search(r"(\w+) query (\d+)", text).groups()
    return name, int(index)


def parse_key(text):
    """'<instruction> alpha key r3c1' → ('alpha', 3, 1)."""
    name, index, candidate = re.fullmatch(r".* (\w+) key r(\d+)c(\d+)", text).groups()
    return name, int(index), int(candidate)


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_every_batch_comes_from_one_dataset_with_aligned_teacher_scores(three, tokenizer):
    seen = collections.Counter()
    for batch in take(iterator(three, tokenizer), 18):
        name = batch["dataset"]
        seen[name] += 1
        assert batch["task"] == {"alpha": "qa", "beta": "tool", "gamma": "chat"}[name]
        assert batch["query_ids"].shape[0] == 4 and batch["key_ids"].shape[0] == 12
        assert batch["query_ids"].dtype == batch["key_mask"].dtype == np.int32
        assert batch["teacher_scores"].shape == (4, 3) and batch["teacher_scores"].dtype == np.float32
        queries = [parse_query(q) for q in decode(tokenizer, batch["query_ids"], batch["query_mask"])]
        keys = [parse_key(k) for k in decode(tokenizer, batch["key_ids"], batch["key_mask"])]
        assert {q[0] for q in queries} | {k[0] for k in keys} == {name}
        for b, (_, i) in enumerate(queries):
            group = keys[b * 3:(b + 1) * 3]  # query-major
            assert all(k[1] == i for k in group)
            candidates = [k[2] for k in group]
            if name == "beta":
                assert not batch["has_teacher"] and np.isnan(batch["teacher_scores"]).all()
                assert candidates[0] == 0 and all(j >= 2 for j in candidates[1:])  # first pos, neg only
            else:
                assert batch["has_teacher"]
                np.testing.assert_array_equal(batch["teacher_scores"][b],
                                              np.float32([score(name, i, j) for j in candidates]))
            if name == "gamma":  # select_positive="teacher": the best of the whole history
                assert batch["teacher_scores"][b, 0] == np.float32(max(score(name, i, j) for j in range(5)))
    assert set(seen) == {"alpha", "beta", "gamma"}


def test_same_seed_same_stream_other_seed_other_stream(three, tokenizer):
    first = take(iterator(three, tokenizer, seed=3), 8)
    assert_batches_equal(first, take(iterator(three, tokenizer, seed=3), 8))
    other = take(iterator(three, tokenizer, seed=4), 8)
    assert any(a["dataset"] != b["dataset"] or not np.array_equal(a["query_ids"], b["query_ids"])
               for a, b in zip(first, other))


def test_restored_state_resumes_the_identical_stream(three, tokenizer):
    it = iterator(three, tokenizer, seed=1)
    take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = take(it, 7)
    resumed = iterator(three, tokenizer, seed=1)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 7), expected)
    dataset = pipeline.make_train_dataset(three, tokenizer=tokenizer, global_batch_size=4, group_size=3,
                                          query_max_len=64, key_max_len=32, seed=1)
    assert_batches_equal([dataset[step] for step in range(5, 12)], expected)


def test_proportional_mixture_uses_every_record_once_per_epoch(tmp_path, tokenizer):
    config = [dict(path=write_dataset(tmp_path, "alpha", "qa", 26)),  # 6 batches of 4, 2 records left over
              dict(path=write_dataset(tmp_path, "beta", "tool", 8, teacher=False))]  # 2 batches
    batches = take(iterator(config, tokenizer, group=2), 24)  # 3 cycles of 8
    for cycle in range(3):
        part = batches[cycle * 8:(cycle + 1) * 8]
        assert collections.Counter(b["dataset"] for b in part) == {"alpha": 6, "beta": 2}
        for name, size in (("alpha", 24), ("beta", 8)):
            record_ids = [parse_query(q)[1] for b in part if b["dataset"] == name
                          for q in decode(tokenizer, b["query_ids"], b["query_mask"])]
            assert len(set(record_ids)) == size == len(record_ids)  # no record twice within an epoch
    orders = [[b["dataset"] for b in batches[c * 8:(c + 1) * 8]] for c in range(3)]
    assert len({tuple(o) for o in orders}) > 1  # the schedule is reshuffled each cycle


def test_explicit_weights_and_a_dataset_listed_twice(tmp_path, tokenizer):
    alpha = write_dataset(tmp_path, "alpha", "qa", 8)
    beta = write_dataset(tmp_path, "beta", "tool", 8, teacher=False)
    weighted = [dict(path=alpha, weight=1.0), dict(path=beta, weight=3.0)]
    counts = collections.Counter(b["dataset"] for b in take(iterator(weighted, tokenizer, batch=2, group=2), 80))
    assert counts == {"alpha": 20, "beta": 60}
    twice = [dict(path=alpha), dict(path=beta), dict(path=beta)]
    counts = collections.Counter(b["dataset"] for b in take(iterator(twice, tokenizer, batch=2, group=2), 48))
    assert counts == {"alpha": 16, "beta": 16, "beta_2": 16}


def test_schedule_frequencies_over_many_steps():
    counts = mixture.cycle_counts([5, 5, 5], [0.2, 0.5, 0.3])
    assert counts == [2, 5, 3]
    schedule = mixture.Schedule(counts, seed=7)
    picks = [schedule[step] for step in range(5_000)]
    frequency = np.bincount([d for d, _ in picks], minlength=3) / len(picks)
    np.testing.assert_allclose(frequency, [0.2, 0.5, 0.3], atol=0.01)
    for dataset in range(3):  # each dataset's own batches come in order 0, 1, 2, ...
        own = [j for d, j in picks if d == dataset]
        assert own == list(range(len(own)))
    assert picks[:50] != [mixture.Schedule(counts, seed=8)[step] for step in range(50)]
    assert mixture.cycle_counts([10, 2]) == [10, 2]
    with pytest.raises(ValueError, match="positive finite"):
        mixture.cycle_counts([1, 1], [1.0, 0.0])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(three, tokenizer, process_count):
    global_batches = take(iterator(three, tokenizer, batch=8), 6)
    parts = [take(iterator(three, tokenizer, batch=8, process_index=p, process_count=process_count), 6)
             for p in range(process_count)]
    for step, whole in enumerate(global_batches):
        local = [part[step] for part in parts]
        assert all(b["dataset"] == whole["dataset"] for b in local)
        assert local[0]["query_ids"].shape[0] == 8 // process_count
        for key in ("query_ids", "query_mask", "key_ids", "key_mask", "teacher_scores"):
            np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), whole[key], err_msg=key)


def test_batches_are_padded_to_length_buckets(three, tokenizer):
    widths = set()
    for batch in take(iterator(three, tokenizer), 18):
        for kind, max_length in (("query", 64), ("key", 32)):
            ids, mask = batch[f"{kind}_ids"], batch[f"{kind}_mask"]
            longest = int(mask.sum(axis=1).max())
            assert ids.shape[1] == buckets.bucket_length(longest, max_length=max_length)
            assert (ids[mask == 0] == tokenizer.pad_token_id).all()
        widths.add(batch["query_ids"].shape[1])
    assert len(widths) > 1 and max(widths) <= 64  # buckets, not one global width


def test_encoder_matches_the_tokenizer_and_leaves_it_alone(tokenizer, real_texts):
    backend_truncation = tokenizer.backend_tokenizer.truncation
    texts = real_texts[:6]
    batch = {"dataset": "d", "task": "qa", "samples": [
        {"query": texts[i], "keys": texts[i:i + 2], "teacher_scores": None, "task": "qa"} for i in range(3)]}
    encoded = pipeline.BatchEncoder(tokenizer, query_max_len=40, key_max_len=24)(batch)
    assert tokenizer.backend_tokenizer.truncation == backend_truncation  # a private copy truncates
    expected_queries = tokenizer(texts[:3], truncation=True, max_length=40)["input_ids"]
    expected_keys = tokenizer([t for i in range(3) for t in texts[i:i + 2]], truncation=True, max_length=24)["input_ids"]
    for ids, mask, expected in ((encoded["query_ids"], encoded["query_mask"], expected_queries),
                                (encoded["key_ids"], encoded["key_mask"], expected_keys)):
        assert [row[m > 0].tolist() for row, m in zip(ids, mask)] == expected
    assert encoded["key_ids"].shape == (6, 24)  # truncated at max_length, itself the widest bucket


def test_tfds_dataset_gives_the_same_batches_as_its_jsonl(three, tokenizer, tmp_path):
    directory = tfds_builder.build_tfds(three[0]["path"], tmp_path / "tfds")
    from_tfds = [dict(three[0], path=directory)] + three[1:]
    assert_batches_equal(take(iterator(from_tfds, tokenizer), 9), take(iterator(three, tokenizer), 9))


def test_toy_data_of_all_six_tasks_with_released_settings(toy_dir, tokenizer):
    config = [dict(path=toy_dir / f"{task}.json") for task in
              ("qa", "convsearch", "chat", "lrlm", "icl", "tool", "tool")]
    seen = set()
    for batch in take(iterator(config, tokenizer, batch=4, group=8), 28):
        seen.add(batch["dataset"])
        assert batch["key_ids"].shape[0] == 32
        assert batch["has_teacher"] == (batch["task"] in ("qa", "chat", "lrlm", "icl"))
        if batch["task"] in ("chat", "lrlm"):  # positive chosen by the teacher
            assert (batch["teacher_scores"][:, 0] >= batch["teacher_scores"].max(axis=1)).all()
    assert seen == {"qa", "convsearch", "chat", "lrlm", "icl", "tool", "tool_2"}


def test_filters_caps_and_skips_are_counted(tmp_path):
    path = write_dataset(tmp_path, "alpha", "qa", 12)
    with open(path, "a") as f:
        f.write('{"task": "qa", "query": "broken"\n')
    spec, = pipeline.dataset_specs([dict(path=path, skip_bad=True,
                                         settings=dict(teacher_scores_min=0.9, max_sample_num=3))])
    prepared = pipeline.prepare_dataset(spec, group_size=4)
    kept = [i for i in range(12) if max(score("alpha", i, j) for j in range(5)) >= 0.9]
    assert len(kept) == 7 and prepared.usable.tolist() == kept[:3]
    assert prepared.dropped == {records.MALFORMED_JSON: 1, "teacher_scores below min": 12 - len(kept),
                                pipeline.OVER_MAX_SAMPLE_NUM: len(kept) - 3}


def test_configuration_errors_are_clear(three, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"unknown keys \['wieght'\]"):
        pipeline.dataset_specs([dict(path="a.jsonl", wieght=2)])
    with pytest.raises(ValueError, match="give a weight to every dataset or to none"):
        pipeline.dataset_specs([dict(path="a.jsonl", weight=2), dict(path="b.jsonl")])
    with pytest.raises(ValueError, match="beta: 12 usable records, fewer than one global batch of 16"):
        iterator(three, tokenizer, batch=16)
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        iterator(three, tokenizer, batch=4, process_index=0, process_count=3)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(three[0]["path"].read_text() + json.dumps({"task": "tool", "query": "q", "pos": ["p"],
                                                                 "neg": ["n"]}) + "\n")
    with pytest.raises(records.DataError, match=r"mixed.jsonl:17: field 'task': 'tool' in a 'qa' dataset"):
        iterator([dict(path=mixed)], tokenizer)
    with pytest.raises(records.DataError, match=r"beta.jsonl:1: field 'teacher_scores': missing"):
        iterator([dict(three[1], settings=dict(select_negative="teacher+"))], tokenizer)
