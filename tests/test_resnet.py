"""ResNets: shapes, torchvision parameter counts, names, linearization, K-FAC.

Parameter counts. torchvision's resnet18 / resnet50 with 1000 classes have
11,689,512 / 25,557,032 parameters. The CIFAR ResNet-18 with 100 classes has
11,220,132: ResNet-18 minus the 7×7 stem plus a 3×3 one (9,408 → 1,728) and
with a 100-way fc (513,000 → 51,300), 11,689,512 − 7,680 − 461,700; a torch
model built by hand with torchvision's BasicBlock layout counts the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from small_state import with_random_head

import dlcft_jax as dj
from dlcft_jax import curvature as cv
from dlcft_jax import linearization as lin
from dlcft_jax.models import resnet as rn
from dlcft_jax.models.efficientnet_lite import FEATURE_DIM, EfficientNetLite0


def _images(batch: int, size: int, seed: int = 0) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)


def _random_variables(model: nn.Module, x: jax.Array, seed: int = 0) -> dict:
    """Random variables without compiling `model.init` (seconds per model).

    Kernels ~ N(0, 1/fan_in); BN scales and running variances in [1, 1.2],
    BN biases and running means ~ N(0, 0.1²), so BN is not the identity.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def fill(path: tuple[str, ...], shape: tuple[int, ...]) -> jax.Array:
        if path[-1] == 'kernel':
            value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        elif path[-1] in ('scale', 'var'):
            value = 1.0 + 0.2 * rng.uniform(size=shape)
        else:
            value = 0.1 * rng.normal(size=shape)
        return jnp.asarray(value, jnp.float32)

    flat = traverse_util.flatten_dict(shapes)
    return traverse_util.unflatten_dict(
        {k: fill(k, v.shape) for k, v in flat.items()}
    )


def _run_fast(fn: Callable[..., Any], *args: Any) -> Any:
    """jit-compiles and runs `fn` with LLVM optimisation off.

    The full-size ResNets' linearized and K-FAC programs take tens of seconds
    to compile on a 2-core CPU at the default level and a few at level 0; the
    program computes the same values, only its machine code is slower.
    """
    compiled = (
        jax.jit(fn).lower(*args).compile({'xla_backend_optimization_level': 0})
    )
    return compiled(*args)


def _param_count(model: nn.Module, size: int) -> int:
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, size, size, 3))
    )
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes['params']))


@pytest.mark.parametrize(
    'model, size, expected',
    [
        (rn.resnet18(num_classes=1000), 64, 11_689_512),
        (rn.resnet50(num_classes=1000), 64, 25_557_032),
        (rn.cifar_resnet18(num_classes=100), 32, 11_220_132),
    ],
)
def test_parameter_counts_match_torchvision(model, size, expected):
    assert _param_count(model, size) == expected


@pytest.mark.parametrize(
    'model, size, dim',
    [
        (rn.cifar_resnet18(width_multiplier=0.25), 32, 128),
        (rn.cifar_resnet18(width_multiplier=0.1), 32, 51),
        (rn.resnet18(), 64, 512),
        (rn.resnet50(), 64, 2048),
    ],
)
def test_output_shapes_and_feature_dims(model, size, dim):
    x = _images(2, size)
    assert rn.feature_dim(model) == dim
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert jax.eval_shape(model.apply, variables, x).shape == (2, dim)
    logits = model.clone(num_classes=7)
    variables = jax.eval_shape(logits.init, jax.random.key(0), x)
    assert variables['params']['fc']['kernel'].shape == (dim, 7)
    assert jax.eval_shape(logits.apply, variables, x).shape == (2, 7)


def test_names_mirror_torchvision_state_dict_keys():
    x = jnp.zeros((1, 64, 64, 3))
    v = jax.eval_shape(rn.resnet50(num_classes=5).init, jax.random.key(0), x)
    params, stats = v['params'], v['batch_stats']
    blocks = {
        f'layer{i + 1}_{j}'
        for i, n in enumerate((3, 4, 6, 3))
        for j in range(n)
    }
    assert set(params) == {'conv1', 'bn1', 'fc'} | blocks
    assert set(params['layer2_0']) == {
        'conv1',
        'bn1',
        'conv2',
        'bn2',
        'conv3',
        'bn3',
        'downsample_conv',
        'downsample_bn',
    }
    assert 'downsample_conv' not in params['layer2_1']
    assert set(params['layer2_0']['downsample_bn']) == {'scale', 'bias'}
    assert set(stats['layer2_0']['downsample_bn']) == {'mean', 'var'}
    # torch layer2.0.conv2.weight (128, 128, 3, 3) is HWIO here; the stride
    # sits in the 3×3 conv (v1.5), so its output is 8×8 for a 64 px input.
    assert params['layer2_0']['conv2']['kernel'].shape == (3, 3, 128, 128)
    downsample = params['layer1_0']['downsample_conv']['kernel']
    assert downsample.shape == (1, 1, 64, 256)
    assert params['conv1']['kernel'].shape == (7, 7, 3, 64)
    # ResNet-18's first stage keeps 64 channels at stride 1: no projection.
    v18 = jax.eval_shape(rn.resnet18().init, jax.random.key(0), x)
    assert 'downsample_conv' not in v18['params']['layer1_0']
    assert 'downsample_conv' in v18['params']['layer2_0']


