"""The quadratic penalty of past tasks as an optax transformation.

`quadratic_penalty(kind, proximal=κ)` is a `GradientTransformation` that a
user puts first in any optax chain. Its state (`PenaltyState`) holds the
anchor θ_{t−1}, the running average H̄ of the curvature of the t finished
tasks and t itself; its update maps the gradient of the current task's loss
L_t to the gradient of the per-task objective (docs/method.md §4.2; the
proximal term follows the authors' code)

    ∇L_t  ↦  (∇L_t + t · H̄ (θ − θ_{t−1})) / (t + 1) + κ (θ − θ_{t−1}),

i.e. of J_t = (L_t + t·R)/(t+1) + ½κ‖θ − θ_{t−1}‖², R = ½ δᵀ H̄ δ. No λ is
tuned: for a linear model with the MSE loss R is the exact sum of the past
losses' quadratic expansions, so J_t is the joint objective (docs/method.md
§6.1).
At t = 0 the curvature product is skipped (`lax.cond`).

The transformation needs `params` in `update` (as `optax.add_decayed_weights`
does); the parameters must have the structure of the curvature's blocks
({'backbone': ..., 'head': ...} for the K-FAC kinds). The penalty value of
the last update is kept in the state (`last_value`), for logging.

Task boundaries are explicit calls on the optimizer state, wherever the
penalty sits in the chain:

    opt_state = penalty.end_task(opt_state, params, task_curvature)
    opt_state = penalty.carry_over(tx.init(params), opt_state)  # fresh moments

`dlcft_jax.create_state` / `begin_task` / `end_task` do both for a
`TrainState`, and `create_state` fills in the zero curvature of the right
shapes (`PenaltyState.curvature` is None until then).

`per_task_schedule(η)` is the other stateful part DLCFT needs: the learning
rate η·(1 − k/N_t) restarted at every task, with N_t held in the state so that
a task of another length does not recompile the step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dlcft_jax import curvature_kinds as kinds

Params = Any


class PenaltyState(flax.struct.PyTreeNode):
    """State of `quadratic_penalty`.

    Attributes:
      anchor: θ_{t−1}, the parameters at the end of the previous task.
      curvature: H̄, a `KroneckerCurvature` or `DiagonalCurvature` (None
        until `with_curvature` or `create_state` sets its shapes).
      num_tasks: int32, t: the number of finished tasks.
      last_value: float32, R at the parameters of the last update.
      kind: static, the `curvature_kinds` estimator of H.
      cached: with `every` > 1, H̄ δ at the last refresh (else None).
      count: int32, updates since the task began (drives the refresh).
    """

    anchor: Params
    curvature: Any
    num_tasks: jax.Array
    last_value: jax.Array
    kind: Any = flax.struct.field(pytree_node=False)
    cached: Params = None
    count: jax.Array | None = None


def quadratic_penalty(
    kind: kinds.CurvatureKind,
    *,
    proximal: float = 0.0,
    curvature: kinds.Curvature | None = None,
    every: int = 1,
) -> optax.GradientTransformation:
    """The penalty of past tasks as the first link of an optax chain.

    Args:
      kind: how the curvature of a task is estimated (`curvature_kinds.KFAC`,
        `EWC`, `MAS`); kept in the state for `estimate_curvature`.
      proximal: κ ≥ 0 of the proximal term κ(θ − θ_{t−1}) (the authors'
        "damping", 1e-4 for DLCFT; 0 disables it).
      curvature: an initial (zero) curvature; None leaves it for
        `with_curvature` (`create_state` fills it).
      every: compute the curvature product H̄ δ at every `every`-th update
        only (the first of each task included) and reuse it in between
        (an approximation: exact for `every` = 1, the default). It is the
        penalty's whole cost (a fixed cost per step, whatever the batch), so
        `every` = k divides it by k; the value logged between refreshes is
        ½ δᵀ(H̄ δ)_cached. `python -m benchmarks.step_speed
        --penalty_every=1,4` measures the time, and the README the accuracy.

    Returns:
      A `GradientTransformation` whose update needs `params`.
    """
    if proximal < 0:
        raise ValueError(f'proximal must be >= 0, got {proximal}.')
    if every < 1:
        raise ValueError(f'every must be >= 1, got {every}.')

    def init(params):
        return PenaltyState(
            anchor=jax.tree.map(jnp.copy, params),
            curvature=curvature,
            num_tasks=jnp.zeros((), jnp.int32),
            last_value=jnp.zeros((), jnp.float32),
            kind=kind,
            cached=None if every == 1 else jax.tree.map(jnp.zeros_like, params),
            count=None if every == 1 else jnp.zeros((), jnp.int32),
        )

    def update(grads, state, params=None):
        if params is None:
            raise ValueError(
                'quadratic_penalty needs the parameters: call '
                'tx.update(grads, opt_state, params).'
            )
        if state.curvature is None:
            raise ValueError(
                'The penalty has no curvature yet: build the state with '
                'dlcft_jax.create_state, or call '
                'penalty.with_curvature(opt_state, zero_curvature) first.'
            )
        delta = jax.tree.map(jnp.subtract, params, state.anchor)
        t = state.num_tasks.astype(jnp.float32)

        def value_of(hv):
            value = 0.5 * optax.tree.vdot(delta, hv)
            return value.astype(state.last_value.dtype)

        def active():
            hv = state.curvature.matvec(delta)
            return hv, value_of(hv)

        def inactive():
            return jax.tree.map(jnp.zeros_like, delta), jnp.zeros_like(
                state.last_value
            )

        if every == 1:
            hv, value = jax.lax.cond(state.num_tasks > 0, active, inactive)
            extra = {}
        else:
            refresh = (state.num_tasks > 0) & (state.count % every == 0)
            hv, value = jax.lax.cond(
                refresh, active, lambda: (state.cached, value_of(state.cached))
            )
            extra = {'cached': hv, 'count': state.count + 1}
        out = jax.tree.map(lambda g, h: (g + t * h) / (t + 1.0), grads, hv)
        if proximal > 0:
            out = jax.tree.map(lambda g, d: g + proximal * d, out, delta)
        return out, state.replace(last_value=value, **extra)

    return optax.GradientTransformation(init, update)


class TaskScheduleState(flax.struct.PyTreeNode):
    """State of `per_task_schedule`: steps taken and N_t of this task.

    Attributes:
      count: int32, steps since the last `init` (the start of the task).
      num_steps: int32, N_t.
      peak: static, η.
      schedule: static, 'linear' or 'constant'.
    """

    count: jax.Array
    num_steps: jax.Array
    peak: float = flax.struct.field(pytree_node=False, default=1.0)
    schedule: str = flax.struct.field(pytree_node=False, default='linear')

    def rate(self) -> jax.Array:
        """η_k of the next step."""
        if self.schedule == 'constant':
            return jnp.asarray(self.peak, jnp.float32)
        frac = self.count.astype(jnp.float32) / jnp.maximum(
            self.num_steps.astype(jnp.float32), 1.0
        )
        return self.peak * jnp.clip(1.0 - frac, 0.0, 1.0)


def per_task_schedule(
    learning_rate: float, schedule: str = 'linear'
) -> optax.GradientTransformation:
    """Scales updates by −η_k, η_k = η(1 − k/N_t) ('linear') or η.

    k counts the steps since the last `tx.init` (a task's start); N_t is set
    by `set_num_steps` and is a value in the state, not a compile-time
    constant, so tasks of different lengths share one compiled step.
    """
    if schedule not in ('linear', 'constant'):
        raise ValueError(
            f"schedule must be 'linear' or 'constant', got {schedule!r}."
        )

    def init(params):
        del params
        return TaskScheduleState(
            count=jnp.zeros((), jnp.int32),
            num_steps=jnp.ones((), jnp.int32),
            peak=float(learning_rate),
            schedule=schedule,
        )

    def update(updates, state, params=None):
        del params
        lr = state.rate()
        updates = jax.tree.map(lambda u: -lr * u, updates)
        return updates, state.replace(count=state.count + 1)

    return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------
# Operations on an optimizer state that contains these states.


def _is_node(x) -> bool:
    return isinstance(x, (PenaltyState, TaskScheduleState))


def _map(fn: Callable[[Any], Any], opt_state):
    """Applies `fn` to every PenaltyState / TaskScheduleState in the tree."""
    return jax.tree.map(
        lambda x: fn(x) if _is_node(x) else x, opt_state, is_leaf=_is_node
    )


def _find(opt_state, cls):
    found = [
        x
        for x in jax.tree.leaves(opt_state, is_leaf=_is_node)
        if isinstance(x, cls)
    ]
    return found[0] if found else None


def find(opt_state) -> PenaltyState | None:
    """The (first) `PenaltyState` inside an optimizer state, or None."""
    return _find(opt_state, PenaltyState)


def with_curvature(opt_state, curvature: kinds.Curvature):
    """Sets the curvature (e.g. zeros of the right shapes) of every penalty."""
    return _map(
        lambda s: (
            s.replace(curvature=curvature) if isinstance(s, PenaltyState) else s
        ),
        opt_state,
    )


def end_task(opt_state, params: Params, task_curvature):
    """Task t is done: H̄ ← (t·H̄ + H_t)/(t+1), anchor ← θ_t, t ← t + 1."""

    def finish(s):
        if not isinstance(s, PenaltyState):
            return s
        if task_curvature is None:
            raise ValueError(
                'end_task needs the task curvature when the optimizer has a '
                'quadratic penalty (see dlcft_jax.estimate_curvature).'
            )
        return s.replace(
            curvature=s.curvature.accumulate(task_curvature, s.num_tasks),
            anchor=jax.tree.map(jnp.copy, params),
            num_tasks=s.num_tasks + 1,
        )

    return _map(finish, opt_state)


def carry_over(new_opt_state, old_opt_state):
    """`new_opt_state` (fresh moments) with the penalty states of the old one.

    The two must come from the same transformation (same tree structure).
    """

    def pick(new, old):
        if not isinstance(new, PenaltyState):
            return new
        # The refresh counter restarts with the task (its first update
        # computes H̄ δ afresh).
        return old.replace(count=new.count)

    return jax.tree.map(pick, new_opt_state, old_opt_state, is_leaf=_is_node)


def set_num_steps(opt_state, num_steps) -> Any:
    """Sets N_t of every `per_task_schedule` in the state."""
    n = jnp.asarray(num_steps, jnp.int32)
    return _map(
        lambda s: (
            s.replace(num_steps=n) if isinstance(s, TaskScheduleState) else s
        ),
        opt_state,
    )


def learning_rate(opt_state) -> jax.Array | None:
    """η of the next step of the `per_task_schedule` in the state, else None."""
    state = _find(opt_state, TaskScheduleState)
    return None if state is None else state.rate()
