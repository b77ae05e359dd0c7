"""Each method's defining formula against autodiff, and the composable API.

EWC's diagonal, MAS's importance, LwF's target, DER / DER++'s terms, OSLA's
curvature, the penalty as a part of a user's optax chain (it reproduces the
preset DLCFT step, and sequential = joint through it), weighted curvature,
and the `trainable` edges.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from small_state import linear_features

import dlcft_jax as dj
from dlcft_jax import curvature as curv_lib
from dlcft_jax import data_terms as dterms
from dlcft_jax import linearization as lin
from dlcft_jax import losses, penalty
from dlcft_jax import train_state as ts
from dlcft_jax.models.small_cnn import SmallConvNet, init_small

C = 3


def _batch(b=6, seed=0):
    rng = np.random.default_rng(seed)
    return {
        'image': jnp.asarray(rng.normal(size=(b, 8, 8, 3)), jnp.float32),
        'label': jnp.asarray(rng.integers(0, C, size=b), jnp.int32),
    }


def _state(method, seed=1, **kwargs):
    """A small-CNN state with a random head and a non-zero Δ."""
    apply_fn, v = init_small(jax.random.key(0))
    state = dj.create_state(
        apply_fn,
        v,
        num_classes=C,
        example_input=_batch()['image'],
        method=method,
        **kwargs,
    )
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {
        'backbone': jax.tree.map(
            lambda a: 0.05 * jax.random.normal(k1, a.shape),
            state.params['backbone'],
        ),
        'head': {
            'kernel': 0.5 * jax.random.normal(k2, (6, C)),
            'bias': jnp.zeros(C),
        },
    }
    return state.replace(params=params)


def _assert_mean_equals(got, per_example):
    """`got` equals the mean over examples of the trees in `per_example`."""
    want = jax.tree.map(lambda *s: jnp.mean(jnp.stack(s), 0), *per_example)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-9),
        got,
        want,
    )


def _kind_args(state):
    """What a curvature kind takes of a state: model, ψ0, parameters."""
    return ts.model_of(state), state.params0, state.params


def _per_example_grad(state, x, objective):
    """∂ objective(f(x; θ))/∂θ for one example, plain autodiff."""
    return jax.grad(lambda p: objective(ts.apply_model(state, p, x[None])[0]))(
        state.params
    )


@pytest.mark.parametrize('loss', ['ce', 'mse'])
def test_ewc_diagonal_is_the_mean_squared_gradient_with_sampled_labels(loss):
    state = _state(dj.METHODS['ewc'].replace(terms=(dterms.LabelLoss(loss),)))
    batch = _batch()
    rng = jax.random.key(7)
    got = dj.curvature_kinds.EWC().batch(*_kind_args(state), batch, rng)
    assert isinstance(got, dj.DiagonalCurvature)
    squares = []
    for i in range(batch['image'].shape[0]):
        key = jax.random.fold_in(rng, i)
        logits = ts.apply_model(state, state.params, batch['image'][i : i + 1])[
            0
        ]
        if loss == 'ce':
            y = jax.random.categorical(key, logits)

            def nll(f, y=y):
                return -jax.nn.log_softmax(f)[y]
        else:
            target = logits + jax.random.normal(key, logits.shape)

            def nll(f, target=target):
                return 0.5 * jnp.sum(jnp.square(target - f))

        g = _per_example_grad(state, batch['image'][i], nll)
        squares.append(jax.tree.map(jnp.square, g))
    _assert_mean_equals(got.diag, squares)


def test_mas_importance_is_the_mean_absolute_gradient_of_the_output_norm():
    state = _state(dj.METHODS['mas'])
    batch = _batch()
    got = dj.curvature_kinds.MAS().batch(
        *_kind_args(state), batch, jax.random.key(0)
    )
    grads = [
        jax.tree.map(
            jnp.abs,
            _per_example_grad(
                state, batch['image'][i], lambda f: jnp.sum(jnp.square(f))
            ),
        )
        for i in range(batch['image'].shape[0])
    ]
    _assert_mean_equals(got.diag, grads)


def test_diagonal_penalty_is_half_weighted_squared_distance_and_task_head():
    state = _state(dj.METHODS['ewc'].replace(penalty=dict(head=False)))
    curv = dj.curvature_kinds.EWC(head=False).batch(
        *_kind_args(state), _batch(), jax.random.key(0)
    )
    # task-IL: no head entries in the penalty
    assert all(
        float(jnp.max(jnp.abs(x))) == 0.0
        for x in jax.tree.leaves(curv.diag['head'])
    )
    delta = jax.tree.map(lambda a: jnp.full_like(a, 0.5), state.params)
    want = 0.5 * sum(
        float(jnp.sum(d * 0.25)) for d in jax.tree.leaves(curv.diag)
    )
    np.testing.assert_allclose(curv.quadratic(delta), want, rtol=1e-6)
    np.testing.assert_allclose(
        jax.tree.leaves(curv.matvec(delta))[0],
        jax.tree.leaves(curv.diag)[0] * 0.5,
    )


def _after_first_task(state, batch, steps=3):
    state = dj.begin_task(state, num_steps=steps)
    for _ in range(steps):
        state, _ = dj.step(state, batch)
    curv = None
    if state.penalty_state is not None:
        curv = dj.estimate_curvature(state, [batch], jax.random.key(3))
    return dj.begin_task(dj.end_task(state, curv), num_steps=steps)


@pytest.mark.parametrize('kind', ['kl', 'mse'])
def test_lwf_target_is_the_frozen_previous_model(kind):
    cfg = dj.METHODS['lwf' if kind == 'kl' else 'lwf_mse']
    assert cfg.terms[1] == dterms.Distillation(kind)
    state = _state(cfg)
    batch = _batch()
    state = _after_first_task(state, batch)
    # Move the current model away from the teacher, which must stay put.
    state = state.replace(
        params=jax.tree.map(lambda a: a * 1.3 + 0.01, state.params)
    )
    mask = jnp.broadcast_to(jnp.array([1.0, 1.0, 0.0]), (6, C))
    batch = {**batch, 'distill_mask': mask}
    _, m = dj.step(state, batch)
    teacher = ts.apply_model(state, state.centre, batch['image'])
    student = ts.apply_model(state, state.params, batch['image'])
    if kind == 'kl':
        p = jax.nn.softmax(teacher[:, :2])
        want = jnp.mean(
            jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(student[:, :2])), -1)
        )
    else:
        want = jnp.mean(0.5 * jnp.sum(jnp.square(student - teacher)[:, :2], -1))
    np.testing.assert_allclose(m['penalty'], want, rtol=1e-5)
    np.testing.assert_allclose(
        m['loss'], (m['data_loss'] + 1.0 * want) / 2.0, rtol=1e-5
    )
    # The teacher is θ_{t−1}: the anchor end_task set, not the current θ.
    assert float(m['penalty']) > 1e-6


def test_lwf_kl_within_task_heads():
    """Task-IL: the softmax of each old head on its own block of outputs."""
    s = jnp.array([[0.3, -0.2, 1.0, 0.5]])
    t = jnp.array([[1.0, 0.0, -1.0, 2.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 1.0]])
    got = dterms.distill_loss(s, t, mask, kind='kl', group_size=2)
    want = 0.0
    for lo in (0, 2):
        p = jax.nn.softmax(t[0, lo : lo + 2])
        q = jax.nn.log_softmax(s[0, lo : lo + 2])
        want += jnp.sum(p * (jnp.log(p) - q))
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize('variant', ['der', 'derpp'])
def test_der_uses_stored_logits_and_derpp_adds_ce_on_buffer_labels(variant):
    # DER's terms on fine-tuning's network (BatchNorm frozen).
    der = dj.METHODS['finetune'].replace(
        terms=dj.METHODS[variant].terms, optimizer=dict(momentum=0.0)
    )
    state = dj.begin_task(_state(der), num_steps=5)
    b, r = 4, 2
    n = b + (2 * r if variant == 'derpp' else r)
    batch = _batch(n)
    kind = np.array([0] * b + [1] * r + ([2] * r if variant == 'derpp' else []))
    alpha, beta = 0.3, 0.5
    stored = np.random.default_rng(3).normal(size=(n, C)).astype(np.float32)
    label_scale = np.where(
        kind == 0, n / b, np.where(kind == 2, beta * n / r, 0)
    )
    batch = {
        **batch,
        'label_scale': jnp.asarray(label_scale, jnp.float32),
        'logit_scale': jnp.asarray(
            np.where(kind == 1, alpha * n / r, 0.0), jnp.float32
        ),
        'logit_target': jnp.asarray(stored),
    }
    _, m = dj.step(state, batch)
    f = ts.apply_model(state, state.params, batch['image'])
    ce = losses.cross_entropy_per_example(f, batch['label'])
    want = jnp.mean(ce[:b]) + alpha * jnp.mean(
        jnp.square(f[b : b + r] - stored[b : b + r])
    )
    if variant == 'derpp':
        want = want + beta * jnp.mean(ce[b + r :])
    np.testing.assert_allclose(m['data_loss'], want, rtol=1e-5)
    # The term reads the stored logits, not the current ones.
    batch2 = {**batch, 'logit_target': batch['logit_target'] + 1.0}
    _, m2 = dj.step(state, batch2)
    assert abs(float(m2['data_loss']) - float(m['data_loss'])) > 1e-3


def _batch_curvature(state, batch, rng, **kwargs):
    """`curvature.batch_curvature` (cross-entropy) at the state's parameters."""
    return curv_lib.batch_curvature(
        state.apply_fn,
        state.params0,
        state.params['backbone'],
        state.params['head'],
        batch['image'],
        rng,
        loss='ce',
        **kwargs,
    )


