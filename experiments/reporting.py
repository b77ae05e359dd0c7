"""Reporting for continual-learning runs: TensorBoard, plots, tables, progress.

Everything here depends only on the standard library, numpy and matplotlib:

* `EventWriter` writes TensorBoard event files (scalars) without TensorFlow or
  protobuf, by encoding the few protocol-buffer fields it needs by hand;
  `read_scalars` reads them back (and checks every CRC).
* `save_plots` draws the accuracy matrix and the per-task accuracy curves of a
  `results.json` dict into one PNG.
* `summary_table` renders a `results.json` dict as a one-screen text table.
* `Progress` shows the progress of training a task on a terminal, or prints
  plain periodic lines when the output is a log file.

The metrics themselves come from `dlcft_jax.metrics`.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self, TextIO

import numpy as np

from dlcft_jax import metrics as metrics_lib

# ---------------------------------------------------------------------------
# CRC32C (Castagnoli), as used by the TFRecord framing.
# ---------------------------------------------------------------------------

_CRC32C_POLY = 0x82F63B78  # Reflected Castagnoli polynomial.
_CRC32C_CHECK = 0xE3069283  # crc32c(b'123456789'), the standard check value.


def _make_crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _make_crc32c_table()


def _crc32c_table(data: bytes) -> int:
    """Pure-Python table-driven CRC32C (fast enough for event records)."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _native_crc32c():
    """A C implementation of CRC32C if one is installed and correct."""
    candidates = []
    with contextlib.suppress(ImportError):
        import google_crc32c

        candidates.append(google_crc32c.value)
    with contextlib.suppress(ImportError, AttributeError):
        import crc32c

        candidates.append(crc32c.crc32c)
    for fn in candidates:
        try:
            if fn(b'123456789') == _CRC32C_CHECK:
                return fn
        except (TypeError, ValueError):  # An incompatible API: skip it.
            continue
    return None


_crc32c = _native_crc32c() or _crc32c_table


def _masked_crc(data: bytes) -> int:
    """The masked CRC32C that TFRecord files store."""
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------
# Minimal protocol-buffer encoding and decoding.
# ---------------------------------------------------------------------------

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
    if value < 0:  # int64 fields: two's complement on 64 bits (10 bytes).
        value += 1 << 64
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _key(field, _BYTES) + _varint(len(data)) + data


def _float32(value: float) -> bytes:
    """`value` as a little-endian float32; out-of-range values become inf."""
    value = float(value)
    try:
        return struct.pack('<f', value)
    except OverflowError:
        return struct.pack('<f', math.copysign(math.inf, value))


