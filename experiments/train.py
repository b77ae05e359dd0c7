"""`train_and_evaluate(config, workdir)`: one continual fine-tuning run.

Order of a run (each task t = 0 .. T−1):
  1. `begin_task`: fresh optimizer moments, N_t-step linear schedule, and the
     setting's class mask (`class_masks`): class-IL, the classes seen so far
     (the head "grows"); task-IL, the task's own head; data-IL, all classes.
  2. N_t steps on the task's data, each batch augmented on the host and
     joined by a replay batch drawn from the buffer when replay is on (while
     the buffer is empty, by more examples of the task, so shapes stay
     static).
  3. DLCFT: curvature of the task (K-FAC of the linearized backbone and the
     exact head factor) from augmented batches of the task, then `end_task`
     folds it into the running average and moves the anchor to θ_t.
  4. The task's training examples enter the reservoir buffer (if any).
  5. Evaluation on the test data of every task seen so far; the accuracy
     matrix, average accuracy, forgetting and backward transfer are printed.
At the end `results.json`, `summary.txt` and `results.png` are written to the
work directory; `log.jsonl` and TensorBoard events are written as it goes.

Scale. Every step, update and evaluation is `jax.pmap`ped over the local
devices; the global batch (train.batch_size + replay.batch_size) is split
over all devices of all hosts, and each host draws the same global batch
indices but loads and augments only its own rows. With
`config.distributed.initialize` the hosts join through
`jax.distributed.initialize()` first.

Determinism and resume. Every random draw is a pure function of (seed, task,
step): which examples form a batch, their augmentation, the replay draw, the
curvature batches and pseudo-targets, and the reservoir decisions. A
checkpoint (orbax, `WORKDIR/checkpoints`) therefore needs only the train
state, the replay buffer and the position; it is written every
`checkpoint.every_steps` steps and after each task. Running the same command
again resumes from the latest one, and the final results equal those of an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

import dlcft_jax as dj
from dlcft_jax import parallel
from dlcft_jax import metrics as metrics_lib
from dlcft_jax import prototypes
from dlcft_jax import data as data_lib
from dlcft_jax.data import ReplayBuffer, RowRandom
from experiments import datasets, methods, reporting

SETTINGS = methods.SETTINGS
RESNETS = ('cifar_resnet18', 'resnet18', 'resnet50')
METHODS = tuple(methods.METHODS)
AXIS = parallel.AXIS

# Streams of the counter-based host RNG: default_rng([seed, STREAM, t, k]).
_ORDER, _AUGMENT, _REPLAY, _FILL, _CURVATURE, _RESERVOIR = range(6)

# Config fields that may change between a run and its resumption.
_RESUMABLE_FIELDS = (
    'checkpoint',
    'compilation_cache_dir',
    'distributed',
    'train.log_every',
    'train.stop_after_tasks',
    'data.npz_dir',
    'data.tfds_data_dir',
    'data.mit67_dir',
    'data.cache_dir',
    'data.download',
    'backbone.checkpoint',
    'eval.batch_size',
)


class ConfigError(ValueError):
    """A configuration the run cannot use; the message says what to change."""


# ----------------------------------------------------------------------------
# Configuration.


def _check_config(config: ml_collections.ConfigDict) -> None:
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)

    need(
        config.setting in SETTINGS,
        f'config.setting={config.setting!r} is unknown; use one of {SETTINGS}.',
    )
    close = difflib.get_close_matches(str(config.method), METHODS, n=1)
    need(
        config.method in METHODS,
        f'config.method={config.method!r} is unknown'
        + (f' (did you mean {close[0]!r}?)' if close else '')
        + f'; use one of {METHODS}.',
    )
    need(
        config.data.num_tasks >= 1 and config.data.classes_per_task >= 1,
        'config.data.num_tasks and config.data.classes_per_task must be >= 1.',
    )
    need(
        config.train.batch_size >= 1 and config.train.steps_per_task >= 1,
        'config.train.batch_size and config.train.steps_per_task must be >= 1.',
    )
    need(
        config.train.trainable in (None, 'none', 'all'),
        f'config.train.trainable={config.train.trainable!r} is unknown; use '
        "None (the method's), 'none' (the head only) or 'all'.",
    )
    need(
        config.backbone.bn_reestimate >= 0,
        'config.backbone.bn_reestimate must be >= 0 (batches; 0 is off).',
    )
    need(
        0.0 <= config.data.validation < 1.0,
        f'config.data.validation={config.data.validation} must be 0 (test on '
        'the test set) or a share in (0, 1) of the training set to hold out.',
    )
    need(
        config.train.first_task_multiplier >= 1,
        'config.train.first_task_multiplier must be >= 1.',
    )
    need(
        config.train.log_every >= 1 and config.eval.batch_size >= 1,
        'config.train.log_every and config.eval.batch_size must be >= 1.',
    )
    need(
        (config.replay.buffer_size is None or config.replay.buffer_size >= 0)
        and config.replay.batch_size >= 0,
        'config.replay.buffer_size and config.replay.batch_size must be >= 0.',
    )
    need(
        config.curvature.kind in ('kfac', 'tkfac'),
        "config.curvature.kind must be 'kfac' or 'tkfac'.",
    )
    need(
        config.curvature.num_batches >= 1 and config.curvature.batch_size >= 1,
        'config.curvature.num_batches and batch_size must be >= 1.',
    )
    need(
        config.backbone.image_size >= 8,
        'config.backbone.image_size must be at least 8 pixels.',
    )
    need(
        config.train.stop_after_tasks is None
        or config.train.stop_after_tasks >= 1,
        'config.train.stop_after_tasks must be None or >= 1.',
    )
    need(
        config.checkpoint.every_steps >= 0
        and config.checkpoint.max_to_keep >= 1,
        'config.checkpoint.every_steps must be >= 0 and max_to_keep >= 1.',
    )
    method = methods.get(config.method)
    need(
        not method.needs_buffer or _replay_batch(config) > 0,
        f'config.method={config.method!r} replays from a buffer; set '
        'config.replay.buffer_size and config.replay.batch_size > 0 (e.g. '
        '200 and 32, Mammoth\'s defaults).',
    )
    need(
        config.replay.insert in (None, 'stream', 'task_end'),
        "config.replay.insert must be None (the method's), 'stream' or "
        "'task_end'.",
    )
    need(
        config.baselines.ncm_metric in prototypes.NCM_METRICS,
        f'config.baselines.ncm_metric must be one of {prototypes.NCM_METRICS}.',
    )
    need(
        config.baselines.ranpac_dim >= 1
        and 0 < config.baselines.ranpac_holdout < 1,
        'config.baselines.ranpac_dim must be >= 1 and ranpac_holdout in '
        '(0, 1).',
    )
    groups = config.data.class_groups
    if groups is not None:
        sizes = {len(g) for g in groups}
        need(
            len(groups) == config.data.num_tasks and len(sizes) == 1,
            f'config.data.class_groups has {len(groups)} groups of sizes '
            f'{sorted(sizes)}; give config.data.num_tasks='
            f'{config.data.num_tasks} groups of equal size.',
        )
        flat = [c for g in groups for c in g]
        need(
            len(set(flat)) == len(flat),
            'config.data.class_groups repeats a class; each class may appear '
            'once.',
        )


def _check_devices(config: ml_collections.ConfigDict) -> None:
    """The global batches must split evenly over all devices."""
    n = jax.device_count()
    per_step = config.train.batch_size + _replay_rows(config)
    if per_step % n:
        raise ConfigError(
            f'The global batch train.batch_size + replayed rows '
            f'(replay.batch_size, twice for derpp) = {per_step} does not divide by the {n} devices; choose sizes '
            f'whose sum is a multiple of {n}.'
        )
    if config.curvature.batch_size % n:
        raise ConfigError(
            f'config.curvature.batch_size={config.curvature.batch_size} does '
            f'not divide by the {n} devices; use a multiple of {n}.'
        )


def buffer_size(config) -> int:
    """The reservoir's capacity: the config's, or the setting's default
    (200 in class-IL and for the buffer methods, else 0)."""
    if config.replay.buffer_size is not None:
        return config.replay.buffer_size
    method = methods.get(config.method)
    if method.replay == 'none':  # joint and the training-free methods too
        return 0
    return 200 if config.setting == 'class_il' or method.needs_buffer else 0


def _replay_batch(config) -> int:
    """Replayed examples per draw (0 when replay is off)."""
    if methods.get(config.method).replay == 'none':
        return 0
    if buffer_size(config) == 0 or config.replay.batch_size == 0:
        return 0
    return config.replay.batch_size


def _replay_rows(config) -> int:
    """Replayed rows per step: one draw, two for DER++."""
    r = _replay_batch(config)
    return 2 * r if methods.get(config.method).replay == 'derpp' else r


def _insert_mode(config) -> str:
    return config.replay.insert or methods.get(config.method).insert


def method_config(config: ml_collections.ConfigDict) -> dj.MethodConfig:
    """The `MethodConfig` of `config.method`, with the config's overrides."""
    method = methods.get(config.method)
    o = config.optim
    overrides: dict[str, Any] = dict(alpha=o.alpha)
    for key, name in (
        ('optimizer', 'name'),
        ('learning_rate', 'learning_rate'),
        ('proximal', 'proximal'),
        ('weight_decay', 'weight_decay'),
        ('clip_norm', 'clip_norm'),
        ('schedule', 'schedule'),
    ):
        if o[name] is not None:
            overrides[key] = o[name]
    if method.adam and o.learning_rate is None and o.adam_learning_rate:
        overrides['learning_rate'] = o.adam_learning_rate
    mcfg = method.preset(**overrides)
    fields: dict[str, Any] = {}
    if mcfg.regularizer in ('kfac', 'tkfac'):
        fields['regularizer'] = config.curvature.kind
    # Task-IL heads are separate per task and not regularized (paper §3.3).
    fields['regularize_head'] = config.setting != 'task_il'
    bn_train = config.baselines.bn_train
    fields['bn_train'] = method.bn_train if bn_train is None else bn_train
    if mcfg.distill != 'none':
        fields['distill_temperature'] = config.baselines.lwf_temperature
        if config.setting == 'task_il':
            fields['distill_group_size'] = _classes_per_task(config)
    try:
        return dataclasses.replace(mcfg, **fields)
    except ValueError as e:
        raise ConfigError(
            f'config.method={config.method!r}: {e} (see config.baselines.'
            'bn_train and config.optim).'
        ) from None


