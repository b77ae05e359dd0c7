"""Losses: values, masks, and the output curvature of MSE vs cross-entropy."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlcft_jax import losses


def test_mse_is_half_sum_over_outputs_mean_over_batch():
    logits = jnp.array([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    labels = jnp.array([1, 2])
    want = np.mean([0.5 * (1 + 13**2 + 0), 0.5 * (0 + 0 + 12**2)])
    np.testing.assert_allclose(losses.mse_loss(logits, labels), want)
    # A class mask drops the inactive outputs; weights drop padding rows.
    mask = jnp.array([1.0, 1.0, 0.0])
    np.testing.assert_allclose(
        losses.mse_loss(logits, labels, class_mask=mask),
        np.mean([0.5 * (1 + 169), 0.0]),
    )
    np.testing.assert_allclose(
        losses.mse_loss(logits, labels, weights=jnp.array([1.0, 0.0])),
        0.5 * (1 + 169),
    )


def test_cross_entropy_ignores_masked_classes():
    logits = jnp.array([[2.0, 1.0, 50.0]])
    labels = jnp.array([0])
    masked = losses.cross_entropy_loss(
        logits, labels, class_mask=jnp.array([1.0, 1.0, 0.0])
    )
    np.testing.assert_allclose(
        masked, -jax.nn.log_softmax(jnp.array([2.0, 1.0]))[0], rtol=1e-6
    )
    assert (
        float(
            losses.accuracy(
                logits, labels, class_mask=jnp.array([1.0, 1.0, 0.0])
            )
        )
        == 1.0
    )
    assert float(losses.accuracy(logits, labels)) == 0.0


def test_shape_errors_say_what_is_expected():
    with pytest.raises(ValueError, match=r'\(B, C\)'):
        losses.mse_loss(jnp.zeros((2, 3)), jnp.zeros((3,), jnp.int32))


@pytest.mark.parametrize('margin', [0.0, 2.0, 5.0, 10.0, 20.0])
def test_output_curvature_vanishes_for_ce_and_stays_identity_for_mse(margin):
    """∇²_f CE = diag(p) − ppᵀ → 0 as the margin grows; MSE's is I.

    docs/method.md §6.2.
    """
    c = 5
    logits = margin * jax.nn.one_hot(2, c)[None]
    labels = jnp.array([2])
    h_ce = jax.hessian(lambda f: losses.cross_entropy_loss(f, labels))(
        logits
    ).reshape(c, c)
    p = jax.nn.softmax(logits[0])
    np.testing.assert_allclose(h_ce, jnp.diag(p) - jnp.outer(p, p), atol=1e-6)
    np.testing.assert_allclose(jnp.trace(h_ce), 1 - jnp.sum(p**2), atol=1e-6)
    h_mse = jax.hessian(lambda f: losses.mse_loss(f, labels))(logits).reshape(
        c, c
    )
    np.testing.assert_allclose(h_mse, np.eye(c), atol=1e-6)
    if margin >= 20.0:
        assert float(jnp.max(jnp.abs(jnp.linalg.eigvalsh(h_ce)))) < 1e-7


def test_ce_curvature_decreases_monotonically_with_margin():
    traces = []
    for m in [0.0, 1.0, 2.0, 4.0, 8.0, 16.0]:
        p = jax.nn.softmax(m * jax.nn.one_hot(0, 10))
        traces.append(float(1 - jnp.sum(p**2)))
    assert all(a > b for a, b in itertools.pairwise(traces))
    assert traces[-1] < 1e-5


def test_per_example_masks_select_each_examples_task_head():
    """Task-IL: a (B, C) mask keeps only the outputs of each example's task."""
    logits = jnp.array([[1.0, 2.0, 9.0, 9.0], [9.0, 9.0, 3.0, 0.0]])
    labels = jnp.array([1, 2])
    mask = jnp.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    want = np.mean([0.5 * (1 + 13**2), 0.5 * (12**2 + 0)])
    np.testing.assert_allclose(
        losses.mse_loss(logits, labels, class_mask=mask), want
    )
    assert float(losses.accuracy(logits, labels, class_mask=mask)) == 1.0
