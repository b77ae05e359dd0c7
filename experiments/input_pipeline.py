"""Where a batch is made: tasks, training batches, curvature and evaluation
batches, host sharding and read-ahead.

The sources (the .npz, tfds and MIT-67 readers) and the image transforms
live in `experiments/datasets.py`; this module turns a loaded data set into
the batches of a continual run:

* `make_tasks` splits the data into tasks (`Task`: example indices and the
  head row of each label), `class_masks` gives the outputs each task trains
  and tests.
* `train_batch` builds step k of task t: the task's examples in an endless
  shuffled order, then one replay draw from the buffer (two for DER++), each
  row augmented with its own random stream.
* `curvature_batches` and `eval_batches` feed the curvature estimate and the
  evaluation; `prefetch` reads ahead in a thread.

Randomness. Every draw is a pure function of (seed, stream, task, step): the
host generators are `numpy.random.default_rng([seed, STREAM, ...])`, and row
i of a batch augments with its own stream keyed by its global row index
(`dlcft_jax.data.RowRandom`). A resumed run therefore draws what an
uninterrupted one would, and a batch does not depend on how many hosts
share it.

Hosts. Every host computes the same global batch indices but loads and
augments only its own rows (`host_rows`); `to_devices` splits them over the
local devices for `jax.pmap`.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from dlcft_jax import data as data_lib
from dlcft_jax import parallel
from dlcft_jax.data import ReplayBuffer, RowRandom
from experiments import datasets
from experiments.cli import ConfigError

# Streams of the counter-based host RNG: default_rng([seed, STREAM, t, k]).
ORDER, AUGMENT, REPLAY, FILL, CURVATURE, RESERVOIR = range(6)

# What each row of a training batch is: a current-task example, a row of
# replay draw 1 or 2, or (while the buffer is empty) a filler example.
_CURRENT, _DRAW1, _DRAW2, _FILLER = range(4)


def rng(seed: int, stream: int, *counters: int) -> np.random.Generator:
    """The host generator of (seed, stream, counters)."""
    return np.random.default_rng([seed, stream, *counters])


def epoch_indices(
    seed: int, t: int, n: int, start: int, count: int, stream: int = ORDER
) -> np.ndarray:
    """Positions start..start+count of task t's endless shuffled order of
    n examples (`dlcft_jax.data.epoch_positions` keyed by (seed, stream, t))."""
    return data_lib.epoch_positions(n, start, count, (seed, stream, t))


def host_rows(total: int) -> slice:
    """This host's rows of a global batch of `total` rows."""
    per_host = total // jax.process_count()
    i = jax.process_index()
    return slice(i * per_host, (i + 1) * per_host)


def to_devices(batch: dict[str, np.ndarray]) -> Any:
    """A host batch split over the local devices (leading axis), for pmap."""
    return parallel.shard_batch(
        {k: np.asarray(v) for k, v in batch.items()},
        jax.local_device_count(),
    )


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

    def task_ids(self, t: int, positions: np.ndarray) -> np.ndarray:
        """The task id of the training examples at `positions`."""
        if self.train_task is None:
            return np.full(len(positions), t, np.int32)
        return self.train_task[positions]


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


def classes_per_task(config: ml_collections.ConfigDict) -> int:
    if config.data.class_groups is not None:
        return len(config.data.class_groups[0])
    return config.data.classes_per_task


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
    _check_classes_present(data, groups)
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


def _check_classes_present(
    data: datasets.Dataset, groups: list[list[int]]
) -> None:
    """Every class of every task has training and test images; labels no
    task uses are named in a warning (a chosen subset is fine, a shifted
    labelling is not)."""
    train = np.bincount(data.y_train, minlength=data.num_classes)
    test = np.bincount(data.y_test, minlength=data.num_classes)
    for t, classes in enumerate(groups):
        for c in classes:
            for split, counts in (('training', train), ('test', test)):
                if counts[c]:
                    continue
                lo = int(min(data.y_train.min(), data.y_test.min()))
                hint = (
                    f' The labels run from {lo}: they must start at 0.'
                    if lo > 0
                    else ' Give every class of every task images in both '
                    'splits, or choose other classes (config.data.'
                    'class_groups).'
                )
                raise ValueError(
                    f'{data.name}: class {c} of task {t + 1} has no {split} '
                    f'images.{hint}'
                )
    used = {c for g in groups for c in g}
    unused = [
        c
        for c in range(data.num_classes)
        if c not in used and (train[c] or test[c])
    ]
    if unused and jax.process_index() == 0:
        print(
            f'warning: {data.name}: labels {unused} belong to no task and '
            'are not used.',
            flush=True,
        )