def _classes_per_task(config) -> int:
    if config.data.class_groups is not None:
        return len(config.data.class_groups[0])
    return config.data.classes_per_task


def _fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config fields that decide the results (for resume checks)."""
    flat = {}

    def walk(prefix, node):
        for key, value in node.items():
            name = f'{prefix}{key}'
            if isinstance(value, dict):
                walk(name + '.', value)
            elif not any(
                name == f or name.startswith(f + '.') for f in _RESUMABLE_FIELDS
            ):
                flat[name] = value

    walk('', json.loads(config.to_json_best_effort()))
    return flat


# ----------------------------------------------------------------------------
# Backbone.


def build_backbone(
    config: ml_collections.ConfigDict,
    mean: tuple[float, float, float] = datasets.IMAGENET_MEAN,
    std: tuple[float, float, float] = datasets.IMAGENET_STD,
) -> tuple[Callable[..., jax.Array], Any]:
    """(apply_fn on uint8 images, pre-trained variables) of the backbone.

    EfficientNet-Lite0 uses its own input scaling; the ResNets normalise with
    `mean` / `std` (in [0, 1] units), the data set's statistics of the paper
    (ImageNet's for CIFAR, spec §2.2; MIT-67's own).
    """
    from dlcft_jax import models  # pylint: disable=g-import-not-at-top

    b = config.backbone
    if b.name == 'efficientnet_lite0':
        variables, _ = models.load_efficientnet_lite0(b.checkpoint)
        net = models.EfficientNetLite0(activation=b.activation)
        preprocess = models.preprocess
    elif b.name == 'small_cnn':  # a tiny random network for tests
        from dlcft_jax.models import small_cnn  # pylint: disable=g-import-not-at-top

        net = small_cnn.SmallConvNet(
            width=8, features=16, depthwise_impl='shift'
        )
        variables = net.init(
            jax.random.key(config.seed),
            jnp.zeros((1, b.image_size, b.image_size, 3)),
        )
        preprocess = lambda x: jnp.asarray(x, jnp.float32) / 127.5 - 1.0
    elif b.name in RESNETS:
        net, variables = _load_resnet(b)
        m = jnp.asarray(mean, jnp.float32) * 255.0
        s = jnp.asarray(std, jnp.float32) * 255.0
        preprocess = lambda x: (x - m) / s
    else:
        raise ConfigError(
            f'config.backbone.name={b.name!r} is unknown; use one of '
            f"{('efficientnet_lite0', 'small_cnn') + RESNETS}."
        )
    size = b.image_size

    def inputs(images):
        x = jnp.asarray(images, jnp.float32)
        if x.shape[1:3] != (size, size):
            x = jax.image.resize(
                x, (x.shape[0], size, size, x.shape[3]), method='bilinear'
            )
        return preprocess(x)

    def apply_fn(variables, images):
        return net.apply(variables, inputs(images))

    def train_apply_fn(variables, images):
        # BatchNorm on batch statistics, running averages updated.
        return net.apply(
            variables, inputs(images), train=True, mutable=['batch_stats']
        )

    apply_fn.train = train_apply_fn  # for the bn_train methods
    return apply_fn, variables


def reestimate_batch_stats(
    train_apply_fn,
    variables,
    images: np.ndarray,
    num_batches: int,
    batch_size: int,
    transform,
    augmentation: str,
):
    """ψ0 with its BatchNorm statistics re-estimated on `images`.

    The pre-trained running statistics belong to the pre-training inputs
    (ImageNet at 224 px); CIFAR at 32 px gives other activations. Each of
    `num_batches` batches of `batch_size` images (the first images of the
    first task, in order; the test transform, no augmentation) is passed
    through the network in training mode, every BatchNorm normalising with
    its batch's statistics, and the new mean and variance of each layer are
    the averages over the batches of its batch means and variances (the
    "precise BN" estimate). The running statistics are read without knowing
    the layers' momentum m: from zero statistics one call gives (1 − m)·b;
    from ones, m + (1 − m)·b.

    Only the first task's training images are read, so the run stays a
    continual one; the weights are unchanged.
    """
    stats0 = variables['batch_stats']
    n = min(len(images), num_batches * batch_size)
    if n < 1:
        raise ConfigError('config.backbone.bn_reestimate needs training images.')

    @jax.jit
    def moments(stats, x):
        _, new = train_apply_fn({**variables, 'batch_stats': stats}, x)
        return new['batch_stats']

    zeros = jax.tree.map(jnp.zeros_like, stats0)
    ones = jax.tree.map(jnp.ones_like, stats0)
    batches = [
        transform(augmentation, images[i : i + batch_size])
        for i in range(0, n, batch_size)
    ]
    # (1 - m) of each leaf, from one batch: ones -> m + (1 - m) b.
    from_zeros = moments(zeros, batches[0])
    keep = jax.tree.map(
        lambda a, b: b - a, from_zeros, moments(ones, batches[0])
    )
    total = from_zeros
    for x in batches[1:]:
        total = jax.tree.map(jnp.add, total, moments(zeros, x))
    new = jax.tree.map(
        lambda t, m: t / ((1.0 - m) * len(batches)), total, keep
    )
    return {**variables, 'batch_stats': new}


def _load_resnet(b: ml_collections.ConfigDict):
    """(network, variables) of a ResNet backbone from `b.checkpoint`."""
    from dlcft_jax import models  # pylint: disable=g-import-not-at-top

    if not b.checkpoint:
        raise ConfigError(
            f'config.backbone.name={b.name!r} needs config.backbone.checkpoint:'
            ' a backbone.npz written by `python -m experiments.pretrain`, or '
            'a torchvision / timm ResNet .pth or .safetensors file.'
        )
    builder = {
        'cifar_resnet18': models.cifar_resnet18,
        'resnet18': models.resnet18,
        'resnet50': models.resnet50,
    }[b.name]
    path = Path(b.checkpoint)
    if path.suffix == '.npz':
        from experiments import pretrain  # pylint: disable=g-import-not-at-top

        info = pretrain.backbone_info(path)
        if info['architecture'] != b.name:
            raise ConfigError(
                f'{path} holds a {info["architecture"]}, but '
                f'config.backbone.name={b.name!r}; set it to '
                f'{info["architecture"]!r}.'
            )
        kwargs, variables = pretrain.load_backbone(path)
    else:
        variables, _ = models.load_resnet(path)
        kwargs = {'activation': b.activation}
        if b.name == 'cifar_resnet18':
            kwargs['width_multiplier'] = b.width_multiplier
    return builder(**kwargs), variables


def _setup_compilation_cache(config: ml_collections.ConfigDict) -> None:
    path = config.compilation_cache_dir
    if path == '':
        return
    if path is None:
        path = os.path.join(
            os.path.expanduser('~'), '.cache', 'dlcft_jax', 'xla'
        )
    os.makedirs(path, exist_ok=True)
    jax.config.update('jax_compilation_cache_dir', path)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def _init_distributed(config: ml_collections.ConfigDict) -> None:
    """`jax.distributed.initialize()` with the config's (optional) fields."""
    d = config.distributed
    if not d.initialize:
        return
    kwargs = {
        k: d[k]
        for k in ('coordinator_address', 'num_processes', 'process_id')
        if d[k] is not None
    }
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        if 'already' not in str(e).lower():  # initialized by the caller
            raise