def _encode_event(
    wall_time: float,
    step: int = 0,
    file_version: str | None = None,
    values: Sequence[tuple[str, float]] = (),
) -> bytes:
    """Serializes a `tensorflow.Event` with a `Summary` of simple values."""
    out = _key(1, _FIXED64) + struct.pack('<d', float(wall_time))
    if step:
        out += _key(2, _VARINT) + _varint(int(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode('utf-8'))
    if values:
        summary = b''.join(
            _bytes_field(
                1,
                _bytes_field(1, tag.encode('utf-8'))
                + _key(2, _FIXED32)
                + _float32(value),
            )
            for tag, value in values
        )
        out += _bytes_field(5, summary)
    return out


def _decode_fields(data: bytes):
    """Yields `(field, wire_type, value)`; value is an int or raw bytes."""
    pos, end = 0, len(data)

    def read_varint():
        nonlocal pos
        result = shift = 0
        while True:
            if pos >= end:
                raise ValueError('Truncated varint in protocol buffer.')
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    while pos < end:
        key = read_varint()
        field, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value = read_varint()
        elif wire_type in (_FIXED64, _FIXED32, _BYTES):
            sizes = {_FIXED64: 8, _FIXED32: 4}
            size = sizes.get(wire_type) or read_varint()
            if pos + size > end:
                raise ValueError('Truncated field in protocol buffer.')
            value = data[pos : pos + size]
            pos += size
        else:
            raise ValueError(f'Unsupported protobuf wire type {wire_type}.')
        yield field, wire_type, value


# ---------------------------------------------------------------------------
# TensorBoard event files.
# ---------------------------------------------------------------------------


def _record(data: bytes) -> bytes:
    """Frames `data` as one TFRecord."""
    header = struct.pack('<Q', len(data))
    return (
        header
        + struct.pack('<I', _masked_crc(header))
        + data
        + struct.pack('<I', _masked_crc(data))
    )


class EventWriter:
    """Writes scalar summaries to a TensorBoard event file.

    Needs neither TensorFlow nor protobuf. The file is named like TensorFlow's
    (`events.out.tfevents.<time>.<host>.<pid><suffix>`), so `tensorboard
    --logdir` picks it up. Use as a context manager, or call `close()`.

    Example:
      with EventWriter('runs/cifar100') as writer:
          writer.scalar('train/loss', 0.5, step=10)
          writer.scalars({'eval/acc': 81.0, 'eval/forgetting': 3.2}, step=1)

    Attributes:
      path: The `Path` of the event file.
    """

    def __init__(self, logdir: str | os.PathLike, filename_suffix: str = ''):
        """Creates `logdir` if needed and the event file in it.

        Args:
          logdir: Folder for the event file (one TensorBoard run).
          filename_suffix: Appended to the file name.
        """
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        name = (
            f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.'
            f'{os.getpid()}{filename_suffix}'
        )
        self.path = logdir / name
        # Append, so that a second writer opened in the same second by the
        # same process cannot erase the first one's events.
        self._file = open(self.path, 'ab')  # noqa: SIM115
        self._write(_encode_event(time.time(), file_version='brain.Event:2'))
        self.flush()

    def _write(self, event: bytes) -> None:
        if self._file is None:
            raise ValueError(f'EventWriter for {self.path} is closed.')
        self._file.write(_record(event))

    def scalar(
        self,
        tag: str,
        value: float,
        step: int,
        wall_time: float | None = None,
    ) -> None:
        """Logs one scalar (stored as float32, as TensorBoard does).

        Args:
          tag: Name of the curve, e.g. 'train/loss'.
          value: Any number convertible with `float()` (numpy and JAX scalars
            too).
          step: The x coordinate (int64).
          wall_time: Seconds since the epoch; defaults to now.
        """
        self.scalars({tag: value}, step, wall_time)

    def scalars(
        self,
        values: Mapping[str, float],
        step: int,
        wall_time: float | None = None,
    ) -> None:
        """Logs several scalars at the same step (one event).

        Args:
          values: Maps tags to values.
          step: The x coordinate (int64).
          wall_time: Seconds since the epoch; defaults to now.
        """
        if not values:
            return
        items = [(str(tag), float(v)) for tag, v in values.items()]
        wall_time = time.time() if wall_time is None else wall_time
        self._write(_encode_event(wall_time, int(step), values=items))

    def flush(self) -> None:
        """Writes buffered events to disk."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Flushes and closes the file; later calls do nothing."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_scalars(path: str | os.PathLike) -> list[tuple[str, int, float]]:
    """Reads the simple-value scalars of a TensorBoard event file.

    Reads files from `EventWriter` and from other writers that store scalars
    as `simple_value` (e.g. PyTorch's SummaryWriter); other summaries (images,
    tensor-valued scalars) are skipped.

    Args:
      path: The event file.

    Returns:
      `(tag, step, value)` tuples in file order; values are float32 numbers
      converted to Python floats.

    Raises:
      ValueError: If a record is truncated or a CRC does not match.
    """
    data = Path(path).read_bytes()
    out = []
    pos = 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError(f'{path}: truncated record header at byte {pos}.')
        header = data[pos : pos + 8]
        (length,) = struct.unpack('<Q', header)
        (header_crc,) = struct.unpack('<I', data[pos + 8 : pos + 12])
        if header_crc != _masked_crc(header):
            raise ValueError(f'{path}: length CRC mismatch at byte {pos}.')
        start = pos + 12
        if start + length + 4 > len(data):
            raise ValueError(f'{path}: truncated record at byte {pos}.')
        event = data[start : start + length]
        (data_crc,) = struct.unpack(
            '<I', data[start + length : start + length + 4]
        )
        if data_crc != _masked_crc(event):
            raise ValueError(f'{path}: data CRC mismatch at byte {pos}.')
        pos = start + length + 4
        step = 0
        summaries = []
        for field, wire_type, value in _decode_fields(event):
            if field == 2 and wire_type == _VARINT:
                step = value - (1 << 64) if value >= 1 << 63 else value
            elif field == 5 and wire_type == _BYTES:
                summaries.append(value)
        for summary in summaries:
            for field, wire_type, value in _decode_fields(summary):
                if field != 1 or wire_type != _BYTES:
                    continue
                tag, simple = None, None
                for f, w, v in _decode_fields(value):
                    if f == 1 and w == _BYTES:
                        tag = v.decode('utf-8')
                    elif f == 2 and w == _FIXED32:
                        (simple,) = struct.unpack('<f', v)
                if tag is not None and simple is not None:
                    out.append((tag, step, simple))
    return out


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
            for k, (c, (_, w)) in enumerate(zip(cells, cols))
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
    return '\n'.join(lines)


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


class Progress:
    """Progress of training one task, for a terminal or a log file.

    On a terminal (`stream.isatty()`) one line is redrawn in place with `\\r`
    (at most ~10 times a second, and always at the last step):
    `task 2/10 [######----] step 60/100 loss 0.5123 penalty 0.0100 acc 81.2%
    1530 img/s ETA 0:04`. Otherwise a plain line is printed every `every`
    steps and at the last step, so logs stay readable.

    Example:
      progress = Progress(n_steps, task=t, num_tasks=T)
      for k in range(n_steps):
          ...
          progress.update(k + 1, metrics)
      progress.close()
    """

    def __init__(
        self,
        total_steps: int,
        task: int,
        num_tasks: int,
        stream: TextIO | None = None,
        every: int = 10,
        width: int = 20,
    ):
        """Initializes the display; prints nothing yet.

        Args:
          total_steps: Number of steps of the task (>= 1).
          task: 0-based index of the task (shown 1-based).
          num_tasks: Number of tasks of the run.
          stream: Where to write; defaults to `sys.stdout` (looked up at call
            time, so pytest's capture works).
          every: Print interval, in steps, when `stream` is not a terminal.
          width: Number of characters of the bar.

        Raises:
          ValueError: If an argument is out of range.
        """
        if total_steps < 1 or every < 1 or width < 1:
            raise ValueError(
                'total_steps, every and width must be >= 1, got '
                f'{total_steps}, {every}, {width}.'
            )
        if not 0 <= task < num_tasks:
            raise ValueError(
                f'task is the 0-based index of one of {num_tasks} tasks, got '
                f'{task}.'
            )
        self.total_steps = int(total_steps)
        self.task = int(task)
        self.num_tasks = int(num_tasks)
        self.stream = sys.stdout if stream is None else stream
        self.every = int(every)
        self.width = int(width)
        isatty = getattr(self.stream, 'isatty', None)
        self.tty = bool(isatty and isatty())
        self._first = None  # (time, step) of the first update.
        self._last_draw = -math.inf
        self._line_len = 0
        self._open = False

    def _eta(self, step: int, now: float) -> str:
        if self._first is None or step <= self._first[1]:
            return '?'
        t0, s0 = self._first
        rate = (now - t0) / (step - s0)
        return _duration(rate * (self.total_steps - step))

    def _text(self, step: int, metrics: Mapping[str, Any], now: float) -> str:
        parts = [f'task {self.task + 1}/{self.num_tasks}']
        if self.tty:
            filled = int(
                self.width * min(step, self.total_steps) / self.total_steps
            )
            parts.append('[' + '#' * filled + '-' * (self.width - filled) + ']')
        parts.append(f'step {step}/{self.total_steps}')
        fields = (
            ('loss', 'loss', '{:.4f}'),
            ('data_loss', 'data', '{:.4f}'),
            ('penalty', 'penalty', '{:.4f}'),
        )
        for key, label, fmt in fields:
            if key in metrics:
                parts.append(f'{label} {fmt.format(float(metrics[key]))}')
        if 'accuracy' in metrics:
            parts.append(f'acc {100 * float(metrics["accuracy"]):.1f}%')
        if 'images_per_s' in metrics:
            parts.append(f'{float(metrics["images_per_s"]):.0f} img/s')
        if step >= self.total_steps and self._first is not None:
            parts.append(f'took {_duration(now - self._first[0])}')
        else:
            parts.append(f'ETA {self._eta(step, now)}')
        return ' '.join(parts)

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
        last = step >= self.total_steps
        if self.tty:
            if not last and now - self._last_draw < 0.1:
                return
            text = self._text(step, metrics, now)
            pad = ' ' * max(0, self._line_len - len(text))
            self.stream.write('\r' + text + pad)
            self._line_len = len(text)
            self._open = True
        elif step % self.every == 0 or last:
            self.stream.write(self._text(step, metrics, now) + '\n')
        else:
            return
        self._last_draw = now
        self.stream.flush()

    def close(self) -> None:
        """Ends the redrawn line (terminal only); safe to call twice."""
        if self._open:
            self.stream.write('\n')
            self.stream.flush()
            self._open = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
