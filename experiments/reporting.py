"""Where a result is reported: the run's logs, TensorBoard, plots, tables and
the progress display.

* `RunLog`: the JSONL log (`log.jsonl`) and TensorBoard scalars of a run,
  written by the chief host only. TensorBoard events go through
  `tensorboardX`, a kept writer that needs neither TensorFlow nor PyTorch.
* `Progress`: the progress of a task, a `tqdm` bar on a terminal and plain
  periodic lines in a log file or CI.
* `report_task`, `write_outputs`: what a run prints and writes after each
  task and at its end (results.json, summary.txt, results.png).
* `save_plots`, `summary_table`, `joint_summary`: the figures and tables of
  a `results.json` dict.

The metrics themselves come from `dlcft_jax.metrics`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self, TextIO

import numpy as np

from dlcft_jax import metrics as metrics_lib

# ---------------------------------------------------------------------------
# The run's logs.
# ---------------------------------------------------------------------------


class RunLog:
    """`log.jsonl` and TensorBoard scalars of a run (no-ops off the chief).

    Example:
      with RunLog(workdir, chief=jax.process_index() == 0) as log:
          log.record({'task': 0, 'step': 10, 'loss': 0.5})
          log.scalars({'train/loss': 0.5}, step=10)
    """

    def __init__(self, workdir: str | os.PathLike, chief: bool = True):
        self._file = self._events = None
        if chief:
            from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

            workdir = Path(workdir)
            self._file = open(workdir / 'log.jsonl', 'a', encoding='utf-8')  # noqa: SIM115
            self._events = SummaryWriter(str(workdir / 'tensorboard'))

    def record(self, record: Mapping[str, Any]) -> None:
        """Appends one JSON line to log.jsonl."""
        if self._file is not None:
            self._file.write(json.dumps(record) + '\n')
            self._file.flush()

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Adds one TensorBoard scalar per tag at `step`."""
        if self._events is None:
            return
        for tag, value in values.items():
            self._events.add_scalar(tag, float(value), int(step))

    def flush(self) -> None:
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        """Flushes and closes both files; later calls do nothing."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._events is not None:
            self._events.close()
            self._events = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Plots and tables of results.json.
# ---------------------------------------------------------------------------

# Above this many tasks, plots drop per-cell labels and the legend, and the
# summary table shows only the first and last tasks.
_MANY_TASKS = 20


def _matrix(results: Mapping[str, Any]) -> np.ndarray:
    """The accuracy matrix as a float array with NaN for missing entries."""
    rows = results['accuracy_matrix']
    m = np.array(
        [[np.nan if v is None else float(v) for v in row] for row in rows],
        dtype=np.float64,
    )
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(
            f'accuracy_matrix must be non-empty and square, got shape '
            f'{m.shape}.'
        )
    return m


def _metric(results: Mapping[str, Any], key: str, fn) -> float:
    value = results.get(key)
    return float(fn(results['accuracy_matrix']) if value is None else value)


def _tick_positions(num_tasks: int) -> list[int]:
    """0-based positions of at most ~10 ticks, labelled 1-based."""
    stride = max(1, math.ceil(num_tasks / 10))
    ticks = list(range(0, num_tasks, stride))
    if ticks[-1] != num_tasks - 1 and num_tasks <= 2 * _MANY_TASKS:
        ticks.append(num_tasks - 1)
    return ticks


def save_plots(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Draws the accuracy matrix and the per-task accuracy curves into a PNG.

    Left: heatmap of `R[i][j]` (row: after training task i, column: test data
    of task j; tasks counted from 1), with values written in the cells (up to
    20 tasks) and blank cells for tasks not yet trained. Right: the accuracy
    on each task j after each task i >= j, and the average accuracy (thick
    black line). Does not touch pyplot's global state or backend.

    Args:
      results: A `results.json` dict (needs `accuracy_matrix`; uses
        `setting`, `method` and `average_accuracy` if present).
      path: The PNG file to write; parent folders are created.

    Returns:
      `path` as a `Path`.
    """
    # Imported here so that importing this module stays cheap.
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    m = _matrix(results)
    num_tasks = m.shape[0]
    many = num_tasks > _MANY_TASKS
    # Rows not evaluated yet (a run stopped early) plot as gaps.
    avg_curve = [
        float(np.mean(m[t, : t + 1]))  # = average_accuracy(m, t)
        if np.isfinite(m[t, : t + 1]).all()
        else np.nan
        for t in range(num_tasks)
    ]
    final_avg = _metric(
        results, 'average_accuracy', metrics_lib.average_accuracy
    )
    finite = m[np.isfinite(m)]
    vmin, vmax = 0.0, 100.0
    if finite.size and (finite.min() < 0 or finite.max() > 100):
        vmin, vmax = float(finite.min()), float(finite.max())

    fig = Figure(figsize=(13, 5.5), dpi=100, layout='constrained')
    ax_map, ax_curve = fig.subplots(1, 2, width_ratios=[1.0, 1.15])

    cmap = colormaps['viridis'].with_extremes(bad='white')
    image = ax_map.imshow(
        np.ma.masked_invalid(m),
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        interpolation='nearest',
    )
    fig.colorbar(image, ax=ax_map, label='accuracy (%)', shrink=0.85)
    ticks = _tick_positions(num_tasks)
    labels = [str(t + 1) for t in ticks]
    ax_map.set_xticks(ticks, labels)
    ax_map.set_yticks(ticks, labels)
    ax_map.set_xlabel('test data of task j')
    ax_map.set_ylabel('after training task i')
    if not many:
        fontsize = max(4.0, min(10.0, 90.0 / num_tasks))
        fmt = '.1f' if num_tasks <= 10 else '.0f'
        for (i, j), value in np.ndenumerate(m):
            if not np.isfinite(value):
                continue
            shade = (value - vmin) / (vmax - vmin) if vmax > vmin else 0.5
            ax_map.text(
                j,
                i,
                format(value, fmt),
                ha='center',
                va='center',
                fontsize=fontsize,
                color='black' if shade > 0.6 else 'white',
            )
    name = ' / '.join(
        str(results[k]) for k in ('setting', 'method') if results.get(k)
    )
    ax_map.set_title(
        (f'{name}: ' if name else '') + f'average accuracy {final_avg:.2f}%'
    )

    x = np.arange(1, num_tasks + 1)
    colors = colormaps['tab10' if num_tasks <= 10 else 'turbo']
    for j in range(num_tasks):
        color = colors(j if num_tasks <= 10 else j / max(1, num_tasks - 1))
        ax_curve.plot(
            x[j:],
            m[j:, j],
            color=color,
            linewidth=0.8 if many else 1.3,
            marker=None if many else 'o',
            markersize=3,
            alpha=0.7 if many else 0.9,
            label=None if many else f'task {j + 1}',
        )
    ax_curve.plot(
        x,
        avg_curve,
        color='black',
        linewidth=3,
        marker='o' if num_tasks == 1 else None,
        label='average',
    )
    ax_curve.set_xlabel('after training task i')
    ax_curve.set_ylabel('accuracy on task j (%)')
    ax_curve.set_title('accuracy of each task over training')
    ax_curve.set_xticks([t + 1 for t in ticks])
    ax_curve.set_xlim(0.5, num_tasks + 0.5)
    if vmin == 0.0 and vmax == 100.0:
        ax_curve.set_ylim(0, 100)
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(
        fontsize='small',
        ncols=1 if num_tasks <= 10 else 2,
        loc='best',
    )

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format='png')
    return path