def test_osla_curvature_is_kfac_of_the_nonlinear_net_with_sampled_labels():
    state = _state(dj.METHODS['osla'])
    assert not state.method.network.linearized and state.method.loss == 'ce'
    batch = _batch()
    rng = jax.random.key(5)
    got = dj.train_state.curvature_step(state, batch, rng)
    assert isinstance(got, dj.KroneckerCurvature)
    want = _batch_curvature(
        state, batch, rng, linearized=False, class_mask=state.class_mask
    )
    jax.tree.map(
        np.testing.assert_allclose,
        got.as_dict(),
        want,
        is_leaf=lambda x: x is None,
    )
    # The head's output factor: E[(p − onehot(ỹ))(p − onehot(ỹ))ᵀ] with
    # ỹ ~ softmax(f) of the non-linear network at ψ0 + Δ.
    f = (
        lin.shifted_apply(
            state.apply_fn,
            state.params0,
            state.params['backbone'],
            batch['image'],
        )
        @ state.params['head']['kernel']
    )
    rows = []
    for i in range(6):
        y = jax.random.categorical(jax.random.fold_in(rng, i), f[i])
        rows.append(jax.nn.softmax(f[i]) - jax.nn.one_hot(y, C))
    r = jnp.stack(rows)
    np.testing.assert_allclose(got.head['S'], r.T @ r / 6, rtol=1e-5, atol=1e-7)
    # Layer statistics are those of ψ0 + Δ, not of ψ0 (the linearized ones).
    lin_stats = _batch_curvature(state, batch, rng, linearized=True)
    assert not np.allclose(
        got.layers['pw']['A'], lin_stats['layers']['pw']['A']
    )