def class_masks(
    config: ml_collections.ConfigDict, t: int, num_classes: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(training mask of task t, test masks of tasks 0..t) for the setting.

    class_il: the classes seen so far, for training and for every test (no
    task id at test). task_il: the rows of the task's own head, for training
    and for that task's test (the task id picks the head). data_il: all.
    """
    cpt = classes_per_task(config)
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


# ----------------------------------------------------------------------------
# Training batches.


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """What the batches of a run depend on, besides the task and the step.

    Attributes:
      seed: the run's seed (every host generator starts from it).
      setting: 'class_il', 'task_il' or 'data_il'.
      batch_size: current-task rows per step (b).
      replay_batch: rows per replay draw (r; 0 without replay).
      replay_draws: draws per step (0, 1, or 2 for DER++).
      num_classes: width of the head.
      classes_per_task: head rows per task (task-IL masks).
      augment: whether training rows are augmented.
      augmentation: the data set's augmentation (`datasets.AUGMENTATIONS`).
      der: (α, β) of DER / DER++ (β 0 for DER), or None.
      distill: whether the method distils from the previous model (LwF).
      replay_weight: ρ, the weight of replayed rows in the label loss
        (`Replay.label_weight`; 1: they count as current rows do).
    """

    seed: int
    setting: str
    batch_size: int
    replay_batch: int
    replay_draws: int
    num_classes: int
    classes_per_task: int
    augment: bool
    augmentation: str
    der: tuple[float, float] | None = None
    distill: bool = False
    replay_weight: float = 1.0

    @property
    def rows(self) -> int:
        """Global rows of a training batch."""
        return self.batch_size + self.replay_batch * self.replay_draws


def augment(spec: BatchSpec, images: np.ndarray, *counters: int) -> np.ndarray:
    """The training transform; row i draws from (seed, counters, i).

    `counters` end with the global index of the first row, so a row's
    augmentation does not depend on how many hosts share the batch.
    """
    if not spec.augment:
        return datasets.test_transform(spec.augmentation, images)
    *head, first = counters
    row_rng = RowRandom(
        (spec.seed, AUGMENT, *head), np.arange(first, first + len(images))
    )
    return datasets.train_transform(spec.augmentation, images, row_rng)


def task_masks(spec: BatchSpec, task_ids: np.ndarray) -> np.ndarray:
    """(N, C) task-IL masks: the head rows of each row's own task."""
    cols = np.arange(spec.num_classes)[None, :] // spec.classes_per_task
    return (cols == np.asarray(task_ids)[:, None]).astype(np.float32)


def step_positions(spec: BatchSpec, task: Task, t: int, k: int) -> np.ndarray:
    """Positions in `task` of the current-task rows of step k."""
    b = spec.batch_size
    return epoch_indices(spec.seed, t, len(task.train_idx), k * b, b)


def train_batch(
    spec: BatchSpec,
    data: datasets.Dataset,
    task: Task,
    t: int,
    k: int,
    buffer: ReplayBuffer | None,
) -> dict[str, np.ndarray]:
    """This host's rows of step k's global batch on task t.

    Rows [0, b) come from the task, then one replay draw of r rows (two for
    DER++). While the buffer is empty the replayed rows are more task
    examples with no weight in the replay terms, so shapes stay static.
    """
    b, r = spec.batch_size, spec.replay_batch
    n = len(task.train_idx)
    pos = step_positions(spec, task, t, k)
    # Every global row: raw images, labels, task ids, which part it is in
    # and stored logits.
    images = [data.x_train[task.train_idx[pos]]]
    labels = [task.train_rows[pos]]
    task_ids = [task.task_ids(t, pos)]
    kind = [np.full(b, _CURRENT, np.int32)]
    no_logits = np.zeros((r, spec.num_classes), np.float32)
    stored = [np.zeros((b, spec.num_classes), np.float32)]
    for draw in range(spec.replay_draws):
        # Draw 0 keeps the counters of the single-draw runner.
        counters = (t, k) if draw == 0 else (t, k, draw)
        if buffer is not None and len(buffer):
            rep = buffer.sample(r, rng(spec.seed, REPLAY, *counters))
            images.append(rep['image'])
            labels.append(rep['label'])
            task_ids.append(rep['task_id'])
            kind.append(np.full(r, _DRAW1 + draw, np.int32))
            stored.append(rep.get('logits', no_logits))
        else:  # no memory yet: more task examples keep the shape static
            fill = rng(spec.seed, FILL, *counters).integers(0, n, size=r)
            images.append(data.x_train[task.train_idx[fill]])
            labels.append(task.train_rows[fill])
            task_ids.append(task.task_ids(t, fill))
            kind.append(np.full(r, _FILLER, np.int32))
            stored.append(no_logits)
    rows = host_rows(spec.rows)
    batch = {
        'image': augment(spec, np.concatenate(images)[rows], t, k, rows.start),
        'label': np.concatenate(labels)[rows].astype(np.int32),
    }
    batch.update(
        _loss_terms(
            spec,
            t,
            np.concatenate(kind),
            np.concatenate(task_ids),
            np.concatenate(stored),
            rows,
        )
    )
    return batch


def _loss_terms(
    spec: BatchSpec,
    t: int,
    kind: np.ndarray,
    task_ids: np.ndarray,
    stored: np.ndarray,
    rows: slice,
) -> dict[str, np.ndarray]:
    """Per-row masks and weights of the method's loss terms."""
    out, total = {}, len(kind)
    if spec.setting == 'task_il':
        out['class_mask'] = task_masks(spec, task_ids)[rows]
    if spec.der is not None:
        alpha, beta = spec.der
        b, r = spec.batch_size, spec.replay_batch
        label = np.where(kind == _CURRENT, total / b, 0.0)
        label = np.where(kind == _DRAW2, beta * total / r, label)
        out['label_scale'] = label.astype(np.float32)[rows]
        out['logit_scale'] = (
            np.where(kind == _DRAW1, alpha * total / r, 0.0).astype(np.float32)
        )[rows]
        out['logit_target'] = stored[rows]
    elif spec.replay_weight != 1.0:
        replayed = (kind == _DRAW1) | (kind == _DRAW2)
        scale = np.where(replayed, spec.replay_weight, 1.0)
        out['label_scale'] = scale.astype(np.float32)[rows]
    if spec.distill:
        c, cpt = spec.num_classes, spec.classes_per_task
        if spec.setting == 'data_il':
            old = np.ones((c,), np.float32)
        else:  # the outputs of the classes of tasks before t
            old = (np.arange(c) < t * cpt).astype(np.float32)
        out['distill_mask'] = np.broadcast_to(old, (total, c))[rows]
    return out


def curvature_batches(
    spec: BatchSpec,
    data: datasets.Dataset,
    task: Task,
    t: int,
    *,
    num_batches: int,
    batch_size: int,
) -> Iterator[Any]:
    """Augmented batches of task t for its curvature, on the devices."""
    pos = epoch_indices(
        spec.seed,
        t,
        len(task.train_idx),
        0,
        batch_size * num_batches,
        CURVATURE,
    )
    rows = host_rows(batch_size)
    for i in range(num_batches):
        idx = pos[i * batch_size : (i + 1) * batch_size][rows]
        images = augment(
            spec,
            data.x_train[task.train_idx[idx]],
            CURVATURE,
            t,
            i,
            rows.start,
        )
        batch = {'image': images, 'label': task.train_rows[idx]}
        if spec.setting == 'task_il':
            batch['class_mask'] = task_masks(spec, np.full(batch_size, t))[rows]
        yield to_devices(batch)


# ----------------------------------------------------------------------------
# Evaluation batches and read-ahead.


def eval_batches(
    images: np.ndarray, batch_size: int, augmentation: str
) -> Iterator[tuple[Any, int]]:
    """(device batch of test-transformed images, number of real rows) in
    padded static-shape batches (`dlcft_jax.data.eval_batches`) of a size
    that divides over the local devices."""
    n_local = jax.local_device_count()
    bs = -(-batch_size // n_local) * n_local
    no_labels = np.zeros((len(images),), np.int32)
    for batch in data_lib.eval_batches(images, no_labels, bs):
        x = datasets.test_transform(augmentation, batch['image'])
        yield to_devices({'x': x})['x'], int(batch['mask'].sum())


def apply_batched(
    fn: Callable[[Any, Any], Any],
    state: Any,
    images: np.ndarray,
    batch_size: int,
    augmentation: str,
) -> np.ndarray:
    """`fn(state, x)` (pmapped) of all `images`, rows in order, as NumPy."""
    out = []
    for x, real in eval_batches(images, batch_size, augmentation):
        y = np.asarray(fn(state, x))
        out.append(y.reshape(-1, *y.shape[2:])[:real].reshape(real, -1))
    return np.concatenate(out)


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(iterator: Iterable[Any], size: int = 3) -> Iterator[Any]:
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
