r"""How the curvature of SCE and MSE evolves while a network fits its data.

  python -m experiments.curvature_spectrum --out=runs/curvature_spectrum \
      [--backbone=efficientnet_lite0] [--image_size=32] [--steps=300] \
      [--every=50] [--batch_size=32] [--seed=0] [--layer=KEY]

The diagnostic behind DLCFT's argument against EWC-like penalties with softmax
cross-entropy (Shon et al., ECCV 2022, arXiv:2208.08112). The output Hessian of
SCE, diag(p) − ppᵀ, has trace 1 − ‖p‖², which goes to 0 as the predictions
become one-hot; the α-scaled MSE has output Hessian I whatever the fit. So the
Gauss–Newton / Fisher curvature that a quadratic penalty is built from fades
away under SCE as the model fits the data, and does not under MSE.

The script fine-tunes one pre-trained network twice on the same data and the
same batch sequence, once with SCE and once with MSE (α = 15): the non-linear
network (no linearization), no penalty, Adam at a constant learning rate (the
authors' diagnostic used a cosine schedule; a constant rate keeps the two runs
simple to compare), coupled L2 and gradient clipping as in the library. Every
`--every` steps (and at step 0) it measures, for each loss, the K-FAC
curvature of

* the head: A_head ⊗ S_head with A_head = E[z̄z̄ᵀ] (z̄ = [z; 1], the features
  with a 1) and S_head the loss's output curvature: exactly I for MSE, and
  E[r rᵀ] with r = p − onehot(ỹ), ỹ ~ softmax(f), for SCE;
* one backbone layer (`--layer`; default the last conv / dense layer of the
  backbone): A ⊗ S with A the second moment of the layer's input (patches) and
  S of the gradient of the pseudo-loss with respect to its output.

Both come from `dlcft_jax.curvature.batch_curvature` (non-linear network at
ψ0 + Δ), averaged over `--curvature_batches` fixed training batches (no
augmentation) with the same pseudo-target draws at every record, so that the
curves change only because the network changes. For each block it records
the trace tr(A)·tr(S) and the top-k eigenvalues (products of the factors'
eigenvalues, the k largest). A depthwise layer's K-FAC block is a sum over
channels of S_c·A_c; its trace is Σ_c S_c·tr(A_c) and its eigenvalues are all
the S_c·eig(A_c).

Written to `--out`:

* `spectrum.json`: the flags, the number of classes, the layer's key, and per
  loss ('sce', 'mse'): steps, train loss and accuracy (on the curvature
  batches), head and layer traces (also tr A and tr S apart) and top-k
  eigenvalues.
* `spectrum.png`: the traces of both losses against the step (log scale), one
  panel for the head and one for the layer, with the largest eigenvalue
  dotted.

It prints a short table: the trace at the first and last record for each loss
and block, their ratio and the ratio of the output factors' traces (tr S),
then the SCE / MSE ratio of the head traces. The run is deterministic for a
seed.

Measured (`--steps=300 --every=50`, the defaults otherwise: EfficientNet-Lite0
at 32 px, the committed CIFAR-10 subset, 3,000 images of 10 classes): 4 min
37 s pinned to one core of a 2-core Intel Xeon CPU without a GPU. Train
accuracy reaches 0.79 (SCE) and 0.73 (MSE). The SCE output factor shrinks
(head tr S 0.90 -> 0.37) while MSE's stays 10 = C; but both runs' features
grow (head tr A 39 -> 4.2e3 for SCE, 6.9e3 for MSE), so both traces rise:
SCE 35 -> 1.6e3, MSE 391 -> 6.9e4, and the SCE / MSE ratio of the head
trace falls from 0.090 to 0.023. 300 steps at lr 1e-4 (about 3 epochs) do not
fit this data; the SCE curvature falls in absolute terms once the model fits
(see `tests/test_curvature_spectrum.py`, where it drops by orders of magnitude
on separable data while MSE's does not).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import traverse_util

import dlcft_jax as dj
from dlcft_jax import curvature as curv_lib
from dlcft_jax import data as data_lib
from dlcft_jax import linearization as lin
from dlcft_jax import losses as losses_lib

#: The two losses: the name used in the outputs, and the library's name.
LOSSES = (('sce', 'ce'), ('mse', 'mse'))

DEFAULT_NPZ_DIR = Path(__file__).resolve().parent / 'data' / 'cifar10_5x2'

Params = Any
ApplyFn = Callable[..., jax.Array]

#: The lists of a run (`fine_tune_and_record`), one entry per record.
RECORD_KEYS = (
    'steps',
    'train_loss',
    'train_accuracy',
    'head_trace',
    'head_trace_A',
    'head_trace_S',
    'head_top_k',
    'layer_trace',
    'layer_trace_A',
    'layer_trace_S',
    'layer_top_k',
)


# ---------------------------------------------------------------------------
# Spectra of Kronecker blocks.
# ---------------------------------------------------------------------------


def _eigvalsh(m: np.ndarray) -> np.ndarray:
    """Eigenvalues of symmetric PSD matrices (batched), clipped at 0."""
    m = np.asarray(m, np.float64)
    m = 0.5 * (m + np.swapaxes(m, -1, -2))
    return np.clip(np.linalg.eigvalsh(m), 0.0, None)


def kron_spectrum(A: np.ndarray, S: np.ndarray, top_k: int) -> dict:
    """Trace and largest eigenvalues of a K-FAC block A ⊗ S.

    Args:
      A: the input factor, (p, p); or (C, p, p) for a depthwise layer.
      S: the output factor, (o, o); or (C,) for a depthwise layer.
      top_k: how many eigenvalues to return.

    Returns:
      {'trace', 'trace_A', 'trace_S', 'top_k'}: the block's trace (tr A·tr S,
      or Σ_c S_c tr A_c for a depthwise layer), the factors' traces and the
      `top_k` largest eigenvalues of the block in decreasing order.
    """
    A = np.asarray(A, np.float64)
    S = np.asarray(S, np.float64)
    if S.ndim == 1:  # depthwise: block-diagonal over channels
        trace_a = np.trace(A, axis1=-2, axis2=-1)
        eig = (S[:, None] * _eigvalsh(A)).ravel()
        trace = float(np.sum(S * trace_a))
        trace_a, trace_s = float(np.sum(trace_a)), float(np.sum(S))
    else:
        trace_a, trace_s = float(np.trace(A)), float(np.trace(S))
        trace = trace_a * trace_s
        # The k largest products only involve the k largest of each factor.
        ea = np.sort(_eigvalsh(A))[::-1][:top_k]
        es = np.sort(_eigvalsh(S))[::-1][:top_k]
        eig = np.outer(ea, es).ravel()
    top = np.sort(eig)[::-1][:top_k]
    return {
        'trace': trace,
        'trace_A': trace_a,
        'trace_S': trace_s,
        'top_k': [float(v) for v in top],
    }


# ---------------------------------------------------------------------------
# Curvature of the non-linear network.
# ---------------------------------------------------------------------------


def layer_order(
    apply_fn: ApplyFn, params0: Params, delta: Params, x: jax.Array
) -> list[str]:
    """The keys of the trainable conv / dense layers in forward order."""
    keys = curv_lib.regularized_layers(delta)
    order: list[str] = []

    def forward():
        out, inputs, _, _ = curv_lib.tapped_apply(apply_fn, params0, x, keys)
        order.extend(inputs)  # filled in call order
        return out

    jax.eval_shape(forward)
    return order


def layer_delta(delta: Params, key: str) -> dict:
    """A zero Δ on the kernel (and bias) of one layer only."""
    layers = curv_lib.regularized_layers(delta)
    if key not in layers:
        raise ValueError(
            f'--layer={key!r} is not a trainable conv / dense layer; use one '
            f'of {sorted(layers)}.'
        )
    flat = traverse_util.flatten_dict(dict(delta))
    has_bias, module = layers[key]
    names = ('kernel', 'bias') if has_bias else ('kernel',)
    return traverse_util.unflatten_dict(
        {module + (n,): jnp.zeros_like(flat[module + (n,)]) for n in names}
    )


def make_measure(apply_fn: ApplyFn, loss: str) -> Callable[..., dict]:
    """A jitted function (point, one_layer, head, x, rng) -> curvature.

    `batch_curvature` evaluates the non-linear network at params0 + Δ and
    estimates every layer of Δ. Here params0 is the current point ψ0 + Δ and
    Δ a zero tree on one layer: the network, its output and the pseudo-targets
    are the same, and only the chosen layer's factors are computed.
    """

    def measure(point, one_layer, head, x, rng):
        return curv_lib.batch_curvature(
            apply_fn,
            point,
            one_layer,
            head,
            x,
            rng,
            linearized=False,
            loss=loss,
            class_mask=None,
        )

    return jax.jit(measure)


def average_curvature(
    measure: Callable[..., dict],
    point: Params,
    one_layer: Params,
    head: Params,
    batches: Sequence[tuple[np.ndarray, np.ndarray]],
    rng: jax.Array,
) -> dict:
    """The statistics of `measure` averaged over `batches` (float64)."""
    total = None
    for i, (x, _) in enumerate(batches):
        stats = jax.device_get(
            measure(point, one_layer, head, x, jax.random.fold_in(rng, i))
        )
        stats = jax.tree.map(lambda a: np.asarray(a, np.float64), stats)
        total = stats if total is None else jax.tree.map(np.add, total, stats)
    return jax.tree.map(lambda a: a / len(batches), total)


# ---------------------------------------------------------------------------
# The experiment.
# ---------------------------------------------------------------------------


def _batch_order(
    n: int, batch_size: int, steps: int, seed: int
) -> list[np.ndarray]:
    """Index arrays of `steps` batches: reshuffled epochs, no remainder."""
    if batch_size > n:
        raise ValueError(
            f'--batch_size={batch_size} is larger than the {n} training images.'
        )
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    while len(out) < steps:
        perm = rng.permutation(n)
        for i in range(n // batch_size):
            out.append(perm[i * batch_size : (i + 1) * batch_size])
    return out[:steps]


def record_steps(steps: int, every: int) -> list[int]:
    """0, every, 2·every, ... and the last step."""
    if every < 1:
        raise ValueError(f'--every must be >= 1, got {every}.')
    out = list(range(0, steps + 1, every))
    if out[-1] != steps:
        out.append(steps)
    return out


def fine_tune_and_record(
    apply_fn: ApplyFn,
    variables: Params,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    loss: str,
    num_classes: int,
    steps: int,
    every: int,
    batch_size: int,
    seed: int,
    learning_rate: float,
    weight_decay: float,
    clip_norm: float,
    probe: Sequence[tuple[np.ndarray, np.ndarray]],
    layer: str | None,
    top_k: int,
    head: Params | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Fine-tunes with one loss and records the curvature along the way.

    Args:
      apply_fn: the backbone `apply_fn(variables, x) -> (B, D)`.
      variables: its pre-trained variables ψ0.
      images, labels: the training set.
      loss: 'sce' or 'mse'.
      num_classes: C, the width of the head.
      steps: optimisation steps.
      every: record interval (in steps; step 0 and the last step are always
        recorded).
      batch_size: training batch size.
      seed: seeds the batch order and the pseudo-targets.
      learning_rate, weight_decay, clip_norm: Adam at a constant rate with
        coupled L2 and global-norm clipping (0 disables either).
      probe: the fixed (x, y) batches the curvature and the train metrics are
        measured on.
      layer: the backbone layer's key, or None for the last conv / dense one.
      top_k: how many eigenvalues to keep per block.
      head: the initial head {'kernel': (D, C), 'bias': (C,)}; None for the
        library's zero head.
      log: called with a progress line at each record.

    Returns:
      {'loss', 'layer', 'layer_kind'} and the lists of RECORD_KEYS, with one
      entry per record.
    """
    lib_loss = dict(LOSSES)[loss]
    method = dj.Method(
        name='spectrum',
        network=dj.Network(linearized=False),
        terms=(dj.data_terms.LabelLoss(lib_loss),),
        penalty=None,
        optimizer=dj.Optimizer(
            learning_rate=learning_rate,
            schedule='constant',
            weight_decay=weight_decay,
            clip_norm=clip_norm,
        ),
    )
    example = images[:batch_size]
    state = dj.create_state(
        apply_fn,
        variables,
        num_classes=num_classes,
        example_input=example,
        method=method,
        head=head,
    )
    state = dj.begin_task(state, num_steps=max(steps, 1))
    delta = state.params['backbone']
    order = layer_order(apply_fn, state.params0, delta, probe[0][0])
    key = layer or order[-1]
    one_layer = layer_delta(delta, key)
    kind = None
    measure = make_measure(apply_fn, lib_loss)
    loss_fn = losses_lib.loss_fn(lib_loss)

    @jax.jit
    def evaluate(state, x, y):
        logits = dj.predict(state, x)
        return loss_fn(logits, y), losses_lib.accuracy(logits, y)

    rng = jax.random.key(seed)
    batches = _batch_order(len(labels), batch_size, steps, seed)
    records = set(record_steps(steps, every))
    out: dict[str, Any] = {name: [] for name in RECORD_KEYS}
    for k in range(steps + 1):
        if k in records:
            point = lin.shift(state.params0, state.params['backbone'])
            stats = average_curvature(
                measure, point, one_layer, state.params['head'], probe, rng
            )
            head = kron_spectrum(stats['head']['A'], stats['head']['S'], top_k)
            lay = kron_spectrum(
                stats['layers'][key]['A'], stats['layers'][key]['S'], top_k
            )
            if kind is None:
                kind = (
                    'depthwise'
                    if np.ndim(stats['layers'][key]['S']) == 1
                    else 'conv/dense'
                )
            metrics = [jax.device_get(evaluate(state, x, y)) for x, y in probe]
            out['steps'].append(k)
            out['train_loss'].append(float(np.mean([m[0] for m in metrics])))
            out['train_accuracy'].append(
                float(np.mean([m[1] for m in metrics]))
            )
            for prefix, spec in (('head', head), ('layer', lay)):
                out[f'{prefix}_trace'].append(spec['trace'])
                out[f'{prefix}_trace_A'].append(spec['trace_A'])
                out[f'{prefix}_trace_S'].append(spec['trace_S'])
                out[f'{prefix}_top_k'].append(spec['top_k'])
            if log is not None:
                log(
                    f'{loss} step {k:5d}: loss {out["train_loss"][-1]:.4g}, '
                    f'accuracy {out["train_accuracy"][-1]:.3f}, head trace '
                    f'{head["trace"]:.4g}, {key} trace {lay["trace"]:.4g}'
                )
        if k == steps:
            break
        idx = batches[k]
        batch = {
            'image': jnp.asarray(images[idx]),
            'label': jnp.asarray(labels[idx]),
        }
        state, _ = dj.step(state, batch)
    return {'loss': loss, 'layer': key, 'layer_kind': kind, **out}


