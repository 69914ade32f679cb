"""Multi-task fine-tuning of the encoder from LLM rewards and hard labels.

`train_step` is the one jitted, donated step: embed queries and keys (tied
encoder, bf16 compute over float32 master weights), the loss of the batch's
task, AdamW with warm-up/decay and clipping, the task's self-paced LR
multiplier, and a non-finite guard. Everything with side effects — data,
checkpoints, metrics, evaluation, export — lives in `train_and_evaluate`.
"""
import dataclasses
import functools
import json
import logging
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm_embedder_jax import atomic, encoder, export, gradcache, losses, paths, sharding, tasks

TASK_INDEX = {task: i for i, task in enumerate(tasks.TASKS)}
STEP_LOG = "metrics"  # in the workdir: one JSON line per step across restarts, a file per checkpoint interval


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Everything static about a step: one compiled step per distinct value."""
    model_config: encoder.EncoderConfig
    loss: tuple                     # sorted (field, value) pairs of the task's loss settings
    dtype: str = "float32"
    remat: str = "none"
    gradcache_chunk: int = 0
    self_paced: tuple = ()          # sorted (field, value) pairs; empty = off


def make_optimizer(config):
    warmup = int(config.num_steps * config.warmup_ratio)
    schedule = optax.join_schedules([
        optax.linear_schedule(0.0, config.learning_rate, max(warmup, 1)),
        optax.linear_schedule(config.learning_rate, 0.0, max(config.num_steps - warmup, 1)),
    ], [warmup])
    chain = [optax.adamw(schedule, eps=config.adam_eps, weight_decay=config.weight_decay)]
    if config.grad_clip_norm:
        chain.insert(0, optax.clip_by_global_norm(config.grad_clip_norm))
    return optax.chain(*chain), schedule


def init_state(params, tx):
    num_tasks = len(tasks.TASKS)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        # Self-paced scheduling: smoothed loss and reference loss per task (0 = not seen yet).
        "task_loss_ema": jnp.zeros((num_tasks,), jnp.float32),
        "task_loss_ref": jnp.zeros((num_tasks,), jnp.float32),
        "nonfinite_steps": jnp.zeros((), jnp.int32),
    }


def _embed_fn(settings):
    dtype = export.DTYPES[settings.dtype]
    return lambda params, inputs: encoder.embed(params, inputs["ids"], inputs["mask"], config=settings.model_config,
                                                dtype=dtype, remat=settings.remat)


def _loss_and_grads(params, batch, settings):
    loss_settings = dict(settings.loss)
    loss_fn = lambda q, k, teacher: losses.task_loss(q, k, teacher, settings=loss_settings)
    embed_fn = _embed_fn(settings)
    queries = {"ids": batch["query_ids"], "mask": batch["query_mask"]}
    keys = {"ids": batch["key_ids"], "mask": batch["key_mask"]}
    if settings.gradcache_chunk:
        rows = batch["query_ids"].shape[0]
        group = batch["key_ids"].shape[0] // rows
        value_and_grad = gradcache.value_and_grad(embed_fn, loss_fn, chunk_size=settings.gradcache_chunk * group,
                                                  query_chunk_size=settings.gradcache_chunk)
        return value_and_grad(params, queries, keys, batch["teacher_scores"])
    full_loss = lambda p: loss_fn(embed_fn(p, queries), embed_fn(p, keys), batch["teacher_scores"])
    return jax.value_and_grad(full_loss)(params)


def _self_paced_update(state, task_id, loss, settings):
    """New (ema, ref) per task and this task's LR multiplier."""
    ema, ref = state["task_loss_ema"], state["task_loss_ref"]
    if not settings.self_paced:
        return ema, ref, jnp.ones((), jnp.float32)
    sp = dict(settings.self_paced)
    seen = ema[task_id] > 0
    smoothed = jnp.where(seen, sp["smoothing"] * ema[task_id] + (1 - sp["smoothing"]) * loss, loss)
    ema = ema.at[task_id].set(smoothed)
    # The first value and then every `interval` steps the smoothed loss becomes the reference.
    refresh = (state["step"] % sp["interval"] == 0) | (ref == 0)
    ref = jnp.where(refresh & (ema > 0), ema, ref)
    scale = jnp.clip(ema[task_id] / jnp.maximum(ref[task_id], 1e-12), sp["min_scale"], sp["max_scale"])
    return ema, ref, scale


