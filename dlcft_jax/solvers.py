"""Minimising a task's objective, not just stepping on it.

DLCFT's promise (docs/method.md §6.1) holds for the *minimiser* of each
task's objective

    J_t(θ) = (L_t(θ) + t·R(θ)) / (t + 1),  R = ½ (θ − θ_{t−1})ᵀ H̄ (θ − θ_{t−1}),

and a fixed budget of first-order steps stops short of it. This module
holds what measures and closes that gap.

**The head in closed form.** With the features z̄ = [g_lin(x); 1] fixed,
the α-MSE loss is a least-squares problem in the head W̄ = [W; b], and the
head's block of H̄ is A ⊗ I with A the running average of E[z̄z̄ᵀ] over the
finished tasks. Column c of W̄ (output c) then solves

    (G + t·A) w̄_c = B_c + t·A w̄_c^{(t−1)}      (c active; else w̄_c stays)

with G = Σ_n ω_n z̄_n z̄_nᵀ and B = Σ_n ω_n z̄_n (α e_{y_n})ᵀ the weighted
statistics of the task's examples (ω: each row's weight in the expected
batch loss). `HeadStats` are those sums (add them over batches),
`solve_head` the solve, `head_loss` the loss of any head from the same
sums. With a frozen backbone and A taken from the same statistics
(`exact_head_curvature`), task-by-task solves give the joint solution
exactly (tests/test_solvers.py).

The solves and the objective are float64 NumPy on the host: a (D+1)² system
once per task, where float32 loses digits to the Gram matrix's conditioning.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dlcft_jax import losses
from dlcft_jax import penalty as pen_lib

Params = Any


class HeadStats(NamedTuple):
    """Weighted sums over examples of a task (add them over batches).

    Attributes:
      gram: (D+1, D+1) Σ ω z̄ z̄ᵀ.
      cross: (D+1, C) Σ ω z̄ (α e_y)ᵀ.
      target_sq: () Σ ω α² (the squared norm of the targets).
      weight: () Σ ω.
    """

    gram: Any
    cross: Any
    target_sq: Any
    weight: Any

    def __add__(self, other):  # type: ignore[override]
        return HeadStats(*(a + b for a, b in zip(self, other, strict=True)))


def head_stats(
    z,
    labels,
    *,
    alpha: float,
    num_classes: int,
    weights=None,
) -> HeadStats:
    """The `HeadStats` of features z (N, D), in float64 on the host (the
    sums then do not depend on how the examples were split over devices,
    and the solve gets every digit the features have)."""
    z = np.asarray(z, np.float64)
    zbar = np.concatenate([z, np.ones((len(z), 1))], 1)
    w = (
        np.ones((len(z),))
        if weights is None
        else np.asarray(weights, np.float64)
    )
    target = alpha * np.eye(num_classes)[np.asarray(labels)]
    return HeadStats(
        gram=(zbar * w[:, None]).T @ zbar,
        cross=(zbar * w[:, None]).T @ target,
        target_sq=float(np.sum(w)) * alpha**2,
        weight=float(np.sum(w)),
    )


def to_host(stats: HeadStats) -> HeadStats:
    """The sums as float64 NumPy arrays."""
    return HeadStats(*(np.asarray(x, np.float64) for x in stats))


def stack_head(head: Params) -> np.ndarray:
    """W̄ = [W; b], (D+1, C), float64."""
    return np.concatenate(
        [
            np.asarray(head['kernel'], np.float64),
            np.asarray(head['bias'], np.float64)[None],
        ]
    )


def unstack_head(wbar: np.ndarray, like: Params) -> Params:
    """{'kernel', 'bias'} from W̄, in the dtypes of `like`."""
    return {
        'kernel': jnp.asarray(wbar[:-1], like['kernel'].dtype),
        'bias': jnp.asarray(wbar[-1], like['bias'].dtype),
    }


def head_loss(stats: HeadStats, wbar: np.ndarray, class_mask) -> float:
    """½ Σ_n ω_n Σ_c m_c (α e_{y_n} − W̄ᵀ z̄_n)_c² from the sums (the label's
    output is active, so every target lies in the masked outputs)."""
    m = np.asarray(class_mask, np.float64)
    fit = np.einsum('ic,ij,jc->c', wbar, stats.gram, wbar)
    lin = np.einsum('ic,ic->c', wbar, stats.cross)
    return float(0.5 * (stats.target_sq - 2 * m @ lin + m @ fit))


def head_penalty(wbar: np.ndarray, anchor: np.ndarray, past_a) -> float:
    """The head's part of R: ½ Σ_c (w̄_c − w̄⁰_c)ᵀ A (w̄_c − w̄⁰_c)."""
    if past_a is None:
        return 0.0
    d = wbar - anchor
    return float(0.5 * np.einsum('ic,ij,jc->', d, past_a, d))


