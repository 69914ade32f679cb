"""The default config of main.py: score → train → evaluate → export on real source code.

  python main.py --workdir=runs/demo                                   # the standard library, 2-core CPU, ~18 min
  python main.py --workdir=runs/demo --config.seeds=3                  # + two more training seeds
  python main.py --config=configs/demo.py:quick --workdir=runs/quick   # about a minute (CI)
  python main.py --config=configs/demo.py:full --workdir=runs/full     # one GPU
  python main.py --workdir=runs/mine --config.data.source=/path/to/code --config.data.pattern="*.go"

Long-range language modelling: the LLM predicts the next chunk of a source file
from the current one, and the retriever picks one earlier chunk of the same
file (read with the chunk after it) to put in front. Samples come from
`data.source` (`data/code_lrlm.py`), the bundled SmolLM2-135M-Instruct rewards
each candidate chunk of the training files, the bundled all-MiniLM-L6-v2 is
fine-tuned on those rewards with the lrlm recipe (KL distillation, T_teacher
0.1), and held-out files measure the LLM's perplexity of the next chunk with
the top-1 retrieved chunk (and its continuation) in the prompt: no retrieval,
BM25, the encoder before and after training. Stages are cached under the workdir (data/, score/, train/, eval/):
a rerun skips what is done.

Variants (comma-separated): `quick` (a handful of files, for CI), `full`
(sized for one GPU), `rank` (the rank-aware reward instead of the likelihood).
"""
import ml_collections

from configs import llm_embedder, score

VARIANTS = ("quick", "full", "rank")