def _task_data_label(results: Mapping[str, Any], t: int) -> str:
    """The data of task `t` in a few characters: its classes or chunk size."""
    per_task = results.get('per_task') or []
    entry = per_task[t] if t < len(per_task) else {}
    for source in (entry, results):
        size = source.get('chunk_size')
        if size is not None:
            if isinstance(size, Sequence):
                size = size[t]
            return f'{int(size)} imgs'
    task_classes = results.get('task_classes')
    classes = entry.get('classes')
    if classes is None and task_classes and t < len(task_classes):
        classes = task_classes[t]
    if classes is None:
        return '-'
    classes = [int(c) for c in classes]
    if len(classes) <= 3:
        text = ','.join(map(str, classes))
        if len(text) <= 12:
            return text
    if classes == list(range(classes[0], classes[0] + len(classes))):
        return f'{classes[0]}-{classes[-1]}'
    return f'{len(classes)} classes'


def _seconds(value: Any) -> str:
    return '-' if value is None else f'{float(value):.1f}'


def joint_summary(results: Mapping[str, Any]) -> str:
    """The summary of a joint-training run: one model, its accuracy per task.

    Joint training has no sequence of models, so there is no matrix, no
    forgetting and no plot; `results['accuracy_matrix']` holds one row.
    """
    row = results['accuracy_matrix'][0]
    per = (results.get('per_task') or [{}])[0]
    lines = [
        f"joint training ({results.get('setting')}, {results.get('method')}"
        f"): one model on the union of {len(row)} tasks, "
        f"{per.get('steps', '?')} steps",
        'task  final %',
    ]
    lines += [
        f'{j + 1:<5} {"-" if a is None else f"{a:7.2f}"}'
        for j, a in enumerate(row)
    ]
    avg = results.get('average_accuracy')
    lines.append(
        f'average accuracy {avg:.2f}% | wall time '
        f"{results.get('wall_time_s', 0.0):.0f} s"
        if avg is not None
        else 'average accuracy -'
    )
    lines += objective_lines([per])
    return '\n'.join(lines)