def solve_head(
    stats: HeadStats,
    *,
    class_mask,
    anchor: np.ndarray,
    past_a: np.ndarray | None,
    num_tasks: int,
    ridge: float = 0.0,
) -> np.ndarray:
    """argmin over W̄ of L(W̄) + t·R_head(W̄) (the head's part of J_t times
    t + 1), column by column; inactive outputs keep their anchor.

    Args:
      stats: the task's `HeadStats` (host, float64).
      class_mask: (C,) active outputs.
      anchor: W̄^{(t−1)} (D+1, C), the head at the end of the last task.
      past_a: A, the penalty's head factor (the average E[z̄z̄ᵀ] of the t
        finished tasks), or None when the head is not penalised.
      num_tasks: t.
      ridge: λ ≥ 0 added to the diagonal (0: none; a singular system gets
        the minimum-norm minimiser).

    Returns:
      W̄ (D+1, C), float64.
    """
    g = np.asarray(stats.gram, np.float64)
    lhs = g.copy()
    rhs = np.asarray(stats.cross, np.float64).copy()
    if past_a is not None and num_tasks > 0:
        a = np.asarray(past_a, np.float64)
        lhs += num_tasks * a
        rhs += num_tasks * a @ anchor
    if ridge > 0:
        lhs += ridge * np.eye(lhs.shape[0])
    # Least squares, not a plain solve: with fewer examples than features
    # (or collinear ones) the system is singular, and the minimum-norm
    # minimiser is the stable choice; its objective is the minimum either way.
    sol = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    active = np.asarray(class_mask, np.float64) > 0
    return np.where(active[None], sol, anchor)


def exact_head_curvature(stats: HeadStats) -> np.ndarray:
    """E[z̄z̄ᵀ] of the task from its sums: the head factor A_t that makes
    the penalty the exact sum of the past head losses."""
    return np.asarray(stats.gram, np.float64) / max(float(stats.weight), 1e-12)


# ----------------------------------------------------------------------------
# K-FAC-preconditioned updates with an exact step along the quadratic model.


class SolverContext(NamedTuple):
    """What a curvature-aware transformation may ask of the step's batch.

    `dlcft_jax.train_state.step` passes one to every transformation of the
    chain that takes extra arguments (`optax.GradientTransformationExtraArgs`)
    as `solver_context=`; a user's loop builds it with `solver_context`.

    Attributes:
      gn_products: `(v_1, …, v_k) -> (k, k)`: v_iᵀ G v_j, G the Gauss–Newton
        matrix of the label loss on the batch at the current parameters (one
        `jax.linearize` of the model, k tangent passes). For the linearized
        model with α-MSE and a fixed head, G is the loss's exact Hessian.
      batch_curvature: `kind -> value`: the kind's curvature estimate on
        this batch at the current parameters (`curvature_kinds`).
      past_curvature: H̄ of the finished tasks (None without a penalty).
      num_tasks: t, float32.
    """

    gn_products: Any
    batch_curvature: Any
    past_curvature: Any
    num_tasks: jax.Array


def solver_context(
    model,
    params0: Params,
    params: Params,
    batch,
    *,
    class_mask: jax.Array,
    weights: jax.Array | None,
    rng: jax.Array,
    past_curvature=None,
    num_tasks=0,
    axis_name: str | None = None,
) -> SolverContext:
    """The `SolverContext` of `batch` for `model` at `params` (the label
    loss's Gauss–Newton: identity on the active outputs for α-MSE,
    diag(p) − ppᵀ of the masked softmax for cross-entropy; rows weighted by
    'label_scale' and `weights`, as the label loss weighs them)."""
    x = batch['image']
    n = x.shape[0]
    row_w = jnp.ones((n,), jnp.float32)
    if 'label_scale' in batch:
        row_w = row_w * batch['label_scale']
    if weights is not None:
        row_w = row_w * weights
        norm = jnp.maximum(jnp.sum(weights), 1e-12)
    else:
        norm = jnp.asarray(n, jnp.float32)

    def gn_products(tangents):
        logits, jvp = jax.linearize(
            lambda p: model.logits(params0, p, x), params
        )
        mask = jnp.broadcast_to(class_mask, logits.shape)
        us = [jvp(v) for v in tangents]
        if model.loss == 'mse':
            hus = [u * mask for u in us]
        else:
            p = jax.nn.softmax(losses.masked_logits(logits, mask), -1)
            hus = [p * u - p * jnp.sum(p * u, -1, keepdims=True) for u in us]
        q = (
            jnp.stack(
                [
                    jnp.stack([jnp.sum(row_w[:, None] * a * b) for b in us])
                    for a in hus
                ]
            )
            / norm
        )
        if axis_name is not None:
            q = jax.lax.pmean(q, axis_name)
        return q

    def batch_curvature(kind):
        return kind.batch(
            model,
            params0,
            params,
            batch,
            rng,
            class_mask=class_mask,
            axis_name=axis_name,
        )

    return SolverContext(
        gn_products,
        batch_curvature,
        past_curvature,
        jnp.asarray(num_tasks, jnp.float32),
    )