@pytest.mark.parametrize('kind', ['kfac', 'ewc', 'mas'])
def test_padding_rows_do_not_enter_the_curvature(kind):
    state = _state(dj.METHODS['dlcft'].replace(penalty=dict(kind=kind)))
    batch = _batch(6)
    padded = {
        'image': jnp.concatenate([batch['image'], 50.0 + batch['image'][:2]]),
        'label': jnp.concatenate([batch['label'], batch['label'][:2]]),
        'weight': jnp.asarray([1.0] * 6 + [0.0] * 2),
    }
    # MSE pseudo-targets depend on the row index only: same draws.
    rng = jax.random.key(1)
    a = dj.estimate_curvature(state, [batch], rng)
    b = dj.estimate_curvature(state, [padded], rng)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-7),
        a,
        b,
    )


def _user_chain(n, lr=1e-4):
    return optax.chain(
        penalty.quadratic_penalty(dj.KFAC(), proximal=1e-4),
        optax.clip_by_global_norm(1.0),
        optax.add_decayed_weights(1e-5),
        optax.adam(optax.linear_schedule(lr, 0.0, n)),
    )


def test_a_user_optax_chain_with_the_penalty_reproduces_the_preset_step():
    n = 4
    batch = _batch(8)
    apply_fn, v = init_small(jax.random.key(0))
    states = [
        dj.create_state(
            apply_fn,
            v,
            num_classes=C,
            example_input=batch['image'],
            tx=tx,
            method=dj.METHODS['dlcft'],
            num_steps=n,
        )
        for tx in (None, _user_chain(n))
    ]
    out = []
    for state in states:
        for t in range(2):
            state = dj.begin_task(state, num_steps=n)
            for k in range(n):
                state, m = dj.step(state, _batch(8, seed=10 * t + k))
            curv = dj.estimate_curvature(state, [batch], jax.random.key(t))
            state = dj.end_task(state, curv)
        out.append((state, m))
    (a, ma), (b, mb) = out
    assert float(ma['penalty']) > 0
    np.testing.assert_allclose(ma['penalty'], mb['penalty'], rtol=1e-6)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9),
        a.params,
        b.params,
    )
    jax.tree.map(np.testing.assert_allclose, a.curvature, b.curvature)