# ----------------------------------------------------------------------------
# Tasks.


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: indices into the data set's arrays, labels as head rows."""

    classes: list[int]
    train_idx: np.ndarray
    test_idx: np.ndarray
    train_rows: np.ndarray  # head row of each training example
    test_rows: np.ndarray
    # Task id of each training example (None: all of this task; set for the
    # union that joint training uses).
    train_task: np.ndarray | None = None


def union_task(tasks: list[Task]) -> Task:
    """All tasks as one (joint training): their examples, labels and ids."""
    return Task(
        sorted({c for task in tasks for c in task.classes}),
        np.concatenate([task.train_idx for task in tasks]),
        np.concatenate([task.test_idx for task in tasks]),
        np.concatenate([task.train_rows for task in tasks]),
        np.concatenate([task.test_rows for task in tasks]),
        np.concatenate(
            [
                np.full(len(task.train_idx), j, np.int32)
                for j, task in enumerate(tasks)
            ]
        ),
    )


def _check_task_size(config, n_train: int, n_test: int, what: str) -> None:
    for name, size in (
        ('train.batch_size', config.train.batch_size),
        ('curvature.batch_size', config.curvature.batch_size),
    ):
        if n_train < size:
            raise ConfigError(
                f'{what} has {n_train} training images, fewer than '
                f'config.{name}={size}; lower config.{name}.'
            )
    if n_test == 0:
        raise ConfigError(f'{what} has no test images in the data.')


def make_tasks(
    config: ml_collections.ConfigDict, data: datasets.Dataset
) -> tuple[list[Task], int]:
    """The tasks of the run and the width of the head.

    class_il / task_il: tasks are groups of classes (natural order, a seeded
    permutation, or `data.class_groups`) whose labels become head rows
    0..C−1 in task order. data_il: the training set split into `num_tasks`
    equal random chunks (seed `config.seed`); every task keeps all classes
    and is tested on the full test set.
    """
    y_train, y_test = data.y_train, data.y_test
    if config.setting == 'data_il':
        chunks = datasets.data_il_chunks(
            len(y_train), config.data.num_tasks, config.seed
        )
        test_idx = np.arange(len(y_test))
        tasks = []
        for t, idx in enumerate(chunks):
            _check_task_size(config, len(idx), len(y_test), f'Task {t + 1}')
            tasks.append(
                Task(
                    list(range(data.num_classes)),
                    idx,
                    test_idx,
                    y_train[idx].astype(np.int32),
                    y_test.astype(np.int32),
                )
            )
        return tasks, data.num_classes
    cpt, num_tasks = config.data.classes_per_task, config.data.num_tasks
    if config.data.class_groups is not None:
        groups = [list(map(int, g)) for g in config.data.class_groups]
    else:
        order = np.arange(data.num_classes)
        if config.data.class_order_seed is not None:
            order = np.random.default_rng(
                config.data.class_order_seed
            ).permutation(data.num_classes)
        if num_tasks * cpt > data.num_classes:
            raise ConfigError(
                f'{num_tasks} tasks x {cpt} classes need '
                f'{num_tasks * cpt} classes but {data.name} has '
                f'{data.num_classes}; lower config.data.num_tasks or '
                'config.data.classes_per_task.'
            )
        groups = [
            order[i * cpt : (i + 1) * cpt].tolist() for i in range(num_tasks)
        ]
    flat = [c for g in groups for c in g]
    bad = [c for c in flat if not 0 <= c < data.num_classes]
    if bad:
        raise ConfigError(
            f'config.data.class_groups names classes {bad} outside 0..'
            f'{data.num_classes - 1} of {data.name}.'
        )
    row = np.full((data.num_classes,), -1, np.int32)
    row[flat] = np.arange(len(flat), dtype=np.int32)
    tasks = []
    for classes in groups:
        tr = np.flatnonzero(np.isin(y_train, classes))
        te = np.flatnonzero(np.isin(y_test, classes))
        _check_task_size(
            config, len(tr), len(te), f'Task with classes {classes}'
        )
        tasks.append(Task(classes, tr, te, row[y_train[tr]], row[y_test[te]]))
    return tasks, len(flat)