def summary_table(results: Mapping[str, Any]) -> str:
    """Renders a `results.json` dict as a plain-text table for a terminal.

    One row per task: its classes (or chunk size), the accuracy on it right
    after training it (`R[t][t]`), its final accuracy (`R[T-1][t]`), its
    forgetting (best accuracy before the last task minus the final one; `-`
    for the last task) and the training and curvature times. Then a row with
    the summed times and a line with the run's average accuracy, forgetting,
    backward transfer and wall time. With more than 20 tasks only the first
    and last 10 are listed, so the table stays under 30 lines of at most
    80 characters.

    Args:
      results: A `results.json` dict (needs `accuracy_matrix`).

    Returns:
      The table, without trailing newline.
    """
    m = _matrix(results)
    planned = m.shape[0]
    # A run stopped early: the table covers the tasks done.
    done = np.isfinite(np.diagonal(m))
    num_tasks = int(np.argmin(done)) if not done.all() else planned
    num_tasks = max(num_tasks, 1)
    m = m[:num_tasks, :num_tasks]
    per_task = list(results.get('per_task') or [])
    per_task += [{}] * (num_tasks - len(per_task))

    cols = (
        ('task', 5),
        ('classes', 12),
        ('own %', 8),
        ('final %', 8),
        ('forget', 8),
        ('train s', 10),
        ('curv s', 10),
    )

    def line(cells: Sequence[str]) -> str:
        return ' '.join(
            str(c).ljust(w) if k < 2 else str(c).rjust(w)
            for k, (c, (_, w)) in enumerate(zip(cells, cols, strict=True))
        ).rstrip()

    def row(t: int) -> str:
        if t < num_tasks - 1:
            forget = f'{np.nanmax(m[t : num_tasks - 1, t]) - m[-1, t]:.2f}'
        else:
            forget = '-'
        return line(
            [
                t + 1,
                _task_data_label(results, t),
                f'{m[t, t]:.2f}',
                f'{m[-1, t]:.2f}',
                forget,
                _seconds(per_task[t].get('train_s')),
                _seconds(per_task[t].get('curvature_s')),
            ]
        )

    name = ' / '.join(
        str(results[k]) for k in ('setting', 'method') if results.get(k)
    )
    labels = [c for c, _ in cols]
    if _task_data_label(results, 0).endswith(' imgs'):
        labels[1] = 'chunk'
    header = line(labels)
    rule = '-' * len(header)
    count = (
        f'{num_tasks} tasks'
        if num_tasks == planned
        else f'{num_tasks} of {planned} tasks (stopped early)'
    )
    lines = [f'{name}: {count}' if name else count]
    lines += [header, rule]
    if num_tasks > _MANY_TASKS:
        shown = _MANY_TASKS // 2
        lines += [row(t) for t in range(shown)]
        lines.append(f'  ... {num_tasks - 2 * shown} more tasks ...')
        lines += [row(t) for t in range(num_tasks - shown, num_tasks)]
    else:
        lines += [row(t) for t in range(num_tasks)]

    def total(key: str) -> str:
        times = [p.get(key) for p in per_task]
        if any(v is None for v in times):
            return '-'
        return f'{sum(float(v) for v in times):.1f}'

    lines.append(rule)
    lines.append(
        line(['sum', '', '', '', '', total('train_s'), total('curvature_s')])
    )
    avg = _metric(results, 'average_accuracy', metrics_lib.average_accuracy)
    fgt = _metric(results, 'forgetting', metrics_lib.forgetting)
    bwt = _metric(results, 'backward_transfer', metrics_lib.backward_transfer)
    wall = results.get('wall_time_s')
    lines.append(
        f'average accuracy {avg:.2f}% | forgetting {fgt:.2f} | '
        f'backward transfer {bwt:.2f}'
    )
    lines.append(
        'wall time ' + ('-' if wall is None else f'{float(wall):.0f} s')
    )
    lines += objective_lines(per_task[:num_tasks])
    return '\n'.join(lines)