def test_sequential_equals_joint_for_the_head_through_a_user_tx():
    """(L_t + t·R)/(t+1) with the exact head curvature, minimized task by task
    with a user's optax SGD, reaches the least-squares solution of all
    tasks' data (docs/method.md §6.1, the head being an exactly quadratic
    problem)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        d, per_task, num_tasks = 4, 40, 3
        params0 = {'w': jnp.eye(d, dtype=jnp.float64)}
        tasks = []
        for t in range(num_tasks):
            x = rng.normal(size=(per_task, d)) + 0.3 * t
            y = rng.integers(0, C, size=per_task)
            tasks.append(
                {'image': jnp.asarray(x), 'label': jnp.asarray(y, jnp.int32)}
            )
        tx = optax.chain(
            penalty.quadratic_penalty(dj.KFAC()), optax.sgd(0.2, momentum=0.5)
        )
        state = dj.create_state(
            linear_features,
            params0,
            num_classes=C,
            example_input=tasks[0]['image'],
            trainable='none',
            tx=tx,
            method=dj.METHODS['dlcft'].replace(penalty=dict(proximal=0.0)),
        )
        state = state.replace(
            params=jax.tree.map(lambda a: a.astype(jnp.float64), state.params),
            centre=jax.tree.map(lambda a: a.astype(jnp.float64), state.centre),
            opt_state=jax.tree.map(
                lambda a: (
                    a.astype(jnp.float64)
                    if jnp.issubdtype(a.dtype, jnp.floating)
                    else a
                ),
                state.opt_state,
            ),
        )
        step = jax.jit(ts.step)
        for t, batch in enumerate(tasks):
            state = dj.begin_task(state, num_steps=1)
            for _ in range(800):
                state, _ = step(state, batch)
            curv = dj.estimate_curvature(state, [batch], jax.random.key(t))
            state = dj.end_task(state, curv)
        # Joint: least squares of the mean of the task losses (equal sizes).
        x = np.concatenate([np.asarray(b['image']) for b in tasks])
        xb = np.concatenate([x, np.ones((len(x), 1))], 1)
        y = (
            15.0
            * np.eye(C)[np.concatenate([np.asarray(b['label']) for b in tasks])]
        )
        w_joint = np.linalg.lstsq(xb, y, rcond=None)[0]
        got = np.concatenate(
            [state.params['head']['kernel'], state.params['head']['bias'][None]]
        )
        np.testing.assert_allclose(got, w_joint, rtol=1e-5, atol=1e-5)


def test_trainable_all_warns_about_leaves_without_curvature_and_keeps_stats():
    apply_fn, v = init_small(jax.random.key(0))
    with pytest.warns(UserWarning, match='no K-FAC block'):
        state = dj.create_state(
            apply_fn,
            v,
            num_classes=C,
            example_input=_batch()['image'],
            trainable='all',
        )
    assert 'batch_stats' not in state.params['backbone']
    assert 'scale' in state.params['backbone']['params']['bn']
    # A diagonal regularizer covers every leaf: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        dj.create_state(
            apply_fn,
            v,
            num_classes=C,
            example_input=_batch()['image'],
            trainable='all',
            method=dj.METHODS['ewc'],
        )


def test_bn_train_updates_the_batchnorm_statistics():
    net = SmallConvNet()
    v = net.init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)))

    def train_apply(variables, x):
        return net.apply(variables, x, train=True, mutable=['batch_stats'])

    with pytest.raises(ValueError, match='non-linear'):
        dj.Network(bn_train=True)
    cfg = dj.METHODS['finetune'].replace(network=dict(bn_train=True))
    with pytest.raises(ValueError, match='train_apply_fn'):
        dj.create_state(
            net.apply,
            v,
            num_classes=C,
            example_input=_batch()['image'],
            method=cfg,
        )
    state = dj.create_state(
        net.apply,
        v,
        num_classes=C,
        example_input=_batch()['image'],
        method=cfg,
        train_apply_fn=train_apply,
    )
    batch = _batch()
    new, _ = dj.step(state, batch)
    _, want = train_apply(
        lin.shift(state.params0, state.params['backbone']), batch['image']
    )
    np.testing.assert_allclose(
        new.params0['batch_stats']['bn']['mean'],
        want['batch_stats']['bn']['mean'],
        rtol=1e-6,
    )
    assert not np.allclose(
        new.params0['batch_stats']['bn']['mean'],
        state.params0['batch_stats']['bn']['mean'],
    )


@pytest.mark.parametrize('update_all', [False, True])
def test_outputs_no_data_term_touches_stay_put(update_all):
    """Task-IL: another task's head gets no data gradient; weight decay alone
    would move it by about η per step through Adam's normalisation."""
    cfg = dj.METHODS['dlcft'].replace(
        optimizer=dict(learning_rate=1e-2, update_untouched_outputs=update_all)
    )
    state = dj.begin_task(_state(cfg), num_steps=10)
    batch = {
        **_batch(),
        'class_mask': jnp.broadcast_to(jnp.array([1.0, 1.0, 0.0]), (6, C)),
    }
    new, _ = dj.step(state, batch)
    old_col = state.params['head']['kernel'][:, 2]
    new_col = new.params['head']['kernel'][:, 2]
    moved = float(jnp.max(jnp.abs(new_col - old_col)))
    if update_all:
        assert moved > 1e-3  # Adam-normalised decay: about η
    else:
        assert moved == 0.0
    # The touched outputs train either way.
    assert (
        float(
            jnp.max(
                jnp.abs(
                    new.params['head']['kernel'][:, :2]
                    - state.params['head']['kernel'][:, :2]
                )
            )
        )
        > 1e-4
    )