def probe_batches(
    images: np.ndarray,
    labels: np.ndarray,
    num_batches: int,
    batch_size: int,
    seed: int,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`num_batches` fixed batches of distinct training examples."""
    n = num_batches * batch_size
    if n > len(labels):
        raise ValueError(
            f'--curvature_batches x batch size = {n} exceeds the '
            f'{len(labels)} training images.'
        )
    idx = np.random.default_rng(seed + 1).permutation(len(labels))[:n]
    return [(images[i], labels[i]) for i in np.split(idx, num_batches)]


def initial_head(
    apply_fn: ApplyFn,
    variables: Params,
    example: np.ndarray,
    num_classes: int,
    init: str,
    seed: int,
) -> dict | None:
    """The head both runs start from.

    'torch': kernel and bias uniform in ±1/√D (PyTorch's `nn.Linear` default,
    a fresh classifier on a pre-trained network); 'zeros': None, the library's
    zero head. With a zero head no gradient reaches the backbone at step 0, so
    the backbone layer's S factor (and its curvature) starts at exactly 0.
    """
    if init == 'zeros':
        return None
    if init != 'torch':
        raise ValueError(f"head_init must be 'torch' or 'zeros', got {init!r}.")
    dim = jax.eval_shape(apply_fn, variables, example).shape[-1]
    bound = 1.0 / np.sqrt(dim)
    rng = np.random.default_rng(seed + 2)
    return {
        'kernel': jnp.asarray(
            rng.uniform(-bound, bound, (dim, num_classes)), jnp.float32
        ),
        'bias': jnp.asarray(
            rng.uniform(-bound, bound, num_classes), jnp.float32
        ),
    }


def run_spectrum(
    apply_fn: ApplyFn,
    variables: Params,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int | None = None,
    steps: int = 300,
    every: int = 50,
    batch_size: int = 32,
    seed: int = 0,
    learning_rate: float = 1e-4,
    weight_decay: float = 1e-5,
    clip_norm: float = 1.0,
    curvature_batches: int = 8,
    curvature_batch_size: int | None = None,
    layer: str | None = None,
    top_k: int = 10,
    head_init: str = 'torch',
    log: Callable[[str], None] | None = None,
) -> dict:
    """Both fine-tuning runs (SCE, then MSE) with their curvature records.

    Both start from the same pre-trained network and head (`initial_head`),
    see the same batches and are measured on the same probe batches with the
    same pseudo-target draws; the arguments are those of
    `fine_tune_and_record`, and `num_classes` defaults to max(label) + 1.

    Returns:
      {'num_classes', 'layer', 'losses': {'sce': ..., 'mse': ...}} with the
      per-loss dicts of `fine_tune_and_record`.
    """
    labels = np.asarray(labels, np.int32)
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    probe = probe_batches(
        images,
        labels,
        curvature_batches,
        curvature_batch_size or batch_size,
        seed,
    )
    head = initial_head(
        apply_fn, variables, images[:1], num_classes, head_init, seed
    )
    runs = {}
    for name, _ in LOSSES:
        runs[name] = fine_tune_and_record(
            apply_fn,
            variables,
            images,
            labels,
            loss=name,
            num_classes=num_classes,
            steps=steps,
            every=every,
            batch_size=batch_size,
            seed=seed,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            clip_norm=clip_norm,
            probe=probe,
            layer=layer,
            top_k=top_k,
            head=head,
            log=log,
        )
    return {
        'num_classes': num_classes,
        'layer': runs['sce']['layer'],
        'losses': runs,
    }


# ---------------------------------------------------------------------------
# Outputs.
# ---------------------------------------------------------------------------


def plot(result: dict, path: str | os.PathLike[str]) -> None:
    """spectrum.png: the traces of both losses, head and layer panels."""
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    colors = {'sce': 'tab:red', 'mse': 'tab:blue'}
    titles = {
        'head': 'head: A_head ⊗ S_head',
        'layer': f'backbone layer {result["layer"]}: A ⊗ S',
    }
    for ax, block in zip(axes, ('head', 'layer'), strict=True):
        for name, run in result['losses'].items():
            steps = run['steps']
            ax.plot(
                steps,
                run[f'{block}_trace'],
                '-o',
                color=colors.get(name),
                markersize=3,
                label=f'{name.upper()}: trace',
            )
            ax.plot(
                steps,
                [v[0] if v else np.nan for v in run[f'{block}_top_k']],
                ':',
                color=colors.get(name),
                label=f'{name.upper()}: largest eigenvalue',
            )
        ax.set_yscale('log')
        ax.set_xlabel('fine-tuning step')
        ax.set_ylabel('curvature')
        ax.set_title(titles[block])
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle('K-FAC curvature while fitting: SCE vs MSE (α = 15)')
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_table(result: dict) -> str:
    """Trace at the first and last record per loss and block, and the ratio.

    The ratio of the output factors' traces (tr S) is shown beside it: it
    separates the loss's own curvature from the growth or shrinkage of the
    features (tr A).
    """
    first, last = None, None
    rows = []
    for name, run in result['losses'].items():
        first, last = run['steps'][0], run['steps'][-1]
        acc = run['train_accuracy']
        for block, label in (('head', 'head'), ('layer', run['layer'])):
            a, b = run[f'{block}_trace'][0], run[f'{block}_trace'][-1]
            sa, sb = run[f'{block}_trace_S'][0], run[f'{block}_trace_S'][-1]
            rows.append(
                (
                    name.upper(),
                    label,
                    f'{a:.4e}',
                    f'{b:.4e}',
                    f'{b / a:.4g}' if a > 0 else 'n/a',
                    f'{sb / sa:.4g}' if sa > 0 else 'n/a',
                    f'{acc[0]:.3f} -> {acc[-1]:.3f}',
                )
            )
    header = (
        'loss',
        'block',
        f'trace @ step {first}',
        f'trace @ step {last}',
        'last / first',
        'tr S last / first',
        'train accuracy',
    )
    rows.insert(0, header)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        '  '.join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]
    runs = result['losses']
    if {'sce', 'mse'} <= set(runs):
        sce, mse = runs['sce']['head_trace'], runs['mse']['head_trace']
        if mse[0] > 0 and mse[-1] > 0:
            lines.append(
                f'SCE / MSE head trace: {sce[0] / mse[0]:.4g} at step {first}'
                f' -> {sce[-1] / mse[-1]:.4g} at step {last}'
            )
    return '\n'.join(lines)


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------

FLAGS = flags.FLAGS

# The `run_spectrum` arguments that come from the flags of the same names
# (and are recorded in spectrum.json with them).
_RUN_FLAGS = (
    'steps',
    'every',
    'batch_size',
    'seed',
    'learning_rate',
    'weight_decay',
    'clip_norm',
    'curvature_batches',
    'curvature_batch_size',
    'top_k',
    'head_init',
)


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program, so that
    importing this module next to another absl program defines nothing)."""
    flags.DEFINE_enum(
        'backbone',
        'efficientnet_lite0',
        ['efficientnet_lite0', 'small_cnn'],
        'efficientnet_lite0 (ImageNet weights) or small_cnn (tiny, random; '
        'tests).',
    )
    flags.DEFINE_integer('image_size', 32, 'Input resolution.')
    flags.DEFINE_string(
        'npz_dir',
        None,
        'Folder with train.npz (image uint8 NHWC, label); default: the '
        'committed CIFAR-10 subset experiments/data/cifar10_5x2.',
    )
    flags.DEFINE_integer('steps', 300, 'Fine-tuning steps per loss.')
    flags.DEFINE_integer('every', 50, 'Record every this many steps.')
    flags.DEFINE_integer('batch_size', 32, 'Training batch size.')
    flags.DEFINE_integer('seed', 0, 'Batch order and pseudo-targets.')
    flags.DEFINE_float('learning_rate', 1e-4, 'Adam learning rate.')
    flags.DEFINE_float('weight_decay', 1e-5, 'Coupled L2 coefficient.')
    flags.DEFINE_float('clip_norm', 1.0, 'Global-norm clipping (0: off).')
    flags.DEFINE_integer(
        'curvature_batches', 8, 'Batches the curvature is averaged over.'
    )
    flags.DEFINE_integer(
        'curvature_batch_size', None, 'Their size (default: --batch_size).'
    )
    flags.DEFINE_string(
        'layer',
        None,
        "The backbone layer's key, e.g. head_conv or blocks_15/project_conv "
        '(default: the last conv / dense layer).',
    )
    flags.DEFINE_integer('top_k', 10, 'Eigenvalues kept per block.')
    flags.DEFINE_enum(
        'head_init',
        'torch',
        ['torch', 'zeros'],
        'Initial head: torch (uniform in +-1/sqrt(D), a fresh nn.Linear) or '
        "zeros (the library's default; the layer's curvature then starts at "
        '0).',
    )
    flags.DEFINE_string(
        'out', 'runs/curvature_spectrum', 'Folder for spectrum.json / .png.'
    )


def build(backbone: str, image_size: int, seed: int):
    """(apply_fn, variables) of the backbone, as the runner builds it."""
    # pylint: disable=g-import-not-at-top
    from experiments import backbones
    from experiments.configs import class_il

    config = class_il.get_config()
    config.backbone.name = backbone
    config.backbone.image_size = image_size
    config.seed = seed
    return backbones.build_backbone(config)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    logging.set_verbosity(logging.WARNING)
    t0 = time.time()
    npz_dir = FLAGS.npz_dir or str(DEFAULT_NPZ_DIR)
    try:
        images, labels = data_lib.load_npz(npz_dir, 'train')
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    apply_fn, variables = build(FLAGS.backbone, FLAGS.image_size, FLAGS.seed)
    print(
        f'{FLAGS.backbone} at {FLAGS.image_size} px, {len(labels)} training '
        f'images of {int(labels.max()) + 1} classes from {npz_dir}; '
        f'{FLAGS.steps} steps per loss, a record every {FLAGS.every}.'
    )
    settings = {name: getattr(FLAGS, name) for name in _RUN_FLAGS}
    try:
        result = run_spectrum(
            apply_fn,
            variables,
            images,
            labels,
            **settings,
            layer=FLAGS.layer,
            log=lambda line: print(line, flush=True),
        )
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    curvature_batch_size = FLAGS.curvature_batch_size or FLAGS.batch_size
    result = {
        'flags': {
            'backbone': FLAGS.backbone,
            'image_size': FLAGS.image_size,
            'npz_dir': npz_dir,
            **settings,
            'curvature_batch_size': curvature_batch_size,
            'schedule': 'constant',
            'alpha': dj.data_terms.LabelLoss().alpha,
        },
        **result,
    }
    (out / 'spectrum.json').write_text(json.dumps(result, indent=1) + '\n')
    plot(result, out / 'spectrum.png')
    print(summary_table(result))
    print(
        f'-> {out / "spectrum.json"}, {out / "spectrum.png"} '
        f'({time.time() - t0:.0f} s)'
    )


if __name__ == '__main__':
    define_flags()
    app.run(main)
