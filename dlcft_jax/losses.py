"""Losses on the classifier outputs, with class masks.

MSE on scaled one-hot labels (the DLCFT loss, docs/method.md §3.1):

    ℓ(f, y) = ½ Σ_c m_c (α·[y = c] − f_c)²,     α = 15,

summed over the active outputs c (m_c = 1) and averaged over the batch. Its
Hessian with respect to f is diag(m): the identity on the active outputs,
however well the model fits (docs/method.md §6.2).

Softmax cross-entropy, −log softmax(f)_y over the active outputs, is the
baseline; its output Hessian diag(p) − ppᵀ vanishes as p becomes one-hot.

Masks. `class_mask` has shape (C,) or (B, C), 1 for the outputs that take part:
  * class-IL: the classes seen so far (a growing head; the current task's data
    also pushes the outputs of old classes toward 0, as in the paper);
  * task-IL: the classes of the example's own task (one head per task, stored
    as one wide head whose blocks are selected per example);
  * data-IL: all ones.
`weights` (B,) weighs examples, e.g. 0 for the padding rows of a static-shape
evaluation batch; the batch mean is Σ w·ℓ / Σ w.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ALPHA = 15.0


def _check(logits: jax.Array, labels: jax.Array) -> None:
    if (
        logits.ndim != 2
        or labels.ndim != 1
        or labels.shape[0] != logits.shape[0]
    ):
        raise ValueError(
            'Expected logits (B, C) and integer labels (B,), got '
            f'{logits.shape} and {labels.shape}.'
        )


def _mean(per_example: jax.Array, weights: jax.Array | None) -> jax.Array:
    if weights is None:
        return jnp.mean(per_example)
    return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def mse_per_example(
    logits: jax.Array,
    labels: jax.Array,
    *,
    alpha: float = ALPHA,
    class_mask: jax.Array | None = None,
) -> jax.Array:
    """½ Σ_c m_c (α·onehot(y)_c − f_c)² for each example, shape (B,)."""
    _check(logits, labels)
    target = alpha * jax.nn.one_hot(
        labels, logits.shape[-1], dtype=logits.dtype
    )
    sq = jnp.square(target - logits)
    if class_mask is not None:
        sq = sq * class_mask
    return 0.5 * jnp.sum(sq, axis=-1)


def mse_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    alpha: float = ALPHA,
    class_mask: jax.Array | None = None,
    weights: jax.Array | None = None,
) -> jax.Array:
    """The α-scaled one-hot MSE, ½·sum over outputs, mean over the batch.

    Args:
      logits: (B, C) outputs f.
      labels: (B,) integer labels in [0, C).
      alpha: the label scale α (15 in the paper).
      class_mask: (C,) or (B, C) 0/1 mask of active outputs; None for all.
      weights: (B,) example weights; None for a plain mean.

    Returns:
      The scalar loss.
    """
    return _mean(
        mse_per_example(logits, labels, alpha=alpha, class_mask=class_mask),
        weights,
    )


def masked_logits(logits: jax.Array, class_mask: jax.Array | None) -> jax.Array:
    """Sets inactive outputs to a large negative value (for softmax/argmax)."""
    if class_mask is None:
        return logits
    neg = jnp.asarray(jnp.finfo(logits.dtype).min / 2, logits.dtype)
    return jnp.where(class_mask > 0, logits, neg)


def cross_entropy_per_example(
    logits: jax.Array,
    labels: jax.Array,
    *,
    class_mask: jax.Array | None = None,
) -> jax.Array:
    """−log softmax(f)_y over the active outputs, shape (B,)."""
    _check(logits, labels)
    logp = jax.nn.log_softmax(masked_logits(logits, class_mask), axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


def cross_entropy_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    class_mask: jax.Array | None = None,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Softmax cross-entropy, mean over the batch (see `mse_loss` for args)."""
    return _mean(
        cross_entropy_per_example(logits, labels, class_mask=class_mask),
        weights,
    )


def _cross_entropy_fn(
    logits, labels, *, alpha=ALPHA, class_mask=None, weights=None
):
    """`cross_entropy_loss` with the arguments of `mse_loss` (alpha unused)."""
    del alpha
    return cross_entropy_loss(
        logits, labels, class_mask=class_mask, weights=weights
    )


def loss_fn(name: str):
    """Returns `fn(logits, labels, *, alpha, class_mask, weights)` by name."""
    if name == 'mse':
        return mse_loss
    if name in ('ce', 'sce', 'cross_entropy'):
        return _cross_entropy_fn
    raise ValueError(f"loss must be 'mse' or 'ce', got {name!r}.")


def accuracy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    class_mask: jax.Array | None = None,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Fraction of examples whose arg-max over the active outputs is the
    label."""
    pred = jnp.argmax(masked_logits(logits, class_mask), axis=-1)
    return _mean((pred == labels).astype(jnp.float32), weights)
