"""LLM-Embedder's multi-task recipe (the paper's main run), and small variants.

  python main.py --mode=train --config=configs/llm_embedder.py --workdir=gs://bucket/llm_embedder
  python main.py --mode=train --config=configs/llm_embedder.py:tiny --workdir=runs/tiny
  python main.py --mode=train --config=configs/llm_embedder.py:tiny,qa --workdir=runs/tiny_qa

Variants (comma-separated, after the colon):
  tiny      the bundled all-MiniLM-L6-v2 on the six toy files of ../shared/data/llm_embedder_toy,
            CPU-sized (a minute or two)
  <task>    only that task's datasets (qa, convsearch, chat, lrlm, icl, tool)

The full recipe expects `config.model` to point at a BAAI/bge-base-en(-v1.5)
folder and `config.data_dir` at the released training data
(FlagEmbedding `llm_embedder/data/train/...`, in the same JSONL format).
"""
import ml_collections

from configs.common import TOY_DIR
from llm_embedder_jax import tasks


def loss_settings(loss, **overrides):
    """One task's loss (losses.task_loss fields)."""
    settings = ml_collections.ConfigDict(dict(
        loss=loss,                   # "contrastive", "graded" (graded distillation) or "kl"
        temperature=0.01,            # τ of s(q, k) = <q, k> / τ
        reward_temperature=1.0,      # α of the graded weights softmax(R / α)
        teacher_temperature=0.1,     # T_teacher of KL distillation
        student_temperature=1.0,     # T_student of KL distillation
        pin_positive=False,          # graded: keep the labelled positive at rank 0 (released behaviour)
        contrastive_weight=0.2 if loss != "contrastive" else 1.0,  # weight of InfoNCE with in-batch negatives
        distill_weight=1.0,          # weight of the distillation term (ignored for "contrastive")
    ))
    settings.update(overrides)
    return settings


# task -> (loss settings, the release's datasets as (name, file)). How records become samples
# (select_positive, select_negative, filters, max_sample_num) follows the release per task
# (data/samples.py RELEASE_SETTINGS); a dataset's `settings` overrides any of those fields.
RECIPE = {
    "qa": (loss_settings("graded", reward_temperature=1.0), [("msmarco", "qa/msmarco.json"), ("nq", "qa/nq.json")]),
    "icl": (loss_settings("graded"), [("icl", "icl/icl.json")]),
    "chat": (loss_settings("kl", teacher_temperature=0.1), [("msc", "chat/msc.json")]),
    "lrlm": (loss_settings("kl", teacher_temperature=0.1),
             [("books3", "lrlm/books3.json"), ("arxiv", "lrlm/arxiv.json"), ("codeparrot", "lrlm/codeparrot.json")]),
    # ToolBench is listed twice in the release, doubling its share of batches.
    "tool": (loss_settings("contrastive"), [("toolbench", "tool/toolbench.json"), ("toolbench", "tool/toolbench.json")]),
    "convsearch": (loss_settings("contrastive"), [("qrecc", "convsearch/qrecc.json")]),
}


