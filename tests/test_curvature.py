"""Curvature: exact head block, K-FAC factors, patch ordering, growth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlcft_jax import curvature as cv
from dlcft_jax import linearization as lin
from dlcft_jax import losses
from dlcft_jax import regularizer as rg
from dlcft_jax.models.small_cnn import init_small


def _head_matrix(head):
    return jnp.concatenate([head['kernel'], head['bias'][None]], 0)


def test_head_curvature_equals_hessian_of_mse_including_absent_classes():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        d, c, b = 5, 7, 16
        z = jnp.asarray(rng.normal(size=(b, d)))
        labels = jnp.asarray(rng.integers(0, 3, size=b))  # classes 3..6 absent
        head = {
            'kernel': jnp.asarray(rng.normal(size=(d, c))),
            'bias': jnp.asarray(rng.normal(size=(c,))),
        }

        def loss(mat):
            logits = z @ mat[:-1] + mat[-1]
            return losses.mse_loss(logits, labels)

        mat = _head_matrix(head)
        hess = jax.hessian(loss)(mat).reshape(mat.size, mat.size)
        A = cv.head_factor(z)
        np.testing.assert_allclose(hess, np.kron(A, np.eye(c)), atol=1e-12)
        # The penalty with S = I is the same quadratic form, for any Δ.
        delta = jnp.asarray(rng.normal(size=mat.shape))
        pen = rg.head_penalty(
            {'kernel': delta[:-1], 'bias': delta[-1]}, {'A': A, 'S': jnp.eye(c)}
        )
        np.testing.assert_allclose(
            pen, 0.5 * delta.ravel() @ hess @ delta.ravel(), rtol=1e-12
        )


def test_grown_head_penalty_is_the_old_loss_over_the_grown_head():
    """New rows, anchored at 0, get the old data's exact curvature (target
    0)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        d, c_old, c_new, b = 4, 3, 2, 32
        z = jnp.asarray(rng.normal(size=(b, d)))
        labels = jnp.asarray(rng.integers(0, c_old, size=b))
        head = {
            'kernel': jnp.asarray(rng.normal(size=(d, c_old))),
            'bias': jnp.asarray(rng.normal(size=(c_old,))),
        }
        curv = {'A': cv.head_factor(z), 'S': jnp.eye(c_old)}
        head_g, centre_g, curv_g = cv.grow_head(head, head, curv, c_new)
        assert head_g['kernel'].shape == (d, c_old + c_new)
        np.testing.assert_array_equal(centre_g['kernel'][:, c_old:], 0)
        np.testing.assert_array_equal(curv_g['S'], np.eye(c_old + c_new))

        def old_loss(mat):  # the old task's MSE over the grown head
            return losses.mse_loss(z @ mat[:-1] + mat[-1], labels)

        m0 = _head_matrix(centre_g)
        delta = jnp.asarray(rng.normal(size=m0.shape))
        exact = (
            old_loss(m0 + delta)
            - old_loss(m0)
            - jnp.vdot(jax.grad(old_loss)(m0), delta)
        )
        pen = rg.head_penalty({'kernel': delta[:-1], 'bias': delta[-1]}, curv_g)
        np.testing.assert_allclose(pen, exact, rtol=1e-10)


def _naive_patches(x, kh, kw, stride, pads):
    """Independent im2col with explicit loops: (B, positions, C·kh·kw)."""
    x = np.pad(np.asarray(x), ((0, 0), pads[0], pads[1], (0, 0)))
    b, h, w, c = x.shape
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = np.zeros((b, ho * wo, c * kh * kw), x.dtype)
    for i in range(ho):
        for j in range(wo):
            win = x[
                :, i * stride : i * stride + kh, j * stride : j * stride + kw, :
            ]
            out[:, i * wo + j] = win.transpose(0, 3, 1, 2).reshape(b, -1)
    return out