def test_every_conv_has_explicit_symmetric_padding_and_no_bias():
    seen = {}

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Conv):
            seen['/'.join(context.module.path)] = context.module
        return next_fun(*args, **kwargs)

    model = rn.resnet50()
    x = jnp.zeros((1, 64, 64, 3))
    with nn.intercept_methods(interceptor):
        jax.eval_shape(model.init, jax.random.key(0), x)
    assert len(seen) == 53  # 1 stem + 16 × 3 + 4 projections
    for module in seen.values():
        k = module.kernel_size[0]
        assert module.padding == ((k // 2, k // 2), (k // 2, k // 2))
        assert not module.use_bias


def test_activation_switch_and_leaky_slope():
    x = _images(2, 32)
    leaky = rn.cifar_resnet18(width_multiplier=0.25)
    relu = leaky.clone(activation='relu')
    assert leaky.activation == 'leaky_relu'
    assert rn.resnet18().activation == 'relu'
    v = _random_variables(leaky, x)
    a, b = _run_fast(
        lambda p, xx: (leaky.apply(p, xx), relu.apply(p, xx)), v, x
    )
    assert not np.allclose(a, b)
    # ReLU features are non-negative; leaky ones are not.
    assert float(jnp.min(b)) >= 0 and float(jnp.min(a)) < 0
    act = rn._activation('leaky_relu')
    np.testing.assert_allclose(act(jnp.array([-2.0, 3.0])), [-0.02, 3.0])
    with pytest.raises(ValueError, match='unknown activation'):
        jax.eval_shape(
            rn.cifar_resnet18(activation='gelu').init, jax.random.key(0), x
        )


def test_train_mode_uses_batch_statistics_and_updates_them():
    model = rn.cifar_resnet18(width_multiplier=0.25)
    x = 3.0 + _images(4, 32)
    v = _random_variables(model, x)

    def run(variables, images):
        train_out, state = model.apply(
            variables,
            images,
            train=True,
            mutable=['batch_stats', 'intermediates'],
            capture_intermediates=True,
        )
        return train_out, state, model.apply(variables, images)

    out, state, inference_out = _run_fast(run, v, x)
    assert not np.allclose(out, inference_out)
    old = v['batch_stats']['bn1']['mean']
    new = state['batch_stats']['bn1']['mean']
    (conv1,) = state['intermediates']['conv1']['__call__']
    # Flax momentum 0.9 = PyTorch momentum 0.1: new = 0.9·old + 0.1·batch.
    np.testing.assert_allclose(
        new, 0.9 * old + 0.1 * jnp.mean(conv1, axis=(0, 1, 2)), atol=1e-5
    )


def test_split_head_gives_backbone_and_head():
    model = rn.cifar_resnet18(width_multiplier=0.25, num_classes=6)
    x = _images(2, 32)
    v = _random_variables(model, x)
    backbone_vars, head = rn.split_head(v)
    assert 'fc' not in backbone_vars['params'] and 'fc' in v['params']
    assert head['kernel'].shape == (128, 6) and head['bias'].shape == (6,)
    backbone = model.clone(num_classes=None)
    z, logits = _run_fast(
        lambda bv, fv, xx: (backbone.apply(bv, xx), model.apply(fv, xx)),
        backbone_vars,
        v,
        x,
    )
    np.testing.assert_allclose(
        z @ head['kernel'] + head['bias'], logits, atol=1e-5
    )
    with pytest.raises(ValueError, match='no params'):
        rn.split_head(backbone_vars)


_BACKBONES = {
    'cifar_resnet18': (rn.cifar_resnet18(width_multiplier=0.25), 32),
    'resnet18': (rn.resnet18(), 64),
    'resnet50': (rn.resnet50(), 64),
    # The 'xla' depthwise conv (nn.Conv with groups) compiles several times
    # faster here than 'shift'; both go through the same K-FAC depthwise path.
    'efficientnet_lite0': (EfficientNetLite0(depthwise_impl='xla'), 32),
}


@pytest.mark.parametrize('name', sorted(_BACKBONES))
def test_linearization_and_kfac_shapes(name):
    model, size = _BACKBONES[name]
    x = _images(2, size)
    params0 = _random_variables(model, x)
    apply_fn = model.apply  # BN in inference mode (train=False)
    delta = lin.zeros_like_trainable(params0)
    dim = FEATURE_DIM if name == 'efficientnet_lite0' else rn.feature_dim(model)
    head = {'kernel': jnp.zeros((dim, 5)), 'bias': jnp.zeros((5,))}

    def run(p, d, h, xx):
        # One program for all three: compiling once is most of the cost.
        return (
            apply_fn(p, xx),
            lin.linearize(apply_fn, p)(p, xx),
            cv.batch_curvature(apply_fn, p, d, h, xx, jax.random.key(1)),
        )

    f, f_lin, stats = _run_fast(run, params0, delta, head, x)
    assert f.shape == (2, dim)
    np.testing.assert_allclose(f_lin, f, rtol=1e-5, atol=1e-5)

    flat_delta = traverse_util.flatten_dict(delta)
    # Only the conv kernels are trained: no biases, BN and running stats frozen.
    assert all(path[-1] == 'kernel' for path in flat_delta)
    kernels = {'/'.join(path[1:-1]): k for path, k in flat_delta.items()}
    assert set(stats['layers']) == set(kernels)
    for key, kernel in kernels.items():
        kh, kw, cin, cout = kernel.shape
        factors = stats['layers'][key]
        if factors['A'].ndim == 3:  # depthwise: per-channel k²×k² blocks
            assert cin == 1
            assert factors['A'].shape == (cout, kh * kw, kh * kw)
            assert factors['S'].shape == (cout,)
        else:
            assert factors['A'].shape == (cin * kh * kw, cin * kh * kw)
            assert factors['S'].shape == (cout, cout)
        assert np.all(np.isfinite(factors['A']))
        assert np.all(np.isfinite(factors['S']))
    assert stats['head']['A'].shape == (dim + 1, dim + 1)
    assert stats['head']['S'].shape == (5, 5)


def test_max_pool_is_differentiable_in_forward_mode():
    """jvp through the stem's max-pool takes the tangent at each argmax."""
    x = _images(1, 8)
    dx = _images(1, 8, seed=3)

    def pool(y):
        return nn.max_pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    out, tangent = jax.jvp(pool, (x,), (dx,))
    assert out.shape == (1, 4, 4, 3)
    # Padding is -inf: every window's maximum is a real pixel, and the
    # tangent is dx at that pixel (an independent loop over the windows).
    pads = ((1, 1), (1, 1), (0, 0))
    xp = np.pad(np.asarray(x[0]), pads, constant_values=-np.inf)
    dxp = np.pad(np.asarray(dx[0]), pads)
    for i in range(4):
        for j in range(4):
            for c in range(3):
                win = xp[2 * i : 2 * i + 3, 2 * j : 2 * j + 3, c]
                r, q = np.unravel_index(np.argmax(win), win.shape)
                assert out[0, i, j, c] == win[r, q]
                assert tangent[0, i, j, c] == dxp[2 * i + r, 2 * j + q, c]


def test_dlcft_steps_on_reduced_cifar_resnet18():
    model = rn.cifar_resnet18(width_multiplier=0.25)
    rng = np.random.default_rng(0)
    batches = [
        {
            'image': _images(8, 32, seed=t),
            'label': jnp.asarray(rng.integers(0, 10, size=8), jnp.int32),
        }
        for t in range(2)
    ]
    params0 = _random_variables(model, batches[0]['image'])
    state = dj.create_state(
        model.apply,
        params0,
        num_classes=10,
        example_input=batches[0]['image'],
        method=dj.METHODS['dlcft'].replace(optimizer=dict(learning_rate=1e-3)),
    )
    state = with_random_head(state, scale=0.1, num_steps=3)
    for _ in range(3):
        state, m = dj.step(state, batches[0])
        assert np.isfinite(float(m['loss']))
    moved = jax.tree.leaves(state.params['backbone'])
    assert any(float(jnp.max(jnp.abs(d))) > 0 for d in moved)

    curv = dj.estimate_curvature(state, [batches[0]], jax.random.key(2))
    state = dj.begin_task(dj.end_task(state, curv), num_steps=3)
    assert int(state.task) == 1
    for _ in range(3):
        state, m = dj.step(state, batches[1])
        assert np.isfinite(float(m['loss']))
    # Measured before the update, so the last step sees two moves from θ_0.
    assert float(m['penalty']) > 0
