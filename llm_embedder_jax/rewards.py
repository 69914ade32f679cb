"""How much a candidate key helps the reward LLM produce the desired output (DESIGN.md §2.1–2.2).

Two rewards:

- likelihood: r(C) = mean log-probability of the answer tokens under prompt(C, q);
- rank-aware: the rank of the desired output O* among N outputs sampled from the
  LLM, each scored under prompt(C, q):

      rank_C = 1 + #{n : s_C(O_n) > s_C(O*)}

  (a tie ranks O* first; samples equal to O* after whitespace normalisation, and
  empty ones, are dropped first), turned into a reward by `reciprocal` 1/rank_C or
  `improvement` rank_∅ − rank_C, rank_∅ being the rank under the prompt with no key.
  The paper states the idea, not the formula; this family is our reading of it.

The LLM is any object with `loglik(prompts, answers, batch_size=, max_length=)`,
`sample(prompts, n=, max_new_tokens=, temperature=, top_p=, seed=, batch_size=, max_length=)` and a
`tokenizer` (`llm.RewardLM`). The ranking math is pure functions of likelihood
arrays that take numpy and jax arrays alike.
"""
import dataclasses

import numpy as np

from llm_embedder_jax.tasks import REWARD_TEMPLATES

SAMPLE_FROM = ("query", "candidate")
TRANSFORMS = ("reciprocal", "improvement")


@dataclasses.dataclass(frozen=True)
class RewardExample:
    """One query with the candidate keys to reward.

    `continuations[j]` follows `keys[j]` in the prompt (lrlm: the next chunk of the
    history, empty for the last one); empty strings for the other tasks.
    """
    task: str
    query: str
    answer: str
    keys: tuple
    continuations: tuple
    context: str = ""


def check_reward_task(task):
    if task not in REWARD_TEMPLATES:
        raise ValueError(
            f"task {task!r} has no reward prompt (tasks with a desired output: {', '.join(REWARD_TEMPLATES)}); "
            "tool records carry no answer to score")


def reward_prompt(task, *, query, key=None, continuation="", context=""):
    """The text before the answer: prompt(C, q), or prompt(∅, q) when `key` is None."""
    check_reward_task(task)
    template = REWARD_TEMPLATES[task]["no_key" if key is None else "key"]
    return template.format(query=query, key=key, continuation=continuation, context=context)


def truncate_to_tokens(texts, tokenizer, *, max_tokens):
    """Each text cut to at most `max_tokens` tokens, as an exact prefix of the original.

    Cutting at character offsets (not decoding token ids) keeps the kept text
    byte-identical. The cut goes before the first dropped token, and before the
    end of the last kept one when they share a character (byte-level tokens split
    characters), so the prefix never re-tokenises to more. 0 keeps all.
    """
    texts = list(texts)
    if not max_tokens or not texts:
        return texts
    offsets = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [text if len(spans) <= max_tokens else text[:min(spans[max_tokens - 1][1], spans[max_tokens][0])]
            for text, spans in zip(texts, offsets)]


def key_prompts(examples, tokenizer, *, key_max_tokens):
    """prompt(C_j, q) for every key of every example (keys and continuations truncated)."""
    pieces = list(dict.fromkeys(t for ex in examples for t in (*ex.keys, *ex.continuations)))
    short = dict(zip(pieces, truncate_to_tokens(pieces, tokenizer, max_tokens=key_max_tokens)))
    return [[reward_prompt(ex.task, query=ex.query, key=short[key], continuation=short[cont], context=ex.context)
             for key, cont in zip(ex.keys, ex.continuations)]
            for ex in examples]


def loglik_pairs(lm, pairs, *, batch_size, max_length):
    """Mean answer log-likelihood of each (prompt, answer) pair; each distinct pair is scored once."""
    return LoglikMemo(lm).loglik([p for p, _ in pairs], [a for _, a in pairs], batch_size=batch_size,
                                 max_length=max_length)


class LoglikMemo:
    """An LLM whose `loglik` scores each (prompt, answer, max_length) once across calls.

    Evaluation rows that retrieve the same chunk for a sample build the same prompt:
    the rows of one run then share that LLM pass. Everything else goes to the wrapped LLM.
    """

    def __init__(self, lm):
        self._lm, self._scores = lm, {}

    def __getattr__(self, name):
        return getattr(self._lm, name)

    def loglik(self, prompts, answers, *, batch_size=16, max_length=None):
        from llm_embedder_jax.llm import check_pairs
        prompts, answers = check_pairs(prompts, answers)  # before zipping drops the unpaired
        keys = [(p, a, max_length) for p, a in zip(prompts, answers)]
        missing = list(dict.fromkeys(k for k in keys if k not in self._scores))
        if missing:
            scores = self._lm.loglik([p for p, _, _ in missing], [a for _, a, _ in missing],
                                     batch_size=batch_size, max_length=max_length)
            self._scores.update(zip(missing, np.asarray(scores, np.float32).tolist()))
        return np.array([self._scores[k] for k in keys], np.float32)