class KFACSolverState(flax.struct.PyTreeNode):
    """State of `kfac_solver`.

    Attributes:
      factors: running average of the current task's K-FAC factors (a
        `KroneckerCurvature`; None until `fill_factors`).
      inverse: the damped inverse factors of the preconditioner.
      previous: the last update (the momentum direction).
      count: int32, updates since the task began.
      rate, momentum: α and μ of the last update (for logging).
      kind: static, the K-FAC estimator of the factors.
    """

    factors: Any
    inverse: Any
    previous: Params
    count: jax.Array
    rate: jax.Array
    momentum: jax.Array
    kind: Any = flax.struct.field(pytree_node=False, default=None)


def _eye_like(m):
    return jnp.eye(m.shape[-1], dtype=m.dtype)


def _damped_inverse(f: dict, damping: float) -> dict:
    """π-damped inverses of one block's factors (Martens & Grosse, 2015,
    §6.3): (A + π√λ I)⁻¹ and (S + √λ/π I)⁻¹, π² = (tr A/dim A)/(tr S/dim S)."""
    a, s = f['A'], f['S']
    root = jnp.sqrt(jnp.asarray(damping, a.dtype))
    tiny = jnp.asarray(1e-12, a.dtype)
    if s.ndim == 1:  # depthwise: A (C, K, K), S (C,)
        ta = jnp.trace(a, axis1=-2, axis2=-1) / a.shape[-1]
        pi = jnp.sqrt(jnp.maximum(ta, tiny) / jnp.maximum(s, tiny))
        a_inv = jnp.linalg.inv(a + (pi * root)[:, None, None] * _eye_like(a))
        s_inv = 1.0 / (s + root / pi)
    else:
        ta = jnp.trace(a) / a.shape[-1]
        ts = jnp.trace(s) / s.shape[-1]
        pi = jnp.sqrt(jnp.maximum(ta, tiny) / jnp.maximum(ts, tiny))
        a_inv = jnp.linalg.inv(a + pi * root * _eye_like(a))
        s_inv = jnp.linalg.inv(s + root / pi * _eye_like(s))
        s_inv = 0.5 * (s_inv + s_inv.T)
    a_inv = 0.5 * (a_inv + jnp.swapaxes(a_inv, -1, -2))
    return {**f, 'A': a_inv, 'S': s_inv}


def _inverse(curv, damping: float):
    layers = {k: _damped_inverse(f, damping) for k, f in curv.layers.items()}
    head = None if curv.head is None else _damped_inverse(curv.head, damping)
    return curv.replace(layers=layers, head=head, restricted=False)


