"""Evaluate retrievers by what they do for the LLM (`--mode=eval`).

  python main.py --mode=eval --config=configs/eval.py:toy --workdir=runs/eval
  python main.py --mode=eval --config=configs/eval.py --workdir=runs/eval_mine \
      --config.retrievers="('mine=runs/train/export', 'minilm', 'bm25', 'none', 'recency')"

Writes workdir/eval.json (every metric of every retriever on every file) and
workdir/eval.png (the main metric of each file, one bar per retriever), and
prints a markdown table.

Variants: the default (also `:toy`) evaluates all six toy files under
../shared/data/llm_embedder_toy with the bundled all-MiniLM-L6-v2 against BM25,
no retrieval and recency, the reward LLM being the bundled SmolLM2-135M-Instruct.
"""
import ml_collections

from configs.common import TOY_DIR



def get_config(arg=None):
    variant = arg or "toy"
    if variant != "toy":
        raise ValueError(f"unknown variant {variant!r} of configs/eval.py: expected 'toy' (the default)")
    config = ml_collections.ConfigDict()
    config.mode = "eval"
    config.workdir = "runs/eval"  # used when --workdir is not given
    # JSONL files in the training format; each is evaluated with the task of its records.
    config.files = tuple(str(TOY_DIR / f"{task}.json") for task in ("qa", "icl", "lrlm", "chat", "tool", "convsearch"))
    config.task = ""  # task of records without a `task` field ("" = such records are errors)
    config.max_records = 0  # records per file (the first N; 0 = all)
    config.skip_bad_records = False  # True: count and log bad lines instead of stopping at the first
    # Retrievers, compared side by side: "minilm" (bundled all-MiniLM-L6-v2), an exported model
    # folder, "bm25", "none" (no retrieval: qa, icl, lrlm, chat) or "recency" (the latest
    # candidates: lrlm, chat); "<name>=<spec>" names one in the table.
    config.retrievers = ("minilm", "bm25", "none", "recency")
    # Task instructions on queries and keys: "auto" (when the folder was exported by this
    # project, which records them as sentence-transformers prompts), "always" or "never".
    config.instructions = "auto"
    # Extra corpora for the tasks evaluated by corpus search (qa, tool, convsearch), as
    # "<task>=<file>" (.txt: one text a line; .jsonl: field "text"); it must hold every
    # positive. Without one, a task's corpus is the distinct pos + neg texts of its file.
    config.corpora = ()
    config.ks = (1, 5, 10)  # cut-offs of MRR@k, Recall@k, NDCG@k; the largest is the headline
    config.k = ml_collections.ConfigDict()  # retrieved texts put into the prompt, per task
    config.k.qa = 3  # passages
    config.k.icl = 3  # in-context examples
    config.k.lrlm = 1  # earlier chunks (each with the chunk after it)
    config.k.chat = 1  # history turns
    # icl records without `answers` whose query carries no "\n<answer>" (like the toy file):
    # True holds out each record's first positive as the query and scores the rest as its pool.
    config.icl_holdout = True

    config.llm = "smollm2"  # reward LLM: HF folder or .gguf file; "smollm2" = the bundled SmolLM2-135M-Instruct
    config.dtype = "float32"  # LLM compute dtype: float32, or bfloat16 on TPU/GPU
    config.model_parallel = 1  # devices per LLM copy (tensor parallel), for an LLM too big for one device
    config.batch_size = 16  # prompts per LLM forward, over all local devices
    config.max_length = 0  # cap on prompt + answer tokens (0 = the LLM's own context)
    config.key_max_tokens = 256  # each retrieved text is cut to this many LLM tokens (0 = no cut)
    # lrlm: rank each history chunk joined with the one after it, the text the LLM then gets
    # (samples.SampleSettings.key_with_continuation). "auto": as the compared encoders were trained
    # (their exports record it), plain chunks when none says; "true" / "false" for every retriever.
    config.key_with_continuation = "auto"
    config.max_new_tokens = 32  # greedy output length of qa and icl answers

    config.embed = ml_collections.ConfigDict()  # how embedding retrievers encode
    config.embed.batch_size = 256  # texts per encoder forward
    config.embed.max_length = 256  # tokens per text, capped by the model's own limit

    config.search = ml_collections.ConfigDict()  # corpus search of embedding retrievers
    config.search.backend = "jax"  # "jax": exact, sharded over every device; "faiss": exact IndexFlatIP (needs faiss)
    config.search.chunk_size = 16384  # corpus rows scored at once per device (bounds memory: queries x chunk)
    config.search.query_batch = 256  # queries per search call
    config.search.cache_dir = ""  # corpus embeddings cache (.npy per model + corpus); "" = workdir/embedding_cache
    return config
