"""Tests for `benchmarks/torch_speed.py` (our steps against PyTorch's).

The benchmark runs in this process on a tiny setting (32 px, batch 2, one
timed step, no warm-up) through its absl flags; its JSON must hold positive
timings for all five steps and finite ratios. Separately, on 2 random uint8
images, the two sides must compute the same network: our pre-trained
features against the torch reference's (measured on the 2-core development
CPU, max |difference| 4.0e-6 for features up to 1.5 at 32 px; asserted:
1e-3 relative, plus 1e-3 of the largest feature absolute), torch's
linearized output at Δ = 0 equal to its plain output, and its tangent JΔ
equal to a central finite difference of the network in float64.

The benchmark test is marked slow: about 30 s on that CPU with the
persistent compilation cache warm, 2-3 minutes without (it compiles our
three steps and the curvature step); the other two take about 5 s.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

torch = pytest.importorskip(
    'torch', reason='torch is a test requirement (requirements-test.txt)'
)
pytest.importorskip('efficientnet_lite_pytorch')

from benchmarks import step_speed, torch_speed  # noqa: E402

_SIZE = 32
_FEATURE_RTOL = 1e-3


@pytest.fixture(scope='module')
def state_dict():
    try:
        return torch_speed.torch_state_dict(None)
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(name='flags_parsed')
def fixture_flags_parsed():
    """absl flags usable in this process; every value restored afterwards."""
    fl = flags.FLAGS
    was_parsed = fl.is_parsed()
    threads = torch.get_num_threads()
    with flagsaver.flagsaver():
        if not was_parsed:
            fl.mark_as_parsed()
        try:
            yield fl
        finally:
            if not was_parsed:
                fl.unparse_flags()
            torch.set_num_threads(threads)


def _images(n: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _nchw(images: np.ndarray):
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


@pytest.mark.slow
def test_main_writes_positive_timings_and_finite_ratios(
    flags_parsed, state_dict, tmp_path
):
    del flags_parsed, state_dict  # the weights fixture only skips early
    out = tmp_path / 'torch_speed.json'
    with flagsaver.as_parsed(
        image_sizes=str(_SIZE),
        batch_size='2',
        steps='1',
        warmup='0',
        out=str(out),
    ):
        torch_speed.main(['torch_speed'])
    res = json.loads(out.read_text())
    assert res['batch_size'] == 2 and res['steps'] == 1
    assert res['hardware']['cpu_count'] >= 1
    assert res['torch_threads'] >= 1
    assert set(res['sizes']) == {str(_SIZE)}
    size = res['sizes'][str(_SIZE)]
    for key, _ in torch_speed._ROWS:
        for figure in ('ms_per_step', 'images_per_s', 'ms_per_image'):
            value = size[key][figure]
            assert math.isfinite(value) and value > 0, (key, figure, value)
        others = size[key]['other_processes_cores']
        assert others is None or others >= 0
    assert set(size['ratios']) == {r[0] for r in torch_speed._RATIOS}
    for key, value in size['ratios'].items():
        assert math.isfinite(value) and value > 0, (key, value)
    # Both sides train the same weights and run the same network.
    assert (
        size['torch_trainable_backbone_params']
        == size['ours_trainable_backbone_params']
        > 3_000_000
    )
    others = size['other_processes_cores']
    assert others is None or others >= 0
    same = size['same_network']
    assert same['features_max_abs'] > 0.1
    assert (
        same['features_max_abs_diff']
        <= _FEATURE_RTOL * same['features_max_abs']
    )
    assert same['lin_at_zero_max_abs_diff'] <= 1e-6


def test_torch_and_our_features_agree(flags_parsed, state_dict):
    del flags_parsed  # make_backbone reads step_speed's --weights flag
    import jax  # pylint: disable=g-import-not-at-top

    images = _images(2)
    apply_fn, variables, _, _ = step_speed.make_backbone(
        'efficientnet_lite0', _SIZE
    )
    ours = np.asarray(jax.jit(apply_fn)(variables, images))
    backbone = torch_speed.torch_backbone(state_dict, _SIZE)
    with torch.no_grad():
        ref = backbone(torch_speed.torch_inputs(_nchw(images), _SIZE)).numpy()
    assert ours.shape == ref.shape == (2, 1280)
    np.testing.assert_allclose(
        ours, ref, rtol=_FEATURE_RTOL, atol=_FEATURE_RTOL * np.abs(ref).max()
    )


def test_torch_linearization(state_dict):
    backbone = torch_speed.torch_backbone(state_dict, _SIZE)
    names = torch_speed.trainable_names(backbone)
    # The conv kernels only (EfficientNet-Lite0's convs have no bias).
    assert len(names) == 49 and all(n.endswith('.weight') for n in names)
    x = torch_speed.torch_inputs(_nchw(_images(2)), _SIZE)
    f_lin, params0 = torch_speed.torch_linearized(backbone, names)
    with torch.no_grad():
        zero = {k: torch.zeros_like(v) for k, v in params0.items()}
        np.testing.assert_allclose(
            f_lin(zero, x).numpy(), backbone(x).numpy(), rtol=0, atol=1e-6
        )

    # f_lin(Δ) − f(ψ0) = JΔ: a central difference in float64.
    backbone = backbone.double()
    x = x.double()
    f_lin, params0 = torch_speed.torch_linearized(backbone, names)
    gen = torch.Generator().manual_seed(0)
    delta = {
        k: 1e-2 * v.abs().mean() * torch.randn(v.shape, generator=gen).double()
        for k, v in params0.items()
    }
    eps = 1e-4
    state = dict(backbone.state_dict())

    def shifted(sign):
        moved = {**state}
        for k, d in delta.items():
            moved[k] = params0[k] + sign * eps * d
        return torch.func.functional_call(backbone, moved, (x,))

    with torch.no_grad():
        tangent = f_lin(delta, x) - backbone(x)
        fd = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    err = float((tangent - fd).norm() / fd.norm())
    assert float(fd.norm()) > 0 and err < 1e-5, err

    # A linearized step moves Δ: the gradient reaches it through the jvp.
    backbone = torch_speed.torch_backbone(state_dict, _SIZE)
    head = {
        'kernel': 0.01 * np.ones((1280, 3), np.float32),
        'bias': np.zeros((3,), np.float32),
    }
    fn, delta = torch_speed.torch_linearized_step(backbone, head, _SIZE)
    batch = {
        'image': _nchw(_images(2)),
        'label': torch.tensor([0, 2]),
    }
    _, loss = fn(delta, batch)
    assert math.isfinite(float(loss)) and float(loss) > 0
    moved = sum(float(d.detach().abs().sum()) for d in delta.values())
    assert moved > 0
