"""How far each task's training stopped from its own optimum, and the head
in closed form.

After a task's steps the runner passes the task's training examples (and
the buffer's) once through the trained network, without augmentation, and
reads from the features (`dlcft_jax.solvers`):

* `objective`: J_t = (L_t + t·R)/(t + 1) at the final θ, L_t the expected
  label loss of a training batch (current rows, and replayed rows with
  their share of the batch and weight ρ), R the penalty of past tasks;
* `head_grad_norm`: ‖∇_W̄ J_t‖, exact;
* `objective_head_optimum`: min over the head of J_t with the backbone at
  its final value, in closed form (α-MSE methods);
* `objective_gap`: `objective` − `objective_head_optimum` ≥ 0. With a frozen
  backbone (`config.train.trainable='none'`) it is the exact distance to
  min J_t; otherwise it is a lower bound on it (the part of the gap the
  head alone could close).

With `Method.closed_form_head` the head is then set to that minimiser, and
the task's head curvature to the exact E[z̄z̄ᵀ] of its examples, so that
with a frozen backbone task-by-task training ends at the joint solution.
The record gives the objective after the solve and, as
`objective_before_head_solve`, before it.

What it costs: one forward pass over the task's training examples per task
(the `curvature` column of the profile holds it).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import dlcft_jax as dj
from dlcft_jax import parallel, solvers
from dlcft_jax import train_state as ts


@jax.jit
def _penalty_value(state: dj.TrainState) -> jax.Array:
    """R = ½ δᵀ H̄ δ at the state's parameters (0 without a penalty)."""
    pen = state.penalty_state
    if pen is None:
        return jnp.zeros((), jnp.float32)
    params = ts.optimizer_params(state, state.params)
    delta = jax.tree.map(jnp.subtract, params, pen.anchor)
    return pen.curvature.quadratic(delta)


def _stats(z: np.ndarray, labels: np.ndarray, weight: float, alpha, c):
    w = np.full((len(labels),), weight)
    return solvers.head_stats(z, labels, alpha=alpha, num_classes=c, weights=w)


def _past_head_factor(state: dj.TrainState) -> np.ndarray | None:
    """A: the penalty's head factor, when the head block is A ⊗ I."""
    pen = state.penalty_state
    if pen is None:
        return None
    curv = pen.curvature
    if not isinstance(curv, dj.KroneckerCurvature) or curv.head is None:
        return None
    return np.asarray(curv.head['A'], np.float64)


def measure(
    features_of,
    state,
    images: np.ndarray,
    labels: np.ndarray,
    replayed: tuple[np.ndarray, np.ndarray] | None,
    *,
    class_mask: np.ndarray,
    batch_shares: tuple[float, float],
    replay_weight: float,
    solve: bool,
) -> tuple[Any, dict[str, Any], np.ndarray | None]:
    """The convergence record of the task just trained.

    Args:
      features_of: `images -> (N, D)` features of the replicated `state`
        (the runner's pmapped `features`, test transform).
      state: the replicated train state at the end of the task's steps.
      images, labels: the task's training examples (rows of the head).
      replayed: the buffer's (images, labels), or None.
      class_mask: (C,) the outputs the task trained.
      batch_shares: (b, r): current and replayed rows of a training batch.
      replay_weight: ρ.
      solve: set the head to its closed-form minimiser.

    Returns:
      (state, record, exact head factor of the task or None): the state
      with the solved head when `solve`, the record's fields, and E[z̄z̄ᵀ]
      of the task's own examples (for the penalty) when `solve`.
    """
    host = parallel.host_unreplicate(state)
    method = host.method
    t = int(host.task)
    reg = float(_penalty_value(host))
    record: dict[str, Any] = {'penalty': reg}
    if method.loss != 'mse':
        # No closed form: the objective's data part is not recorded here.
        return state, record, None
    alpha = next(
        term.alpha
        for term in method.terms
        if isinstance(term, dj.data_terms.LabelLoss)
    )
    c = class_mask.shape[0]
    b, r = batch_shares
    rows = b + (r if replayed is not None else 0)
    own = _stats(features_of(images), labels, 1.0, alpha, c)
    # Each row's weight in the expected batch loss.
    stats = solvers.HeadStats(*(x * (b / rows / len(labels)) for x in own))
    if replayed is not None and len(replayed[1]):
        rep = _stats(features_of(replayed[0]), replayed[1], 1.0, alpha, c)
        share = replay_weight * r / rows / len(replayed[1])
        stats = stats + solvers.HeadStats(*(x * share for x in rep))
    past_a = _past_head_factor(host)
    if not method.penalty or not method.penalty.head:
        past_a = None
    wbar = solvers.stack_head(host.params['head'])
    anchor = wbar
    if host.penalty_state is not None:
        anchor_head = host.penalty_state.anchor['head']
        anchor = solvers.stack_head(anchor_head)
    reg_head = solvers.head_penalty(wbar, anchor, past_a)

    def objective(w):
        loss = solvers.head_loss(stats, w, class_mask)
        pen = reg - reg_head + solvers.head_penalty(w, anchor, past_a)
        return (loss + t * pen) / (t + 1)

    best = solvers.solve_head(
        stats,
        class_mask=class_mask,
        anchor=anchor,
        past_a=past_a,
        num_tasks=t,
    )

    def grad_norm(w):
        grad = stats.gram @ w - stats.cross
        if past_a is not None:
            grad = grad + t * past_a @ (w - anchor)
        return float(np.linalg.norm(grad * (class_mask > 0)[None]) / (t + 1))

    record.update(
        objective=objective(wbar),
        head_grad_norm=grad_norm(wbar),
        objective_head_optimum=objective(best),
    )
    record['objective_gap'] = max(
        record['objective'] - record['objective_head_optimum'], 0.0
    )
    exact_a = None
    if solve:
        record['objective_before_head_solve'] = record['objective']
        record['objective'] = record['objective_head_optimum']
        record['objective_gap'] = 0.0
        record['head_grad_norm'] = grad_norm(best)
        head = solvers.unstack_head(best, host.params['head'])
        host = host.replace(params={**host.params, 'head': head})
        state = parallel.host_replicate(host)
        exact_a = solvers.exact_head_curvature(own)
    return state, record, exact_a


def with_exact_head(curvature, exact_a: np.ndarray | None):
    """The task's curvature with its head factor set to the exact one."""
    if exact_a is None or not isinstance(curvature, dj.KroneckerCurvature):
        return curvature
    if curvature.head is None:
        return curvature
    head = dict(curvature.head)
    a = head['A']
    head['A'] = jnp.broadcast_to(jnp.asarray(exact_a, a.dtype), a.shape)
    return curvature.replace(head=head)
