"""Losses against float64 numpy references written plainly, loop by loop, from DESIGN.md §2.3."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_embedder_jax import losses

B, G, D = 3, 4, 6
# jitted (eager dispatch is the slow part of these tiny tests); hyper-parameters are static
graded = jax.jit(losses.graded_distillation, static_argnames=("temperature", "reward_temperature", "pin_positive"))
contrastive = jax.jit(losses.contrastive, static_argnames=("temperature",))


def _f64(*arrays):
    return tuple(np.asarray(x, np.float64) for x in arrays)


def _logsumexp(x):
    m = np.max(x)
    return m + np.log(np.sum(np.exp(x - m)))


def _softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


def ref_contrastive(q, k, temperature):
    q, k = _f64(q, k)
    batch, group = len(q), len(k) // len(q)
    total = 0.0
    for b in range(batch):
        scores = [q[b] @ k[n] / temperature for n in range(len(k))]
        total += _logsumexp(np.array(scores)) - scores[b * group]
    return total / batch


def ref_order(teacher_row, pin_positive, tie_break=lambda j: j):
    """Candidate indices from rank 0 down; Python's sort is stable, so ties keep candidate order."""
    candidates = list(range(1, len(teacher_row))) if pin_positive else list(range(len(teacher_row)))
    ranked = sorted(candidates, key=lambda j: (-teacher_row[j], tie_break(j)))
    return [0] + ranked if pin_positive else ranked


def ref_graded(q, k, teacher, temperature, reward_temperature, pin_positive, tie_break=lambda j: j):
    q, k, teacher = _f64(q, k, teacher)
    batch, group = teacher.shape
    total = 0.0
    for b in range(batch):
        order = ref_order(teacher[b], pin_positive, tie_break)
        weights = _softmax(teacher[b] / reward_temperature)
        others = [c * group + m for c in range(batch) if c != b for m in range(group)]
        for i, j in enumerate(order):
            denominator = [b * group + m for m in order[i:]] + others
            scores = np.array([q[b] @ k[n] / temperature for n in denominator])
            total += weights[j] * (_logsumexp(scores) - q[b] @ k[b * group + j] / temperature)
    return total / batch


def ref_kl(q, k, teacher, temperature, teacher_temperature, student_temperature):
    q, k, teacher = _f64(q, k, teacher)
    batch, group = teacher.shape
    total = 0.0
    for b in range(batch):
        student = np.array([q[b] @ k[b * group + j] / temperature / student_temperature for j in range(group)])
        p = _softmax(teacher[b] / teacher_temperature)
        log_q = student - _logsumexp(student)
        total += sum(p[j] * (np.log(p[j]) - log_q[j]) for j in range(group))
    return total / batch


def anchor_graded_distill(q, k, teacher, temperature):
    """The released loop (FlagEmbedding stable_distill), ported to numpy: keys must come pre-sorted."""
    q, k, teacher = _f64(q, k, teacher)
    batch, group = teacher.shape
    scores = q @ k.T / temperature
    weights = np.stack([_softmax(row) for row in teacher])
    labels = np.arange(batch) * group
    loss, mask = 0.0, np.zeros_like(scores)
    for i in range(group):
        target = labels + i
        masked = scores + mask
        cross_entropy = np.array([_logsumexp(masked[b]) - masked[b, target[b]] for b in range(batch)])
        loss += np.mean(weights[:, i] * cross_entropy)
        mask[np.arange(batch), target] = np.finfo(scores.dtype).min
    return loss


def finite_difference_grad(f, q, k, h=1e-6):
    q, k = _f64(q, k)
    grads = []
    for x in (q, k):
        g = np.zeros_like(x)
        for idx in np.ndindex(*x.shape):
            plus, minus = x.copy(), x.copy()
            plus[idx] += h
            minus[idx] -= h
            args_plus = (plus, k) if x is q else (q, plus)
            args_minus = (minus, k) if x is q else (q, minus)
            g[idx] = (f(*args_plus) - f(*args_minus)) / (2 * h)
        grads.append(g)
    return grads


def embeddings(seed, batch=B, group=G, dim=D):
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(rng.normal(size=(batch, dim)))
    k = unit(rng.normal(size=(batch * group, dim)))
    teacher = rng.normal(size=(batch, group))
    return q.astype(np.float32), k.astype(np.float32), teacher.astype(np.float32)