def kfac_solver(
    kind,
    *,
    damping: float = 1e-3,
    refresh_every: int = 20,
    decay: float = 0.95,
    momentum: bool = True,
    diagonal: float = 0.0,
    max_rate: float = 10.0,
) -> optax.GradientTransformationExtraArgs:
    """K-FAC-preconditioned updates whose size (and momentum) minimise the
    quadratic model of J_t along them (Martens & Grosse, 2015, §6–7).

    Put it last in a chain after `penalty.quadratic_penalty` (and any L2
    term), so that it receives ∇J_t. At each update:

    1. every `refresh_every` updates (the first of each task included) the
       current task's K-FAC factors are estimated on the batch and folded
       into a running average (`decay`); the preconditioner is
       P = (F_t + t·H̄)/(t + 1), combined factor by factor as the penalty
       combines tasks, inverted with π-damping λ = `damping`;
    2. d = −P⁻¹ ∇J_t;
    3. (α, μ) minimise M(α d + μ v) = J + ∇Jᵀu + ½ uᵀ(C + (λ + `diagonal`)I)u
       with v the previous update and C = (G_batch + t·H̄)/(t + 1): G_batch
       from one `jax.linearize` of the model (exact for the linearized
       model with α-MSE and a fixed head), H̄ from the penalty. A 2×2 solve;
       α is clipped to [0, `max_rate`];
    4. the update is α d + μ v.

    Args:
      kind: the K-FAC estimator of the current task's factors (the
        penalty's kind, so that the factors have the same blocks).
      damping: λ of the preconditioner and of the quadratic model.
      refresh_every: re-estimate the factors and invert every this many
        updates.
      decay: weight of the old factors in the running average.
      momentum: use the previous update as a second direction.
      diagonal: a multiple of the identity that is part of J_t's Hessian
        (the proximal κ and coupled L2 λ of the chain before).
      max_rate: the largest α.

    Returns:
      A `GradientTransformationExtraArgs`: its update needs `params` and
      `solver_context` (`SolverContext`). Its state needs factor shapes:
      `dlcft_jax.create_state` fills them (`fill_factors`).
    """

    def init(params):
        zero = jax.tree.map(jnp.zeros_like, params)
        return KFACSolverState(
            factors=None,
            inverse=None,
            previous=zero,
            count=jnp.zeros((), jnp.int32),
            rate=jnp.zeros((), jnp.float32),
            momentum=jnp.zeros((), jnp.float32),
            kind=kind,
        )

    def update(grads, state, params=None, *, solver_context=None, **unused):
        del params, unused
        if solver_context is None or state.factors is None:
            raise ValueError(
                'kfac_solver needs solver_context= in update and factor '
                'shapes in its state: build the state with '
                'dlcft_jax.create_state and step with dlcft_jax.step.'
            )
        ctx = solver_context
        t = ctx.num_tasks
        past = ctx.past_curvature

        def refresh():
            new = ctx.batch_curvature(kind)
            w = jnp.where(state.count == 0, 0.0, decay)
            factors = jax.tree.map(
                lambda old, cur: w * old + (1.0 - w) * cur, state.factors, new
            )
            combined = factors
            if past is not None:
                combined = jax.tree.map(
                    lambda c, p: (c + t * p) / (t + 1.0), factors, past
                )
            return factors, _inverse(combined, damping)

        factors, inverse = jax.lax.cond(
            state.count % refresh_every == 0,
            refresh,
            lambda: (state.factors, state.inverse),
        )
        d = jax.tree.map(jnp.negative, inverse.matvec(grads))
        v = state.previous
        dirs = (d, v) if momentum else (d,)
        k = len(dirs)
        gram = jnp.stack(
            [jnp.stack([optax.tree.vdot(a, b) for b in dirs]) for a in dirs]
        )
        c = ctx.gn_products(dirs)
        if past is not None:
            hs = [past.matvec(u) for u in dirs]
            pen = jnp.stack(
                [jnp.stack([optax.tree.vdot(a, h) for h in hs]) for a in dirs]
            )
            c = (c + t * pen) / (t + 1.0)
        c = c + (damping + diagonal) * gram
        b = jnp.stack([optax.tree.vdot(grads, u) for u in dirs])
        if k == 2:
            # Before any update (v = 0) the system is 1-D.
            first = state.count == 0
            c = jnp.where(first, jnp.diag(jnp.array([c[0, 0], 1.0])), c)
            b = jnp.where(first, b.at[1].set(0.0), b)
        coef = -jnp.linalg.solve(c, b)
        coef = coef.at[0].set(jnp.clip(coef[0], 0.0, max_rate))
        coef = jnp.where(jnp.all(jnp.isfinite(coef)), coef, 0.0)
        upd = jax.tree.map(lambda x: coef[0] * x, d)
        if k == 2:
            upd = jax.tree.map(lambda x, y: x + coef[1] * y, upd, v)
        new_state = KFACSolverState(
            factors=factors,
            inverse=inverse,
            previous=upd,
            count=state.count + 1,
            rate=coef[0].astype(jnp.float32),
            momentum=(coef[1] if k == 2 else jnp.zeros(())).astype(jnp.float32),
            kind=kind,
        )
        return upd, new_state

    return optax.GradientTransformationExtraArgs(init, update)


def _is_solver(x) -> bool:
    return isinstance(x, KFACSolverState)


def fill_factors(opt_state, zeros_of):
    """Sets zero factors (and inverses) of the right shapes in every
    `kfac_solver` state; `zeros_of(kind)` gives a zero curvature of the
    kind (`create_state` calls it)."""

    def fill(s):
        if not _is_solver(s) or s.factors is not None:
            return s
        zero = zeros_of(s.kind)
        return s.replace(factors=zero, inverse=zero.replace(restricted=False))

    return jax.tree.map(fill, opt_state, is_leaf=_is_solver)


def carry_over(new_opt_state, old_opt_state):
    """A fresh task's solver state (count 0: the first update re-estimates
    the factors; no momentum) with the old state's factor arrays, so that
    its structure does not change."""

    def pick(new, old):
        if not _is_solver(new):
            return new
        return new.replace(factors=old.factors, inverse=old.inverse)

    def leaf(x):  # a fresh penalty has no curvature yet: not compared
        return _is_solver(x) or isinstance(x, pen_lib.PenaltyState)

    return jax.tree.map(pick, new_opt_state, old_opt_state, is_leaf=leaf)


def find(opt_state) -> KFACSolverState | None:
    """The (first) `KFACSolverState` in an optimizer state, or None."""
    found = [
        x
        for x in jax.tree.leaves(opt_state, is_leaf=_is_solver)
        if _is_solver(x)
    ]
    return found[0] if found else None
