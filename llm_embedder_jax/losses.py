"""Retrieval losses: in-batch contrastive, graded distillation, KL distillation.

Shapes, for every loss: q [B, d] query embeddings; k [B*G, d] key embeddings,
query-major (k[b*G + j] is candidate j of query b; candidate 0 is the labelled
positive); teacher_scores [B, G] (the LLM's rewards, in candidate order).
Every loss returns a scalar in the dtype of q and k; scores and log-sum-exps
are computed in float32 (float64 stays float64), so bf16 embeddings lose no
precision in the softmax. Teacher scores are data: no gradient flows into them.

With data parallelism, q and k are the global batch: `q @ k.T` already holds
every device's in-batch negatives.
"""
import jax
import jax.numpy as jnp

LOSSES = ("contrastive", "graded", "kl")


def contrastive(q, k, *, temperature):
    """InfoNCE over all B*G keys: the positive of query b is key b*G, every other key a negative."""
    batch, group = _group_shape(q, k)
    scores = _scores(q, k, temperature)
    positive = scores[jnp.arange(batch), jnp.arange(batch) * group]
    return jnp.mean(jax.nn.logsumexp(scores, axis=-1) - positive).astype(_out_dtype(q, k))


def graded_distillation(q, k, teacher_scores, *, temperature, reward_temperature=1.0, pin_positive=False):
    """Listwise loss that uses both the value and the order of the rewards.

    Each query's candidates are ranked by teacher score, descending (ties keep
    candidate order); with `pin_positive` the labelled positive stays at rank 0
    and only the negatives are ranked, as in the released recipe. Candidate i
    weighs w_i = softmax(R / reward_temperature)_i and contributes the
    cross-entropy of picking it among itself, the own candidates ranked below
    it, and every key of every other query.
    """
    batch, group = _group_shape(q, k, teacher_scores)
    scores = _scores(q, k, temperature).reshape(batch, batch, group)
    compute = scores.dtype
    masked = _masked_value(compute)
    own = scores[jnp.arange(batch), jnp.arange(batch)]  # [B, G]
    # The log-sum-exp over the denominator splits into the other queries' keys
    # (the same for every rank) and the own candidates not ranked above i, so
    # no [B, G, B*G] tensor is ever built.
    is_own_group = jnp.eye(batch, dtype=bool)[:, :, None]
    other_lse = jax.nn.logsumexp(jnp.where(is_own_group, masked, scores).reshape(batch, -1), axis=-1)
    teacher = jax.lax.stop_gradient(teacher_scores).astype(compute)
    above = _ranked_above(teacher, pin_positive=pin_positive)  # [B, i, j]: j ranked above i
    own_lse = jax.nn.logsumexp(jnp.where(above, masked, own[:, None, :]), axis=-1)  # [B, G]
    cross_entropy = jnp.logaddexp(other_lse[:, None], own_lse) - own
    weights = jax.nn.softmax(teacher / reward_temperature, axis=-1)
    return (jnp.sum(weights * cross_entropy) / batch).astype(_out_dtype(q, k))


def kl_distillation(q, k, teacher_scores, *, temperature, teacher_temperature, student_temperature=1.0):
    """KL(softmax(R / T_teacher) || softmax(s / T_student)) over each query's own group, batch mean."""
    batch, group = _group_shape(q, k, teacher_scores)
    compute = _compute_dtype(q, k)
    own = jnp.einsum("bd,bgd->bg", q, k.reshape(batch, group, -1), preferred_element_type=compute) / temperature
    log_student = jax.nn.log_softmax(own / student_temperature, axis=-1)
    teacher = jax.lax.stop_gradient(teacher_scores).astype(compute)
    log_teacher = jax.nn.log_softmax(teacher / teacher_temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student)) / batch
    return kl.astype(_out_dtype(q, k))