CASES = {
    "contrastive": (lambda q, k, t: losses.contrastive(q, k, temperature=0.05),
                    lambda q, k, t: ref_contrastive(q, k, 0.05)),
    "graded": (lambda q, k, t: losses.graded_distillation(q, k, t, temperature=0.05, reward_temperature=0.5),
               lambda q, k, t: ref_graded(q, k, t, 0.05, 0.5, False)),
    "graded_pinned": (lambda q, k, t: losses.graded_distillation(q, k, t, temperature=0.05, pin_positive=True),
                      lambda q, k, t: ref_graded(q, k, t, 0.05, 1.0, True)),
    "kl": (lambda q, k, t: losses.kl_distillation(q, k, t, temperature=0.05, teacher_temperature=0.1,
                                                  student_temperature=2.0),
           lambda q, k, t: ref_kl(q, k, t, 0.05, 0.1, 2.0)),
}


@pytest.mark.parametrize("name", CASES)
def test_value_and_gradient_match_float64_reference(name):
    ours, ref = CASES[name]
    q, k, teacher = embeddings(0)
    expected = ref(q, k, teacher)
    expected_grads = finite_difference_grad(lambda q_, k_: ref(q_, k_, teacher), q, k)
    with jax.enable_x64(True):
        value, grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(*_f64(q, k, teacher))
        assert value.dtype == jnp.float64
        np.testing.assert_allclose(float(value), expected, rtol=1e-10)
        for g, e in zip(grads, expected_grads):
            np.testing.assert_allclose(np.asarray(g), e, atol=1e-6)
    # float32, the training dtype
    value32 = jax.jit(ours)(q, k, teacher)
    assert value32.dtype == jnp.float32
    np.testing.assert_allclose(float(value32), expected, rtol=1e-5)


def test_graded_with_one_hot_rewards_is_contrastive():
    q, k, _ = embeddings(1)
    teacher = np.zeros((B, G), np.float32)
    teacher[:, 0] = 100.0  # all weight on the positive, which then ranks first: rank 0 sees every key
    value = graded(q, k, teacher, temperature=0.02, reward_temperature=0.01)
    np.testing.assert_allclose(float(value), float(contrastive(q, k, temperature=0.02)), rtol=1e-6)


def test_pin_positive_reproduces_released_loop():
    q, k, teacher = embeddings(2, batch=4, group=5)
    # what the released data pipeline feeds its loop: positive first, negatives by teacher score, descending
    order = np.stack([ref_order(row, pin_positive=True) for row in teacher])
    assert not np.all(order == np.arange(5)), "the random scores must need sorting for this test to mean anything"
    rows = (np.arange(4)[:, None] * 5 + order).reshape(-1)
    presorted_k, presorted_teacher = k[rows], np.take_along_axis(teacher, order, axis=1)
    expected = anchor_graded_distill(q, presorted_k, presorted_teacher, 0.5)

    for keys, scores in ((k, teacher), (presorted_k, presorted_teacher)):  # sorting happens inside
        ours = graded(q, keys, scores, temperature=0.5, pin_positive=True)
        np.testing.assert_allclose(float(ours), expected, rtol=1e-5)
    unpinned = graded(q, k, teacher, temperature=0.5, pin_positive=False)
    assert abs(float(unpinned) - expected) > 1e-3  # the positive is not the top-scored candidate everywhere


def test_ties_keep_candidate_order():
    q, k, _ = embeddings(3, batch=2, group=4)
    teacher = np.array([[0.5, 2.0, 2.0, 2.0], [1.0, 1.0, 0.0, 1.0]])
    ours = float(graded(q, k, teacher, temperature=0.05))
    stable = ref_graded(q, k, teacher, 0.05, 1.0, False)
    reversed_ties = ref_graded(q, k, teacher, 0.05, 1.0, False, tie_break=lambda j: -j)
    np.testing.assert_allclose(ours, stable, rtol=1e-5)
    assert abs(stable - reversed_ties) > 1e-3  # the tie order changes the loss, so the check above can fail


@pytest.mark.parametrize("name", CASES)
def test_bfloat16_in_bfloat16_out(name):
    ours, _ = CASES[name]
    q, k, teacher = embeddings(4)
    value32 = jax.jit(ours)(q, k, teacher)
    value, grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(
        jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16), teacher)
    assert value.dtype == jnp.bfloat16
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    # scores and softmax run in float32: only the bf16 rounding of the inputs and the result remains
    np.testing.assert_allclose(float(value), float(value32), rtol=3e-2)


