"""Teacher scores from a reward LLM for JSONL training data (`--mode=score`).

  python main.py --mode=score --config=configs/score.py --workdir=runs/score
  python main.py --mode=score --config=configs/score.py:rank --workdir=runs/score_rank
  python main.py --mode=score --config=configs/score.py --workdir=runs/my_qa \
      --config.inputs="('data/qa.jsonl',)" --config.llm=/models/Llama-2-7b-chat-hf \
      --config.dtype=bfloat16 --config.model_parallel=2 --config.batch_size=64

Variants: the default (also `:toy`) scores the toy qa, convsearch, chat and lrlm files
under ../shared/data/llm_embedder_toy with the likelihood reward of the bundled
SmolLM2-135M-Instruct; `:rank` uses the rank-aware reward instead. The toy icl and
tool files carry no `answers`, so they cannot be scored as they are: the job names
their first line and the missing field (or, with skip_bad_records=True, counts them).
"""
import ml_collections

from configs.common import TOY_DIR


def get_config(arg=None):
    variant = arg or "toy"
    if variant not in ("toy", "rank"):
        raise ValueError(f"unknown variant {variant!r} of configs/score.py: expected 'toy' (the default) or 'rank'")
    config = ml_collections.ConfigDict()
    config.mode = "score"
    config.workdir = "runs/score"  # used when --workdir is not given
    # JSONL files in the training format (query, pos/neg or history, answers, task, ...);
    # each gives workdir/<its name>, so names must differ.
    config.inputs = tuple(str(TOY_DIR / f"{task}.json") for task in ("qa", "convsearch", "chat", "lrlm"))
    config.task = ""  # task of records without a `task` field ("" = such records are errors)
    config.llm = "smollm2"  # reward LLM: HF folder or .gguf file; "smollm2" = the bundled SmolLM2-135M-Instruct GGUF
    config.dtype = "float32"  # LLM compute dtype: float32, or bfloat16 on TPU/GPU
    config.model_parallel = 1  # devices per LLM copy (tensor parallel), for an LLM too big for one device
    config.batch_size = 16  # (prompt, answer) pairs per LLM forward, over all local devices
    config.max_length = 0  # cap on prompt + answer tokens (0 = the LLM's own limit)
    config.key_max_tokens = 512  # candidate keys are cut to this many LLM tokens (0 = no cut)
    config.max_candidates = 0  # score only the first N candidates of pos + neg / history, and cut
    # those lists (and the lists aligned with them) in the output to match (0 = all)
    config.reward = "rank" if variant == "rank" else "likelihood"  # "likelihood" (§2.1) or "rank" (§2.2)
    config.seed = 0  # draws the answer of records with several, and the rank-aware samples
    config.shard_size = 64  # records per resumable shard (workdir/shards/<file stem>/00000.jsonl ...)
    config.skip_bad_records = False  # True: count and report bad records instead of stopping at the first

    config.rank = ml_collections.ConfigDict()  # options of the rank-aware reward (config.reward = "rank")
    config.rank.num_samples = 10  # N sampled outputs the desired output is ranked among
    config.rank.sample_from = "query"  # "query": one sample set per query, from the prompt without a key;
    # "candidate": one sample set per candidate, from that candidate's prompt
    config.rank.transform = "reciprocal"  # "reciprocal": 1/rank_C; "improvement": rank_∅ − rank_C
    config.rank.max_new_tokens = 32  # length cap of each sample
    config.rank.temperature = 1.0  # sampling temperature
    config.rank.top_p = 1.0  # nucleus sampling threshold (1.0 = off)
    return config
