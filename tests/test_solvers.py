"""The solvers of `dlcft_jax.solvers`: the head in closed form."""

import numpy as np
import pytest
from small_state import linear_features

from dlcft_jax import solvers

D, C, ALPHA = 5, 6, 15.0


def _task(rng, classes, n=40):
    z = rng.normal(size=(n, D)) + rng.normal(size=(1, D))
    y = rng.choice(classes, size=n)
    w = np.full((n,), 1.0 / n)  # the mean over the task's examples
    stats = solvers.to_host(
        solvers.head_stats(z, y, alpha=ALPHA, num_classes=C, weights=w)
    )
    return z, y, stats


def test_head_stats_give_the_loss_of_any_head(x64):
    rng = np.random.default_rng(0)
    z, y, stats = _task(rng, [0, 1, 2])
    wbar = rng.normal(size=(D + 1, C))
    mask = np.array([1, 1, 1, 1, 0, 0], np.float64)
    f = z @ wbar[:-1] + wbar[-1]
    target = ALPHA * np.eye(C)[y]
    want = np.mean(0.5 * np.sum(mask * (target - f) ** 2, -1))
    got = solvers.head_loss(stats, wbar, mask)
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_the_solve_is_the_minimiser_of_the_task_objective(x64):
    """The gradient of L + t·R_head vanishes at the solution, and inactive
    outputs keep their anchor."""
    rng = np.random.default_rng(1)
    _, _, stats = _task(rng, [2, 3])
    anchor = rng.normal(size=(D + 1, C))
    a = rng.normal(size=(D + 1, D + 1))
    a = a @ a.T / D
    mask = np.array([1, 1, 1, 1, 0, 0], np.float64)
    t = 2
    sol = solvers.solve_head(
        stats, class_mask=mask, anchor=anchor, past_a=a, num_tasks=t
    )
    grad = stats.gram @ sol - stats.cross + t * a @ (sol - anchor)
    np.testing.assert_allclose(grad[:, :4], 0.0, atol=1e-9)
    np.testing.assert_array_equal(sol[:, 4:], anchor[:, 4:])

    def objective(w):
        return solvers.head_loss(stats, w, mask) + t * solvers.head_penalty(
            w, anchor, a
        )

    for _ in range(5):
        other = sol + 1e-3 * rng.normal(size=sol.shape) * mask
        assert objective(other) > objective(sol)


@pytest.mark.parametrize('num_tasks', [2, 3])
def test_sequential_head_solves_equal_the_joint_solution(num_tasks, x64):
    """Frozen features, class-IL: a task-by-task closed-form head with the
    exact head curvature (the running average of each task's E[z̄z̄ᵀ]) and
    the penalty's weighting ends at the joint least-squares head over the
    union (every output active), to float64 precision: DLCFT's promise,
    exact for the head."""
    rng = np.random.default_rng(2)
    groups = [[0, 1], [2, 3], [4, 5]][:num_tasks]
    tasks = [_task(rng, g) for g in groups]
    wbar = np.zeros((D + 1, C))
    past_a = np.zeros((D + 1, D + 1))
    for t, (_, _, stats) in enumerate(tasks):
        mask = np.zeros(C)
        mask[: 2 * (t + 1)] = 1
        wbar = solvers.solve_head(
            stats, class_mask=mask, anchor=wbar, past_a=past_a, num_tasks=t
        )
        a_t = solvers.exact_head_curvature(stats)
        past_a = (t * past_a + a_t) / (t + 1)  # the penalty's running mean
    total = sum((s for _, _, s in tasks[1:]), tasks[0][2])
    joint = np.linalg.solve(total.gram, total.cross)
    seen = 2 * num_tasks
    np.testing.assert_allclose(wbar[:, :seen], joint[:, :seen], atol=1e-8)
    # Outputs of classes never seen stay at the anchor 0 in both.
    np.testing.assert_allclose(joint[:, seen:], 0.0, atol=1e-9)
    np.testing.assert_allclose(wbar[:, seen:], 0.0)


def _tiny(npz_dir, method, **overrides):
    from tiny_run import tiny_config

    config = tiny_config(npz_dir, method=method, **overrides)
    config.compilation_cache_dir = ''
    return config