def objective_lines(per_task: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each task's objective J_t at its end and its gap to the closed-form
    head optimum (experiments/convergence.py); none if not measured."""
    if not any('objective' in p for p in per_task):
        return []
    lines = ['task  objective J_t  gap to head optimum  ‖∇_head J‖']
    for t, p in enumerate(per_task):
        if 'objective' not in p:
            continue
        lines.append(
            f'{t + 1:<5} {p["objective"]:13.4f}  '
            f'{p["objective_gap"]:19.4f}  {p["head_grad_norm"]:9.2e}'
        )
    return lines


# ---------------------------------------------------------------------------
# Training progress.
# ---------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f'{hours}:{minutes:02d}:{secs:02d}'
    return f'{minutes}:{secs:02d}'


def _metric_text(metrics: Mapping[str, Any]) -> list[str]:
    parts = []
    for key, label in (
        ('loss', 'loss'),
        ('data_loss', 'data'),
        ('penalty', 'penalty'),
    ):
        if key in metrics:
            parts.append(f'{label} {float(metrics[key]):.4f}')
    if 'accuracy' in metrics:
        parts.append(f'acc {100 * float(metrics["accuracy"]):.1f}%')
    if 'images_per_s' in metrics:
        parts.append(f'{float(metrics["images_per_s"]):.0f} img/s')
    return parts


class Throughput:
    """Images per second and the share of time spent waiting for input,
    over the steps since the last `read`."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self._start, self._images, self._wait = time.time(), 0, 0.0

    def add(self, images: int, wait_s: float) -> None:
        self._images += images
        self._wait += wait_s

    def read(self) -> dict[str, float]:
        """{'images_per_s', 'input_wait_frac'} of the window; restarts it."""
        seconds = max(time.time() - self._start, 1e-9)
        out = {
            'images_per_s': self._images / seconds,
            'input_wait_frac': self._wait / seconds,
        }
        self._reset()
        return out


class Progress:
    """Progress of training one task, for a terminal or a log file.

    On a terminal (`stream.isatty()`) a `tqdm` bar is redrawn in place,
    the latest metrics beside it. Otherwise (a log file, CI) a plain line is
    printed every `every` steps and at the last one:
    `task 2/10 step 60/100 loss 0.5123 penalty 0.0100 acc 81.2% 1530 img/s
    ETA 0:04`.

    Example:
      with Progress(n_steps, task=t, num_tasks=T) as progress:
          for k in range(n_steps):
              ...
              progress.update(k + 1, metrics)
    """

    def __init__(
        self,
        total_steps: int,
        task: int,
        num_tasks: int,
        stream: TextIO | None = None,
        every: int = 10,
    ):
        """Initializes the display.

        Args:
          total_steps: Number of steps of the task (>= 1).
          task: 0-based index of the task (shown 1-based).
          num_tasks: Number of tasks of the run.
          stream: Where to write; defaults to `sys.stdout` (looked up at call
            time, so pytest's capture works).
          every: Print interval, in steps, when `stream` is not a terminal.

        Raises:
          ValueError: If an argument is out of range.
        """
        if total_steps < 1 or every < 1:
            raise ValueError(
                'total_steps and every must be >= 1, got '
                f'{total_steps}, {every}.'
            )
        if not 0 <= task < num_tasks:
            raise ValueError(
                f'task is the 0-based index of one of {num_tasks} tasks, got '
                f'{task}.'
            )
        self.total_steps = int(total_steps)
        self.label = f'task {task + 1}/{num_tasks}'
        self.stream = sys.stdout if stream is None else stream
        self.every = int(every)
        isatty = getattr(self.stream, 'isatty', None)
        self._bar = None
        if isatty and isatty():
            from tqdm import tqdm  # pylint: disable=g-import-not-at-top

            self._bar = tqdm(
                total=self.total_steps,
                desc=self.label,
                file=self.stream,
                unit='step',
                leave=True,
                dynamic_ncols=True,
            )
        self._first = None  # (time, step) of the first update.

    def update(self, step: int, metrics: Mapping[str, Any] | None = None):
        """Reports that `step` steps of the task are done.

        Args:
          step: Number of steps done so far (1..total_steps).
          metrics: Any of 'loss', 'data_loss', 'penalty', 'accuracy' (a
            fraction, shown in %) and 'images_per_s'; values may be numpy or
            JAX scalars.
        """
        metrics = metrics or {}
        now = time.monotonic()
        if self._first is None:
            self._first = (now, step)
        if self._bar is not None:
            self._bar.set_postfix_str(' '.join(_metric_text(metrics)), False)
            self._bar.update(step - self._bar.n)
            return
        last = step >= self.total_steps
        if not (step % self.every == 0 or last):
            return
        parts = [self.label, f'step {step}/{self.total_steps}']
        parts += _metric_text(metrics)
        t0, s0 = self._first
        if last:
            parts.append(f'took {_duration(now - t0)}')
        elif step > s0:
            rate = (now - t0) / (step - s0)
            parts.append(f'ETA {_duration(rate * (self.total_steps - step))}')
        else:
            parts.append('ETA ?')
        self.stream.write(' '.join(parts) + '\n')
        self.stream.flush()

    def close(self) -> None:
        """Closes the bar (terminal only); safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ---------------------------------------------------------------------------
# What a continual run reports after each task and at its end.
# ---------------------------------------------------------------------------


def accuracy_summary(
    acc: Sequence[Sequence[float | None]], t: int, joint: bool
) -> dict[str, Any]:
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


def report_task(
    log: RunLog,
    summary: Mapping[str, Any],
    acc: Sequence[Sequence[float | None]],
    step: int,
    *,
    chief: bool,
    joint: bool,
) -> None:
    """Logs, plots to TensorBoard and prints the summary of a finished task
    (`summary['task']`, 0-based) at global `step`."""
    t = summary['task']
    log.record({'event': 'task_end', **summary})
    curves = {
        f'eval/{k}': summary[k]
        for k in ('average_accuracy', 'forgetting', 'backward_transfer')
        if summary[k] is not None
    }
    for j, a in enumerate(summary['accuracy']):
        curves[f'eval/task_{j + 1}_accuracy'] = a
    log.scalars(curves, step)
    log.flush()
    if not chief:
        return
    line = ' '.join(
        f'T{j + 1} {a:5.1f}%' for j, a in enumerate(summary['accuracy'])
    )
    line += f' | average {summary["average_accuracy"]:5.2f}%'
    if summary['forgetting'] is not None:
        line += (
            f' | forgetting {summary["forgetting"]:5.2f}'
            f' | BWT {summary["backward_transfer"]:+.2f}'
        )
    line += (
        f' | train {summary["train_s"]:.0f}s curvature '
        f'{summary["curvature_s"]:.0f}s eval {summary["eval_s"]:.0f}s'
    )
    print(f'after task {t + 1}: {line}', flush=True)
    if 0 < t < _MANY_TASKS and not joint:  # the matrix, if it fits
        seen = [row[: t + 1] for row in acc[: t + 1]]
        print(metrics_lib.format_accuracy_matrix(seen), flush=True)


def write_outputs(results: Mapping[str, Any], workdir: Path) -> None:
    """results.json, summary.txt and results.png, written atomically."""
    tmp = workdir / 'results.json.tmp'
    tmp.write_text(json.dumps(results, indent=2) + '\n', encoding='utf-8')
    os.replace(tmp, workdir / 'results.json')
    if not results.get('per_task'):
        table = f'{results["setting"]} / {results["method"]}: no task finished.'
    elif results.get('joint'):
        table = joint_summary(results)
    else:
        table = summary_table(results)
        save_plots(results, workdir / 'results.png')
    (workdir / 'summary.txt').write_text(table + '\n', encoding='utf-8')
    print()
    print(table)
    print(
        f'-> {workdir / "results.json"}, summary.txt, results.png, log.jsonl, '
        'tensorboard/'
    )


def profile_line(profile: Mapping[str, Any]) -> str:
    """One line of where this invocation's wall time went (see
    `experiments.profiling`)."""
    totals = profile['totals']
    parts = ', '.join(
        f'{name} {totals[name]:.0f} s'
        for name in (
            'compile',
            'train',
            'data',
            'curvature',
            'eval',
            'checkpoint',
            'other',
        )
        if totals.get(name, 0.0) >= 0.5
    )
    return (
        f"time: {totals['total']:.0f} s = {parts} "
        f"({profile['compilations']} compilations, "
        f"{profile['cache_hits']} from the cache)"
    )


def checkpoint_line(sizes: Mapping[int, int]) -> str:
    """'checkpoints: 2 kept (steps 250, 300), 21.0 MB each' (or the sizes)."""
    if not sizes:
        return 'checkpoints: none kept'
    steps = sorted(sizes)
    mb = [sizes[s] / 1e6 for s in steps]
    each = (
        f'{mb[0]:.1f} MB each'
        if max(mb) - min(mb) < 0.05 * max(mb)
        else ', '.join(f'{m:.1f}' for m in mb) + ' MB'
    )
    return (
        f'checkpoints: {len(steps)} kept (steps '
        f'{", ".join(map(str, steps))}), {each}, {sum(mb):.1f} MB in all'
    )
