"""The data terms of a method: small pure functions with one signature.

A method's loss on a batch is a sum of data terms. A term is any callable

    term(logits, batch, context) -> scalar

with two attributes, `past` and `needs_teacher`. `logits` (B, C) are the
model's outputs on `batch['image']`, `batch` the step's batch (its optional
keys switch terms on and off), and `context` a `Context` with the active
outputs, the example weights and the previous model's outputs (read only by
terms with `needs_teacher`). A term with `past=False` belongs to the current
task's loss L_t; a term with `past=True` stands for the finished tasks and
is weighted like the penalty, J = (L_t + t·R)/(t + 1) (LwF's distillation).
`dlcft_jax.train_state.step` sums a method's terms; `current` and `past`
below are the two sums, for a user's own loop. The terms here are frozen
records (hashable, so a method that holds them is a static jit argument):

* `LabelLoss(kind, alpha)`: the label loss ℓ(f, y) (α-MSE or cross-entropy),
  mean over the batch; with 'label_scale' (B,) each row's loss is scaled
  (DER and DER++ weigh current and replayed rows with it).
* `StoredLogits()`: DER's mean_n u_n · mean_c (f_nc − z_nc)² on the logits z
  stored at insertion ('logit_target' (B, C), 'logit_scale' (B,) = u); zero
  when the batch has no 'logit_target'.
* `Distillation(kind, temperature, group_size)`: LwF's term on the current
  inputs, from the previous model's outputs (`context.teacher`); the
  outputs it covers are 'distill_mask' (B, C), else the active ones.
* `labels(loss_fn)` / `DataTerm(fn, past, needs_teacher)`: a term from your
  own function.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, NamedTuple

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
    """A term from a function: `fn(logits, batch, context) -> scalar`;
    `past`: weighted by t; `needs_teacher`: reads `context.teacher`."""

    fn: Callable[[jax.Array, Batch, Context], jax.Array]
    past: bool = False
    needs_teacher: bool = False

    def __call__(self, logits, batch, ctx):
        return self.fn(logits, batch, ctx)


def _label_loss(loss_fn, logits, batch, ctx) -> jax.Array:
    y, weights = batch['label'], ctx.weights
    scale = batch.get('label_scale')
    if scale is None:
        return loss_fn(logits, y, class_mask=ctx.class_mask, weights=weights)
    w = scale if weights is None else scale * weights
    norm = y.shape[0] if weights is None else jnp.sum(weights)
    value = loss_fn(logits, y, class_mask=ctx.class_mask, weights=w)
    return value * (jnp.sum(w) / jnp.maximum(norm, 1e-12))


def labels(loss_fn: Callable[..., jax.Array]) -> DataTerm:
    """The label loss of your own `loss_fn(logits, labels, *, class_mask,
    weights)` (a weighted mean over the batch)."""
    return DataTerm(functools.partial(_label_loss, loss_fn))


@dataclasses.dataclass(frozen=True)
class LabelLoss:
    """The label loss ℓ(f, y), mean over the batch: 'mse' (½‖α·onehot(y) −
    f‖² over the active outputs) or 'ce' (softmax cross-entropy over them).
    With 'label_scale' (B,) in the batch each row's loss is scaled (DER and
    DER++ weigh current and replayed rows with it). `all_outputs`: the loss
    covers every output, those of classes not seen yet included (Mammoth's
    class-IL cross-entropy), instead of the active ones."""

    kind: str = 'mse'
    alpha: float = losses.ALPHA
    all_outputs: bool = False
    past: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False

    def __post_init__(self):
        if self.kind not in ('mse', 'ce'):
            raise ValueError(
                f"LabelLoss kind must be 'mse' or 'ce', got {self.kind!r}."
            )

    def loss_fn(self) -> Callable[..., jax.Array]:
        """`loss(logits, labels, *, class_mask, weights)` of this term."""
        return functools.partial(losses.loss_fn(self.kind), alpha=self.alpha)

    def __call__(self, logits, batch, ctx):
        if self.all_outputs:
            ctx = ctx._replace(class_mask=None)
        return _label_loss(self.loss_fn(), logits, batch, ctx)


@dataclasses.dataclass(frozen=True)
class StoredLogits:
    """DER's term on replayed rows: mean_n u_n · mean_c (f_nc − z_nc)², z the
    logits stored at insertion ('logit_target' (B, C)), u = 'logit_scale'
    (B,) (α on the replayed rows, 0 on the others); zero when the batch has
    no 'logit_target'."""

    past: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False

    def __call__(self, logits, batch, ctx):
        if 'logit_target' not in batch:
            return jnp.zeros((), logits.dtype)
        sq = jnp.mean(jnp.square(logits - batch['logit_target']), -1)
        return losses._mean(  # pylint: disable=protected-access
            batch['logit_scale'] * sq, ctx.weights
        )


@dataclasses.dataclass(frozen=True)
class Distillation:
    """LwF's term on the current inputs, weighted by t like a penalty:
    'kl' (KL of the previous model's softmax at temperature T to the current
    one, within blocks of `group_size` outputs when > 0) or 'mse' (½‖f −
    f_old‖²), over the old outputs: 'distill_mask' (B, C), else the active
    ones."""

    kind: str = 'kl'
    temperature: float = 1.0
    group_size: int = 0
    past: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = True

    def __post_init__(self):
        if self.kind not in ('kl', 'mse'):
            raise ValueError(
                f"Distillation kind must be 'kl' or 'mse', got {self.kind!r}."
            )
        if self.temperature <= 0 or self.group_size < 0:
            raise ValueError(
                'Distillation needs temperature > 0 and group_size >= 0.'
            )

    def __call__(self, logits, batch, ctx):
        old = batch.get('distill_mask')
        if old is None:  # every active output (data-IL)
            old = jnp.broadcast_to(ctx.class_mask, logits.shape)
        return distill_loss(
            logits,
            ctx.teacher,
            old,
            kind=self.kind,
            temperature=self.temperature,
            group_size=self.group_size,
            weights=ctx.weights,
        )


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
            total = total + term(logits, batch, ctx)
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