def test_every_run_reports_each_tasks_objective_and_its_gap(tmp_path, npz_dir):
    from experiments import train

    results = train.train_and_evaluate(
        _tiny(npz_dir, 'dlcft'), str(tmp_path / 'w')
    )
    for p in results['per_task']:
        assert np.isfinite(p['objective']) and p['objective'] > 0
        assert p['objective_gap'] >= 0.0
        assert p['objective_head_optimum'] <= p['objective'] + 1e-9
        assert p['head_grad_norm'] > 0.0
    assert results['per_task'][0]['penalty'] == 0.0
    assert results['per_task'][1]['penalty'] > 0.0
    text = (tmp_path / 'w' / 'summary.txt').read_text()
    assert 'objective J_t' in text and 'gap to head optimum' in text


def test_frozen_backbone_sequential_closed_form_head_equals_joint(
    tmp_path, npz_dir
):
    """The runner end to end: with the backbone frozen and the head solved
    in closed form, the class-IL sequence (exact penalty, no replay) ends at
    the joint head: the same final accuracies as joint training of the
    same model on the union, and no gap at any task."""
    from experiments import train

    flags = {'train.trainable': 'none', 'replay.buffer_size': 0}
    seq = train.train_and_evaluate(
        _tiny(npz_dir, 'dlcft_head', **flags), str(tmp_path / 'seq')
    )
    joint_config = _tiny(npz_dir, 'joint', **flags)
    joint_config.solver.closed_form_head = True
    joint = train.train_and_evaluate(joint_config, str(tmp_path / 'joint'))
    for p in seq['per_task']:
        assert p['objective_gap'] == 0.0
        assert p['objective'] <= p['objective_before_head_solve'] + 1e-9
        assert p['head_grad_norm'] < 1e-4
    np.testing.assert_allclose(
        seq['accuracy_matrix'][-1], joint['accuracy_matrix'][0], atol=1e-9
    )


def test_kfac_solver_reaches_the_joint_minimiser_of_a_quadratic():
    """Head only, so J_t is exactly quadratic and K-FAC's head block is its
    exact Hessian: the preconditioned step with the exact step size is a
    Newton step. Task by task, a few full-batch steps of `dlcft_kfac` (no
    proximal term, no L2, tiny damping) reach the joint least-squares head
    of all tasks."""
    import jax
    import jax.numpy as jnp

    import dlcft_jax as dj

    rng = np.random.default_rng(0)
    d, per_task, groups = 8, 64, [[0, 1], [2, 3], [4, 5]]
    params0 = {'w': jnp.asarray(rng.normal(size=(d, D)), jnp.float32)}
    tasks = []
    for g in groups:
        x = rng.normal(size=(per_task, d)) + rng.normal(size=(1, d))
        y = np.asarray(rng.choice(g, size=per_task), np.int32)
        tasks.append({'image': jnp.asarray(x, jnp.float32), 'label': y})
    method = dj.METHODS['dlcft_kfac'].replace(
        penalty=dict(proximal=0.0),
        optimizer=dict(weight_decay=0.0, damping=1e-7, refresh_every=1),
    )
    state = dj.create_state(
        linear_features,
        params0,
        num_classes=C,
        example_input=tasks[0]['image'],
        trainable='none',
        method=method,
    )
    losses = []
    for t, batch in enumerate(tasks):
        mask = np.zeros(C, np.float32)
        mask[: 2 * (t + 1)] = 1
        state = dj.begin_task(state, num_steps=3, class_mask=mask)
        for _ in range(3):
            state, m = dj.step(state, batch)
            losses.append(float(m['loss']))
        curv = dj.estimate_curvature(state, [batch], jax.random.key(t))
        state = dj.end_task(state, curv)
    z = np.concatenate(
        [np.asarray(linear_features(params0, b['image'])) for b in tasks]
    )
    zbar = np.concatenate([z, np.ones((len(z), 1))], 1).astype(np.float64)
    y = np.concatenate([b['label'] for b in tasks])
    joint = np.linalg.lstsq(zbar, ALPHA * np.eye(C)[y], rcond=None)[0]
    got = solvers.stack_head(state.params['head'])
    np.testing.assert_allclose(got, joint, rtol=2e-3, atol=2e-3)
    assert all(np.isfinite(losses))