def task_loss(q, k, teacher_scores, *, settings):
    """contrastive_weight * contrastive + distill_weight * distillation, for one task's settings.

    `settings` is a dict or ConfigDict (extra fields are ignored, so a task's
    whole settings block can be passed):
      loss: "contrastive" (no distillation), "graded" (graded_distillation)
        or "kl" (kl_distillation).
      temperature: τ in s(q, C) = <q, C> / τ, shared by every term (0.01 released).
      contrastive_weight: weight of the in-batch contrastive term; 0 drops it.
        With loss "contrastive" it scales the whole loss: 1.0 reproduces the
        released code, which leaves a lone term unweighted.
      distill_weight: weight of the distillation term (graded / kl only).
      reward_temperature: α in w = softmax(R / α) (graded only; 1.0 released).
      pin_positive: keep the labelled positive at rank 0 (graded only; the
        released behaviour).
      teacher_temperature: T_teacher (kl only; 0.1 released for chat / lrlm).
      student_temperature: T_student (kl only; 1.0 released).
    The fields are static Python values: the step is traced once per task.
    `teacher_scores` may be None when loss is "contrastive".
    """
    kind = _field(settings, "loss")
    if kind not in LOSSES:
        raise ValueError(f"settings.loss={kind!r} is not one of {LOSSES}")
    temperature = _field(settings, "temperature")
    contrastive_weight = _field(settings, "contrastive_weight")
    distill_weight = _field(settings, "distill_weight") if kind != "contrastive" else 0.0
    if contrastive_weight <= 0 and distill_weight <= 0:
        raise ValueError(
            f"settings (loss={kind!r}, contrastive_weight={contrastive_weight}, "
            f"distill_weight={distill_weight}) enable no loss term")
    terms = []
    if contrastive_weight > 0:
        terms.append(contrastive_weight * contrastive(q, k, temperature=temperature))
    if distill_weight > 0:
        if teacher_scores is None:
            raise ValueError(f"settings.loss={kind!r} needs teacher_scores, got None")
        if kind == "graded":
            distill = graded_distillation(
                q, k, teacher_scores, temperature=temperature,
                reward_temperature=_field(settings, "reward_temperature"),
                pin_positive=bool(_field(settings, "pin_positive")))
        else:
            distill = kl_distillation(
                q, k, teacher_scores, temperature=temperature,
                teacher_temperature=_field(settings, "teacher_temperature"),
                student_temperature=_field(settings, "student_temperature"))
        terms.append(distill_weight * distill)
    return sum(terms[1:], terms[0])


def _field(settings, name):
    try:
        return settings[name]
    except KeyError:
        raise KeyError(f"loss settings lack the field {name!r} (see losses.task_loss)") from None


def _ranked_above(teacher, *, pin_positive):
    """[B, G, G] mask, True at [b, i, j] when candidate j ranks strictly above candidate i.

    A stable descending sort written as a comparison: j is above i when its
    score is higher, or equal with a smaller index.
    """
    group = teacher.shape[-1]
    row = jnp.arange(group)[:, None]
    col = jnp.arange(group)[None, :]
    t_i, t_j = teacher[:, :, None], teacher[:, None, :]
    above = (t_j > t_i) | ((t_j == t_i) & (col < row))
    if pin_positive:
        # the positive (index 0) is above every other candidate, and nothing is above it
        above = jnp.where(col == 0, row != 0, above & (row != 0))
    return above


def _group_shape(q, k, teacher_scores=None):
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"expected q [B, d] and k [B*G, d], got q {q.shape} and k {k.shape}")
    batch = q.shape[0]
    if k.shape[0] % batch:
        raise ValueError(f"k has {k.shape[0]} rows, not a multiple of the {batch} queries")
    group = k.shape[0] // batch
    if teacher_scores is not None and teacher_scores.shape != (batch, group):
        raise ValueError(f"teacher_scores {teacher_scores.shape} should be [B, G] = {(batch, group)}")
    return batch, group


def _compute_dtype(q, k):
    return jnp.promote_types(_out_dtype(q, k), jnp.float32)


def _out_dtype(q, k):
    return jnp.result_type(q.dtype, k.dtype)


def _scores(q, k, temperature):
    return jnp.einsum("bd,nd->bn", q, k, preferred_element_type=_compute_dtype(q, k)) / temperature


def _masked_value(dtype):
    # Finite and far below any real score, with room left for the max-subtraction
    # inside logsumexp: exp underflows to 0 and the gradient stays finite.
    return jnp.asarray(jnp.finfo(dtype).min / 2, dtype)