LAYERS = {
    'dense': dict(kind='dense'),
    'conv': dict(kind='conv', k=3, stride=2, pads=((0, 1), (0, 1))),
    'depthwise': dict(kind='depthwise', k=3, stride=1, pads=((1, 1), (1, 1))),
}


def _layer_setup(name, rng):
    p = LAYERS[name]
    b, c_in = 3, 4
    if name == 'dense':
        x = rng.normal(size=(b, c_in))
        kernel = rng.normal(size=(c_in, 5))
        spec = cv.LayerSpec('dense')

        def conv(x, k):
            return x @ k

    else:
        x = rng.normal(size=(b, 6, 5, c_in))
        c_out = c_in if name == 'depthwise' else 5
        kernel = rng.normal(
            size=(p['k'], p['k'], 1 if name == 'depthwise' else c_in, c_out)
        )
        spec = cv.LayerSpec(
            name,
            (p['k'], p['k']),
            (p['stride'],) * 2,
            p['pads'],
            (1, 1),
            (1, 1),
        )
        groups = c_in if name == 'depthwise' else 1

        def conv(x, k):
            return jax.lax.conv_general_dilated(
                x,
                k,
                spec.strides,
                spec.padding,
                dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                feature_group_count=groups,
            )

    return x, kernel, spec, conv


