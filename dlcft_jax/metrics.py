"""Continual-learning metrics computed from an accuracy matrix.

All functions take an accuracy matrix `R` of shape (T, T), where `R[i][j]` is
the accuracy (in %) on the test data of task `j` after training on task `i`.
Entries above the diagonal (`j > i`, tasks not yet trained) may be `None` or
NaN when they were not evaluated; every entry on or below the diagonal must be
present, because each metric below reads only those.

For class-incremental learning the DLCFT paper reports the accuracy over the
test data of all classes seen so far. When every task has the same number of
test examples (as in the CIFAR splits, which hold the same number of images per
class and of classes per task), that equals the plain mean of
`R[t][:t + 1]`, which `average_accuracy` returns. For unequal test sets, pass
`task_sizes` to weight each task by its number of test examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Matrix = Sequence[Sequence[float | None]] | np.ndarray


def _as_matrix(r: Matrix) -> np.ndarray:
    """Converts `r` to a square float64 array with NaN for missing entries.

    Args:
      r: Accuracy matrix as nested sequences (may hold `None`) or an array.

    Returns:
      A float64 array of shape (T, T).

    Raises:
      ValueError: If `r` is empty, not square, or misses an entry on or below
        the diagonal.
    """
    if isinstance(r, np.ndarray) and r.dtype != object:
        m = r.astype(np.float64)
    else:
        rows = [[np.nan if v is None else float(v) for v in row] for row in r]
        if any(len(row) != len(rows) for row in rows):
            raise ValueError(
                'The accuracy matrix must be square (T rows of T entries); '
                f'got row lengths {[len(row) for row in rows]}.'
            )
        m = np.array(rows, dtype=np.float64).reshape(len(rows), len(rows))
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(
            f'The accuracy matrix must be non-empty and square, got shape '
            f'{m.shape}.'
        )
    lower = np.tril(np.ones(m.shape, dtype=bool))
    missing = np.argwhere(lower & ~np.isfinite(m))
    if missing.size:
        raise ValueError(
            'Entries R[i][j] with j <= i must all be evaluated; missing '
            f'(i, j): {[tuple(int(x) for x in ij) for ij in missing]}.'
        )
    return m


def average_accuracy(
    r: Matrix, t: int | None = None, task_sizes: Sequence[int] | None = None
) -> float:
    """Average accuracy over the tasks seen after training task `t`.

    Args:
      r: Accuracy matrix, shape (T, T).
      t: Index of the last trained task; defaults to `T - 1` (after the final
        task). Negative values count from the end.
      task_sizes: Optional number of test examples of each task. When given,
        the mean is weighted by it, which makes the result the accuracy over
        the pooled test data of tasks `0..t` (the class-IL metric for unequal
        test sets).

    Returns:
      `mean_{j <= t} R[t][j]` (weighted by `task_sizes` if given), in the same
      unit as `r`.

    Raises:
      IndexError: If `t` is out of range.
      ValueError: If `task_sizes` has the wrong length or non-positive total.
    """
    m = _as_matrix(r)
    num_tasks = m.shape[0]
    if t is None:
        t = num_tasks - 1
    if not -num_tasks <= t < num_tasks:
        raise IndexError(f't={t} is out of range for {num_tasks} tasks.')
    t %= num_tasks
    row = m[t, : t + 1]
    if task_sizes is None:
        return float(row.mean())
    sizes = np.asarray(task_sizes, dtype=np.float64)
    if sizes.shape != (num_tasks,):
        raise ValueError(
            f'task_sizes must have one entry per task ({num_tasks}), got '
            f'shape {sizes.shape}.'
        )
    weights = sizes[: t + 1]
    if weights.sum() <= 0 or (weights < 0).any():
        raise ValueError(
            f'task_sizes must be non-negative with a positive sum, got '
            f'{weights.tolist()}.'
        )
    return float((row * weights).sum() / weights.sum())


def forgetting(r: Matrix) -> float:
    """Average forgetting after the final task (Chaudhry et al., 2018).

    For each task `j < T - 1`, forgetting is the drop from the best accuracy
    ever reached on it before the final task to its final accuracy:
    `max_{j <= i <= T-2} R[i][j] - R[T-1][j]`.

    Args:
      r: Accuracy matrix, shape (T, T).

    Returns:
      The mean over `j < T - 1`; 0.0 when `T == 1`. Positive means forgetting.
    """
    m = _as_matrix(r)
    num_tasks = m.shape[0]
    if num_tasks == 1:
        return 0.0
    drops = [
        m[j : num_tasks - 1, j].max() - m[num_tasks - 1, j]
        for j in range(num_tasks - 1)
    ]
    return float(np.mean(drops))


def backward_transfer(r: Matrix) -> float:
    """Backward transfer after the final task (Lopez-Paz & Ranzato, 2017).

    Args:
      r: Accuracy matrix, shape (T, T).

    Returns:
      `mean_{j < T-1} (R[T-1][j] - R[j][j])`; 0.0 when `T == 1`. Negative
      values mean that later training hurt earlier tasks.
    """
    m = _as_matrix(r)
    num_tasks = m.shape[0]
    if num_tasks == 1:
        return 0.0
    final = m[num_tasks - 1, : num_tasks - 1]
    just_trained = np.diag(m)[: num_tasks - 1]
    return float((final - just_trained).mean())


def format_accuracy_matrix(r: Matrix, precision: int = 2) -> str:
    """Renders the accuracy matrix as a fixed-width table for logs.

    Rows are "after training task i", columns "test data of task j" (labelled
    T1..TT, counting tasks from 1 as people do), plus an
    `avg` column with `average_accuracy(r, i)`. Missing entries print as `-`.
    Unlike the metrics, this accepts matrices with missing lower-triangle
    entries (e.g. while training is still running); their `avg` prints as `-`.

    Args:
      r: Accuracy matrix, shape (T, T).
      precision: Digits after the decimal point.

    Returns:
      A multi-line string (no trailing newline).

    Raises:
      ValueError: If `r` is not square.
    """
    if isinstance(r, np.ndarray) and r.dtype != object:
        m = r.astype(np.float64)
    else:
        m = np.array(
            [[np.nan if v is None else float(v) for v in row] for row in r],
            dtype=np.float64,
        )
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(
            f'The accuracy matrix must be square, got shape {m.shape}.'
        )
    num_tasks = m.shape[0]
    # Wide enough for "100.00" and for the row/column labels.
    width = max(precision + 5, len(f'T{num_tasks}'), len('avg')) + 1
    label_width = max(len('after'), len(f'T{num_tasks}')) + 1

    def cell(v: float) -> str:
        text = '-' if not np.isfinite(v) else f'{v:.{precision}f}'
        return text.rjust(width)

    header = (
        'after'.ljust(label_width)
        + ''.join(f'T{j + 1}'.rjust(width) for j in range(num_tasks))
        + 'avg'.rjust(width)
    )
    lines = [header]
    for i in range(num_tasks):
        seen = m[i, : i + 1]
        avg = seen.mean() if np.isfinite(seen).all() else np.nan
        lines.append(
            f'T{i + 1}'.ljust(label_width)
            + ''.join(cell(v) for v in m[i])
            + cell(avg)
        )
    return '\n'.join(lines)
