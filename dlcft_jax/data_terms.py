"""The data terms of a method: small pure functions with one signature.

A method's loss on a batch is a sum of data terms. Each term is a
`DataTerm(fn, past)`:

    fn(logits, batch, context) -> scalar

where `logits` (B, C) are the model's outputs on `batch['image']`, `batch`
the step's batch (its optional keys switch terms on and off), and `context`
a `Context` with the active outputs, the example weights and the previous
model's outputs. A term with `past=False` belongs to the current task's
loss L_t; a term with `past=True` stands for the finished tasks and is
weighted like the penalty, J = (L_t + t·R)/(t + 1) (LwF's distillation).
`dlcft_jax.train_state.step` sums them; `current` and `past` below are the
two sums, for a user's own loop. The terms here:

* `labels(loss_fn)`: the label loss ℓ(f, y) (α-MSE or cross-entropy), mean
  over the batch; with 'label_scale' (B,) each row's loss is scaled (DER and
  DER++ weigh current and replayed rows with it).
* `der_logits()`: DER's mean_n u_n · mean_c (f_nc − z_nc)² on the logits z
  stored at insertion ('logit_target' (B, C), 'logit_scale' (B,) = u); zero
  when the batch has no 'logit_target'.
* `distillation(kind, temperature, group_size)`: LwF's term on the current
  inputs, from the previous model's outputs (`context.teacher`); the
  outputs it covers are 'distill_mask' (B, C), else the active ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dlcft_jax import losses

Batch = Mapping[str, jax.Array]


class Context(NamedTuple):
    """What a data term may read besides the logits and the batch.

    Attributes:
      class_mask: (C,) or (B, C) active outputs.
      weights: (B,) example weights, or None.
      teacher: (B, C) outputs of the previous model θ_{t−1} on the batch,
        or None when no term needs them.
    """

    class_mask: jax.Array
    weights: jax.Array | None = None
    teacher: jax.Array | None = None


class DataTerm(NamedTuple):
    """`fn(logits, batch, context) -> scalar`; `past`: weighted by t."""

    fn: Callable[[jax.Array, Batch, Context], jax.Array]
    past: bool = False
    #: Needs `context.teacher` (the previous model's outputs).
    needs_teacher: bool = False


def labels(loss_fn: Callable[..., jax.Array]) -> DataTerm:
    """The label loss, `loss_fn(logits, labels, *, class_mask, weights)`."""

    def fn(logits, batch, ctx):
        y, weights = batch['label'], ctx.weights
        scale = batch.get('label_scale')
        if scale is None:
            return loss_fn(
                logits, y, class_mask=ctx.class_mask, weights=weights
            )
        w = scale if weights is None else scale * weights
        norm = y.shape[0] if weights is None else jnp.sum(weights)
        value = loss_fn(logits, y, class_mask=ctx.class_mask, weights=w)
        return value * (jnp.sum(w) / jnp.maximum(norm, 1e-12))

    return DataTerm(fn)


def der_logits() -> DataTerm:
    """DER's term on replayed rows: mean_n u_n · mean_c (f_nc − z_nc)²."""

    def fn(logits, batch, ctx):
        if 'logit_target' not in batch:
            return jnp.zeros((), logits.dtype)
        sq = jnp.mean(jnp.square(logits - batch['logit_target']), -1)
        return losses._mean(  # pylint: disable=protected-access
            batch['logit_scale'] * sq, ctx.weights
        )

    return DataTerm(fn)


def distillation(
    kind: str, temperature: float = 1.0, group_size: int = 0
) -> DataTerm:
    """LwF: 'kl' (KL of the previous model's softmax to the current one,
    temperature T, within blocks of `group_size` outputs when > 0) or 'mse'
    (½‖f − f_old‖²) over the old outputs; weighted by t like a penalty."""
    if kind not in ('kl', 'mse'):
        raise ValueError(f"distillation kind must be 'kl' or 'mse': {kind!r}")

    def fn(logits, batch, ctx):
        old = batch.get('distill_mask')
        if old is None:  # every active output (data-IL)
            old = jnp.broadcast_to(ctx.class_mask, logits.shape)
        return distill_loss(
            logits,
            ctx.teacher,
            old,
            kind=kind,
            temperature=temperature,
            group_size=group_size,
            weights=ctx.weights,
        )

    return DataTerm(fn, past=True, needs_teacher=True)


def distill_loss(
    logits: jax.Array,
    teacher: jax.Array,
    mask: jax.Array,
    *,
    kind: str,
    temperature: float = 1.0,
    group_size: int = 0,
    weights: jax.Array | None = None,
) -> jax.Array:
    """LwF's term on the outputs of old classes (`mask` (B, C), 1 = old).

    'kl': KL(softmax(f_old/T) ‖ softmax(f/T)) over the masked outputs (within
    blocks of `group_size` outputs when > 0, summed over the blocks that have
    old outputs); 'mse': ½ Σ_c m_c (f_c − f_old,c)². Mean over the batch.
    """
    teacher = jax.lax.stop_gradient(teacher)
    if kind == 'mse':
        per = 0.5 * jnp.sum(mask * jnp.square(logits - teacher), axis=-1)
        return losses._mean(per, weights)  # pylint: disable=protected-access
    b, c = logits.shape
    g = group_size if group_size > 0 else c
    shape = (b, c // g, g)
    s, t, m = (v.reshape(shape) for v in (logits, teacher, mask))
    log_q = jax.nn.log_softmax(losses.masked_logits(s / temperature, m), -1)
    log_p = jax.nn.log_softmax(losses.masked_logits(t / temperature, m), -1)
    kl = jnp.sum(m * jnp.exp(log_p) * (log_p - log_q), axis=-1)
    per = jnp.sum(kl * (jnp.sum(m, axis=-1) > 0), axis=-1)
    return losses._mean(per, weights)  # pylint: disable=protected-access


def _sum(terms, logits, batch, ctx, past: bool) -> jax.Array:
    total = jnp.zeros((), jnp.float32)
    for term in terms:
        if term.past == past:
            total = total + term.fn(logits, batch, ctx)
    return total


def current(
    terms: Sequence[DataTerm], logits: jax.Array, batch: Batch, ctx: Context
) -> jax.Array:
    """L_t: the sum of the current task's terms."""
    return _sum(terms, logits, batch, ctx, past=False)


def past(
    terms: Sequence[DataTerm], logits: jax.Array, batch: Batch, ctx: Context
) -> jax.Array:
    """The sum of the terms that stand for finished tasks (weighted t)."""
    return _sum(terms, logits, batch, ctx, past=True)


def any_past(terms: Sequence[DataTerm]) -> bool:
    return any(term.past for term in terms)


def needs_teacher(terms: Sequence[DataTerm]) -> bool:
    return any(term.needs_teacher for term in terms)