def class_masks(config, t: int, num_classes: int, cpt: int | None = None):
    """(training mask of task t, test masks of tasks 0..t) for the setting.

    class_il: the classes seen so far, for training and for every test (no
    task id at test). task_il: the rows of the task's own head, for training
    and for that task's test (the task id picks the head). data_il: all.
    """
    if cpt is None:
        cpt = config.data.classes_per_task
        if config.data.class_groups is not None:
            cpt = len(config.data.class_groups[0])
    if config.setting == 'data_il':
        ones = np.ones((num_classes,), np.float32)
        return ones, [ones] * (t + 1)

    def rows(lo, hi):
        mask = np.zeros((num_classes,), np.float32)
        mask[lo * cpt : hi * cpt] = 1.0
        return mask

    if config.setting == 'task_il':
        return rows(t, t + 1), [rows(j, j + 1) for j in range(t + 1)]
    return rows(0, t + 1), [rows(0, t + 1)] * (t + 1)


def _rng(config, stream: int, *counters: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, stream, *counters])


def epoch_indices(
    config, t: int, n: int, start: int, count: int, stream: int = _ORDER
) -> np.ndarray:
    """Positions start..start+count of task t's endless shuffled order
    (`dlcft_jax.data.epoch_positions` keyed by (seed, stream, t))."""
    return data_lib.epoch_positions(n, start, count, (config.seed, stream, t))


def host_copy(tree: Any) -> Any:
    """Device 0's copy of a pmap-replicated pytree, as NumPy arrays.

    Reads one shard per leaf: no gather of all copies and no per-shape
    compilation (unlike indexing `x[0]` on the device).
    """

    def first(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)[0]
        d = np.asarray(x.addressable_shards[0].data)
        return d[0] if d.ndim == x.ndim else d

    return jax.tree.map(first, tree)


def host_replicate(tree: Any, n: int) -> Any:
    """n stacked copies of every leaf (NumPy views), for a pmap input."""
    return jax.tree.map(
        lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree
    )


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(iterator, size: int = 3):
    """Runs `iterator` in a background thread, `size` items ahead.

    Host-side batch assembly and augmentation (NumPy, which releases the
    GIL in its kernels) overlap with the device step. An exception in the
    thread is raised in the consumer.
    """
    items: queue.Queue = queue.Queue(maxsize=size)
    done = object()

    def work():
        try:
            for item in iterator:
                items.put(item)
        except BaseException as e:  # pylint: disable=broad-except
            items.put(_Failed(e))
            return
        items.put(done)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = items.get()
        if item is done:
            return
        if isinstance(item, _Failed):
            raise item.error
        yield item


# ----------------------------------------------------------------------------
# The run.