def test_penalty_every_k_refreshes_the_product_and_reuses_it_between():
    """`quadratic_penalty(every=k)`: the product H̄δ is exact at the first
    update of a task and every k-th after it, and the last refreshed one is
    used in between; every=1 is exact at every update."""
    d = jnp.asarray([1.0, 2.0, 3.0])
    curv = dj.DiagonalCurvature(diag={'w': d})
    anchor = {'w': jnp.zeros(3)}
    grads = {'w': jnp.zeros(3)}
    outs = {}
    for every in (1, 3):
        tx = penalty.quadratic_penalty(dj.EWC(), curvature=curv, every=every)
        state = tx.init(anchor)
        # One finished task (t = 1): the update is (g + H̄δ)/2.
        state = penalty.end_task(state, anchor, curv)
        state = penalty.carry_over(tx.init(anchor), state)
        got = []
        for k in range(7):
            params = {'w': jnp.full(3, float(k + 1))}
            update, state = tx.update(grads, state, params)
            got.append(np.asarray(update['w']))
        outs[every] = got
    exact = [0.5 * np.asarray(d) * (k + 1) for k in range(7)]
    np.testing.assert_allclose(outs[1], exact, rtol=1e-6)
    lagged = [exact[k - k % 3] for k in range(7)]
    np.testing.assert_allclose(outs[3], lagged, rtol=1e-6)
    with pytest.raises(ValueError, match='every'):
        penalty.quadratic_penalty(dj.EWC(), every=0)


def test_a_data_term_of_ones_own_joins_the_step_without_an_edit_to_it():
    """Data terms are pure `fn(logits, batch, context)`: the step sums the
    current ones (L_t) and weights the past ones by t; a user's extra term
    changes the loss exactly by its own value."""
    batch = _batch(8)

    def logit_l2(logits, batch, ctx):
        del batch, ctx
        return 0.05 * jnp.mean(jnp.sum(jnp.square(logits), -1))

    base = dj.begin_task(_state(dj.METHODS['dlcft']), num_steps=4)
    extra = base.replace(
        data_terms=base.data_terms + (dterms.DataTerm(logit_l2),)
    )
    _, m0 = dj.step(base, batch)
    _, m1 = dj.step(extra, batch)
    logits = ts.apply_model(base, base.params, batch['image'])
    want = float(m0['data_loss']) + float(logit_l2(logits, batch, None))
    np.testing.assert_allclose(float(m1['data_loss']), want, rtol=1e-5)
    assert not dterms.any_past(extra.data_terms)
    lwf = dj.METHODS['lwf'].terms
    assert dterms.any_past(lwf) and dterms.needs_teacher(lwf)


def test_the_docs_methods_table_is_rendered_from_the_records():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / 'README.md').read_text()
    assert dj.methods.table() in readme
    for name in dj.METHODS:
        assert f'| `{name}` |' in readme