def get_config(arg=None):
    variants = [v for v in (arg or "").split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or ("quick" in variants and "full" in variants):
        raise ValueError(f"unknown or conflicting variant(s) {variants} of configs/demo.py: expected any of "
                         f"{', '.join(VARIANTS)} ('quick' and 'full' exclusive)")
    config = ml_collections.ConfigDict()
    config.mode = "demo"
    config.workdir = "runs/demo"  # used when --workdir is not given
    config.seeds = 1  # training seeds (train.seed, +1, ...) sharing the same scored data; the report gives mean ± std
    # Every retriever (BM25 and the encoder before and after training) reads each candidate
    # chunk joined with the chunk after it, the text the LLM then gets (tasks.keys_with_continuation).
    # What a candidate is worth follows mostly what its continuation shares with the answer; with
    # the chunk alone the encoder cannot see that part, and training barely moved the held-out
    # perplexity (README, "The main job").
    config.key_with_continuation = True

    # --- data (data/code_lrlm.py): chunks of source files, split by file ---
    config.data = ml_collections.ConfigDict()
    config.data.source = "stdlib"  # a folder, a glob ("src/**/*.py"), or "stdlib" (this Python's standard library)
    config.data.pattern = "*.py"  # files taken below a folder source
    config.data.exclude_dirs = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__")
    config.data.tokenizer = "smollm2"  # tokenizer that measures chunks: the reward LLM's
    config.data.chunk_tokens = 32  # LLM tokens per chunk (query, answer and each candidate)
    config.data.context_chunks = 1  # chunks right before the query, always in the prompt (not candidates)
    config.data.gap_chunks = 1  # chunks between candidates and context, in neither (data/code_lrlm.py says why)
    config.data.validation_fraction = 0.1  # files (by path hash) kept out of train and test, for tuning
    config.data.test_fraction = 0.1  # files (by path hash) held out for the evaluation
    # Per split: files with samples (in path-hash order; 0 = all), query positions per file,
    # candidates per query (the nearest earlier chunks; a position needs at least min_candidates).
    # Scoring costs one LLM pass per train candidate; evaluating one pass per test query and
    # retriever (rows that pick the same chunk share it). Training takes one query per file from
    # every train file: samples of one file share its names and idioms, and an encoder fitted to a
    # few files learns those rather than what helps the LLM on files it has not seen. The test split
    # is as large as the 20-minute budget allows (627 samples from Python 3.11's standard library).
    config.data.train = ml_collections.ConfigDict(dict(max_files=0, max_samples_per_file=1, min_candidates=8,
                                                       max_candidates=8))
    config.data.test = ml_collections.ConfigDict(dict(max_files=0, max_samples_per_file=12, min_candidates=8,
                                                      max_candidates=8))

    # --- teacher scores of the train split (score.py); its LLM also measures the perplexities ---
    config.score = score.get_config("rank" if "rank" in variants else "toy")
    config.score.inputs = ()  # filled by the demo: data/train.jsonl
    config.score.batch_size = 16

    # --- training (train.py), the lrlm recipe of configs/llm_embedder.py ---
    config.train = llm_embedder.get_config("tiny,lrlm")
    config.train.datasets[0].name = "code"
    config.train.datasets[0].path = "train.jsonl"  # under the score stage's folder (filled by the demo)
    config.train.eval_files = []  # held-out files are judged by the LLM in the eval stage instead
    config.train.eval_every = 0
    config.train.global_batch_size = 8
    config.train.group_size = 8  # candidates per query in the KL distillation (repeated when fewer)
    config.train.query_max_len = 96
    config.train.key_max_len = 160  # a chunk and its continuation: 64 LLM tokens of code
    # ~2 epochs over the train queries at a gentle rate, with τ = 0.02 (MiniLM's cosines of
    # neighbouring code chunks are close together): chosen by 2-fold cross-validation over train
    # files; larger rates and more epochs fit the train files and lose on held-out ones.
    config.train.num_steps = 120
    config.train.learning_rate = 2e-5
    config.train.tasks.lrlm.temperature = 0.02
    config.train.log_every = 20
    config.train.checkpoint_every = 120

    # --- evaluation on the test split (evaluate.py) ---
    config.eval = ml_collections.ConfigDict()
    # Rows beside the trained encoder(s): "<name>=<retriever spec>" (search.build_retriever).
    config.eval.retrievers = ("none=none", "bm25=bm25", "untrained=minilm")
    config.eval.k = 1  # retrieved chunks in the prompt (each with the chunk after it)
    config.eval.key_max_tokens = 256  # each retrieved chunk cut to this many LLM tokens (0 = no cut)
    config.eval.batch_size = 16  # prompts per LLM forward
    config.eval.max_length = 0  # prompt + answer tokens (0 = the LLM's own context)
    # Task instructions on queries and keys: "always" gives the encoder before and after training
    # the same inputs (a like-for-like row); "auto" only to folders exported by this project.
    config.eval.instructions = "always"
    config.eval.embed = ml_collections.ConfigDict(dict(batch_size=64, max_length=160))
    config.eval.search = ml_collections.ConfigDict(dict(backend="jax", chunk_size=16384, query_batch=256,
                                                        cache_dir=""))

    if "quick" in variants:
        config.workdir = "runs/demo_quick"
        config.data.train.update(max_files=4, max_samples_per_file=2, min_candidates=2, max_candidates=3)
        config.data.test.update(max_files=3, max_samples_per_file=2, min_candidates=2, max_candidates=4)
        config.train.global_batch_size = 8
        config.train.group_size = 3
        config.train.num_steps = 4
        config.train.log_every = 2
        config.train.checkpoint_every = 4
        config.train.datasets[0].settings.teacher_scores_margin = None  # too few samples to filter any
    if "full" in variants:
        config.workdir = "runs/demo_full"
        config.data.chunk_tokens = 64
        config.data.train.update(max_files=0, max_samples_per_file=8, max_candidates=16)
        config.data.test.update(max_files=0, max_samples_per_file=4, max_candidates=16)  # as many as training sees
        config.score.dtype = "bfloat16"
        config.score.batch_size = 256
        config.train.dtype = "bfloat16"
        config.train.global_batch_size = 64
        config.train.num_steps = 1000
        config.train.query_max_len = 160
        config.train.key_max_len = 320
        config.train.log_every = 50
        config.train.checkpoint_every = 500
        config.eval.batch_size = 256
        config.eval.embed.update(batch_size=256, max_length=320)
    return config
