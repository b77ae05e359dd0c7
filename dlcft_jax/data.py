"""Host-side NumPy data utilities for continual learning on image data.

Everything here runs on the host in plain NumPy, so the jitted training step
only ever sees arrays of fixed shape. All randomness comes from an explicit
`np.random.Generator`, which makes every function reproducible given a seed.

Contents:
  * `load_npz`: reads the `image`/`label` arrays written for CIFAR-10.
  * `class_incremental_split`, `task_indices`: class-incremental task splits.
  * `augment_crop_flip`: random crop with zero padding and horizontal flip.
  * `batches`, `eval_batches`: static-shape minibatch iterators.
  * `epoch_positions`, `RowRandom`: counter-based shuffling and per-row
    random numbers (a draw depends only on its counters, so resumed and
    multi-host runs see the same batches and augmentations).
  * `ReplayBuffer`: reservoir-sampling replay memory (as in the mammoth
    continual-learning framework), with a checkpointable state.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]


def _check_images(images: np.ndarray, name: str = 'images') -> None:
    """Raises ValueError unless `images` is uint8 NHWC with 3 channels."""
    if not isinstance(images, np.ndarray):
        raise TypeError(f'{name} must be a numpy array, got {type(images)}.')
    if images.dtype != np.uint8:
        raise ValueError(
            f'{name} must be uint8 (raw pixels), got dtype {images.dtype}; '
            'normalise on device, after augmentation.'
        )
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f'{name} must have shape (N, H, W, 3) (NHWC, RGB), got '
            f'{images.shape}.'
        )


def _check_labels(labels: np.ndarray, n: int, name: str = 'labels') -> None:
    """Raises ValueError unless `labels` is an integer vector of length `n`."""
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f'{name} must be a 1-D integer array, got shape {labels.shape} and '
            f'dtype {labels.dtype}.'
        )
    if labels.shape[0] != n:
        raise ValueError(
            f'{name} has {labels.shape[0]} entries but there are {n} images.'
        )


# ---------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------


def load_npz(
    path_or_dir: str | os.PathLike[str], split: str
) -> tuple[np.ndarray, np.ndarray]:
    """Loads one split of an image data set stored as `.npz`.

    The file must hold the keys `image` (uint8, shape (N, H, W, 3)) and `label`
    (integers, shape (N,)), as written by `np.savez[_compressed]`.

    Args:
      path_or_dir: Either a directory containing `{split}.npz`, or the path of
        an `.npz` file itself (then `split` only appears in error messages).
      split: Split name, e.g. `'train'` or `'test'`.

    Returns:
      `(images, labels)`: images as uint8 NHWC, labels as int32.

    Raises:
      FileNotFoundError: If the file does not exist.
      ValueError: If the file is truncated or corrupt, lacks `image` or
        `label`, or the arrays have the wrong dtype, shape, or counts.
    """
    path = os.fspath(path_or_dir)
    if os.path.isdir(path):
        path = os.path.join(path, f'{split}.npz')
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'No {split!r} data at {path!r}: expected a directory containing '
            f'{split}.npz or the path of an .npz file.'
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            files = sorted(data.files)
            images = data['image'] if 'image' in files else None
            labels = data['label'] if 'label' in files else None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        # np.load takes a file that is no zip archive for a pickle, which
        # allow_pickle=False refuses: the same error, a file to rewrite.
        raise ValueError(
            f'{path!r} is not a readable .npz file ({type(e).__name__}: {e}); '
            'it may be truncated or corrupt: write it again with np.savez.'
        ) from None
    missing = [k for k in ('image', 'label') if k not in files]
    if missing:
        raise ValueError(
            f"{path!r} lacks key(s) {missing}; found {files}. The file must "
            "hold 'image' (uint8 NHWC) and 'label' (int)."
        )
    _check_images(images, name=f"'image' in {path!r}")
    _check_labels(labels, images.shape[0], name=f"'label' in {path!r}")
    return images, labels.astype(np.int32)


# ---------------------------------------------------------------------------
# Task splits.
# ---------------------------------------------------------------------------


def class_incremental_split(
    labels: np.ndarray,
    classes_per_task: int,
    num_tasks: int,
    class_order: Sequence[int] | None = None,
    *,
    num_classes: int | None = None,
) -> list[np.ndarray]:
    """Groups class ids into tasks for class-incremental learning.

    Task `t` receives classes `order[t * k:(t + 1) * k]` with
    `k = classes_per_task`; the default order is the natural one (0, 1, 2, ...),
    which is what the DLCFT code uses for CIFAR.

    Args:
      labels: Integer labels of the data set, used to infer and check the number
        of classes.
      classes_per_task: Number of classes in each task.
      num_tasks: Number of tasks.
      class_order: Optional permutation (or subset) of class ids that fixes
        which classes go to which task. Ids must be distinct and in
        `[0, num_classes)`.
      num_classes: Number of classes. Defaults to `max(labels) + 1`.

    Returns:
      A list of `num_tasks` int32 arrays, each holding `classes_per_task`
      distinct class ids; the arrays are pairwise disjoint.

    Raises:
      ValueError: If labels are out of range, the tasks need more classes than
        exist, or `class_order` is invalid.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f'labels must be a 1-D integer array, got shape {labels.shape} and '
            f'dtype {labels.dtype}.'
        )
    if classes_per_task < 1 or num_tasks < 1:
        raise ValueError(
            f'classes_per_task ({classes_per_task}) and num_tasks '
            f'({num_tasks}) must both be at least 1.'
        )
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f'labels must lie in [0, {num_classes}), found range '
            f'[{labels.min()}, {labels.max()}]; fix the labels or raise '
            'num_classes.'
        )
    needed = classes_per_task * num_tasks
    if needed > num_classes:
        raise ValueError(
            f'classes_per_task * num_tasks = {classes_per_task} * '
            f'{num_tasks} = {needed} exceeds the {num_classes} classes '
            'available; lower classes_per_task or num_tasks.'
        )
    if class_order is None:
        order = np.arange(num_classes, dtype=np.int32)
    else:
        order = np.asarray(class_order, dtype=np.int64)
        if order.ndim != 1:
            raise ValueError(
                f'class_order must be 1-D, got shape {order.shape}.'
            )
        if order.size and (order.min() < 0 or order.max() >= num_classes):
            raise ValueError(
                f'class_order has ids outside [0, {num_classes}): '
                f'{sorted(set(order[(order < 0) | (order >= num_classes)]))}.'
            )
        if np.unique(order).size != order.size:
            raise ValueError('class_order must not repeat a class id.')
        if order.size < needed:
            raise ValueError(
                f'class_order lists {order.size} classes but {num_tasks} '
                f'tasks of {classes_per_task} classes need {needed}; extend '
                'class_order.'
            )
        order = order.astype(np.int32)
    return [
        order[t * classes_per_task : (t + 1) * classes_per_task].copy()
        for t in range(num_tasks)
    ]