def get_config(arg=None):
    variants = [v for v in (arg or "").split(",") if v]
    unknown = [v for v in variants if v not in ("tiny", *tasks.TASKS)]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown} of configs/llm_embedder.py: "
                         f"expected 'tiny' and/or one of {', '.join(tasks.TASKS)}")
    tiny = "tiny" in variants
    only = [v for v in variants if v in tasks.TASKS]

    config = ml_collections.ConfigDict()
    config.mode = "train"
    config.workdir = "runs/llm_embedder"
    config.seed = 0

    # --- model ---
    config.model = "BAAI/bge-base-en-v1.5"  # encoder folder; empty = the bundled all-MiniLM-L6-v2
    config.dtype = "bfloat16"       # compute dtype; parameters and optimizer state stay float32
    config.remat = "full"           # per-layer rematerialisation: none | full | dots
    config.model_parallel = 1       # size of the mesh's `model` axis (the rest is `data`)

    # --- data ---
    config.data_dir = "data/llm_embedder/train"  # folder the dataset files are relative to
    # Filled below. Each: name, path (relative to data_dir; JSONL or a TFDS folder), task,
    # weight (used when mixture == "weights"), settings (overrides of the task's sample settings).
    config.datasets = []
    config.mixture = "proportional"  # batches "proportional" to dataset size, or by each dataset's "weights"
    config.global_batch_size = 800  # queries per step over all devices (100 per device × 8 in the paper)
    config.group_size = 8           # keys per query: 1 positive + 7 hard negatives
    config.query_max_len = 256
    config.key_max_len = 256
    config.skip_bad_records = False  # count and skip malformed records instead of stopping

    # --- per-task losses ---
    config.tasks = ml_collections.ConfigDict()

    # --- optimisation ---
    config.num_steps = 10000
    config.learning_rate = 5e-6
    config.weight_decay = 0.01
    config.adam_eps = 1e-8
    config.warmup_ratio = 0.1       # linear warm-up over this share of the steps, then linear decay to 0
    config.grad_clip_norm = 1.0
    config.gradcache_chunk = 0      # rows embedded at once under GradCache; 0 = off
    config.on_nonfinite = "skip"    # NaN/Inf loss or gradient: "skip" the step (counted) or "stop"

    # Self-paced per-task learning rates (ACL version; off in the release): every `interval` steps
    # each task's smoothed loss becomes its reference; its LR multiplier is current / reference,
    # clipped to [min_scale, max_scale].
    config.self_paced = ml_collections.ConfigDict(dict(
        enabled=False, interval=1000, smoothing=0.9, min_scale=0.5, max_scale=2.0))

    # --- logging, evaluation, checkpoints ---
    config.log_every = 50
    config.eval_every = 1000        # reranking MRR on held-out samples; 0 = only at the end
    config.eval_samples = 200       # records per eval file
    # Held-out files for that evaluation: name, path (relative to data_dir), task.
    config.eval_files = []
    config.checkpoint_every = 500
    config.stop_after_steps = 0     # end this invocation at this step (checkpointed), to run in stages; 0 = off
    config.keep_checkpoints = 3
    config.export_dir = ""          # where the final encoder is exported; empty = <workdir>/export

    selected = only or list(tasks.TASKS)
    for task in selected:
        losses_cfg, datasets = RECIPE[task]
        config.tasks[task] = losses_cfg.copy_and_resolve_references()  # a copy: RECIPE is shared
        for name, file in datasets:
            config.datasets.append(ml_collections.ConfigDict(dict(
                name=name, path=file, task=task, weight=1.0, settings=ml_collections.ConfigDict())))

    if tiny:
        config.model = ""
        config.data_dir = str(TOY_DIR)
        config.dtype = "float32"
        config.remat = "none"
        config.global_batch_size = 8
        config.group_size = 4
        # Short enough that nearly every toy batch fills its bucket: one shape, few compilations.
        config.query_max_len = 48
        config.key_max_len = 64
        config.num_steps = 24
        config.learning_rate = 5e-5
        config.log_every = 4
        config.eval_every = 12
        config.eval_samples = 8
        config.checkpoint_every = 12
        config.keep_checkpoints = 1
        config.workdir = "runs/tiny"
        # The toy folder has one file per task (8 records each): one dataset per task, tool still twice.
        config.datasets = [ml_collections.ConfigDict(dict(
            name=task if i == 0 else f"{task}_{i + 1}", path=f"{task}.json", task=task, weight=1.0,
            settings=ml_collections.ConfigDict())) for task in selected for i in range(2 if task == "tool" else 1)]
        # Too few toy records to hold any out: the evaluation re-ranks training records (a fit check).
        config.eval_files = [ml_collections.ConfigDict(dict(name=task, path=f"{task}.json", task=task))
                             for task in selected if task in ("chat", "icl")]
    return config