def _split(flat, sizes):
    return np.split(flat, np.cumsum(sizes)[:-1]) if sizes else []


def likelihood_rewards(lm, examples, *, key_max_tokens=512, batch_size=16, max_length=None):
    """r(C) per key of every example: a list of float32 arrays, one per example."""
    prompts = key_prompts(examples, lm.tokenizer, key_max_tokens=key_max_tokens)
    pairs = [(p, ex.answer) for ex, ps in zip(examples, prompts) for p in ps]
    return _split(loglik_pairs(lm, pairs, batch_size=batch_size, max_length=max_length), [len(ps) for ps in prompts])


def normalize_whitespace(text):
    return " ".join(text.split())


def sample_mask(samples, answer):
    """Which samples rank against `answer`: not equal to it after whitespace normalisation, not empty."""
    target = normalize_whitespace(answer)
    return np.array([normalize_whitespace(s) not in ("", target) for s in samples], bool)


def answer_ranks(answer_scores, sample_scores, sample_mask):
    """1 + #{kept n : s(O_n) > s(O*)}.

    answer_scores [...], sample_scores and sample_mask [..., N]; a tie ranks the
    answer first, masked samples never count.
    """
    return 1 + ((sample_scores > answer_scores[..., None]) & sample_mask).sum(-1)


def check_transform(transform):
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown rank transform {transform!r}: expected one of {', '.join(TRANSFORMS)}")


def check_sample_from(sample_from):
    if sample_from not in SAMPLE_FROM:
        raise ValueError(f"unknown sample_from {sample_from!r}: expected one of {', '.join(SAMPLE_FROM)}")


def rank_rewards(ranks, *, transform="reciprocal", ranks_without_key=None):
    """R(C) from rank_C: `reciprocal` 1/rank_C, or `improvement` rank_∅ − rank_C (broadcast)."""
    check_transform(transform)
    if transform == "reciprocal":
        return 1.0 / ranks
    if ranks_without_key is None:
        raise ValueError("the improvement transform needs ranks_without_key (rank_∅)")
    return ranks_without_key - ranks


def rank_aware_rewards(lm, examples, *, num_samples=10, sample_from="query", transform="reciprocal",
                       max_new_tokens=32, temperature=1.0, top_p=1.0, seed=0,
                       key_max_tokens=512, batch_size=16, max_length=None):
    """(rewards, ranks) per example, each an array over its keys.

    Every "slot" (a key, plus the no-key prompt when the transform needs rank_∅)
    ranks O* among a sample set: one set per query drawn from prompt(∅, q)
    (`sample_from="query"`), or one per slot drawn from that slot's own prompt
    (`"candidate"`). All likelihoods go to the LLM in one call, so its length
    batching sees every pair at once.
    """
    check_sample_from(sample_from)
    check_transform(transform)
    with_base = transform == "improvement"
    prompts = key_prompts(examples, lm.tokenizer, key_max_tokens=key_max_tokens)
    base_prompts = [reward_prompt(ex.task, query=ex.query, context=ex.context) for ex in examples]
    # Slots in example order; an example's base slot, when present, comes after its keys.
    slots = [(i, p) for i, ps in enumerate(prompts) for p in ps + ([base_prompts[i]] if with_base else [])]
    sampling = dict(n=num_samples, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                    batch_size=batch_size, max_length=max_length)
    if sample_from == "query":
        per_query = lm.sample(base_prompts, **sampling)
        samples = [per_query[i] for i, _ in slots]
    else:
        samples = lm.sample([p for _, p in slots], **sampling)

    masks = np.zeros((len(slots), num_samples), bool)
    pairs = []
    for s, ((i, prompt), outs) in enumerate(zip(slots, samples)):
        masks[s, :len(outs)] = sample_mask(outs, examples[i].answer)
        pairs.append((prompt, examples[i].answer))
        pairs.extend((prompt, o) for o, keep in zip(outs, masks[s]) if keep)
    flat = loglik_pairs(lm, pairs, batch_size=batch_size, max_length=max_length)

    answer_scores = np.zeros(len(slots), np.float32)
    sample_scores = np.zeros((len(slots), num_samples), np.float32)
    start = 0
    for s in range(len(slots)):
        kept = int(masks[s].sum())
        answer_scores[s] = flat[start]
        sample_scores[s, masks[s]] = flat[start + 1:start + 1 + kept]
        start += 1 + kept
    ranks = answer_ranks(answer_scores, sample_scores, masks)

    results = []
    start = 0
    for ps in prompts:
        key_ranks = ranks[start:start + len(ps)]
        base = ranks[start + len(ps)] if with_base else None
        rewards = rank_rewards(key_ranks, transform=transform, ranks_without_key=base)
        results.append((np.asarray(rewards, np.float32), key_ranks))
        start += len(ps) + with_base
    return results