def task_indices(
    labels: np.ndarray, task_classes: Sequence[int] | np.ndarray
) -> np.ndarray:
    """Returns the indices of the examples whose label is in `task_classes`.

    Args:
      labels: Integer labels, shape (N,).
      task_classes: Class ids of one task (e.g. an entry returned by
        `class_incremental_split`).

    Returns:
      Ascending int64 index array into `labels`.

    Raises:
      ValueError: If `task_classes` is empty or contains negative ids.
    """
    labels = np.asarray(labels)
    task_classes = np.asarray(task_classes)
    if task_classes.size == 0:
        raise ValueError(
            'task_classes is empty; a task needs at least one class.'
        )
    if task_classes.min() < 0:
        raise ValueError(f'task_classes has negative ids: {task_classes}.')
    return np.flatnonzero(np.isin(labels, task_classes)).astype(np.int64)


# ---------------------------------------------------------------------------
# Augmentation.
# ---------------------------------------------------------------------------


def augment_crop_flip(
    images: np.ndarray, rng: np.random.Generator, pad: int = 4
) -> np.ndarray:
    """Random crop after zero padding, then random horizontal flip, per image.

    This is the standard CIFAR augmentation: each image is zero-padded by `pad`
    pixels on every side, a window of the original size is cut at a uniformly
    random offset in `[0, 2 * pad]` along each axis, and the window is mirrored
    left-right with probability 1/2. Both steps are done with one gather, so the
    cost is a single pass over the batch.

    Args:
      images: uint8 array of shape (N, H, W, C).
      rng: Generator for the offsets and flips (drawn in that order: row
        offsets, column offsets, flips).
      pad: Zero padding in pixels; 0 disables cropping (flip only).

    Returns:
      A new uint8 array of the same shape as `images`.

    Raises:
      ValueError: If `images` is not uint8 NHWC with 3 channels or `pad < 0`.
    """
    _check_images(images)
    if pad < 0:
        raise ValueError(f'pad must be >= 0, got {pad}.')
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    off_y = rng.integers(0, 2 * pad + 1, size=n)
    off_x = rng.integers(0, 2 * pad + 1, size=n)
    flip = rng.random(n) < 0.5
    rows = off_y[:, None] + np.arange(h)[None, :]  # (N, H)
    # A flip just reads the window's columns right-to-left.
    col_pos = np.where(
        flip[:, None], np.arange(w)[::-1][None, :], np.arange(w)[None, :]
    )
    cols = off_x[:, None] + col_pos  # (N, W)
    return padded[
        np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]
    ]