@functools.partial(jax.jit, static_argnames=("settings", "tx"), donate_argnames=("state",))
def train_step(state, batch, task_id, *, settings, tx):
    """One optimisation step on one homogeneous batch. Returns (state, metrics)."""
    loss, grads = _loss_and_grads(state["params"], batch, settings)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step must not touch the weights or the optimizer moments.
    grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
    ema, ref, scale = _self_paced_update(state, task_id, jnp.where(finite, loss, 0.0), settings)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], jax.tree.map(lambda u: u * scale, updates))
    # A finite gradient can still overflow the weights (a learning rate far too large): skip that too.
    finite = finite & jnp.isfinite(optax.tree.norm(params))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {
        "step": state["step"] + 1,
        "params": keep(params, state["params"]),
        "opt_state": keep(opt_state, state["opt_state"]),
        "task_loss_ema": jnp.where(finite, ema, state["task_loss_ema"]),
        "task_loss_ref": jnp.where(finite, ref, state["task_loss_ref"]),
        "nonfinite_steps": state["nonfinite_steps"] + (~finite).astype(jnp.int32),
    }
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite, "lr_scale": scale}


def step_settings(config, model_config, task):
    loss = config.tasks[task].to_dict()
    return StepSettings(
        model_config=model_config,
        loss=tuple(sorted(loss.items())),
        dtype=config.dtype,
        remat=config.remat,
        gradcache_chunk=config.gradcache_chunk,
        self_paced=tuple(sorted(config.self_paced.to_dict().items())) if config.self_paced.enabled else (),
    )


def rerank_eval(embedder, eval_sets, *, max_length):
    """Reranking MRR@10 per eval set: each query ranks its own candidates."""
    from llm_embedder_jax import evaluate
    results = {}
    for name, (task, samples) in eval_sets.items():
        queries = embedder.encode([s["query"] for s in samples], kind="query", task=task, max_length=max_length)
        scores, relevance = [], []
        for query, sample in zip(queries, samples):
            keys = embedder.encode(sample["candidates"], kind="key", task=task, max_length=max_length)
            scores.append(keys @ query)
            relevance.append(sample["relevance"])
        metrics = evaluate.rerank_metrics(scores, relevance, ks=(10,))
        results[name] = metrics["mrr@10"]
    return results


def load_eval_sets(config):
    """Held-out records as {name: (task, [{"query", "candidates", "relevance"}])}.

    Relevance is the labelled positives; where a task has none (chat, lrlm) it is
    the candidate the LLM rewarded most.
    """
    from llm_embedder_jax.data import records
    sets = {}
    for spec in config.eval_files:
        path = paths.as_path(config.data_dir) / spec.path
        samples, unlabelled = [], 0
        for record in records.read_jsonl(path, task=spec.task, skip_bad=config.skip_bad_records):
            cands, num_pos = records.candidates(record)
            relevance = np.zeros(len(cands), np.float32)
            if num_pos:
                relevance[:num_pos] = 1.0
            elif record["teacher_scores"] is not None:
                relevance[int(np.argmax(record["teacher_scores"]))] = 1.0
            else:
                unlabelled += 1
                continue
            samples.append({"query": record["query"], "candidates": cands, "relevance": relevance})
            if len(samples) >= config.eval_samples:
                break
        if unlabelled:
            logging.warning("%s: %d records have neither positives nor teacher_scores; not evaluated", path, unlabelled)
        if not samples:
            raise ValueError(f"eval file {path}: no record with positives or teacher_scores to evaluate")
        sets[spec.name] = (spec.task, samples)
    return sets


def train_datasets(config):
    """The pipeline's dataset entries: paths under data_dir, weights only for a weighted mixture."""
    if config.mixture not in ("proportional", "weights"):
        raise ValueError(f"config.mixture={config.mixture!r}: expected 'proportional' or 'weights'")
    entries = []
    for dataset in config.datasets:
        entry = dict(name=dataset.name, path=str(paths.as_path(config.data_dir) / dataset.path), task=dataset.task,
                     settings=dataset.settings.to_dict(), skip_bad=config.skip_bad_records)
        if config.mixture == "weights":
            entry["weight"] = dataset.weight
        entries.append(entry)
    return entries


def _training_facts(config):
    """What the export records for its users: how the lrlm keys were formed, when every lrlm
    dataset formed them alike (the eval mode then forms its keys the same way)."""
    from llm_embedder_jax.data import samples as sample_settings
    modes = {sample_settings.task_settings("lrlm", d.settings).key_with_continuation
             for d in config.datasets if d.task == "lrlm"}
    return {"lrlm_key_with_continuation": modes.pop()} if len(modes) == 1 else None


