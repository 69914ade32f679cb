"""Rewards: prompt templates per task, key truncation, rank math, the rank-aware pipeline."""
import jax.numpy as jnp
import numpy as np
import pytest

from llm_embedder_jax import rewards
from llm_embedder_jax.rewards import RewardExample


def test_prompt_templates_per_task():
    prompt = rewards.reward_prompt
    assert prompt("qa", query="who?", key="K") == "Knowledge: K\n\nQuestion: who?\n\nAnswer: "
    assert prompt("convsearch", query="who?", key="K") == "Knowledge: K\n\nQuestion: who?\n\nAnswer: "
    assert prompt("qa", query="who?") == "Question: who?\n\nAnswer: "
    assert prompt("icl", query="2+2?", key="1+1?\n2") == "1+1?\n2\n2+2?\n"
    assert prompt("icl", query="2+2?") == "2+2?\n"
    assert prompt("chat", query="hi", key="Speaker 1: a\nSpeaker 2: b") == \
        "Speaker 1: a\nSpeaker 2: b\nSpeaker 1: hi\nSpeaker 2: "
    assert prompt("chat", query="hi") == "Speaker 1: hi\nSpeaker 2: "
    # lrlm: chunk, its continuation, the context, then the query chunk, with no separators.
    assert prompt("lrlm", query="Q", key="A", continuation="B", context="C") == "ABCQ"
    assert prompt("lrlm", query="Q", context="C") == "CQ"
    # Braces in the data are text, not template fields.
    assert prompt("qa", query="{key}", key="{query}") == "Knowledge: {query}\n\nQuestion: {key}\n\nAnswer: "
    with pytest.raises(ValueError, match="tool"):
        prompt("tool", query="q", key="k")