# ---------------------------------------------------------------------------
# Minibatch iterators.
# ---------------------------------------------------------------------------


def batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    *,
    drop_remainder: bool = True,
    epochs: int | None = None,
) -> Iterator[Batch]:
    """Yields shuffled training minibatches of a fixed shape.

    The data are reshuffled at the start of every epoch. Every yielded batch has
    exactly `batch_size` rows so that a jitted step compiles once:

    * `drop_remainder=True` drops the last `N % batch_size` examples of each
      epoch's permutation (they are usually seen in other epochs).
    * `drop_remainder=False` completes the last batch with the first examples of
      the same epoch's permutation (wrapping around as often as needed), so
      every example appears at least once per epoch and a few appear twice.

    Args:
      images: Array of shape (N, ...), typically uint8 NHWC.
      labels: Array of shape (N,).
      batch_size: Rows per batch.
      rng: Generator for the per-epoch permutations.
      drop_remainder: See above.
      epochs: Number of passes over the data; `None` iterates forever.

    Yields:
      Dicts `{'image': images[idx], 'label': labels[idx]}`.

    Raises:
      ValueError: If `batch_size < 1`, `epochs < 0`, lengths differ, or no full
        batch can be formed with `drop_remainder=True`.
    """
    n = images.shape[0]
    if labels.shape[0] != n:
        raise ValueError(f'{n} images but {labels.shape[0]} labels.')
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
    if epochs is not None and epochs < 0:
        raise ValueError(f'epochs must be None or >= 0, got {epochs}.')
    if n == 0 or (drop_remainder and n < batch_size):
        # Otherwise an infinite loop would yield nothing.
        raise ValueError(
            f'Cannot form a batch of {batch_size} from {n} examples; lower '
            'batch_size or pass drop_remainder=False.'
        )
    epoch = 0
    while epochs is None or epoch < epochs:
        perm = rng.permutation(n)
        if drop_remainder:
            num_batches = n // batch_size
        else:
            num_batches = -(-n // batch_size)
            # np.resize repeats `perm` cyclically to the requested length.
            perm = np.resize(perm, num_batches * batch_size)
        for b in range(num_batches):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            yield {'image': images[idx], 'label': labels[idx]}
        epoch += 1


def eval_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int
) -> Iterator[Batch]:
    """Yields evaluation batches in order, padding the last one.

    Every example is visited exactly once. The last batch is padded with zero
    images and label 0 up to `batch_size` rows, so the shape stays static; the
    `mask` entry tells real rows (1.0) from padding (0.0). Weight per-example
    results by `mask` (e.g. `sum(correct * mask)`) to count only real rows.

    Args:
      images: Array of shape (N, ...).
      labels: Array of shape (N,).
      batch_size: Rows per batch.

    Yields:
      Dicts with `image` (batch_size, ...), `label` (batch_size,) and `mask`
      (batch_size,) float32.

    Raises:
      ValueError: If `batch_size < 1` or the lengths differ.
    """
    n = images.shape[0]
    if labels.shape[0] != n:
        raise ValueError(f'{n} images but {labels.shape[0]} labels.')
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
    for start in range(0, n, batch_size):
        x = images[start : start + batch_size]
        y = labels[start : start + batch_size]
        real = x.shape[0]
        mask = np.ones((batch_size,), np.float32)
        if real < batch_size:
            fill = batch_size - real
            x = np.concatenate([x, np.zeros((fill,) + x.shape[1:], x.dtype)])
            y = np.concatenate([y, np.zeros((fill,), y.dtype)])
            mask[real:] = 0.0
        yield {'image': x, 'label': y, 'mask': mask}


