"""The quadratic penalty and the sequential = joint property.

See docs/method.md §6.1.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import dlcft_jax as dj
from dlcft_jax import linearization as lin
from dlcft_jax import losses
from dlcft_jax import regularizer as rg
from dlcft_jax import train_state as ts
from dlcft_jax.models.small_cnn import init_small


def _f64(tree):
    return jax.tree.map(
        lambda a: (
            a.astype(jnp.float64)
            if jnp.issubdtype(a.dtype, jnp.floating)
            else a
        ),
        tree,
    )


def _penalty(state, params):
    """R(θ) = ½ δᵀ H̄ δ from the penalty state in the optimizer state."""
    anchor = state.penalty_state.anchor
    return state.curvature.quadratic(jax.tree.map(jnp.subtract, params, anchor))


def _tasks(num_tasks, b=12, num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for t in range(num_tasks):
        # Each task has its own input distribution (shifted mean) and labels.
        x = rng.normal(size=(b, 8, 8, 3)) + 0.5 * t
        y = rng.integers(0, num_classes, size=b)
        out.append(
            {'image': jnp.asarray(x), 'label': jnp.asarray(y, jnp.int32)}
        )
    return out


@pytest.mark.parametrize('restricted', [False, True])
def test_model_penalty_equals_dense_block_diagonal_form(restricted):
    with jax.enable_x64(True):
        # Every layer kind, a depthwise conv with a bias included.
        apply_fn, v = init_small(jax.random.key(0), depthwise_bias=True)
        v = _f64(v)
        batch = _tasks(1)[0]
        state = dj.create_state(
            apply_fn,
            v,
            num_classes=3,
            example_input=batch['image'],
            method=dj.METHODS['dlcft'].replace(
                penalty=dict(kind='tkfac' if restricted else 'kfac')
            ),
        )
        head = {
            'kernel': jax.random.normal(jax.random.key(1), (6, 3), jnp.float64),
            'bias': jnp.zeros(3, jnp.float64),
        }
        state = state.replace(params={**state.params, 'head': head})
        curv = dj.estimate_curvature(state, [batch], jax.random.key(2))
        centre = state.params
        params = jax.tree.map(
            lambda a: (
                a + 0.1 * jax.random.normal(jax.random.key(3), a.shape, a.dtype)
            ),
            centre,
        )
        assert isinstance(curv, dj.KroneckerCurvature)
        assert curv.restricted == restricted
        H, flatten = rg.dense_penalty_matrix(
            curv.as_dict(), params, restricted=restricted
        )
        d = np.asarray(flatten(params) - flatten(centre))
        pen = rg.penalty(params, centre, curv.as_dict(), restricted=restricted)
        np.testing.assert_allclose(pen, 0.5 * d @ H @ d, rtol=1e-10)
        grads = jax.grad(rg.penalty)(
            params, centre, curv.as_dict(), restricted=restricted
        )
        np.testing.assert_allclose(flatten(grads), H @ d, rtol=1e-9, atol=1e-12)
        # The typed value's interface: quadratic form and product with δ.
        delta = jax.tree.map(jnp.subtract, params, centre)
        np.testing.assert_allclose(
            curv.quadratic(delta), 0.5 * d @ H @ d, rtol=1e-10
        )
        np.testing.assert_allclose(
            flatten(curv.matvec(delta)), H @ d, rtol=1e-9, atol=1e-12
        )


def _newton_minimize(objective, params):
    """Exact minimizer of a quadratic objective: one Newton step."""
    flat, unravel = ravel_pytree(params)

    def f(p):
        return objective(unravel(p))

    g = jax.grad(f)(flat)
    h = jax.hessian(f)(flat)
    return unravel(flat - jnp.linalg.solve(h, g))


def _head_sequential(tasks, curvature_transform=lambda c: c):
    # width 8 > features 6, so the features span all 6 dimensions and every
    # task's E[z̄z̄ᵀ] is non-singular (a unique minimizer per task).
    apply_fn, v = init_small(jax.random.key(0), width=8)
    v = _f64(v)
    state = dj.create_state(
        apply_fn,
        v,
        num_classes=3,
        trainable='none',
        example_input=tasks[0]['image'],
    )
    state = state.replace(
        params=_f64(state.params),
        centre=_f64(state.centre),
        opt_state=_f64(state.opt_state),
    )
    for t, batch in enumerate(tasks):

        def objective(params, batch=batch, state=state):
            logits = ts.apply_model(state, params, batch['image'])
            data = losses.mse_loss(logits, batch['label'])
            pen = _penalty(state, params)
            return rg.task_objective(data, pen, state.task)

        state = state.replace(params=_newton_minimize(objective, state.params))
        curv = dj.estimate_curvature(state, [batch], jax.random.key(t))
        state = dj.end_task(state, curvature_transform(curv))
        assert int(state.task) == t + 1
    return state, apply_fn, v


def _head_joint(tasks, apply_fn, v, state):
    def joint(params):
        return sum(
            losses.mse_loss(
                ts.apply_model(state, params, b['image']), b['label']
            )
            for b in tasks
        ) / len(tasks)

    return _newton_minimize(joint, state.params)


def test_sequential_training_equals_joint_training_for_the_exact_head():
    """With exact accumulated curvature, (L_t + t·R)/(t+1) task by task reaches
    the joint minimizer of the average loss (the head of an MSE model is an
    exactly quadratic problem, and its curvature A ⊗ I is exact)."""
    with jax.enable_x64(True):
        tasks = _tasks(4)
        state, apply_fn, v = _head_sequential(tasks)
        joint = _head_joint(tasks, apply_fn, v, state)
        np.testing.assert_allclose(
            ravel_pytree(state.params)[0],
            ravel_pytree(joint)[0],
            rtol=1e-5,
            atol=1e-5,
        )


def test_diagonal_curvature_breaks_sequential_equals_joint():
    """Control: an EWC-like diagonal of the same curvature leaves a clear gap,
    so the test above is not passing by construction."""
    with jax.enable_x64(True):
        tasks = _tasks(4)

        def diagonal(curv):
            a = curv.head['A']
            return curv.replace(head={**curv.head, 'A': jnp.diag(jnp.diag(a))})

        state, apply_fn, v = _head_sequential(tasks, diagonal)
        joint = _head_joint(tasks, apply_fn, v, state)
        gap = np.max(
            np.abs(ravel_pytree(state.params)[0] - ravel_pytree(joint)[0])
        )
        assert gap > 1e-2


def test_sequential_equals_joint_for_the_linearized_backbone_exact_hessian():
    """docs/method.md §6.1 on the linearized network itself (head fixed, so
    the model is linear in Δψ): each task's loss is exactly quadratic with
    constant Hessian H_i, and minimizing
    L_t + ½(θ−θ_{t−1})ᵀ(Σ_{i<t} H_i)(θ−θ_{t−1}) task by task gives the joint
    minimizer."""
    with jax.enable_x64(True):
        apply_fn, v = init_small(jax.random.key(0))
        v = _f64(v)
        tasks = _tasks(3, b=16)
        head = jax.random.normal(jax.random.key(5), (6, 3), jnp.float64)
        delta0 = lin.zeros_like_trainable(v)
        flat0, unravel = ravel_pytree(delta0)
        ridge = 1e-3  # makes every task's problem strictly convex

        def task_loss(p, batch):
            z = lin.tangent_apply(apply_fn, v, unravel(p), batch['image'])
            return losses.mse_loss(
                z @ head, batch['label']
            ) + 0.5 * ridge * jnp.sum(p**2)

        hessians = [jax.hessian(task_loss)(flat0, b) for b in tasks]
        theta = flat0
        h_sum = jnp.zeros_like(hessians[0])
        for batch, h in zip(tasks, hessians, strict=True):

            def obj(p, c=theta, hs=h_sum, b=batch):
                return task_loss(p, b) + 0.5 * (p - c) @ hs @ (p - c)

            g = jax.grad(obj)(theta)
            theta = theta - jnp.linalg.solve(jax.hessian(obj)(theta), g)
            h_sum = h_sum + h

        def joint_obj(p):
            return sum(task_loss(p, b) for b in tasks)

        g = jax.grad(joint_obj)(flat0)
        joint = flat0 - jnp.linalg.solve(jax.hessian(joint_obj)(flat0), g)
        np.testing.assert_allclose(theta, joint, rtol=1e-5, atol=1e-7)
        # And each H_i is the Gauss-Newton E[JᵀJ] (+ ridge): the loss is
        # quadratic.
        j = jax.jacobian(
            lambda p: (
                lin.tangent_apply(apply_fn, v, unravel(p), tasks[0]['image'])
                @ head
            )
        )(flat0)
        j = j.reshape(-1, flat0.size)
        np.testing.assert_allclose(
            hessians[0],
            j.T @ j / 16 + ridge * np.eye(flat0.size),
            rtol=1e-8,
            atol=1e-10,
        )
