r"""Runs every method on one benchmark and writes the comparison table.

  python -m benchmarks.methods_table --root=runs/methods_quick
  python -m benchmarks.methods_table --config=experiments/configs/task_il.py \
      --methods=dlcft,lwf,ewc --root=runs/methods_task_il

Each method is one `python -m experiments.run --config=CONFIG
--config.method=NAME --workdir=ROOT/NAME` command (extra `--flag=value`
arguments after `--` are passed to every run), timed as a whole process
(compilation included). A method whose `results.json` is complete is not
run again; an interrupted one resumes. At the end ROOT/table.md holds one row
per method: average accuracy after the last task, forgetting, accuracy on
the newest task, wall time and the command. Every method gets the same
config (data, steps, batch, replay budget, augmentation); only the method
changes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

from experiments import methods

_CONFIG = flags.DEFINE_string(
    'config', 'experiments/configs/class_il.py', 'The config of every run.'
)
_METHODS = flags.DEFINE_list(
    'methods', sorted(methods.METHODS), 'Methods to run (default: all).'
)
_ROOT = flags.DEFINE_string('root', 'runs/methods', 'One folder per method.')


def command(name: str, root: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        '-m',
        'experiments.run',
        f'--config={_CONFIG.value}',
        f'--config.method={name}',
        f'--workdir={root / name}',
        *extra,
    ]


def _row(name: str, root: Path, extra: list[str]) -> str:
    path = root / name / 'results.json'
    res = json.loads(path.read_text())
    timing = root / name / 'wall_time.json'
    wall = (
        json.loads(timing.read_text())['seconds']
        if timing.exists()
        else res['wall_time_s']
    )
    last = [a for a in res['accuracy_matrix'][-1] if a is not None]
    forget = res['forgetting']
    cmd = ' '.join(command(name, Path('ROOT'), extra)[1:]).replace(
        sys.executable, 'python'
    )
    return (
        f"| `{name}` | {res['average_accuracy']:.2f}% | "
        f"{'—' if forget is None else f'{forget:.2f}'} | {last[-1]:.1f} | "
        f'{wall / 60:.1f} min | `python {cmd}` |'
    )


def main(argv):
    extra = list(argv[1:])
    root = Path(_ROOT.value)
    root.mkdir(parents=True, exist_ok=True)
    for name in _METHODS.value:
        methods.get(name)  # unknown names fail here, before any run
        path = root / name / 'results.json'
        if path.exists() and json.loads(path.read_text()).get('complete'):
            print(f'{name}: done', flush=True)
            continue
        start = time.time()
        out = subprocess.run(command(name, root, extra), check=False)
        if out.returncode:
            print(f'{name}: failed ({out.returncode})', flush=True)
            continue
        (root / name / 'wall_time.json').write_text(
            json.dumps({'seconds': time.time() - start}) + '\n'
        )
    rows = [
        '| method | average accuracy | forgetting | newest task % | wall '
        'time | command (ROOT = --root) |',
        '| --- | --- | --- | --- | --- | --- |',
    ]
    for name in _METHODS.value:
        if (root / name / 'results.json').exists():
            rows.append(_row(name, root, extra))
        else:
            rows.append(f'| `{name}` | missing | | | | |')
    table = '\n'.join(rows)
    (root / 'table.md').write_text(table + '\n')
    print(table)


if __name__ == '__main__':
    app.run(main)