class _Preemption:
    """SIGTERM (a preemption notice) stops the loop at a step boundary, where it saves and returns.

    One process: a signal handler sets a flag. Several: jax's preemption service (started by
    `jax.distributed.initialize`) catches SIGTERM on any of them and picks the step at which all
    stop, so that all save the same step; a Python handler would take the signal from it.
    """

    def __init__(self):
        self.requested = False
        self._multiprocess = jax.process_count() > 1
        self._previous = None if self._multiprocess else signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def reached(self, step):
        """Whether to save and stop after `step`; every process calls it at every step."""
        if self._multiprocess:
            from jax.experimental import multihost_utils
            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self):
        if not self._multiprocess:
            signal.signal(signal.SIGTERM, self._previous)


def _checkpoint_manager(workdir, config):
    import orbax.checkpoint as ocp
    # cleanup_tmp_directories: a save cut short by a crash leaves a `*.orbax-checkpoint-tmp*` folder, never
    # read as a checkpoint; it is removed at the next start.
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(paths.as_path(workdir) / "checkpoints", options=options,
                                 item_names=("state", "data"))


def _save(manager, state, iterator):
    import orbax.checkpoint as ocp
    step = int(state["step"])
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data=ocp.args.JsonSave(iterator.get_state())))


def _restore(manager, abstract_state):
    import orbax.checkpoint as ocp
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]


def _step_log_parts(folder):
    """The step log's files, by their first step: each is named after it."""
    return sorted((int(part.stem), part) for part in folder.glob("*.jsonl")) if folder.exists() else []


def read_step_log(workdir):
    """Every step's entry logged in `workdir` (train loss, grad norm, dataset), in step order."""
    return [json.loads(line) for _, part in _step_log_parts(paths.as_path(workdir) / STEP_LOG)
            for line in part.read_text().splitlines()]


def _cut_step_log(folder, step):
    """Drops the entries after `step`: a resumed run redoes those steps."""
    kept = []
    for first, part in _step_log_parts(folder):
        if first > step:
            part.unlink()
        else:
            kept.append(part)
    # Parts are consecutive, so only the last kept one can reach past `step`: the others are not read.
    if kept:
        entries = [json.loads(line) for line in kept[-1].read_text().splitlines()]
        if entries and entries[-1]["step"] > step:
            _write_step_log(folder, [e for e in entries if e["step"] <= step])


def _write_step_log(folder, entries):
    # One file per flush (each checkpoint, and the end of the loop), written whole and atomically
    # (object stores cannot append): the I/O stays linear in the run length, and a crash loses
    # only steps that the resumed run redoes.
    if entries:
        with atomic.atomic_file(folder / f"{entries[0]['step']:09d}.jsonl") as f:
            f.writelines(json.dumps(entry) + "\n" for entry in entries)