@pytest.mark.parametrize("pin_positive", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_masking_stays_finite_at_extreme_temperatures(pin_positive, batch):
    q, k, teacher = embeddings(5, batch=batch)
    teacher = teacher * 1e4  # extreme rewards, tiny temperatures: scores near ±1e4, weights one-hot
    loss = lambda q_, k_: losses.graded_distillation(q_, k_, teacher, temperature=1e-4, reward_temperature=1e-3,
                                                     pin_positive=pin_positive)
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(q, k)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    kl_value, kl_grads = jax.jit(jax.value_and_grad(
        lambda q_, k_: losses.kl_distillation(q_, k_, teacher, temperature=1e-4, teacher_temperature=1e-3),
        argnums=(0, 1)))(q, k)
    assert np.isfinite(float(kl_value))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in kl_grads)


def test_graded_gradient_at_one_query_matches_reference():
    # B = 1: no other query, so the denominator is the own group alone
    q, k, teacher = embeddings(6, batch=1)
    grads = jax.jit(jax.grad(lambda q_, k_: losses.graded_distillation(q_, k_, teacher, temperature=0.1),
                             argnums=(0, 1)))
    with jax.enable_x64(True):
        ours = grads(*_f64(q, k))
    expected = finite_difference_grad(lambda q_, k_: ref_graded(q_, k_, teacher, 0.1, 1.0, False), q, k)
    for g, e in zip(ours, expected):
        np.testing.assert_allclose(np.asarray(g), e, atol=1e-6)


SETTINGS = {
    "loss": "graded", "temperature": 0.02, "contrastive_weight": 0.2, "distill_weight": 1.0,
    "reward_temperature": 1.0, "pin_positive": True, "teacher_temperature": 0.1, "student_temperature": 1.0,
}


@pytest.mark.parametrize("kind, contrastive_weight, distill_weight",
                         list(itertools.product(["contrastive", "graded", "kl"], [0.0, 0.2], [0.0, 1.0])))
def test_task_loss_is_the_weighted_sum(kind, contrastive_weight, distill_weight):
    q, k, teacher = embeddings(7)
    settings = dict(SETTINGS, loss=kind, contrastive_weight=contrastive_weight, distill_weight=distill_weight)
    distill = {
        "contrastive": 0.0,
        "graded": ref_graded(q, k, teacher, 0.02, 1.0, True),
        "kl": ref_kl(q, k, teacher, 0.02, 0.1, 1.0),
    }[kind]
    expected = contrastive_weight * ref_contrastive(q, k, 0.02) + (kind != "contrastive") * distill_weight * distill
    if expected == 0.0:
        with pytest.raises(ValueError, match="enable no loss term"):
            losses.task_loss(q, k, teacher, settings=settings)
        return
    ours = jax.jit(lambda q_, k_, t: losses.task_loss(q_, k_, t, settings=settings))(q, k, teacher)
    np.testing.assert_allclose(float(ours), expected, rtol=1e-5)


def test_task_loss_accepts_config_dict_and_reports_bad_settings():
    import ml_collections
    q, k, teacher = embeddings(8)
    settings = ml_collections.ConfigDict(dict(SETTINGS, loss="contrastive", contrastive_weight=1.0))
    np.testing.assert_allclose(float(losses.task_loss(q, k, None, settings=settings)),
                               ref_contrastive(q, k, 0.02), rtol=1e-5)
    with pytest.raises(ValueError, match="needs teacher_scores"):
        losses.task_loss(q, k, None, settings=dict(SETTINGS))
    with pytest.raises(ValueError, match="not one of"):
        losses.task_loss(q, k, teacher, settings=dict(SETTINGS, loss="listwise"))
    with pytest.raises(KeyError, match="reward_temperature"):
        losses.task_loss(q, k, teacher, settings={k_: v for k_, v in SETTINGS.items() if k_ != "reward_temperature"})


def test_shape_errors_are_explicit():
    q, k, teacher = embeddings(9)
    with pytest.raises(ValueError, match="not a multiple"):
        losses.contrastive(q, k[:-1], temperature=0.02)
    with pytest.raises(ValueError, match=r"should be \[B, G\]"):
        losses.graded_distillation(q, k, teacher[:, :-1], temperature=0.02)
    with pytest.raises(ValueError, match="expected q"):
        losses.kl_distillation(q, k[:, :-1], teacher, temperature=0.02, teacher_temperature=0.1)