@pytest.mark.parametrize('name', list(LAYERS))
def test_patch_ordering_matches_kernel_flattening(name):
    """Σ_{n,t} a gᵀ from our patches equals the autodiff kernel gradient."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        x, kernel, spec, conv = _layer_setup(name, rng)
        y = conv(jnp.asarray(x), jnp.asarray(kernel))
        g = rng.normal(size=y.shape)
        grad = jax.grad(lambda k: jnp.vdot(conv(jnp.asarray(x), k), g))(
            jnp.asarray(kernel)
        )
        kind = 'depthwise' if name == 'depthwise' else 'dense'
        grad_mat = cv.kernel_matrix(grad, None, kind)
        b = x.shape[0]
        if name == 'dense':
            a = x[:, None, :]
        else:
            a = _naive_patches(
                x,
                kernel.shape[0],
                kernel.shape[1],
                spec.strides[0],
                spec.padding,
            )
            np.testing.assert_allclose(
                cv.patches(jnp.asarray(x), spec), a, atol=1e-12
            )
        gm = g.reshape(b, a.shape[1], -1)
        if name == 'depthwise':
            c = gm.shape[-1]
            mine = np.einsum(
                'btck,btc->ck', a.reshape(b, a.shape[1], c, -1), gm
            )
        else:
            mine = np.einsum('btp,bto->po', a, gm)
        np.testing.assert_allclose(grad_mat, mine, atol=1e-10)


@pytest.mark.parametrize(
    'name,has_bias',
    [
        ('dense', True),
        ('conv', True),
        ('depthwise', False),
        ('depthwise', True),
    ],
)
@pytest.mark.parametrize('restricted', [False, True])
def test_kfac_penalty_equals_explicit_kronecker_form(
    name, has_bias, restricted
):
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        x, kernel, spec, conv = _layer_setup(name, rng)
        y = conv(jnp.asarray(x), jnp.asarray(kernel))
        g = jnp.asarray(rng.normal(size=y.shape))
        f = cv.layer_factors(spec, jnp.asarray(x), g, has_bias)
        # Factors from the independent im2col.
        b = x.shape[0]
        a = (
            x[:, None, :]
            if name == 'dense'
            else _naive_patches(
                x,
                kernel.shape[0],
                kernel.shape[1],
                spec.strides[0],
                spec.padding,
            )
        )
        t = a.shape[1]
        gm = np.asarray(g).reshape(b, t, -1)
        if name == 'depthwise':
            c = gm.shape[-1]
            a4 = a.reshape(b, t, c, -1)
            if has_bias:  # each channel's patch gets its own trailing 1
                a4 = np.concatenate([a4, np.ones(a4.shape[:-1] + (1,))], -1)
            np.testing.assert_allclose(
                f['A'],
                np.einsum('btck,btcl->ckl', a4, a4) / (b * t),
                atol=1e-12,
            )
            np.testing.assert_allclose(
                f['S'], (gm**2).sum((0, 1)) / b, atol=1e-12
            )
        else:
            a = np.concatenate([a, np.ones(a.shape[:-1] + (1,))], -1)
            np.testing.assert_allclose(
                f['A'], np.einsum('btp,btq->pq', a, a) / (b * t), atol=1e-12
            )
            np.testing.assert_allclose(
                f['S'], np.einsum('bto,btp->op', gm, gm) / b, atol=1e-12
            )
        # Exact per-example trace of the Fisher: mean_n ‖∂ℓ_n/∂K‖².
        per_ex = []
        for n in range(b):
            xn, gn = jnp.asarray(x[n : n + 1]), g[n : n + 1]
            gk = jax.grad(lambda k, xn=xn, gn=gn: jnp.vdot(conv(xn, k), gn))(
                jnp.asarray(kernel)
            )
            sq = float(jnp.sum(gk**2))
            if has_bias:
                sq += float(
                    jnp.sum(jnp.sum(g[n].reshape(-1, g.shape[-1]), 0) ** 2)
                )
            per_ex.append(sq)
        np.testing.assert_allclose(f['trace'], np.mean(per_ex), rtol=1e-10)

        dk = jnp.asarray(rng.normal(size=kernel.shape))
        db = (
            jnp.asarray(rng.normal(size=kernel.shape[-1])) if has_bias else None
        )
        kind = 'depthwise' if name == 'depthwise' else 'dense'
        vec = np.asarray(cv.kernel_matrix(dk, db, kind)).ravel()
        m = cv.kfac_dense_matrix(f)
        if restricted:
            tr = float(np.trace(m))
            m = m * float(f['trace']) / tr
        np.testing.assert_allclose(
            rg.layer_penalty(dk, db, f, restricted=restricted),
            0.5 * vec @ m @ vec,
            rtol=1e-10,
        )
        # The custom VJP returns (A ⊗ S) vec(Δ) in the kernel's own layout.
        gk, gb = jax.grad(
            lambda k, bb: rg.layer_penalty(k, bb, f, restricted=restricted),
            argnums=(0, 1),
        )(dk, db)
        np.testing.assert_allclose(
            np.asarray(cv.kernel_matrix(gk, gb, kind)).ravel(),
            m @ vec,
            rtol=1e-9,
            atol=1e-12,
        )


@pytest.mark.parametrize(
    'impl,dw_bias', [('xla', False), ('shift', False), ('xla', True)]
)
def test_batch_statistics_are_those_of_the_linearized_network(impl, dw_bias):
    """Σ_t a gᵀ built from the recorded primal inputs and tangent-output
    gradients equals the autodiff gradient of the linearized loss w.r.t. each
    layer's Δ; the head factor is E[z̄ z̄ᵀ] of g_lin."""
    with jax.enable_x64(True):
        apply_fn, v = init_small(
            jax.random.key(0), depthwise_impl=impl, depthwise_bias=dw_bias
        )
        v = jax.tree.map(lambda a: a.astype(jnp.float64), v)
        x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3), jnp.float64)
        train0, _ = lin.split(v)
        delta = jax.tree.map(lambda a: 0.05 * jnp.ones_like(a), train0)
        head = {
            'kernel': jax.random.normal(jax.random.key(2), (6, 3), jnp.float64),
            'bias': jnp.zeros((3,), jnp.float64),
        }
        r = jax.random.normal(jax.random.key(3), (4, 3), jnp.float64)

        def lin_loss(d):  # Σ_n <r_n, f_lin(x_n)>: its gradient is Σ_n J_nᵀ r_n
            z = lin.tangent_apply(apply_fn, v, d, x)
            return jnp.vdot(z @ head['kernel'] + head['bias'], r)

        grads = jax.grad(lin_loss)(delta)
        layers = cv.regularized_layers(delta)
        _, _, outs, specs = cv.tapped_apply(apply_fn, v, x, layers)
        taps = {k: jnp.zeros_like(o) for k, o in outs.items()}

        def fwd(tp):
            z, inputs, _, _ = cv.tapped_apply(apply_fn, v, x, layers, tp)
            return z @ head['kernel'] + head['bias'], inputs

        _, vjp_fn, inputs = jax.vjp(fwd, taps, has_aux=True)
        (tap_grads,) = vjp_fn(r)
        for key, (has_bias, path) in layers.items():
            spec = specs[key]
            module_grad = grads
            for p in path:
                module_grad = module_grad[p]
            kind = 'depthwise' if spec.kind == 'depthwise' else 'dense'
            want = cv.kernel_matrix(
                module_grad['kernel'], module_grad.get('bias'), kind
            )
            b = x.shape[0]
            a = (
                inputs[key].reshape(b, -1, inputs[key].shape[-1])
                if spec.kind == 'dense'
                else cv.patches(inputs[key], spec)
            )
            g = tap_grads[key].reshape(b, a.shape[1], -1)
            if spec.kind == 'depthwise':
                a4 = a.reshape(b, a.shape[1], g.shape[-1], -1)
                if has_bias:
                    a4 = jnp.concatenate(
                        [a4, jnp.ones(a4.shape[:-1] + (1,))], -1
                    )
                got = jnp.einsum('btck,btc->ck', a4, g)
            else:
                if has_bias:
                    a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,))], -1)
                got = jnp.einsum('btp,bto->po', a, g)
            np.testing.assert_allclose(
                got, want, rtol=1e-9, atol=1e-11, err_msg=key
            )

        stats = cv.batch_curvature(
            apply_fn, v, delta, head, x, jax.random.key(4)
        )
        z = lin.tangent_apply(apply_fn, v, delta, x)
        np.testing.assert_allclose(
            stats['head']['A'], cv.head_factor(z), atol=1e-12
        )
        np.testing.assert_array_equal(stats['head']['S'], np.eye(3))
        assert set(stats['layers']) == set(layers)