# ---------------------------------------------------------------------------
# Counter-based randomness: every draw a pure function of its counters.
# ---------------------------------------------------------------------------


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective hash of uint64 values."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class RowRandom:
    """Per-row random numbers that depend only on (counters, row index).

    Duck-types the two `np.random.Generator` methods the augmentations use
    (`integers`, `random`). Call d of the transform gives row i the value
    hash(counters, i, d), so a row's augmentation is the same whichever
    host or device processes it, and a batch needs no generator per row.
    """

    def __init__(self, counters: tuple[int, ...], rows: np.ndarray):
        key = np.zeros((), np.uint64)
        with np.errstate(over='ignore'):
            for c in counters:
                key = _mix(key + np.uint64(c) + np.uint64(0x9E3779B97F4A7C15))
            self._rows = _mix(key + np.asarray(rows, np.uint64))
        self._draw = 0

    def random(self, size: int) -> np.ndarray:
        """Uniform [0, 1) floats, one per row."""
        assert size == len(self._rows), (size, len(self._rows))
        self._draw += 1
        with np.errstate(over='ignore'):
            bits = _mix(
                self._rows
                + np.uint64(self._draw) * np.uint64(0xD1B54A32D192ED03)
            )
        return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def integers(self, low, high, size: int) -> np.ndarray:
        """Integers in [low, high) (bounds may be per-row arrays)."""
        u = self.random(size)
        low = np.asarray(low, np.int64)
        span = np.asarray(high, np.int64) - low
        return low + np.minimum((u * span).astype(np.int64), span - 1)