def test_truncate_to_tokens_keeps_exact_prefixes(minilm_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    texts = ["one two three four five six seven", "short", "Ünïcode wörds and more wörds here"]
    cut = rewards.truncate_to_tokens(texts, tokenizer, max_tokens=4)
    assert cut[:2] == ["one two three four", "short"]
    for original, short in zip(texts, cut):
        assert original.startswith(short)
        assert len(tokenizer(short, add_special_tokens=False)["input_ids"]) == \
            min(4, len(tokenizer(original, add_special_tokens=False)["input_ids"]))
    assert rewards.truncate_to_tokens(texts, tokenizer, max_tokens=0) == texts


def test_answer_ranks_ties_masks_numpy_and_jax():
    answer = np.array([0.0, -1.0, -2.0])
    samples = np.array([
        [1.0, -1.0, 0.0, 2.0],    # two above, one below, one tie (a tie ranks the answer first) -> 3
        [-0.5, -0.5, -0.5, -3.0],  # three above, but the first is masked out -> 3
        [-5.0, -4.0, -3.0, -2.5],  # none above -> 1
    ])
    mask = np.array([[True] * 4, [False, True, True, True], [True] * 4])
    expected = [3, 3, 1]
    np.testing.assert_array_equal(rewards.answer_ranks(answer, samples, mask), expected)
    np.testing.assert_array_equal(rewards.answer_ranks(jnp.asarray(answer), jnp.asarray(samples), jnp.asarray(mask)),
                                  expected)
    # Every sample masked: the answer is first whatever the scores.
    np.testing.assert_array_equal(rewards.answer_ranks(answer, samples, np.zeros_like(mask)), [1, 1, 1])


def test_rank_transforms():
    ranks = np.array([1, 2, 4])
    np.testing.assert_allclose(rewards.rank_rewards(ranks, transform="reciprocal"), [1.0, 0.5, 0.25])
    np.testing.assert_allclose(rewards.rank_rewards(jnp.asarray(ranks), transform="reciprocal"), [1.0, 0.5, 0.25])
    np.testing.assert_array_equal(rewards.rank_rewards(ranks, transform="improvement", ranks_without_key=3), [2, 1, -1])
    per_query = np.array([[1, 2], [3, 3]])
    np.testing.assert_array_equal(
        rewards.rank_rewards(per_query, transform="improvement", ranks_without_key=np.array([[2], [1]])),
        [[1, 0], [-2, -2]])
    with pytest.raises(ValueError, match="ranks_without_key"):
        rewards.rank_rewards(ranks, transform="improvement")
    with pytest.raises(ValueError, match="unknown rank transform"):
        rewards.rank_rewards(ranks, transform="log")


def test_sample_mask_drops_the_answer_after_whitespace_normalisation():
    samples = ["Paris is nice.", "  Paris\n is   nice. ", "Paris is nice", "", "   ", "Lyon"]
    np.testing.assert_array_equal(rewards.sample_mask(samples, "Paris is\tnice."),
                                  [False, False, True, False, False, True])


class ScriptedLM:
    """Likelihoods from a table, fixed samples: the rank-aware pipeline checked by hand."""

    def __init__(self, tokenizer, table, samples):
        self.tokenizer, self.table, self.samples = tokenizer, table, samples
        self.sampled_prompts, self.scored_pairs = [], []

    def loglik(self, prompts, answers, batch_size=16, max_length=None):
        pairs = list(zip(prompts, answers))
        self.scored_pairs += pairs
        return np.array([self.table[p] for p in pairs], np.float32)

    def sample(self, prompts, n=10, max_new_tokens=32, temperature=1.0, top_p=1.0, seed=0, batch_size=64,
               max_length=None):
        self.sampled_prompts += prompts
        return [list(self.samples[p])[:n] for p in prompts]


def test_rank_aware_rewards_by_hand(minilm_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    example = RewardExample(task="qa", query="q", answer="gold", keys=("k1", "k2"), continuations=("", ""))
    p1, p2 = "Knowledge: k1\n\nQuestion: q\n\nAnswer: ", "Knowledge: k2\n\nQuestion: q\n\nAnswer: "
    base = "Question: q\n\nAnswer: "
    samples = {base: ["a", " gold ", "b"]}  # " gold " is the answer: dropped, never scored
    table = {(p1, "gold"): -1.0, (p1, "a"): -0.5, (p1, "b"): -2.0,   # rank 2 under k1
             (p2, "gold"): -1.0, (p2, "a"): -3.0, (p2, "b"): -2.0,   # rank 1 under k2
             (base, "gold"): -1.0, (base, "a"): 0.0, (base, "b"): 0.0}  # rank 3 without a key
    lm = ScriptedLM(tokenizer, table, samples)
    [(reward, ranks)] = rewards.rank_aware_rewards(lm, [example], num_samples=3, transform="reciprocal")
    np.testing.assert_array_equal(ranks, [2, 1])
    np.testing.assert_allclose(reward, [0.5, 1.0])
    assert lm.sampled_prompts == [base]
    assert all(answer != " gold " for _, answer in lm.scored_pairs)
    assert len(lm.scored_pairs) == len(set(lm.scored_pairs)) == 6  # (answer + 2 kept samples) x 2 keys

    lm = ScriptedLM(tokenizer, table, samples)
    [(reward, ranks)] = rewards.rank_aware_rewards(lm, [example], num_samples=3, transform="improvement")
    np.testing.assert_array_equal(ranks, [2, 1])
    np.testing.assert_array_equal(reward, [3 - 2, 3 - 1])

    # Per-candidate sampling: each key ranks among samples drawn from its own prompt.
    samples = {p1: ["b", "b", "b"], p2: ["a", "gold", "a"]}
    lm = ScriptedLM(tokenizer, table, samples)
    [(reward, ranks)] = rewards.rank_aware_rewards(lm, [example], num_samples=3, sample_from="candidate")
    np.testing.assert_array_equal(ranks, [1, 1])
    assert lm.sampled_prompts == [p1, p2]


def test_loglik_memo_scores_each_pair_once_across_calls():
    table = {("p1", "a"): -1.0, ("p2", "a"): -2.0, ("p3", "b"): -3.0}
    inner = ScriptedLM(tokenizer=None, table=table, samples={})
    lm = rewards.LoglikMemo(inner)
    np.testing.assert_array_equal(lm.loglik(["p1", "p2", "p1"], ["a", "a", "a"]), [-1.0, -2.0, -1.0])
    np.testing.assert_array_equal(lm.loglik(["p2", "p3"], ["a", "b"]), [-2.0, -3.0])
    assert inner.scored_pairs == [("p1", "a"), ("p2", "a"), ("p3", "b")]  # nothing scored twice
    lm.loglik(["p1"], ["a"], max_length=8)  # another truncation: another score
    assert inner.scored_pairs[-1] == ("p1", "a") and len(inner.scored_pairs) == 4
    assert lm.tokenizer is None and lm.samples == {}  # the rest is the wrapped LLM's
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        lm.loglik(["p1", "p2"], ["a"])


def test_likelihood_rewards_truncate_keys_and_align(minilm_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    examples = [
        RewardExample(task="lrlm", query="Q", answer="next", keys=("one two three", "four"),
                      continuations=("four", ""), context="ctx "),
        RewardExample(task="chat", query="hi", answer="yo", keys=("Speaker 1: x",), continuations=("",)),
    ]
    table = {("one twofourctx Q", "next"): -1.0, ("fourctx Q", "next"): -2.0,
             ("Speaker 1\nSpeaker 1: hi\nSpeaker 2: ", "yo"): -3.0}
    scores = rewards.likelihood_rewards(ScriptedLM(tokenizer, table, {}), examples, key_max_tokens=2)
    assert [s.tolist() for s in scores] == [[-1.0, -2.0], [-3.0]]
