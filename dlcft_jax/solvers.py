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

import jax
import jax.numpy as jnp
import numpy as np

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
    z: jax.Array,
    labels: jax.Array,
    *,
    alpha: float,
    num_classes: int,
    weights: jax.Array | None = None,
) -> HeadStats:
    """The `HeadStats` of one batch of features z (B, D) (jit-able)."""
    zbar = jnp.concatenate([z, jnp.ones((z.shape[0], 1), z.dtype)], axis=1)
    if weights is None:
        weights = jnp.ones((z.shape[0],), z.dtype)
    w = weights.astype(z.dtype)
    target = alpha * jax.nn.one_hot(labels, num_classes, dtype=z.dtype)
    return HeadStats(
        gram=jnp.einsum('n,ni,nj->ij', w, zbar, zbar),
        cross=jnp.einsum('n,ni,nc->ic', w, zbar, target),
        target_sq=jnp.sum(w) * alpha**2,
        weight=jnp.sum(w),
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
      ridge: λ ≥ 0 added to the diagonal (0: none; a singular system then
        falls back to the least-norm solution).

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
    try:
        sol = np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    active = np.asarray(class_mask, np.float64) > 0
    return np.where(active[None], sol, anchor)


def exact_head_curvature(stats: HeadStats) -> np.ndarray:
    """E[z̄z̄ᵀ] of the task from its sums: the head factor A_t that makes
    the penalty the exact sum of the past head losses."""
    return np.asarray(stats.gram, np.float64) / max(float(stats.weight), 1e-12)