def train_and_evaluate(config, workdir):
    """`--mode=train`: trains, checkpoints, evaluates and exports into `workdir`; resumes what is there."""
    from tensorboardX import SummaryWriter
    from tqdm.auto import tqdm

    from llm_embedder_jax import assets, validation
    from llm_embedder_jax.data import pipeline

    validation.validate(config, "train")
    workdir = paths.as_path(workdir)
    mesh = sharding.make_mesh(model_parallel=config.model_parallel)
    embedder = export.Embedder.from_pretrained(config.model or assets.minilm_dir(), dtype=config.dtype)
    tx, schedule = make_optimizer(config)
    replicated = sharding.replicated(mesh)
    params = jax.device_put(embedder.params, replicated)
    state = jax.jit(functools.partial(init_state, tx=tx), out_shardings=replicated)(params)

    iterator = pipeline.make_train_iterator(
        train_datasets(config), tokenizer=embedder.tokenizer, global_batch_size=config.global_batch_size,
        group_size=config.group_size, query_max_len=config.query_max_len, key_max_len=config.key_max_len,
        seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
    manager = _checkpoint_manager(workdir, config)
    if manager.latest_step() is not None:
        state, data_state = _restore(manager, jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state))
        iterator.set_state(data_state)
        logging.info("resumed from %s at step %d", manager.directory, int(state["step"]))

    eval_sets = load_eval_sets(config)
    writer = SummaryWriter(str(workdir / "tensorboard")) if jax.process_index() == 0 else None
    preemption = _Preemption()
    step = int(state["step"])
    # Every step's loss across restarts (train_report.json has only this invocation's): the
    # entries since the last flush to workdir/STEP_LOG.
    step_log = None
    if jax.process_index() == 0:
        _cut_step_log(workdir / STEP_LOG, step)
        step_log = []
    progress = tqdm(total=config.num_steps, initial=step, desc="train", unit="step",
                    disable=jax.process_index() != 0)
    window = {"loss": {}, "examples": 0, "start": time.perf_counter()}
    history = []
    try:
        last_step = min(config.num_steps, config.stop_after_steps or config.num_steps)
        while step < last_step:
            batch = next(iterator)
            task = batch["task"]
            settings = step_settings(config, embedder.config, task)
            if dict(settings.loss)["loss"] != "contrastive" and not batch["has_teacher"]:
                raise ValueError(f"dataset {batch['dataset']!r} (task {task}) has no teacher_scores, but "
                                 f"config.tasks.{task}.loss={dict(settings.loss)['loss']!r} needs them: "
                                 f"score it first (--mode=score) or use loss='contrastive'")
            arrays = sharding.global_batch(mesh, {
                "query_ids": batch["query_ids"], "query_mask": batch["query_mask"],
                "key_ids": batch["key_ids"], "key_mask": batch["key_mask"],
                "teacher_scores": np.nan_to_num(batch["teacher_scores"], nan=0.0).astype(np.float32)})
            state, metrics = train_step(state, arrays, TASK_INDEX[task], settings=settings, tx=tx)
            step += 1
            loss = float(metrics["loss"])  # also waits for the step: see DESIGN.md §5 on fake devices
            finite = bool(metrics["finite"])
            if step_log is not None:
                step_log.append({"step": step, "dataset": batch["dataset"], "task": task,
                                 "loss": loss if finite else None,
                                 "grad_norm": float(metrics["grad_norm"]) if finite else None, "finite": finite})
            if not finite:
                logging.warning("step %d: non-finite loss, gradient or update on %s; update skipped", step,
                                batch["dataset"])
                if config.on_nonfinite == "stop":
                    manager.wait_until_finished()  # the checkpoint named below is complete
                    raise FloatingPointError(
                        f"non-finite loss, gradient or update at step {step} (dataset {batch['dataset']}); "
                        f"the last good checkpoint is step {manager.latest_step()} in {manager.directory}")
            else:
                window["loss"].setdefault(task, []).append(loss)
                history.append({"step": step, "task": task, "loss": loss})
            window["examples"] += config.global_batch_size
            progress.update(1)
            progress.set_postfix(task=task, loss=f"{loss:.4f}")

            if step % config.log_every == 0 or step == config.num_steps:
                elapsed = time.perf_counter() - window["start"]
                scalars = {f"loss/{t}": float(np.mean(v)) for t, v in window["loss"].items()}
                scalars.update({"grad_norm": float(metrics["grad_norm"]), "learning_rate": float(schedule(step)),
                                "examples_per_s": window["examples"] / elapsed,
                                "nonfinite_steps": int(state["nonfinite_steps"])})
                if config.self_paced.enabled:
                    scalars[f"lr_scale/{task}"] = float(metrics["lr_scale"])
                _write_scalars(writer, scalars, step)
                logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
                window = {"loss": {}, "examples": 0, "start": time.perf_counter()}
            if step % config.checkpoint_every == 0:
                _save(manager, state, iterator)
                if step_log is not None:
                    _write_step_log(workdir / STEP_LOG, step_log)
                    step_log.clear()
            if config.eval_every and step % config.eval_every == 0 and eval_sets:
                _write_scalars(writer, {f"eval/mrr@10/{k}": v for k, v in
                                        rerank_eval(embedder.with_params(state["params"]), eval_sets,
                                                    max_length=config.key_max_len).items()}, step)
            if preemption.reached(step):
                logging.warning("SIGTERM: saving step %d and exiting", step)
                _save(manager, state, iterator)
                manager.wait_until_finished()
                return None
    finally:
        progress.close()
        preemption.restore()
        if step_log is not None:
            _write_step_log(workdir / STEP_LOG, step_log)
        manager.wait_until_finished()  # whatever ends the loop, a save in flight completes

    if manager.latest_step() != step:
        _save(manager, state, iterator)
    manager.wait_until_finished()
    if step < config.num_steps:
        logging.info("stopped at step %d of %d (config.stop_after_steps); rerun to continue", step, config.num_steps)
        return None
    final_eval = rerank_eval(embedder.with_params(state["params"]), eval_sets, max_length=config.key_max_len)
    _write_scalars(writer, {f"eval/mrr@10/{k}": v for k, v in final_eval.items()}, step)
    export_dir = paths.as_path(config.export_dir or workdir / "export")
    if jax.process_index() == 0:
        embedder.with_params(jax.device_get(state["params"])).save_pretrained(export_dir,
                                                                               training=_training_facts(config))
        with atomic.atomic_file(workdir / "train_report.json") as f:
            json.dump({"steps": step, "nonfinite_steps": int(state["nonfinite_steps"]),
                       "eval_mrr@10": final_eval, "losses": history, "export": str(export_dir)}, f, indent=1)
    if writer:
        writer.close()
    return export_dir


def _write_scalars(writer, scalars, step):
    if writer is None:
        return
    for name, value in scalars.items():
        writer.add_scalar(name, value, step)
    writer.flush()