class _Run:
    """The pmapped functions and the host-side state of the task loop."""

    def __init__(self, config, data, tasks, num_classes, state, workdir):
        self.config = config
        self.data = data
        self.tasks = tasks
        self.method = methods.get(config.method)
        # What is trained, task by task: the union for joint training.
        self.train_tasks = [union_task(tasks)] if self.method.joint else tasks
        self.num_classes = num_classes
        self.n_local = jax.local_device_count()
        self.process = jax.process_index()
        self.is_chief = self.process == 0
        self.replay_bs = _replay_batch(config)
        self.replay_rows = _replay_rows(config)
        self.insert = _insert_mode(config)
        der = self.method.replay in ('der', 'derpp')
        self.store_logits = config.replay.store_logits or der
        self.buffer = (
            ReplayBuffer(buffer_size(config)) if self.replay_bs else None
        )
        self.state = host_replicate(jax.device_get(state), self.n_local)
        self.step_fn = parallel.pmap_step(donate=True)
        self.curvature_fns = parallel.pmap_curvature_fns()
        self.end_fn = jax.pmap(dj.end_task, donate_argnums=0)
        self.predict_fn = jax.pmap(dj.predict, in_axes=(0, 0))
        self.features_fn = jax.pmap(
            lambda s, x: dj.train_state.features(s, s.params, x),
            in_axes=(0, 0),
        )
        self.begin_fn = jax.jit(dj.begin_task, static_argnames='num_steps')
        self.acc: list[list[float | None]] = [
            [None] * len(tasks) for _ in self.train_tasks
        ]
        self.per_task: list[dict[str, Any]] = []
        self.input_wait_s = 0.0  # of the current task
        self.log_file = None
        self.events = None
        self.free = None  # NCM / RanPAC state of a training-free method
        self.test_features = {}  # task -> frozen features (training-free)
        if self.is_chief:
            self.log_file = open(workdir / 'log.jsonl', 'a', encoding='utf-8')
            self.events = reporting.EventWriter(workdir / 'tensorboard')

    # -- host-side helpers --------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        if self.log_file is not None:
            self.log_file.write(json.dumps(record) + '\n')
            self.log_file.flush()

    def close(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
        if self.events is not None:
            self.events.close()

    def n_steps(self, t: int) -> int:
        """Steps of training task t (joint: all tasks' steps together)."""
        cfg = self.config.train
        if self.method.training_free:
            return 0
        if self.method.joint:
            return cfg.steps_per_task * (
                len(self.tasks) - 1 + cfg.first_task_multiplier
            )
        mult = cfg.first_task_multiplier if t == 0 else 1
        return cfg.steps_per_task * mult

    def global_step(self, t: int, k: int) -> int:
        """Steps of all tasks before t, plus k: the checkpoint and log step."""
        return sum(self.n_steps(j) for j in range(t)) + k

    def _host_rows(self, total: int) -> slice:
        per_host = total // jax.process_count()
        return slice(self.process * per_host, (self.process + 1) * per_host)

    def _augment(self, images, *counters):
        """Training transform; row i draws from (seed, counters, i).

        `counters` end with the global index of the first row, so a row's
        augmentation does not depend on how many hosts share the batch.
        """
        aug = self.data.augmentation
        if not self.config.data.augment:
            return datasets.test_transform(aug, images)
        *head, first = counters
        rng = RowRandom(
            (self.config.seed, _AUGMENT, *head),
            np.arange(first, first + len(images)),
        )
        return datasets.train_transform(aug, images, rng)

    def _to_devices(self, batch: dict[str, np.ndarray]) -> Any:
        return parallel.shard_batch(
            {k: np.asarray(v) for k, v in batch.items()}, self.n_local
        )

    def _task_mask(self, task_ids: np.ndarray) -> np.ndarray:
        """(N, C) task-IL masks: the head rows of each row's own task."""
        cpt = _classes_per_task(self.config)
        cols = np.arange(self.num_classes)[None, :] // cpt
        return (cols == np.asarray(task_ids)[:, None]).astype(np.float32)

    def train_batch(self, t: int, k: int) -> dict[str, np.ndarray]:
        """This host's rows of step k's global batch.

        Rows [0, b) come from the task, then one replay draw of r rows (two
        for DER++). While the buffer is empty the replayed rows are more task
        examples with no weight in the replay terms, so shapes stay static.
        """
        cfg, task = self.config, self.train_tasks[t]
        b, r = cfg.train.batch_size, self.replay_bs
        total = b + self.replay_rows
        rows = self._host_rows(total)
        n = len(task.train_idx)
        pos = epoch_indices(cfg, t, n, k * b, b)
        # Every global row: raw images, labels, task ids, which part it is
        # in (0 current, 1/2 replay draw, 3 fill) and stored logits.
        images = [self.data.x_train[task.train_idx[pos]]]
        labels = [task.train_rows[pos]]
        task_ids = [
            np.full(b, t, np.int32)
            if task.train_task is None
            else task.train_task[pos]
        ]
        kind = [np.zeros(b, np.int32)]
        stored = [np.zeros((b, self.num_classes), np.float32)]
        for draw in range(self.replay_rows // max(r, 1)):
            # Draw 0 keeps the counters of the single-draw runner.
            counters = (t, k) if draw == 0 else (t, k, draw)
            if len(self.buffer):
                rep = self.buffer.sample(r, _rng(cfg, _REPLAY, *counters))
                images.append(rep['image'])
                labels.append(rep['label'])
                task_ids.append(rep['task_id'])
                kind.append(np.full(r, 1 + draw, np.int32))
                stored.append(
                    rep.get(
                        'logits', np.zeros((r, self.num_classes), np.float32)
                    )
                )
            else:  # no memory yet: more task examples keep the shape static
                fill = _rng(cfg, _FILL, *counters).integers(0, n, size=r)
                images.append(self.data.x_train[task.train_idx[fill]])
                labels.append(task.train_rows[fill])
                task_ids.append(
                    np.full(r, t, np.int32)
                    if task.train_task is None
                    else task.train_task[fill]
                )
                kind.append(np.full(r, 3, np.int32))
                stored.append(np.zeros((r, self.num_classes), np.float32))
        labels, task_ids = np.concatenate(labels), np.concatenate(task_ids)
        kind, stored = np.concatenate(kind), np.concatenate(stored)
        batch = {
            'image': self._augment(
                np.concatenate(images)[rows], t, k, rows.start
            ),
            'label': labels[rows].astype(np.int32),
        }
        batch.update(self._loss_terms(t, kind, task_ids, stored, rows))
        return batch

    def _loss_terms(self, t, kind, task_ids, stored, rows) -> dict:
        """Per-row masks and weights of the method's loss terms."""
        cfg, out = self.config, {}
        total = len(kind)
        if cfg.setting == 'task_il':
            out['class_mask'] = self._task_mask(task_ids)[rows]
        if self.method.replay in ('der', 'derpp'):
            b, r = cfg.train.batch_size, self.replay_bs
            alpha = cfg.baselines.der_alpha
            if alpha is None:
                alpha = methods.DER_ALPHA[self.method.replay]
            label = np.where(kind == 0, total / b, 0.0)
            label = np.where(
                kind == 2, cfg.baselines.der_beta * total / r, label
            )
            out['label_scale'] = label.astype(np.float32)[rows]
            out['logit_scale'] = (
                np.where(kind == 1, alpha * total / r, 0.0).astype(np.float32)
            )[rows]
            out['logit_target'] = stored[rows]
        if self.state.config.distill != 'none':
            if cfg.setting == 'data_il':
                old = np.ones((self.num_classes,), np.float32)
            elif cfg.setting == 'task_il':
                cpt = _classes_per_task(cfg)
                old = (np.arange(self.num_classes) < t * cpt).astype(np.float32)
            else:
                old, _ = class_masks(cfg, max(t - 1, 0), self.num_classes)
                old = old * (t > 0)
            out['distill_mask'] = np.broadcast_to(
                old, (total, self.num_classes)
            )[rows]
        return out

    # -- the phases of a task ------------------------------------------------

    def begin_task(self, t: int) -> None:
        if self.method.joint:
            # The union: every class of the run (task-IL: per-row masks).
            train_mask, _ = class_masks(
                self.config, len(self.tasks) - 1, self.num_classes
            )
        else:
            train_mask, _ = class_masks(self.config, t, self.num_classes)
        # Through the host: pmap places the replicated copies itself.
        state = self.begin_fn(
            host_copy(self.state),
            num_steps=self.n_steps(t),
            class_mask=train_mask,
        )
        self.state = host_replicate(jax.device_get(state), self.n_local)

    def train_steps(self, t: int, first: int, last: int, on_step) -> None:
        """Steps first..last−1 of task t; `on_step(k)` after each one."""
        cfg = self.config
        n = self.n_steps(t)
        progress = (
            reporting.Progress(
                n, t, len(self.train_tasks), every=cfg.train.log_every
            )
            if self.is_chief
            else None
        )
        window_start, window_images, window_wait = time.time(), 0, 0.0
        stream = self.buffer is not None and self.insert == 'stream'
        make = (
            self._to_devices(self.train_batch(t, k)) for k in range(first, last)
        )
        # With stream insertion a batch's replay rows depend on the step
        # before it: no read-ahead.
        batches = make if stream else prefetch(make)
        for k in range(first, last):
            # Time the step waits for its input: near 0 while the host
            # keeps ahead of the device.
            wait_start = time.time()
            batch = next(batches)
            window_wait += time.time() - wait_start
            self.input_wait_s += time.time() - wait_start
            if stream:
                self._offer_stream(t, k)
            self.state, m = self.step_fn(self.state, batch)
            window_images += cfg.train.batch_size + self.replay_rows
            done = k + 1
            if done % cfg.train.log_every == 0 or done == n:
                # Metrics reach the host only at log steps.
                m = {
                    name: float(v)
                    for name, v in jax.device_get(host_copy(m)).items()
                }
                if not all(math.isfinite(v) for v in m.values()):
                    raise FloatingPointError(
                        f'Non-finite metrics at task {t + 1} step {done}: '
                        f'{m}. Lower config.optim.learning_rate or check '
                        'the data.'
                    )
                elapsed = max(time.time() - window_start, 1e-9)
                m['images_per_s'] = window_images / elapsed
                m['input_wait_frac'] = window_wait / elapsed
                window_start, window_images, window_wait = time.time(), 0, 0.0
                if progress is not None:
                    progress.update(done, m)
                g = self.global_step(t, done)
                self.log({'task': t, 'step': done, 'global_step': g, **m})
                if self.events is not None:
                    self.events.scalars(
                        {f'train/{name}': v for name, v in m.items()}, g
                    )
            on_step(done)
        if progress is not None:
            progress.close()

    def _offer_stream(self, t: int, k: int) -> None:
        """Offers step k's current-task examples to the reservoir (Mammoth's
        order: after the batch is drawn), with the logits of the model before
        the step on the raw images when the method stores logits."""
        cfg, task = self.config, self.train_tasks[t]
        b = cfg.train.batch_size
        pos = epoch_indices(cfg, t, len(task.train_idx), k * b, b)
        images = self.data.x_train[task.train_idx[pos]]
        logits = self.logits(images) if self.store_logits else None
        ids = t if task.train_task is None else task.train_task[pos]
        self.buffer.add(
            images,
            task.train_rows[pos],
            ids,
            logits,
            rng=_rng(cfg, _RESERVOIR, t, k),
        )

    def _curvature_batches(self, t: int):
        """Augmented batches of task t for the curvature, as in the paper."""
        cfg, task = self.config, self.train_tasks[t]
        bs, nb = cfg.curvature.batch_size, cfg.curvature.num_batches
        pos = epoch_indices(cfg, t, len(task.train_idx), 0, bs * nb, _CURVATURE)
        rows = self._host_rows(bs)
        for i in range(nb):
            idx = pos[i * bs : (i + 1) * bs]
            images = self._augment(
                self.data.x_train[task.train_idx[idx[rows]]],
                _CURVATURE,
                t,
                i,
                rows.start,
            )
            batch = {'image': images, 'label': task.train_rows[idx[rows]]}
            if cfg.setting == 'task_il':
                batch['class_mask'] = self._task_mask(np.full(bs, t))[rows]
            yield self._to_devices(batch)

    def end_task(self, t: int) -> None:
        """Curvature of task t (methods with a penalty), anchor update,
        buffer update."""
        cfg, task = self.config, self.train_tasks[t]
        curvature = None
        if self.state.penalty_state is not None:
            key = jax.random.fold_in(jax.random.key(cfg.seed), t)
            curvature = dj.estimate_curvature(
                self.state,
                self._curvature_batches(t),
                key,
                **self.curvature_fns,
            )
        self.state = self.end_fn(self.state, curvature)
        if self.buffer is not None and self.insert == 'task_end':
            images = self.data.x_train[task.train_idx]
            logits = self.logits(images) if self.store_logits else None
            self.buffer.add(
                images,
                task.train_rows,
                t,
                logits,
                rng=_rng(cfg, _RESERVOIR, t),
            )

    def _batched(self, fn, images: np.ndarray):
        """`fn(state, x)` of `images` (test transform), over local devices,
        in padded static-shape batches (`dlcft_jax.data.eval_batches`)."""
        bs = self.config.eval.batch_size
        bs = -(-bs // self.n_local) * self.n_local
        no_labels = np.zeros((len(images),), np.int32)
        for batch in data_lib.eval_batches(images, no_labels, bs):
            x = datasets.test_transform(self.data.augmentation, batch['image'])
            out = fn(self.state, self._to_devices({'x': x})['x'])
            real = int(batch['mask'].sum())
            yield np.asarray(out).reshape(bs, -1)[:real]

    def logits(self, images: np.ndarray) -> np.ndarray:
        return np.concatenate(list(self._batched(self.predict_fn, images)))

    def features(self, images: np.ndarray) -> np.ndarray:
        """g(x; ψ0): the frozen pre-trained features (test transform)."""
        return np.concatenate(list(self._batched(self.features_fn, images)))

    # -- training-free methods -----------------------------------------------

    def fit_training_free(self, t: int) -> None:
        """NCM / RanPAC: add task t's features to the closed-form classifier."""
        cfg, task = self.config, self.train_tasks[t]
        z = self.features(self.data.x_train[task.train_idx])
        y = task.train_rows
        kind, opts = self.method.training_free, cfg.baselines
        if kind == 'ncm':
            if self.free is None:
                self.free = prototypes.ncm_init(self.num_classes, z.shape[1])
            self.free = prototypes.ncm_update(self.free, z, y)
            return
        if self.free is None:
            # The ridge, once, on a held-out split of the first task.
            tr, va = prototypes.split_holdout(
                len(y), opts.ranpac_holdout, cfg.seed
            )
            ridge, scores = prototypes.choose_ridge(
                z[tr],
                y[tr],
                z[va],
                y[va],
                num_classes=self.num_classes,
                proj_dim=opts.ranpac_dim,
                seed=cfg.seed,
            )
            self.log(
                {
                    'event': 'ranpac_ridge',
                    'ridge': ridge,
                    'validation_accuracy': {
                        str(k): v for k, v in scores.items()
                    },
                }
            )
            self.free = {
                'ridge': ridge,
                'state': prototypes.ranpac_init(
                    z.shape[1], self.num_classes, opts.ranpac_dim, cfg.seed
                ),
            }
        self.free['state'] = prototypes.ranpac_update(self.free['state'], z, y)
        self.free['w'] = prototypes.ranpac_solve(
            self.free['state'], self.free['ridge']
        )

    def _scores(self, j: int) -> np.ndarray:
        """Class scores on task j's test images (training-free: its
        classifier on the frozen features, computed once per task)."""
        images = self.data.x_test[self.tasks[j].test_idx]
        if not self.method.training_free:
            return self.logits(images)
        if j not in self.test_features:
            self.test_features[j] = self.features(images)
        z = self.test_features[j]
        if self.method.training_free == 'ncm':
            scores = prototypes.ncm_scores(
                self.free, z, self.config.baselines.ncm_metric
            )
        else:
            scores = prototypes.ranpac_scores(
                self.free['state'], self.free['w'], z
            )
        return np.nan_to_num(scores, neginf=-1e30)

    def evaluate(self, t: int) -> list[float]:
        """% accuracy on the test data of tasks 0..t, arg-max within masks
        (joint: every task, after training on their union)."""
        last = len(self.tasks) - 1 if self.method.joint else t
        _, masks = class_masks(self.config, last, self.num_classes)
        if self.config.setting == 'data_il':
            # Every task shares the full test set and the head: one pass.
            masks = masks[:1]
        out = []
        for j, mask in enumerate(masks):
            task = self.tasks[j]
            scores = self._scores(j)
            pred = np.argmax(np.where(mask > 0, scores, -np.inf), -1)
            out.append(100.0 * float(np.mean(pred == task.test_rows)))
        if self.config.setting == 'data_il':
            return out * (last + 1)
        return out


# ----------------------------------------------------------------------------
# Checkpoints.

_SAVED_FIELDS = (
    'step',
    'task',
    'num_steps',
    'params',
    'centre',
    'opt_state',
    'class_mask',
)


def _state_tree(state) -> dict[str, Any]:
    """The parts of a TrainState a checkpoint holds (ψ0 is rebuilt)."""
    tree = {name: getattr(state, name) for name in _SAVED_FIELDS}
    if state.config.bn_train:  # its BatchNorm statistics were trained
        tree['params0'] = state.params0
    return tree


def _buffer_tree(buffer: ReplayBuffer, image_shape, num_classes):
    """The buffer as fixed-shape arrays (capacity rows) for the checkpoint."""
    cap = buffer.capacity
    tree = {
        'num_seen': np.asarray(buffer.num_seen, np.int64),
        'images': np.zeros((cap,) + tuple(image_shape), np.uint8),
        'labels': np.zeros((cap,), np.int32),
        'task_ids': np.zeros((cap,), np.int32),
        'logits': np.zeros((cap, num_classes), np.float32),
    }
    sd = buffer.state_dict()
    size = len(buffer)
    for key in ('images', 'labels', 'task_ids', 'logits'):
        if key in sd:
            tree[key][:size] = sd[key]
    return tree


def _buffer_from_tree(tree, capacity: int, store_logits: bool) -> ReplayBuffer:
    num_seen = int(tree['num_seen'])
    size = min(capacity, num_seen)
    sd = {'capacity': capacity, 'num_seen': num_seen}
    if size:
        for key in ('images', 'labels', 'task_ids'):
            sd[key] = np.asarray(tree[key])[:size]
        if store_logits:
            sd['logits'] = np.asarray(tree['logits'])[:size]
    return ReplayBuffer.from_state_dict(sd)


class _Checkpoints:
    """orbax CheckpointManager of (state, buffer, position) in WORKDIR."""

    def __init__(self, workdir: Path, config):
        self.config = config
        self.manager = ocp.CheckpointManager(
            (workdir / 'checkpoints').absolute(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=config.checkpoint.max_to_keep,
                enable_async_checkpointing=True,
            ),
        )

    def save(self, run: _Run, g: int, meta: dict[str, Any]) -> None:
        state = _state_tree(host_copy(run.state))
        items = {
            'state': ocp.args.StandardSave(state),
            'meta': ocp.args.JsonSave(meta),
        }
        if run.buffer is not None:
            items['buffer'] = ocp.args.StandardSave(
                _buffer_tree(
                    run.buffer, run.data.x_train.shape[1:], run.num_classes
                )
            )
        self.manager.save(g, args=ocp.args.Composite(**items))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def meta(self, g: int) -> dict[str, Any]:
        """The position and config fingerprint of checkpoint g (cheap)."""
        return self.manager.restore(
            g, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )['meta']

    def restore(self, run: _Run, g: int) -> dict[str, Any]:
        state = host_copy(run.state)
        # NumPy templates: the values restore as NumPy on the host.
        items = {
            'state': ocp.args.StandardRestore(
                jax.device_get(_state_tree(state))
            ),
            'meta': ocp.args.JsonRestore(),
        }
        if run.buffer is not None:
            items['buffer'] = ocp.args.StandardRestore(
                _buffer_tree(
                    run.buffer, run.data.x_train.shape[1:], run.num_classes
                )
            )
        out = self.manager.restore(g, args=ocp.args.Composite(**items))
        state = state.replace(**out['state'])
        run.state = host_replicate(state, run.n_local)
        if run.buffer is not None:
            run.buffer = _buffer_from_tree(
                out['buffer'],
                run.buffer.capacity,
                run.store_logits,
            )
        return out['meta']

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _check_resumable(config, meta: dict[str, Any], workdir: Path) -> None:
    saved = meta.get('fingerprint', {})
    now = _fingerprint(config)
    diff = sorted(
        k for k in set(saved) | set(now) if saved.get(k) != now.get(k)
    )
    if diff:
        shown = ', '.join(
            f'{k} (saved {saved.get(k)!r}, now {now.get(k)!r})'
            for k in diff[:5]
        )
        raise ConfigError(
            f'{workdir} holds a checkpoint of a run with another '
            f'configuration: {shown}. Re-run with the original values to '
            'resume it, or choose a new --workdir.'
        )


# ----------------------------------------------------------------------------
# Entry point.


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
    """Runs (or resumes) the continual fine-tuning job of `config`.

    Args:
      config: see `experiments/configs/common.py`.
      workdir: output folder (created if missing); a checkpoint there is
        resumed.

    Returns:
      The results dict that was written to `workdir/results.json`.
    """
    _check_config(config)
    _init_distributed(config)
    _check_devices(config)
    t_start = time.time()
    _setup_compilation_cache(config)
    workdir_path = Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)

    data = datasets.load(config.data)
    if config.data.validation:
        data = datasets.hold_out(
            data, config.data.validation, config.data.validation_seed
        )
    tasks, num_classes = make_tasks(config, data)
    apply_fn, variables = build_backbone(config, data.mean, data.std)
    if config.backbone.bn_reestimate:
        variables = reestimate_batch_stats(
            apply_fn.train,
            variables,
            data.x_train[tasks[0].train_idx],
            config.backbone.bn_reestimate,
            config.train.batch_size,
            datasets.test_transform,
            data.augmentation,
        )
    mcfg = method_config(config)
    method = methods.get(config.method)
    trainable = config.train.trainable or method.trainable
    per_device = (
        config.train.batch_size + _replay_rows(config)
    ) // jax.device_count()
    example = jnp.zeros(
        (per_device,)
        + datasets.test_transform(data.augmentation, data.x_train[:1]).shape[
            1:
        ],
        jnp.uint8,
    )
    state = dj.create_state(
        apply_fn,
        variables,
        num_classes=num_classes,
        example_input=example,
        config=mcfg,
        trainable=trainable,
        train_apply_fn=apply_fn.train if mcfg.bn_train else None,
    )
    run = _Run(config, data, tasks, num_classes, state, workdir_path)
    ckpt = _Checkpoints(workdir_path, config)
    if run.is_chief:
        print(
            f'{config.setting} / {config.method} on {data.name}: '
            f'{len(tasks)} tasks, {num_classes} classes, backbone '
            f'{config.backbone.name} at {config.backbone.image_size} px, '
            f'{jax.device_count()} devices on {jax.process_count()} hosts',
            flush=True,
        )
    # Position: the next task to run and the steps of it already taken.
    t0, k0, elapsed, resumed_train_s = 0, 0, 0.0, 0.0
    latest = ckpt.latest()
    try:
        if latest is not None:
            # The config check first: another config's arrays may not fit.
            _check_resumable(config, ckpt.meta(latest), workdir_path)
            meta = ckpt.restore(run, latest)
            t0, k0 = meta['task'], meta['steps_done']
            run.acc = meta['accuracy_matrix']
            run.per_task = meta['per_task']
            elapsed = meta['elapsed_s']
            resumed_train_s = meta['task_timing'].get('train_s', 0.0)
            print(
                f'resumed from {workdir_path / "checkpoints"} at task '
                f'{t0 + 1} step {k0}',
                flush=True,
            )
            run.log({'event': 'resumed', 'task': t0, 'steps_done': k0})
        fingerprint = _fingerprint(config)

        def meta(t, k, task_timing=None):
            return {
                'task': t,
                'steps_done': k,
                'accuracy_matrix': run.acc,
                'per_task': run.per_task,
                'elapsed_s': elapsed + time.time() - t_start,
                'task_timing': task_timing or {},
                'fingerprint': fingerprint,
            }

        stop = config.train.stop_after_tasks
        free = method.training_free is not None
        for t in range(t0, len(run.train_tasks)):
            if stop is not None and t >= stop:
                break
            n = run.n_steps(t)
            # Training seconds of this task before a resume, if any.
            before = resumed_train_s if k0 else 0.0
            if k0 == 0 and not free:
                run.begin_task(t)
            every = config.checkpoint.every_steps
            clock = time.time()

            def on_step(k, t=t, n=n, every=every, before=before, clock=clock):
                if every and k % every == 0 and k < n:
                    timing = {'train_s': before + time.time() - clock}
                    ckpt.save(run, run.global_step(t, k), meta(t, k, timing))

            run.input_wait_s = 0.0
            if free:
                run.fit_training_free(t)
            else:
                run.train_steps(t, k0, n, on_step)
            train_s = before + time.time() - clock
            k0 = 0
            clock = time.time()
            if not free:
                run.end_task(t)
            curvature_s = time.time() - clock
            clock = time.time()
            accuracy = run.evaluate(t)
            run.acc[t][: len(accuracy)] = accuracy
            eval_s = time.time() - clock
            task = run.train_tasks[t]
            summary = {
                'task': t,
                'classes': task.classes
                if config.setting != 'data_il'
                else None,
                'train_examples': int(len(task.train_idx)),
                'chunk_size': int(len(task.train_idx))
                if config.setting == 'data_il'
                else None,
                'accuracy': accuracy,
                **_accuracy_metrics(run.acc, t, method.joint),
                'steps': n,
                'train_s': train_s,
                # Share of this invocation's training time spent waiting for
                # input batches (the host pipeline starving the device).
                'input_wait_frac': run.input_wait_s
                / max(train_s - before, 1e-9),
                'curvature_s': curvature_s,
                'eval_s': eval_s,
            }
            run.per_task.append(summary)
            _report_task(run, t, summary)
            if not free:  # a training-free run is redone in seconds
                ckpt.save(run, run.global_step(t + 1, 0), meta(t + 1, 0))
    finally:
        # Async saves complete before the process ends, error or not.
        ckpt.close()
        run.close()

    done = len(run.per_task)
    results = {
        'complete': done == len(run.train_tasks),
        'tasks_done': done,
        'setting': config.setting,
        'benchmark': config.benchmark,
        'method': config.method,
        'data': data.name,
        'num_tasks': len(tasks),
        'num_classes': num_classes,
        'classes_per_task': None
        if config.setting == 'data_il'
        else len(tasks[0].classes),
        'task_classes': [task.classes for task in tasks]
        if config.setting != 'data_il'
        else None,
        # Joint training: one row, the model trained on the union.
        'joint': method.joint,
        'accuracy_matrix': run.acc,
        # After the last task done (all of them unless stop_after_tasks).
        **_accuracy_metrics(run.acc, max(done - 1, 0), method.joint),
        'per_task': run.per_task,
        'wall_time_s': elapsed + time.time() - t_start,
        # Training-free methods train nothing: no optimizer or loss to list.
        'method_config': None
        if method.training_free
        else dataclasses.asdict(mcfg),
        'config': json.loads(config.to_json_best_effort()),
        'num_devices': jax.device_count(),
        'num_processes': jax.process_count(),
        'platform': jax.devices()[0].platform,
        'device_kind': jax.devices()[0].device_kind,
        'host': socket.gethostname(),
        'jax_version': jax.__version__,
    }
    if jax.process_index() == 0:
        _write_outputs(results, workdir_path)
        if not results['complete']:
            print(
                f'stopped after task {done} of {len(tasks)} '
                f'(config.train.stop_after_tasks={stop}); run the same '
                'command with a larger value, or without it, to continue.'
            )
    return results


def _accuracy_metrics(acc, t: int, joint: bool) -> dict[str, Any]:
    """Average accuracy, forgetting and BWT after task t (joint: one row of
    final accuracies, so forgetting and BWT are undefined)."""
    if joint:
        row = [a for a in acc[0] if a is not None]
        return {
            'average_accuracy': float(np.mean(row)) if row else None,
            'forgetting': None,
            'backward_transfer': None,
        }
    seen = [row[: t + 1] for row in acc[: t + 1]]
    return {
        'average_accuracy': metrics_lib.average_accuracy(seen),
        'forgetting': metrics_lib.forgetting(seen),
        'backward_transfer': metrics_lib.backward_transfer(seen),
    }


def _report_task(run: _Run, t: int, summary: dict[str, Any]) -> None:
    run.log({'event': 'task_end', **summary})
    if run.events is not None:
        g = run.global_step(t + 1, 0)
        run.events.scalars(
            {
                **{
                    f'eval/{k}': summary[k]
                    for k in (
                        'average_accuracy',
                        'forgetting',
                        'backward_transfer',
                    )
                    if summary[k] is not None
                },
                **{
                    f'eval/task_{j + 1}_accuracy': a
                    for j, a in enumerate(summary['accuracy'])
                },
            },
            g,
        )
        run.events.flush()
    if run.is_chief:
        print(
            f'after task {t + 1}: '
            + ' '.join(
                f'T{j + 1} {a:5.1f}%' for j, a in enumerate(summary['accuracy'])
            )
            + f" | average {summary['average_accuracy']:5.2f}%"
            + (
                ''
                if summary['forgetting'] is None
                else f" | forgetting {summary['forgetting']:5.2f}"
                f" | BWT {summary['backward_transfer']:+.2f}"
            )
            + f" | train {summary['train_s']:.0f}s curvature "
            f"{summary['curvature_s']:.0f}s eval {summary['eval_s']:.0f}s",
            flush=True,
        )
        if 0 < t < 20 and not run.method.joint:  # the matrix, if it fits
            seen = [row[: t + 1] for row in run.acc[: t + 1]]
            print(metrics_lib.format_accuracy_matrix(seen), flush=True)


def _write_outputs(results: dict[str, Any], workdir: Path) -> None:
    """results.json, summary.txt and results.png, written atomically."""
    tmp = workdir / 'results.json.tmp'
    tmp.write_text(json.dumps(results, indent=2) + '\n', encoding='utf-8')
    os.replace(tmp, workdir / 'results.json')
    if results.get('joint'):
        table = reporting.joint_summary(results)
    else:
        table = reporting.summary_table(results)
        reporting.save_plots(results, workdir / 'results.png')
    (workdir / 'summary.txt').write_text(table + '\n', encoding='utf-8')
    print()
    print(table)
    print(
        f'-> {workdir / "results.json"}, summary.txt, results.png, log.jsonl, '
        'tensorboard/'
    )
