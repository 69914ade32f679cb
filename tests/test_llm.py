"""The causal LM against PyTorch transformers: GGUF SmolLM2-135M, tiny random HF folders, sharding."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from llm_embedder_jax import RewardLM, llm, sharding

# One intra-op thread: with XLA's threads on the same few cores, more only spin and wait.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def smollm(smollm2_gguf):
    return RewardLM.from_pretrained(smollm2_gguf)


@pytest.fixture(scope="module")
def torch_smollm(smollm2_gguf):
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return model.eval()


@pytest.fixture(scope="module")
def pairs(real_texts):
    """Varied (prompt, answer) pairs: real docstrings, templates of the method, non-ASCII, long."""
    rag = "Knowledge: Paris is the capital of France.\n\nQuestion: What is the capital of France?\n\nAnswer:"
    pairs = [
        # One prompt, five answers: scored from one prompt cache, split over two batches of four.
        (rag, " Paris"), (rag, " London, surely."), (rag, " The capital of France is Paris."), (rag, " Lyon"),
        (rag, " I do not know."),
        ("Speaker 1: Wie geht es dir heute?\nSpeaker 2:", " Sehr gut, danke! Und dir?"),
        ("東京は日本の首都です。質問：日本の首都は？\n答え：", "東京"),
        ("Ünïcödé naïve café — résumé:", " déjà vu 🎉"),
        ("x", " y"),
        ("def add(a, b):\n", "    return a + b\n"),
    ]
    for i, doc in enumerate(real_texts[:14]):
        words = doc.split()
        cut = min(25, max(1, len(words) // 2))
        answer = " " + " ".join(words[cut:cut + 3 + i % 7])
        pairs.append((" ".join(words[:cut])[:200], answer if answer.strip() else " ok"))
    long_docs = sorted(real_texts, key=len)[-2:]
    pairs += [(doc[:700], " and that is all.") for doc in long_docs]  # ~150-200 tokens each
    return pairs


def torch_loglik(model, tokenizer, prompt_ids, answer):
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([list(prompt_ids) + answer_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), -1)
    start = len(prompt_ids)
    return float(np.mean([logprobs[start + j - 1, t].item() for j, t in enumerate(answer_ids)]))


def test_loglik_matches_transformers(smollm, torch_smollm, pairs):
    prompts, answers = zip(*pairs)
    ours = smollm.loglik(list(prompts), list(answers), batch_size=4)
    assert ours.dtype == np.float32 and ours.shape == (len(pairs),)
    reference = np.array([torch_loglik(torch_smollm, smollm.tokenizer, smollm.tokenizer(p)["input_ids"], a)
                          for p, a in pairs])
    assert np.abs(ours - reference).max() < 1e-3
    assert len(set(np.round(reference, 2))) > len(pairs) // 2  # the pairs really differ


def test_loglik_truncates_the_prompt_from_the_left(smollm, torch_smollm, pairs):
    prompt, answer = pairs[-1]
    prompt_ids = smollm.tokenizer(prompt)["input_ids"]
    answer_len = len(smollm.tokenizer(answer, add_special_tokens=False)["input_ids"])
    max_length = 40
    assert len(prompt_ids) + answer_len > max_length
    ours = smollm.loglik([prompt], [answer], max_length=max_length)[0]
    kept = prompt_ids[len(prompt_ids) + answer_len - max_length:]
    assert abs(ours - torch_loglik(torch_smollm, smollm.tokenizer, kept, answer)) < 1e-3


def test_greedy_decoding_matches_transformers(smollm, torch_smollm):
    prompts = ["The capital of France is", "def fibonacci(n):", "Ünïcödé text: 日本語の"]
    ours = smollm.sample_tokens(prompts, n=1, max_new_tokens=16, temperature=0)
    for prompt, (tokens,) in zip(prompts, ours):
        ids = torch.tensor([smollm.tokenizer(prompt)["input_ids"]])
        expected = torch_smollm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=16)[0, ids.shape[1]:].tolist()
        expected = expected[:expected.index(2)] if 2 in expected else expected  # EOS of SmolLM2
        assert tokens == expected


def test_sampling_is_reproducible_by_seed(smollm):
    prompts = ["Tell me a story about a dragon.", "List three colours:"]
    first = smollm.sample(prompts, n=3, max_new_tokens=8, seed=0)
    assert len(first) == 2 and all(len(outputs) == 3 for outputs in first)
    assert all(isinstance(text, str) for outputs in first for text in outputs)
    # Per-(prompt, sample) keys: batching does not change the draws.
    assert smollm.sample(prompts, n=3, max_new_tokens=8, seed=0, batch_size=3) == first
    assert smollm.sample(prompts, n=3, max_new_tokens=8, seed=1) != first
    assert len(set(first[0])) > 1  # samples of one prompt differ
    nucleus = smollm.sample(prompts, n=3, max_new_tokens=8, seed=0, top_p=0.05)
    assert all(len(set(outputs)) == 1 for outputs in nucleus)  # a tiny nucleus is the greedy path


def test_top_p_keeps_the_smallest_sufficient_set():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.asarray(llm._top_p_filter(logits, 0.7)) > -1e30
    np.testing.assert_array_equal(kept, [[True, True, False, False]])
    kept = np.asarray(llm._top_p_filter(logits, 0.5)) > -1e30
    np.testing.assert_array_equal(kept, [[True, False, False, False]])


def test_sharded_matches_single_device(smollm, pairs):
    mesh = sharding.make_mesh(model_parallel=2)  # data=4, model=2
    sharded = RewardLM(params=smollm.params, config=smollm.config, tokenizer=smollm.tokenizer, mesh=mesh,
                       eos_ids=smollm.eos_ids)
    assert sharded.params["layers"]["q"].sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
    prompts, answers = map(list, zip(*pairs[3:11]))  # two share a prompt
    np.testing.assert_allclose(sharded.loglik(prompts, answers, batch_size=8),
                               smollm.loglik(prompts, answers, batch_size=8), atol=1e-4)
    greedy = dict(n=1, max_new_tokens=8, temperature=0)
    assert sharded.sample_tokens(prompts[:3], **greedy) == smollm.sample_tokens(prompts[:3], **greedy)


def tiny_torch_llama(kind):
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=97, max_position_embeddings=128, rms_norm_eps=1e-6)
    if kind == "qwen2":
        config = transformers.Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        rope = {"rope_theta": 5000.0, "rope_type": "default"}
        if kind == "llama3-rope":
            rope = {"rope_theta": 5000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        config = transformers.LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default init, so that the layers matter
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-sharded-files", "llama3-rope", "qwen2"])
def test_hf_folder_logits_match_torch(tmp_path, kind):
    model = tiny_torch_llama(kind)
    model.save_pretrained(tmp_path, safe_serialization=True,
                          **({"max_shard_size": "20KB"} if kind == "llama-sharded-files" else {}))
    if kind == "llama-sharded-files":
        assert (tmp_path / "model.safetensors.index.json").exists()
    config, params = llm.load_params(tmp_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 97, (3, 24)).astype(np.int32)
    mask = (np.arange(24)[None] < np.array([[24], [17], [5]])).astype(np.int32)
    ours = np.asarray(jax.jit(llm.forward, static_argnames="config")(jax.device_put(params), ids, mask,
                                                                      config=config))
    with torch.no_grad():
        reference = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    for row, length in enumerate(mask.sum(1)):
        np.testing.assert_allclose(ours[row, :length], reference[row, :length], atol=1e-4)
    logprobs = np.asarray(llm.token_logprobs(params, ids, mask, config=config))
    expected = torch.log_softmax(torch.tensor(reference[:, :-1]), -1).gather(
        -1, torch.tensor(ids[:, 1:, None], dtype=torch.long))[..., 0].numpy()
    np.testing.assert_allclose(logprobs, np.where(mask[:, 1:] > 0, expected, 0), atol=1e-4)


def test_reward_lm_from_hf_folder_with_tokenizer(tmp_path, smollm):
    """End to end through a folder: safetensors, tokenizer files, bfloat16."""
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=49152,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    smollm.tokenizer.save_pretrained(tmp_path)
    lm = RewardLM.from_pretrained(tmp_path)
    prompts, answers = ["The answer is", "Ünïcödé"], [" forty-two", " ok"]
    reference = [torch_loglik(model, lm.tokenizer, lm.tokenizer(p)["input_ids"], a) for p, a in zip(prompts, answers)]
    np.testing.assert_allclose(lm.loglik(prompts, answers), reference, atol=1e-4)
    half = RewardLM.from_pretrained(tmp_path, dtype="bfloat16")
    assert half.params["embed"].dtype == jnp.bfloat16
    np.testing.assert_allclose(half.loglik(prompts, answers), reference, atol=0.05)


def test_bad_input_gives_clear_errors(tmp_path, smollm):
    with pytest.raises(FileNotFoundError, match="no such file"):
        RewardLM.from_pretrained(tmp_path / "missing.gguf")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(ValueError, match=r"config\.json: field 'model_type' is 'gpt2'"):
        RewardLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        smollm.loglik(["a", "b"], ["c"])
    with pytest.raises(ValueError, match=r"answers\[1\] is empty"):
        smollm.loglik(["a", "b"], [" c", ""])
    with pytest.raises(TypeError, match=r"prompts\[0\] is a int"):
        smollm.loglik([3], [" c"])
    with pytest.raises(TypeError, match="not a single str"):
        smollm.sample("one prompt")
    assert smollm.loglik([], []).shape == (0,) and smollm.sample([]) == []
