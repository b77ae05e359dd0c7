"""Tests for reading PyTorch ResNet checkpoints without torch.

The reference models are built here with plain torch (no torchvision, whose
PyPI wheels do not match the installed torch): torchvision's exact module
layout and state-dict keys for ResNet-18 (BasicBlock [2, 2, 2, 2]),
ResNet-50 (v1.5 Bottleneck [3, 4, 6, 3]) and a CIFAR ResNet-18 (3x3 stride-1
stem, no max-pool, width multiplier 0.25). Weights are random, and every
BatchNorm gets random affine parameters and running statistics (mean
~N(0, 0.1), var ~U(0.5, 1.5)) so the BN conversion is really exercised; the
torch models run in ``.eval()`` mode.

Converted Flax models (``dlcft_jax.models.resnet``) against torch on the
same random batch (2 images, NCHW for torch, NHWC for Flax), float32,
measured on the 2-core development CPU, max |logit difference| (largest
|logit| in brackets):

* ResNet-18, ReLU, 64x64:              2.7e-7  (0.49)
* ResNet-18, leaky ReLU 0.01, 64x64:   3.0e-7  (0.49)
* ResNet-50, ReLU, 64x64:              5.4e-7  (0.71)
* CIFAR ResNet-18 x0.25, ReLU, 32x32:  1.2e-7  (0.41)
* CIFAR ResNet-18 x0.25, leaky, 32x32: 6.0e-8  (0.41)

The test asserts an absolute tolerance of 1e-4.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    'torch', reason='torch is needed to write the reference checkpoints'
)
safetensors_torch = pytest.importorskip('safetensors.torch')

from torch import nn  # noqa: E402

from dlcft_jax.models import convert_torch  # noqa: E402
from dlcft_jax.models import resnet as resnet_lib  # noqa: E402

_LOGIT_ATOL = 1e-4


class _Block(nn.Module):
    """A torchvision residual block: relu(branch(x) + identity).

    Subclasses add the branch's convs and BNs under torchvision's names.
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int,
        act: Callable[[], nn.Module],
    ):
        super().__init__()
        self.add_branch(inplanes, planes, stride)
        self.relu = act()
        out = planes * self.expansion
        self.downsample = _downsample(inplanes, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.branch(x) + identity)


class _BasicBlock(_Block):
    """torchvision.models.resnet.BasicBlock (same attribute names)."""

    expansion = 1

    def add_branch(self, inplanes: int, planes: int, stride: int) -> None:
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))


class _Bottleneck(_Block):
    """torchvision.models.resnet.Bottleneck (v1.5: stride in the 3x3)."""

    expansion = 4

    def add_branch(self, inplanes: int, planes: int, stride: int) -> None:
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


def _downsample(inplanes: int, out: int, stride: int) -> nn.Module | None:
    """torchvision's projection shortcut (keys downsample.0 / .1)."""
    if stride == 1 and inplanes == out:
        return None
    return nn.Sequential(
        nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
    )


