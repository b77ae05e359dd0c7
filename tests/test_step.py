"""The jitted step: objective, compile-once, grad modes, baselines, devices."""

import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from small_state import second_task, small_batch, small_state

import dlcft_jax as dj
from dlcft_jax import losses
from dlcft_jax import regularizer as rg
from dlcft_jax import train_state as ts


def _penalty(state, params):
    """R(θ) = ½ δᵀ H̄ δ from the penalty state inside the optimizer state."""
    anchor = state.penalty_state.anchor
    return state.curvature.quadratic(jax.tree.map(jnp.subtract, params, anchor))


def test_step_compiles_once_per_input_shape():
    fn = jax.jit(chex.assert_max_traces(ts.step, n=1))
    batch = small_batch()
    state = small_state()
    for _ in range(3):
        state, _ = fn(state, batch)
    curv = dj.estimate_curvature(state, [batch], jax.random.key(0))
    state = dj.begin_task(
        dj.end_task(state, curv),
        num_steps=7,
        class_mask=jnp.array([1.0, 1.0, 0.0]),
    )
    # A new task, schedule, mask and curvature: no retrace.
    for _ in range(3):
        state, _ = fn(state, batch)
    # A new batch shape is the only thing that traces again.
    with pytest.raises(AssertionError, match='traced > 1 times'):
        fn(state, small_batch(b=4))
    # The exported jitted step behaves the same way.
    before = dj.step._cache_size()
    for _ in range(2):
        state, _ = dj.step(state, batch)
    assert dj.step._cache_size() - before <= 1


def test_objective_is_task_weighted_average_and_penalty_is_active():
    batch = small_batch()
    state = second_task(small_state(), batch)
    assert int(state.task) == 1
    new, m = dj.step(state, batch)
    logits = ts.apply_model(state, state.params, batch['image'])
    data = losses.mse_loss(logits, batch['label'])
    pen = _penalty(state, state.params)
    np.testing.assert_allclose(m['data_loss'], data, rtol=1e-5)
    np.testing.assert_allclose(m['penalty'], pen, rtol=1e-4)
    np.testing.assert_allclose(m['loss'], (data + pen) / 2, rtol=1e-5)
    assert float(pen) > 0
    assert int(new.step) == int(state.step) + 1


def test_step_gradient_is_the_objective_gradient_plus_damping():
    """With plain SGD (no clip/decay/momentum) one step moves θ by −η·g, where
    g = ∇[(L + t·R)/(t+1)] + κ(θ − θ_{t−1})."""
    cfg = dj.METHODS['dlcft'].replace(
        optimizer=dj.Optimizer(
            name='sgd',
            momentum=0.0,
            clip_norm=0.0,
            weight_decay=0.0,
            schedule='constant',
            learning_rate=0.1,
        ),
        penalty=dict(proximal=1e-2),
    )
    batch = small_batch()
    state = second_task(small_state(cfg), batch)

    def objective(params):
        logits = ts.apply_model(state, params, batch['image'])
        return rg.task_objective(
            losses.mse_loss(logits, batch['label']),
            _penalty(state, params),
            state.task,
        )

    g = jax.grad(objective)(state.params)
    want = jax.tree.map(
        lambda p, gg, c: p - 0.1 * (gg + 1e-2 * (p - c)),
        state.params,
        g,
        state.centre,
    )
    new, _ = dj.step(state, batch)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        new.params,
        want,
    )


def test_vjp_and_jvp_grad_modes_take_the_same_step():
    batch = small_batch()
    s1 = second_task(
        small_state(dj.METHODS['dlcft'].replace(network=dict(grad_mode='vjp'))),
        batch,
    )
    s2 = s1.replace(method=dj.METHODS['dlcft'])
    a, _ = dj.step(s1, batch)
    b, _ = dj.step(s2, batch)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7),
        a.params,
        b.params,
    )


def test_finetune_baseline_trains_the_nonlinear_network_without_penalty():
    batch = small_batch()
    state = small_state(dj.METHODS['finetune'])
    assert state.curvature is None
    state, m = dj.step(state, batch)
    assert float(m['penalty']) == 0.0
    np.testing.assert_allclose(
        m['data_loss'],
        losses.cross_entropy_loss(
            ts.apply_model(
                small_state(dj.METHODS['finetune']),
                small_state(dj.METHODS['finetune']).params,
                batch['image'],
            ),
            batch['label'],
        ),
        rtol=1e-5,
    )
    state = dj.end_task(state, None)
    assert int(state.task) == 1
    # No penalty, so no (t + 1) weighting: the objective is the task loss.
    state, m = dj.step(state, batch)
    np.testing.assert_allclose(m['loss'], m['data_loss'])


def test_learning_rate_decays_linearly_to_zero_within_a_task():
    state = small_state()
    lrs = []
    batch = small_batch()
    for _ in range(5):
        state, m = dj.step(state, batch)
        lrs.append(float(m['learning_rate']))
    np.testing.assert_allclose(
        lrs, [1e-4 * (1 - k / 5) for k in range(5)], rtol=1e-6
    )


def test_a_batch_of_the_wrong_shape_fails_at_trace_time():
    state, batch = small_state(), small_batch()
    with pytest.raises(AssertionError, match='label'):
        dj.step(state, {**batch, 'label': batch['label'][:4]})
    with pytest.raises(AssertionError, match='label'):
        dj.step(state, {**batch, 'label': batch['label'].astype(jnp.float32)})
    with pytest.raises(AssertionError, match='class_mask'):  # another width
        dj.step(state, {**batch, 'class_mask': jnp.ones((8, 4))})


def test_bad_method_record_is_explained():
    with pytest.raises(ValueError, match="Penalty: kind must be"):
        dj.Penalty('ewc2')
    with pytest.raises(ValueError, match='Optimizer: name must be'):
        dj.METHODS['dlcft'].replace(optimizer=dict(name='adamw'))
    with pytest.raises(ValueError, match='StoredLogits'):
        dj.METHODS['dlcft'].replace(replay=dict(logit_weight=0.3))


def test_parallel_batch_must_divide_devices():
    from dlcft_jax import parallel

    with pytest.raises(ValueError, match='not divisible'):
        parallel.shard_batch({'x': jnp.zeros((5, 2))}, num_devices=2)


def test_eight_devices_equal_one_device():
    script = Path(__file__).with_name('multidevice_check.py')
    env = dict(
        os.environ,
        XLA_FLAGS='--xla_force_host_platform_device_count=8',
        JAX_PLATFORMS='cpu',
    )
    out = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert 'OK' in out.stdout