def test_a_record_is_changed_part_by_part():
    base = dj.METHODS['dlcft']
    m = base.replace(penalty=dict(kind='tkfac'), optimizer=dict(name='sgd'))
    assert m.penalty == dj.Penalty('tkfac') and m.optimizer.name == 'sgd'
    assert m.network == base.network and m.terms == base.terms
    assert base.penalty.kind == 'kfac'  # records are values
    assert base.replace(penalty=None).penalty is None
    assert hash(m) != hash(base) and m == base.replace(
        penalty=dj.Penalty('tkfac'), optimizer=dict(name='sgd')
    )
    record = m.as_dict()
    assert record['terms'] == [
        {
            'term': 'LabelLoss',
            'kind': 'mse',
            'alpha': 15.0,
            'all_outputs': False,
        }
    ]
    assert record['penalty']['kind'] == 'tkfac'


def test_a_new_method_is_one_record_that_the_step_runs():
    """DLCFT with DER's stored-logit term, composed from existing parts: its
    step's data loss is DLCFT's label loss plus DER's term, and its optimizer
    is DLCFT's (penalty first)."""
    new = dj.METHODS['dlcft_der']
    assert new.penalty == dj.METHODS['dlcft'].penalty
    assert dterms.StoredLogits() in new.terms
    state = dj.begin_task(_state(new), num_steps=4)
    batch = _batch(6)
    stored = jnp.asarray(
        np.random.default_rng(0).normal(size=(6, C)), jnp.float32
    )
    scale = jnp.asarray([0, 0, 0, 0, 0.3 * 3, 0.3 * 3], jnp.float32)
    batch = {**batch, 'logit_target': stored, 'logit_scale': scale}
    _, m = dj.step(state, batch)
    f = ts.apply_model(state, state.params, batch['image'])
    label = losses.mse_loss(f, batch['label'], alpha=15.0)
    der = jnp.mean(scale * jnp.mean(jnp.square(f - stored), -1))
    np.testing.assert_allclose(m['data_loss'], label + der, rtol=1e-5)
    assert state.penalty_state is not None


def test_label_loss_over_all_outputs_ignores_the_class_mask():
    """Mammoth's class-IL cross-entropy: the unseen classes' outputs enter
    the softmax (pushed down) instead of being masked out."""
    base = dj.METHODS['finetune']
    every = base.replace_terms(dterms.LabelLoss, all_outputs=True)
    batch = _batch(6)
    mask = jnp.asarray([1.0, 1.0, 0.0])
    batch = {**batch, 'label': jnp.minimum(batch['label'], 1)}
    masked = dj.begin_task(_state(base), num_steps=3, class_mask=mask)
    full = dj.begin_task(_state(every), num_steps=3, class_mask=mask)
    _, m_masked = dj.step(masked, batch)
    _, m_full = dj.step(full, batch)
    f = ts.apply_model(full, full.params, batch['image'])
    want = jnp.mean(losses.cross_entropy_per_example(f, batch['label']))
    np.testing.assert_allclose(m_full['data_loss'], want, rtol=1e-5)
    assert float(m_full['data_loss']) > float(m_masked['data_loss'])
    new, _ = dj.step(full, batch)  # the unseen output's row now moves
    moved = (
        new.params['head']['kernel'][:, 2] - full.params['head']['kernel'][:, 2]
    )
    assert float(jnp.max(jnp.abs(moved))) > 0


def test_the_step_gives_an_rng_to_a_train_function_that_asks_for_one():
    """Stochastic depth needs randomness in training: a `train_apply_fn`
    with `needs_rng` gets a key that depends on the step."""
    net = SmallConvNet()
    v = net.init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)))
    keys = []

    def train_apply(variables, x, rng):
        keys.append(rng)
        return net.apply(variables, x, train=True, mutable=['batch_stats'])

    train_apply.needs_rng = True
    cfg = dj.METHODS['finetune'].replace(network=dict(bn_train=True))
    state = dj.create_state(
        net.apply,
        v,
        num_classes=C,
        example_input=_batch()['image'],
        method=cfg,
        train_apply_fn=train_apply,
    )
    state = dj.begin_task(state, num_steps=3)
    step = jax.jit(ts.step)
    state, _ = step(state, _batch())
    # Traced once, with a key (a 2-argument call would have failed).
    assert len(keys) == 1 and jax.dtypes.issubdtype(
        keys[0].dtype, jax.dtypes.prng_key
    )