class _TorchResNet(nn.Module):
    """torchvision.models.ResNet, or the CIFAR variant (3x3 stem, no pool)."""

    def __init__(
        self,
        block: type[nn.Module],
        layers: list[int],
        num_classes: int,
        act: Callable[[], nn.Module],
        widths: tuple[int, ...] = (64, 128, 256, 512),
        cifar: bool = False,
    ):
        super().__init__()
        if cifar:
            self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = act()
        self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(3, 2, 1)
        inplanes = widths[0]
        for i, (n, width) in enumerate(zip(layers, widths, strict=True)):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(inplanes, width, stride, act))
                inplanes = width * block.expansion
            setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f'layer{i}')(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _randomize_batch_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Random affine parameters and running statistics for every BN."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.num_batches_tracked.fill_(7)


_ACTS: dict[str, Callable[[], nn.Module]] = {
    'relu': nn.ReLU,
    'leaky_relu': lambda: nn.LeakyReLU(0.01),
}

# name -> (torch constructor kwargs, Flax constructor, input size).
_CASES: dict[str, tuple[dict[str, Any], Callable[..., Any], int]] = {
    'r18': (
        {'block': _BasicBlock, 'layers': [2, 2, 2, 2], 'num_classes': 1000},
        lambda act: resnet_lib.resnet18(num_classes=1000, activation=act),
        64,
    ),
    'r50': (
        {'block': _Bottleneck, 'layers': [3, 4, 6, 3], 'num_classes': 1000},
        lambda act: resnet_lib.resnet50(num_classes=1000, activation=act),
        64,
    ),
    'cifar': (
        {
            'block': _BasicBlock,
            'layers': [2, 2, 2, 2],
            'num_classes': 10,
            'widths': (16, 32, 64, 128),
            'cifar': True,
        },
        lambda act: resnet_lib.cifar_resnet18(
            width_multiplier=0.25, num_classes=10, activation=act
        ),
        32,
    ),
}


def _torch_model(case: str, act: str, seed: int = 0) -> nn.Module:
    """The random-weight eval-mode torch reference for `case`."""
    torch.manual_seed(seed)
    model = _TorchResNet(act=_ACTS[act], **_CASES[case][0])
    _randomize_batch_norms(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory) -> dict[str, tuple[dict, Path, Path]]:
    """case -> (torch state dict, zip .pth path, .safetensors path)."""
    root = tmp_path_factory.mktemp('ckpt')
    out = {}
    for case in _CASES:
        sd = _torch_model(case, 'relu').state_dict()
        pth, st = root / f'{case}.pth', root / f'{case}.safetensors'
        torch.save(sd, pth)
        safetensors_torch.save_file(dict(sd), str(st))
        out[case] = (sd, pth, st)
    return out


def _assert_bit_exact(got: dict[str, np.ndarray], want: dict) -> None:
    """Same keys, dtypes, shapes and bytes as the torch tensors."""
    assert set(got) == set(want)
    for k, t in want.items():
        ref = t.detach().numpy()
        assert got[k].dtype == ref.dtype, k
        assert got[k].shape == ref.shape, k
        assert got[k].tobytes() == np.ascontiguousarray(ref).tobytes(), k


@pytest.mark.parametrize('case', sorted(_CASES))
def test_read_zip_and_safetensors_bit_exact(checkpoints, case):
    sd, pth, st = checkpoints[case]
    with open(pth, 'rb') as f:
        assert f.read(2) == b'PK'  # really the zip format
    _assert_bit_exact(convert_torch.read_torch_state_dict(pth), sd)
    _assert_bit_exact(convert_torch.read_torch_state_dict(st), sd)


def test_read_legacy_format(checkpoints, tmp_path):
    sd = checkpoints['cifar'][0]
    path = tmp_path / 'legacy.pth'
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    _assert_bit_exact(convert_torch.read_torch_state_dict(path), sd)


def test_read_dtypes_views_and_parameters(tmp_path):
    """Non-float32 dtypes (incl. the v3 ones), strided views, parameters."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {
        'f16': torch.randn(3, 5).half(),
        'bf16': torch.randn(7).bfloat16(),
        'f64': torch.randn(2, 2).double(),
        'i64': torch.tensor(5),
        'u8': torch.arange(10, dtype=torch.uint8),
        'b': torch.tensor([True, False]),
        'u16': torch.arange(9, dtype=torch.int32).to(torch.uint16),
        'transposed': base.t(),  # shares base's storage, strided
        'sliced': base[1:, 2:5],  # storage offset 8
        'base': base,
        'param': nn.Parameter(torch.randn(3)),
    }
    path = tmp_path / 'mixed.pt'
    torch.save(sd, path)
    got = convert_torch.read_torch_state_dict(path)
    assert got['bf16'].dtype.name == 'bfloat16'
    for k, t in sd.items():
        want = t.detach()
        if want.dtype == torch.bfloat16:
            want = want.view(torch.int16)
            assert got[k].view(np.int16).tolist() == want.tolist(), k
            continue
        np.testing.assert_array_equal(got[k], want.numpy(), err_msg=k)
        assert got[k].dtype == want.numpy().dtype, k
        assert got[k].flags['C_CONTIGUOUS'], k


def _flax_logits(case: str, act: str, variables: dict, head: dict, x):
    """Logits of the Flax model with the converted weights."""
    model = _CASES[case][1](act)
    params = {**variables['params'], 'fc': head}
    full = {'params': params, 'batch_stats': variables['batch_stats']}
    return np.asarray(jax.jit(model.apply)(full, jnp.asarray(x)))


@pytest.mark.parametrize(
    'case,act',
    [
        ('r18', 'relu'),
        ('r18', 'leaky_relu'),
        ('r50', 'relu'),
        ('cifar', 'relu'),
        ('cifar', 'leaky_relu'),
    ],
)
def test_converted_logits_match_torch(tmp_path, case, act):
    model = _torch_model(case, act)
    path = tmp_path / f'{case}_{act}.pth'
    torch.save(model.state_dict(), path)
    size = _CASES[case][2]
    x = np.random.default_rng(0).normal(size=(2, 3, size, size))
    x = x.astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    variables, head = convert_torch.convert_resnet_state_dict(
        convert_torch.read_torch_state_dict(path)
    )
    assert 'fc' not in variables['params']
    got = _flax_logits(case, act, variables, head, x.transpose(0, 2, 3, 1))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=_LOGIT_ATOL)
    assert np.abs(want).max() > 0.1  # the comparison is not vacuous


def test_converted_tree_matches_flax_init(checkpoints):
    """Every converted leaf has the name and shape Flax's init creates."""
    for case in _CASES:
        variables, head = convert_torch.convert_resnet_state_dict(
            convert_torch.read_torch_state_dict(checkpoints[case][1])
        )
        size = _CASES[case][2]
        backbone = _CASES[case][1]('relu').clone(num_classes=None)
        ref = jax.eval_shape(
            backbone.init,
            jax.random.key(0),
            jnp.zeros((1, size, size, 3), jnp.float32),
        )
        shapes = jax.tree.map(lambda a: a.shape, variables)
        assert shapes == jax.tree.map(lambda a: a.shape, dict(ref)), case
        n_out = _CASES[case][0]['num_classes']
        assert head['kernel'].shape[1] == head['bias'].shape[0] == n_out


@pytest.mark.parametrize(
    'payload,refused',
    [
        # GLOBAL 'os system', the string 'echo pwned', TUPLE1, REDUCE, STOP.
        (b'\x80\x02cos\nsystem\nX\n\x00\x00\x00echo pwned\x85R.', 'os.system'),
        (b'\x80\x02cbuiltins\neval\nX\x01\x00\x00\x001\x85R.', 'builtins.eval'),
    ],
)
def test_refuses_malicious_pickle(tmp_path, payload, refused):
    path = tmp_path / 'evil.pth'
    with zipfile.ZipFile(path, 'w') as zf:
        zf.writestr('evil/data.pkl', payload)
        zf.writestr('evil/byteorder', 'little')
    with pytest.raises(pickle.UnpicklingError, match='refusing to unpickle'):
        convert_torch.read_torch_state_dict(path)
    with pytest.raises(pickle.UnpicklingError, match=refused):
        convert_torch.read_torch_state_dict(path)


def test_refuses_pickled_object_in_checkpoint(tmp_path):
    """A real torch checkpoint holding a non-tensor class is refused."""
    path = tmp_path / 'ckpt.pth'
    torch.save({'state_dict': {'w': torch.ones(2)}, 'gen': Path('x')}, path)
    with pytest.raises(pickle.UnpicklingError, match='refusing.*pathlib'):
        convert_torch.read_torch_state_dict(path)


@pytest.mark.parametrize('wrapper', ['state_dict', 'model'])
def test_checkpoint_wrappers_and_module_prefix(checkpoints, tmp_path, wrapper):
    sd = checkpoints['cifar'][0]
    wrapped = {
        'epoch': 3,
        'optimizer': {'state': {0: {'momentum_buffer': torch.ones(4)}}},
        wrapper: {f'module.{k}': v for k, v in sd.items()},
    }
    path = tmp_path / 'wrapped.pth'
    torch.save(wrapped, path)
    _assert_bit_exact(convert_torch.read_torch_state_dict(path), sd)
    # DataParallel prefixes are stripped in safetensors files too.
    st = tmp_path / 'prefixed.safetensors'
    safetensors_torch.save_file(wrapped[wrapper], str(st))
    _assert_bit_exact(convert_torch.read_torch_state_dict(st), sd)


def test_checkpoint_without_tensors_is_rejected(tmp_path):
    path = tmp_path / 'meta.pth'
    torch.save({'epoch': 3, 'state_dict': {'lr': 0.1}}, path)
    with pytest.raises(ValueError, match='no dict of tensors'):
        convert_torch.read_torch_state_dict(path)


def test_leftover_and_missing_keys_are_reported(checkpoints):
    sd = convert_torch.read_torch_state_dict(checkpoints['r50'][1])
    extra = {**sd, 'extra.weight': np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match=r"\['extra\.weight'\].*ResNet-50"):
        convert_torch.convert_resnet_state_dict(extra)
    missing = {k: v for k, v in sd.items() if k != 'layer3.2.bn2.running_var'}
    with pytest.raises(ValueError, match=r"missing key 'layer3\.2\.bn2"):
        convert_torch.convert_resnet_state_dict(missing)
    cifar = convert_torch.read_torch_state_dict(checkpoints['cifar'][1])
    with pytest.raises(ValueError, match='CIFAR ResNet-18'):
        convert_torch.convert_resnet_state_dict({**cifar, 'fc.extra': 0})
    with pytest.raises(ValueError, match='not a torchvision/timm ResNet'):
        convert_torch.convert_resnet_state_dict({'features.0.weight': 0})


def test_keep_fc_false_drops_the_head(checkpoints):
    sd = convert_torch.read_torch_state_dict(checkpoints['r18'][1])
    variables, head = convert_torch.convert_resnet_state_dict(sd, keep_fc=False)
    assert head is None and 'fc' not in variables['params']
    no_fc = {k: v for k, v in sd.items() if not k.startswith('fc.')}
    assert convert_torch.convert_resnet_state_dict(no_fc)[1] is None


def test_load_resnet_cache_round_trip(checkpoints, tmp_path, monkeypatch):
    _, pth, st = checkpoints['cifar']
    cache = tmp_path / 'cache'
    variables, head = convert_torch.load_resnet(pth, cache_dir=cache)
    cache_file = convert_torch.resnet_cache_file(pth, cache)
    assert cache_file.is_file() and list(cache.iterdir()) == [cache_file]

    def no_reading(path):
        raise AssertionError('the cache should have been used')

    monkeypatch.setattr(convert_torch, 'read_torch_state_dict', no_reading)
    cached = convert_torch.load_resnet(pth, cache_dir=cache)
    want = jax.tree.map(np.asarray, (variables, head))
    assert jax.tree.structure(cached) == jax.tree.structure(want)
    for a, b in zip(
        jax.tree.leaves(cached), jax.tree.leaves(want), strict=True
    ):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    monkeypatch.undo()
    # Same tensors in another file format: same conversion, own cache entry.
    from_st = convert_torch.load_resnet(st, cache_dir=cache)
    for a, b in zip(
        jax.tree.leaves(from_st), jax.tree.leaves(want), strict=True
    ):
        assert np.array_equal(a, b)
    assert len(list(cache.iterdir())) == 2
