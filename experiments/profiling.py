"""Where a run's wall time goes: phases per task, compilation split out.

`Profile` is a context manager that the runner holds for a whole run. The
runner marks its phases (`with profile.phase('train', t): ...`); JAX reports
every compilation it does through `jax.monitoring` (tracing to a jaxpr,
lowering to MLIR, the backend compile or the persistent-cache read), and the
profile books those seconds as `compile` of the task and phase running at the
time, taking them out of the phase's own time. So each row splits into

    compile      tracing, lowering and XLA compilation (or a cache read)
    train        the training steps, minus compilation and input waits
    data         waiting for input batches (the host pipeline)
    curvature    the task's curvature, the anchor, the buffer at task end
    eval         accuracy on the test data of the tasks seen so far
    checkpoint   writing checkpoints (the asynchronous part is not counted)
    setup        (a row, not a column) before the first task

    other        what no phase covers (start-up: data, backbone, state)

and the columns of a row add up to its wall time. `summary()` gives them as
JSON-ready dicts and `table(summary)` prints them; the runner writes the
summary into results.json (`profile`), and `python -m
benchmarks.run_profile` runs a config cold and warm and prints both.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax

# The duration events JAX records for one compilation (jax._src.dispatch).
COMPILE_EVENTS = frozenset(
    {
        '/jax/core/compile/jaxpr_trace_duration',
        '/jax/core/compile/jaxpr_to_mlir_module_duration',
        '/jax/core/compile/backend_compile_duration',
    }
)
CACHE_HIT_EVENT = '/jax/compilation_cache/cache_hits'
COLUMNS = ('compile', 'train', 'data', 'curvature', 'eval', 'checkpoint')
# With 'other' (the setup row's unmarked time) and the row's 'total'.
ALL_COLUMNS = (*COLUMNS, 'other', 'total')
SETUP = 'setup'


class Profile:
    """Seconds by (task, phase), with compilation booked apart.

    Use as a context manager (it registers a `jax.monitoring` listener on
    entry and removes it on exit). Thread-safe: compilations in another
    thread (an input pipeline's) are booked to the phase running then.
    """

    def __init__(self):
        self._seconds: dict[tuple[Any, str], float] = {}
        self._where: tuple[Any, str] = (None, SETUP)
        self._compiled = 0.0  # compile seconds inside the current phase
        self._lock = threading.Lock()
        self.compilations = 0
        self.cache_hits = 0
        # Compile seconds by the compiled function's name.
        self.by_function: dict[str, float] = {}

    # -- jax.monitoring listeners -------------------------------------------
    def _on_duration(self, event: str, duration_secs: float, **kwargs):
        if event not in COMPILE_EVENTS:
            return
        name = str(kwargs.get('fun_name', '?'))
        with self._lock:
            self.by_function[name] = (
                self.by_function.get(name, 0.0) + duration_secs
            )
            self._add(self._where[0], 'compile', duration_secs)
            self._compiled += duration_secs
            if event.endswith('backend_compile_duration'):
                self.compilations += 1

    def _on_event(self, event: str, **kwargs):
        del kwargs
        if event == CACHE_HIT_EVENT:
            with self._lock:
                self.cache_hits += 1

    def __enter__(self) -> Profile:
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc_info) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)

    # -- booking -------------------------------------------------------------
    def _add(self, task: Any, column: str, seconds: float) -> None:
        key = (task, column)
        self._seconds[key] = self._seconds.get(key, 0.0) + seconds

    def add(self, task: Any, column: str, seconds: float) -> None:
        """Books `seconds` of `column` to `task` (e.g. input waits, which
        the caller then leaves out of the train phase with `moved`)."""
        with self._lock:
            self._add(task, column, seconds)

    def begin(self, column: str, task: Any = None) -> tuple:
        """Starts timing a phase; pass the token to `end`."""
        with self._lock:
            token = (self._where, self._compiled, time.perf_counter())
            self._where, self._compiled = (task, column), 0.0
        return token

    def end(self, token: tuple, *, moved: float = 0.0) -> None:
        """Ends the phase of `token`. `moved`: seconds of it that the caller
        booked to another column with `add` (e.g. input waits of `train`)."""
        outer, outer_compiled, t0 = token
        wall = time.perf_counter() - t0
        with self._lock:
            task, column = self._where
            own = wall - self._compiled - moved
            self._add(task, column, max(own, 0.0))
            # A nested phase's wall time is not the outer phase's own.
            self._where = outer
            self._compiled = outer_compiled + wall

    @contextlib.contextmanager
    def phase(self, column: str, task: Any = None) -> Iterator[None]:
        """`begin` ... `end` around a block."""
        token = self.begin(column, task)
        try:
            yield
        finally:
            self.end(token)

    # -- reading -------------------------------------------------------------
    def rows(self, *, total_s: float | None = None) -> list[dict[str, Any]]:
        """One dict per task (setup first, then tasks in order), each with
        the `COLUMNS` in seconds and their sum `total`; the setup row holds
        what no marked phase covered when `total_s` is given."""
        with self._lock:
            seconds = dict(self._seconds)
        tasks = sorted({t for t, _ in seconds if t is not None})
        out = []
        for task in [None, *tasks]:
            row: dict[str, Any] = {
                'task': SETUP if task is None else task + 1,
                **{c: seconds.get((task, c), 0.0) for c in COLUMNS},
            }
            if task is None:
                row['other'] = 0.0  # filled from `total_s` below
            row['total'] = sum(v for k, v in row.items() if k != 'task')
            out.append(row)
        if total_s is not None:
            marked = sum(r['total'] for r in out)
            out[0]['other'] += max(total_s - marked, 0.0)
            out[0]['total'] += max(total_s - marked, 0.0)
        return out

    def summary(self, *, total_s: float | None = None) -> dict[str, Any]:
        """{'rows', 'totals' (column sums), 'compilations', 'cache_hits'}."""
        rows = self.rows(total_s=total_s)
        totals = {k: sum(r.get(k, 0.0) for r in rows) for k in ALL_COLUMNS}
        top = sorted(self.by_function.items(), key=lambda kv: -kv[1])
        return {
            'rows': rows,
            'totals': totals,
            'compilations': self.compilations,
            'cache_hits': self.cache_hits,
            # The ten functions that took longest to trace, lower, compile.
            'compile_by_function': dict(top[:10]),
        }


def table(summary: Mapping[str, Any], title: str = '') -> str:
    """The profile as a fixed-width text table (seconds)."""
    cols = ALL_COLUMNS
    head = f"{'task':<7}" + ''.join(f'{c:>11}' for c in cols)
    lines = [title] if title else []
    lines.append(head)

    def line(name: str, row: Mapping[str, Any]) -> str:
        return f'{name:<7}' + ''.join(f'{row.get(c, 0.0):>11.1f}' for c in cols)

    for row in summary['rows']:
        lines.append(line(str(row['task']), row))
    lines.append(line('all', summary['totals']))
    lines.append(
        f"{summary['compilations']} XLA compilations, "
        f"{summary['cache_hits']} read from the persistent cache"
    )
    top = list(summary.get('compile_by_function', {}).items())[:4]
    if top:
        lines.append(
            'compile time by function: '
            + ', '.join(f'{name} {sec:.1f} s' for name, sec in top)
        )
    return '\n'.join(lines)


def side_by_side(
    summaries: Sequence[tuple[str, Mapping[str, Any]]],
) -> str:
    """Totals of several profiles (e.g. cold and warm), one row each."""
    cols = ALL_COLUMNS
    width = max(len(n) for n, _ in summaries) + 2
    lines = [f"{'run':<{width}}" + ''.join(f'{c:>11}' for c in cols)]
    for name, s in summaries:
        lines.append(
            f'{name:<{width}}'
            + ''.join(f"{s['totals'].get(c, 0.0):>11.1f}" for c in cols)
        )
    return '\n'.join(lines)