def test_mse_pseudo_residual_gives_the_gauss_newton_factor():
    """For a dense head-like layer, S averaged over many pseudo-targets →
    WᵀW."""
    r = cv.pseudo_residual(
        jnp.zeros((20000, 3)), jax.random.key(0), 'mse', None
    )
    np.testing.assert_allclose(r.T @ r / r.shape[0], np.eye(3), atol=0.03)
    masked = cv.pseudo_residual(
        jnp.zeros((5, 3)), jax.random.key(0), 'mse', jnp.array([1.0, 1.0, 0.0])
    )
    np.testing.assert_array_equal(masked[:, 2], 0.0)


def test_accumulate_is_the_running_average_over_tasks():
    xs = [{'A': jnp.full((2, 2), float(i))} for i in range(1, 5)]
    run = xs[0]
    for t, x in enumerate(xs[1:], start=1):
        run = cv.accumulate(run, x, t)
    np.testing.assert_allclose(run['A'], np.full((2, 2), 2.5))


def test_grouped_conv_is_rejected_with_a_clear_message():
    import flax.linen as nn

    class G(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (1, 1), feature_group_count=2)(x).mean((1, 2))

    m = G()
    x = jnp.ones((1, 4, 4, 4))
    v = m.init(jax.random.key(0), x)
    d = lin.zeros_like_trainable(v)
    head = {'kernel': jnp.zeros((4, 2)), 'bias': jnp.zeros(2)}
    with pytest.raises(ValueError, match='grouped convolutions'):
        cv.batch_curvature(m.apply, v, d, head, x, jax.random.key(0))
