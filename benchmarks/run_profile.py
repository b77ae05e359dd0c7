r"""Where a run's wall time goes, cold and warm.

  python -m benchmarks.run_profile \
      --config=experiments/configs/class_il.py[:seq_cifar10] \
      [--root=runs/profile] [--runs=cold,warm] [--out=profile.json] \
      [-- --config.method=ncm ...]

Runs `python -m experiments.run` once per entry of `--runs`, each in a new
process and a new workdir under `--root`: `cold` with an empty persistent
compilation cache (ROOT/xla_cache, emptied first), `warm` with the cache the
cold run filled, as a user's second run (or another method with the same
shapes) finds it. Arguments after `--` go to every run. For each run it
prints the runner's profile (`experiments.profiling`: compile, train, data,
curvature, eval, checkpoint and other seconds, per task), then the totals
side by side with the whole command's wall time and the checkpoint sizes,
and `--out` writes all of it as one JSON.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from absl import app, flags

from benchmarks.hardware import hardware
from experiments import profiling, reporting

_CONFIG = flags.DEFINE_string(
    'config',
    'experiments/configs/class_il.py',
    'Config file (with :BENCHMARK) of experiments.run.',
)
_ROOT = flags.DEFINE_string('root', 'runs/profile', 'Workdirs and cache.')
_RUNS = flags.DEFINE_list(
    'runs', ['cold', 'warm'], "Runs in order: 'cold' (empty cache), 'warm'."
)
_OUT = flags.DEFINE_string('out', None, 'Write all figures as JSON here.')


def run_once(name: str, root: Path, extra: list[str]) -> dict[str, Any]:
    """One `experiments.run` in a new process; its profile and wall time."""
    cache = root / 'xla_cache'
    if name == 'cold':
        shutil.rmtree(cache, ignore_errors=True)
    elif name != 'warm':
        raise app.UsageError(f"--runs takes 'cold' and 'warm', not {name!r}.")
    workdir = root / name
    shutil.rmtree(workdir, ignore_errors=True)
    cmd = [
        sys.executable,
        '-m',
        'experiments.run',
        f'--config={_CONFIG.value}',
        f'--workdir={workdir}',
        f'--config.compilation_cache_dir={cache}',
        *extra,
    ]
    print('$ ' + ' '.join(cmd), flush=True)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if out.returncode:
        tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
        print('\n'.join(tail), file=sys.stderr)
        print(
            f'error: the {name} run failed (exit {out.returncode}); the '
            'lines above are its last words.',
            file=sys.stderr,
        )
        sys.exit(2)
    results = json.loads((workdir / 'results.json').read_text())
    return {
        'command_wall_s': wall,
        'profile': results['profile'],
        'checkpoint_bytes': results.get('checkpoint_bytes', {}),
        'average_accuracy': results.get('average_accuracy'),
    }


def main(argv):
    extra = list(argv[1:])
    root = Path(_ROOT.value)
    root.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        'config': _CONFIG.value,
        'extra_args': extra,
        'hardware': hardware(),
        'runs': {},
    }
    for name in _RUNS.value:
        report['runs'][name] = r = run_once(name, root, extra)
        print(profiling.table(r['profile'], title=f'{name} run (seconds)'))
        sizes = {int(k): v for k, v in r['checkpoint_bytes'].items()}
        print(reporting.checkpoint_line(sizes))
        print()
    print('totals (seconds)')
    print(
        profiling.side_by_side(
            [(n, r['profile']) for n, r in report['runs'].items()]
        )
    )
    for name, r in report['runs'].items():
        print(
            f"{name}: the whole command took {r['command_wall_s']:.0f} s "
            f"(process start and imports included)"
        )
    if _OUT.value:
        Path(_OUT.value).write_text(json.dumps(report, indent=2) + '\n')


if __name__ == '__main__':
    app.run(main)
