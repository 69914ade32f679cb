"""The score job with the real SmolLM2: alignment, devices, kill-and-resume, bad input."""
import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import score as score_config
from llm_embedder_jax import rewards, score, sharding
from llm_embedder_jax.llm import RewardLM

REPO = pathlib.Path(__file__).resolve().parents[1]
# The toy icl records carry no answers (the job rejects them as they are); these are the
# answers of their first two queries, given here so that icl is scored too.
ICL_ANSWERS = (["No"], ["World"])


@pytest.fixture(scope="module")
def lm(smollm2_gguf):
    return RewardLM.from_pretrained(smollm2_gguf, mesh=sharding.make_mesh())


def first_records(toy_dir, task, folder, count=2):
    records = [json.loads(line) for line in (toy_dir / f"{task}.json").read_text().splitlines()[:count]]
    if task == "icl":
        for record, answers in zip(records, ICL_ANSWERS):
            record["answers"] = answers
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task}.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records


def small_config(*inputs, **overrides):
    config = score_config.get_config()
    config.inputs = tuple(str(p) for p in inputs)
    config.max_candidates = 3
    config.batch_size = 8
    config.key_max_tokens = 48
    config.update(overrides)
    return config


def read_jsonl(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def scored(lm, toy_dir, tmp_path_factory):
    """Two records of each of the toy qa, chat, icl and lrlm files, scored on 8 devices."""
    folder = tmp_path_factory.mktemp("scored")
    inputs = {task: first_records(toy_dir, task, folder / "data") for task in ("qa", "chat", "icl", "lrlm")}
    config = small_config(*(path for path, _ in inputs.values()))
    report = score.score_files(config, folder / "out", lm=lm)
    return config, inputs, folder / "out", report


LISTS = ("pos", "neg", "history", "pos_index", "neg_index", "pos_scores", "neg_score", "teacher_scores")


def candidates_of(task, record):
    return record["history"] if task == "chat" else record["pos"] + record["neg"]


def test_scores_align_with_candidates(lm, scored):
    config, inputs, out, report = scored
    assert report["skipped"] == 0
    cut = lambda text: rewards.truncate_to_tokens([text], lm.tokenizer, max_tokens=config.key_max_tokens)[0]
    direct_prompts, direct_answers, expected = [], [], []
    for task, (path, records) in inputs.items():
        outputs = read_jsonl(out / path.name)
        assert len(outputs) == len(records) == 2
        for record, output in zip(records, outputs):
            # The first three candidates are kept, with every list in step with them.
            assert candidates_of(task, output) == candidates_of(task, record)[:3]
            assert len(output["teacher_scores"]) == 3 and np.all(np.isfinite(output["teacher_scores"]))
            for name in ("pos_index", "pos_scores"):
                assert name not in record or output[name] == record[name][:len(output["pos"])]
            for name in ("neg_index", "neg_score"):
                assert name not in record or output[name] == record[name][:len(output["neg"])]
            assert list(output) == list(record) + ([] if "teacher_scores" in record else ["teacher_scores"])
            assert {k: v for k, v in output.items() if k not in LISTS} == \
                {k: v for k, v in record.items() if k not in LISTS}
        # Every candidate of the second record, recomputed directly from the templates.
        record, output = records[1], outputs[1]
        candidates = candidates_of(task, record)
        for j, candidate in enumerate(candidates[:3]):
            key = cut(candidate)
            if task == "qa":
                prompt = f"Knowledge: {key}\n\nQuestion: {record['query']}\n\nAnswer: "
            elif task == "icl":
                prompt = f"{key}\n{record['query']}\n"
            elif task == "chat":
                prompt = f"{key}\nSpeaker 1: {record['query']}\nSpeaker 2: "
            else:  # lrlm: the chunk, its continuation (the next candidate), the context, the query chunk
                prompt = key + cut(candidates[j + 1]) + record["context"] + record["query"]
            direct_prompts.append(prompt)
            direct_answers.append(record["answers"][0])
            expected.append(output["teacher_scores"][j])
    direct = lm.loglik(direct_prompts, direct_answers, batch_size=config.batch_size)
    np.testing.assert_allclose(direct, expected, atol=2e-5)
    assert len(set(expected)) == len(expected)


def test_key_truncation_with_the_llm_tokenizer(lm, toy_dir):
    """Byte-level tokens split characters: cuts stay exact prefixes of at most k tokens."""
    texts = [json.loads(line)["pos"][0] for line in (toy_dir / "convsearch.json").read_text().splitlines()]
    texts.append("Ünïcödé 日本語のテキスト 🙂🙂 emoji " * 8)
    count = lambda text: len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    for k in (1, 5, 9, 14, 43, 512):
        for text, cut in zip(texts, rewards.truncate_to_tokens(texts, lm.tokenizer, max_tokens=k)):
            assert text.startswith(cut)
            assert min(k, count(text)) - 2 <= count(cut) <= k
    assert [count(c) for c in rewards.truncate_to_tokens(texts[:-1], lm.tokenizer, max_tokens=48)] == [48] * 8


def test_one_device_gives_the_scores_of_eight(lm, scored, tmp_path):
    config, inputs, out, _ = scored
    one = RewardLM(params=lm.params, config=lm.config, tokenizer=lm.tokenizer, eos_ids=lm.eos_ids,
                   mesh=sharding.make_mesh(devices=jax.devices()[:1]))
    assert len(jax.devices()) == 8 and len(jax.tree.leaves(one.params)[0].sharding.device_set) == 1
    config = small_config(inputs["qa"][0], inputs["chat"][0])
    score.score_files(config, tmp_path, lm=one)
    for task in ("qa", "chat"):
        eight = [r["teacher_scores"] for r in read_jsonl(out / f"{task}.json")]
        single = [r["teacher_scores"] for r in read_jsonl(tmp_path / f"{task}.json")]
        np.testing.assert_allclose(single, eight, atol=1e-4)


def test_two_processes_split_and_merge_in_input_order(lm, scored, tmp_path):
    """Process p scores the records i % 2 == p; process 0 merges them in input order."""
    config, inputs, out, _ = scored
    config = small_config(inputs["chat"][0], shard_size=1)
    assert score.score_files(config, tmp_path, lm=lm, process_index=1, process_count=2)["files"] == {}
    shards = tmp_path / "shards" / "chat"
    assert sorted(p.name for p in shards.glob("0*")) == ["00000.1-of-2.jsonl", "00001.1-of-2.jsonl"]
    assert (shards / "00000.1-of-2.jsonl").read_text() == ""  # record 0 is process 0's
    assert [e["i"] for e in read_jsonl(shards / "00001.1-of-2.jsonl")] == [1]
    score.score_files(config, tmp_path, lm=lm, process_index=0, process_count=2)
    merged, single = read_jsonl(tmp_path / "chat.json"), read_jsonl(out / "chat.json")
    assert [r["query"] for r in merged] == [r["query"] for r in single]
    np.testing.assert_allclose([r["teacher_scores"] for r in merged], [r["teacher_scores"] for r in single],
                               atol=1e-5)


def test_rank_aware_job_writes_ranks(lm, toy_dir, tmp_path):
    path, _ = first_records(toy_dir, "chat", tmp_path / "data", count=1)
    config = small_config(path, max_candidates=2, reward="rank")
    config.rank.num_samples = 3
    config.rank.max_new_tokens = 6
    score.score_files(config, tmp_path / "out", lm=lm)
    [output] = read_jsonl(tmp_path / "out" / "chat.json")
    ranks = output["teacher_ranks"]
    assert len(ranks) == 2 and all(isinstance(r, int) and 1 <= r <= 4 for r in ranks)
    np.testing.assert_allclose(output["teacher_scores"], [1 / r for r in ranks], rtol=1e-6)

    # The same pipeline, checked against samples and likelihoods taken by hand.
    history, answer = output["history"], output["answers"][0]
    example = rewards.RewardExample(task="chat", query=output["query"], answer=answer, keys=tuple(history),
                                    continuations=("", ""))
    options = dict(n=3, max_new_tokens=6, seed=7, batch_size=8)
    [(reward, ranks)] = rewards.rank_aware_rewards(lm, [example], num_samples=3, max_new_tokens=6, seed=7,
                                                   key_max_tokens=0, batch_size=8, transform="improvement")
    [samples] = lm.sample([f"Speaker 1: {example.query}\nSpeaker 2: "], **options)
    kept = [o for o in samples if " ".join(o.split()) not in ("", " ".join(answer.split()))]
    assert kept  # otherwise every rank is 1 and nothing is checked
    by_hand = []
    for prompt in [f"{key}\nSpeaker 1: {example.query}\nSpeaker 2: " for key in history] + \
            [f"Speaker 1: {example.query}\nSpeaker 2: "]:
        scores = lm.loglik([prompt] * (1 + len(kept)), [answer] + kept, batch_size=8)
        by_hand.append(1 + int(np.sum(scores[1:] > scores[0])))
    np.testing.assert_array_equal(ranks, by_hand[:2])
    np.testing.assert_array_equal(reward, [by_hand[2] - r for r in by_hand[:2]])


def test_kill_and_resume_gives_the_uninterrupted_output(lm, toy_dir, tmp_path):
    path, _ = first_records(toy_dir, "chat", tmp_path / "data", count=5)
    score.score_files(small_config(path, max_candidates=1, shard_size=1), tmp_path / "reference", lm=lm)

    workdir = tmp_path / "work"
    command = [sys.executable, "main.py", "--mode=score", "--config=configs/score.py", f"--workdir={workdir}",
               f"--config.inputs=('{path}',)", "--config.max_candidates=1", "--config.shard_size=1",
               "--config.batch_size=8", "--config.key_max_tokens=48"]
    first_shard = workdir / "shards" / "chat" / "00000.jsonl"
    with open(tmp_path / "killed.log", "wb") as log:
        job = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while not first_shard.exists() and job.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        job.send_signal(signal.SIGKILL)
        job.wait()
    assert first_shard.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    assert not (workdir / "chat.json").exists(), "the job finished before it could be killed"
    finished = {p.name: p.stat().st_mtime_ns for p in first_shard.parent.glob("0*.jsonl")}
    assert 1 <= len(finished) < 5

    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    assert {p.name: p.stat().st_mtime_ns for p in first_shard.parent.glob("0*.jsonl") if p.name in finished} == \
        finished  # finished shards were kept, not scored again
    assert (workdir / "chat.json").read_bytes() == (tmp_path / "reference" / "chat.json").read_bytes()
    assert len(read_jsonl(workdir / "chat.json")) == 5
    assert not list(first_shard.parent.glob(".*tmp*"))


def test_bad_records_name_file_line_and_field(toy_dir, tmp_path):
    def fails(text_or_path, match, name="bad.json"):
        """The job stops, before loading any LLM, with an error that matches."""
        path = text_or_path if isinstance(text_or_path, pathlib.Path) else tmp_path / name
        if isinstance(text_or_path, str):
            path.write_text(text_or_path)
        elif isinstance(text_or_path, bytes):
            path.write_bytes(text_or_path)
        with pytest.raises(ValueError, match=match):
            score.score_files(small_config(path), tmp_path / "out")

    chat = json.loads((toy_dir / "chat.json").read_text().splitlines()[0])
    qa = json.loads((toy_dir / "qa.json").read_text().splitlines()[0])
    fails(json.dumps(chat) + "\n\n{\"query\": \n", r"bad\.json, line 3: malformed JSON")
    fails("[1, 2]\n", r"bad\.json, line 1: expected a JSON object")
    fails(json.dumps(chat).encode() + b"\n" + b'{"query": "caf\xe9"}\n', r"bad\.json, line 2: not UTF-8")
    fails(toy_dir / "icl.json", r"icl\.json, line 1, field 'answers'")
    fails(toy_dir / "tool.json", r"tool\.json, line 1, field 'task'.*no answer")
    fails(json.dumps({**qa, "neg_index": qa["neg_index"][:-1]}) + "\n",
          r"line 1, field 'neg_index'.*'neg': 99 entries for 100")
    fails(json.dumps(chat) + "\n" + json.dumps({**chat, "teacher_scores": [0.0]}) + "\n",
          r"line 2, field 'teacher_scores'.*history: 1 entries for 7")
    fails(json.dumps({**qa, "pos_scores": 3.0}) + "\n", r"line 1, field 'pos_scores'.*not a list")
    fails(json.dumps({**chat, "history": "one string"}) + "\n", r"line 1, field 'history'.*list of strings")
    fails(json.dumps({k: v for k, v in chat.items() if k != "task"}) + "\n", r"line 1, field 'task'")


def test_skip_bad_records_counts_and_reports(lm, toy_dir, tmp_path):
    good = [json.loads(line) for line in (toy_dir / "chat.json").read_text().splitlines()[:2]]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(good[0]) + "\n{oops\n" + json.dumps({**good[1], "answers": []}) + "\n"
                    + json.dumps(good[1]) + "\n")
    report = score.score_files(small_config(path, max_candidates=1, skip_bad_records=True), tmp_path / "out", lm=lm)
    outputs = read_jsonl(tmp_path / "out" / "chat.json")
    assert [o["query"] for o in outputs] == [good[0]["query"], good[1]["query"]]
    saved = json.loads((tmp_path / "out" / "score_report.json").read_text())
    assert saved["skipped"] == report["skipped"] == 2
    [entry] = saved["files"].values()
    assert entry["records"] == 4 and entry["scored"] == 2
    assert "line 2: malformed JSON" in entry["skipped_records"][0]
    assert "line 3, field 'answers'" in entry["skipped_records"][1]