def epoch_positions(
    n: int, start: int, count: int, key: Sequence[int]
) -> np.ndarray:
    """Positions start..start+count of an endless shuffled order of n items.

    Epoch e of the order is `default_rng([*key, e]).permutation(n)`, so any
    step's batch is known without replaying the steps before it (exact
    resume, and every host draws the same global batch).

    Args:
      n: number of items.
      start: first position (step k of batch size b: k·b).
      count: how many positions.
      key: integers that name the order, e.g. (seed, stream, task).

    Returns:
      (count,) int64 item indices.
    """
    pos = np.arange(start, start + count)
    out = np.empty((count,), np.int64)
    for e in np.unique(pos // n):
        sel = pos // n == e
        perm = np.random.default_rng([*key, int(e)]).permutation(n)
        out[sel] = perm[pos[sel] % n]
    return out


# ---------------------------------------------------------------------------
# Replay buffer.
# ---------------------------------------------------------------------------


class ReplayBuffer:
    """Fixed-capacity replay memory filled by reservoir sampling.

    Semantics follow the reservoir buffer of the mammoth continual-learning
    framework (Buzzega et al., 2020), whose ER/DER results the DLCFT class-IL
    table appears to compare against (the DLCFT buffer itself is unpublished):

    * Examples are offered one at a time, in order. `num_seen` counts every
      example offered so far, across all tasks.
    * While the buffer is not full, the example goes to the next free slot.
    * Once full, the example offered when `num_seen == s` draws
      `j ~ Uniform{0, ..., s}`; if `j < capacity` it overwrites slot `j`,
      otherwise it is discarded. Hence after `N` offers each of them is held
      with probability `min(1, capacity / N)` (Vitter's Algorithm R).

    The buffer stores raw (non-augmented) uint8 images, integer labels, task ids
    and, optionally, logits (for DER-style distillation). Augmentation is
    applied after `sample`, as in mammoth.

    Unlike mammoth, `sample` always returns exactly `batch_size` rows so that
    the training step keeps a static shape: without replacement when the buffer
    holds at least `batch_size` examples, with replacement otherwise.

    Attributes:
      capacity: Maximum number of stored examples.
      num_seen: Number of examples offered to `add` so far.
    """

    def __init__(self, capacity: int) -> None:
        """Creates an empty buffer.

        Args:
          capacity: Maximum number of stored examples (>= 1).

        Raises:
          ValueError: If `capacity < 1`.
        """
        if capacity < 1:
            raise ValueError(f'capacity must be >= 1, got {capacity}.')
        self.capacity: int = int(capacity)
        self.num_seen: int = 0
        # Storage is allocated on the first `add`, once the shape is known.
        self._images: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._task_ids: np.ndarray | None = None
        self._logits: np.ndarray | None = None

    def __len__(self) -> int:
        """Number of examples currently stored, `min(capacity, num_seen)`."""
        return min(self.capacity, self.num_seen)

    def is_empty(self) -> bool:
        """Returns True if nothing has been stored yet."""
        return len(self) == 0

    @property
    def has_logits(self) -> bool:
        """Whether the buffer stores logits."""
        return self._logits is not None

    def _allocate(self, images: np.ndarray, logits: np.ndarray | None) -> None:
        self._images = np.zeros((self.capacity,) + images.shape[1:], np.uint8)
        self._labels = np.zeros((self.capacity,), np.int32)
        self._task_ids = np.zeros((self.capacity,), np.int32)
        if logits is not None:
            self._logits = np.zeros(
                (self.capacity,) + logits.shape[1:], np.float32
            )

    def add(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        task_ids: np.ndarray | int,
        logits: np.ndarray | None = None,
        *,
        rng: np.random.Generator,
    ) -> None:
        """Offers a batch of examples to the buffer, in row order.

        Args:
          images: uint8 array (B, H, W, 3) of non-augmented images.
          labels: Integer labels, shape (B,).
          task_ids: Task id per example, shape (B,), or one int for all.
          logits: Optional float array (B, K). Either every call passes
            logits or none does; K must stay the same (pad a growing head to
            its final width).
          rng: Generator for the reservoir draws (one integer per example
            offered after the buffer is full).

        Raises:
          ValueError: On shape/dtype mismatches or inconsistent use of logits.
        """
        _check_images(images)
        b = images.shape[0]
        labels = np.asarray(labels)
        _check_labels(labels, b)
        task_ids = np.broadcast_to(np.asarray(task_ids, np.int32), (b,))
        if logits is not None:
            logits = np.asarray(logits, np.float32)
            if logits.shape[0] != b:
                raise ValueError(
                    f'{logits.shape[0]} logits rows but {b} images.'
                )
        if self._images is None:
            self._allocate(images, logits)
        else:
            if images.shape[1:] != self._images.shape[1:]:
                raise ValueError(
                    f'image shape {images.shape[1:]} differs from the stored '
                    f'{self._images.shape[1:]}.'
                )
            if (logits is None) != (self._logits is None):
                had = 'with' if self._logits is not None else 'without'
                raise ValueError(
                    'Pass logits on every add or on none: the buffer was '
                    f'created {had} logits.'
                )
            if (
                logits is not None
                and logits.shape[1:] != self._logits.shape[1:]
            ):
                raise ValueError(
                    f'logits shape {logits.shape[1:]} differs from the stored '
                    f'{self._logits.shape[1:]}; pad logits to a fixed width.'
                )
        if b == 0:
            return

        # Offer k (0-based within the batch) arrives after
        # `self.num_seen + k` earlier offers.
        seen_before = self.num_seen + np.arange(b)
        slots = np.full((b,), -1, np.int64)
        filling = seen_before < self.capacity
        slots[filling] = seen_before[filling]
        full = ~filling
        if full.any():
            # Algorithm R: j ~ Uniform{0..seen_before}; keep if j < capacity.
            # The upper bound differs per example; `integers` accepts an array
            # of bounds, so no Python loop is needed.
            j = rng.integers(0, seen_before[full] + 1)
            slots[full] = np.where(j < self.capacity, j, -1)
        self.num_seen += b

        kept = np.flatnonzero(slots >= 0)
        if kept.size == 0:
            return
        # Sequential semantics: if two offers in this batch hit the same slot,
        # the later one wins. Keep only each slot's last writer explicitly,
        # since NumPy does not promise an order for repeated fancy-index
        # assignment.
        rev = kept[::-1]
        _, first_in_rev = np.unique(slots[rev], return_index=True)
        src = rev[first_in_rev]
        dst = slots[src]
        self._images[dst] = images[src]
        self._labels[dst] = labels[src]
        self._task_ids[dst] = task_ids[src]
        if logits is not None:
            self._logits[dst] = logits[src]

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        """Draws a replay minibatch of exactly `batch_size` rows.

        Args:
          batch_size: Number of rows to return.
          rng: Generator for the draw.

        Returns:
          Dict with `image` (uint8, non-augmented), `label` (int32), `task_id`
          (int32), `index` (int64 slot ids) and, if stored, `logits` (float32).
          Rows are distinct when `len(self) >= batch_size`; otherwise drawn with
          replacement.

        Raises:
          ValueError: If the buffer is empty or `batch_size < 1`.
        """
        if batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
        size = len(self)
        if size == 0:
            raise ValueError(
                'Cannot sample from an empty replay buffer; check '
                'is_empty() before sampling.'
            )
        if size >= batch_size:
            idx = rng.choice(size, size=batch_size, replace=False)
        else:
            idx = rng.integers(0, size, size=batch_size)
        return self._gather(idx)

    def _gather(self, idx: np.ndarray) -> Batch:
        out = {
            'image': self._images[idx],
            'label': self._labels[idx],
            'task_id': self._task_ids[idx],
            'index': idx.astype(np.int64),
        }
        if self._logits is not None:
            out['logits'] = self._logits[idx]
        return out

    def contents(self) -> Batch:
        """Returns all stored examples in slot order (copies).

        Returns:
          Same keys as `sample`, with `len(self)` rows.
        """
        if self._images is None:
            raise ValueError('The replay buffer is empty.')
        return self._gather(np.arange(len(self)))

    def state_dict(self) -> dict[str, Any]:
        """Returns the buffer state as plain ints and NumPy arrays.

        Only the occupied slots are saved. The dict round-trips through
        `from_state_dict` and can be written into a checkpoint.

        Returns:
          Dict with `capacity`, `num_seen` (ints) and, once something was added,
          `images`, `labels`, `task_ids` and optionally `logits`.
        """
        state: dict[str, Any] = {
            'capacity': self.capacity,
            'num_seen': self.num_seen,
        }
        if self._images is not None:
            size = len(self)
            state['images'] = self._images[:size].copy()
            state['labels'] = self._labels[:size].copy()
            state['task_ids'] = self._task_ids[:size].copy()
            if self._logits is not None:
                state['logits'] = self._logits[:size].copy()
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> ReplayBuffer:
        """Rebuilds a buffer from `state_dict()` output.

        Args:
          state: Mapping produced by `state_dict` (values may be NumPy
            scalars or 0-d arrays, as restored by checkpoint libraries).

        Returns:
          A buffer equal to the one that was saved.

        Raises:
          ValueError: If the arrays disagree with `capacity`/`num_seen`.
        """
        buf = cls(int(state['capacity']))
        buf.num_seen = int(state['num_seen'])
        if 'images' not in state:
            if buf.num_seen:
                raise ValueError('state has num_seen > 0 but no stored arrays.')
            return buf
        images = np.asarray(state['images'], np.uint8)
        size = len(buf)
        if images.shape[0] != size:
            raise ValueError(
                f'state holds {images.shape[0]} images but capacity '
                f'{buf.capacity} and num_seen {buf.num_seen} imply {size}.'
            )
        logits = state.get('logits')
        buf._allocate(images, None if logits is None else np.asarray(logits))
        buf._images[:size] = images
        buf._labels[:size] = np.asarray(state['labels'])
        buf._task_ids[:size] = np.asarray(state['task_ids'])
        if logits is not None:
            buf._logits[:size] = np.asarray(logits)
        return buf
