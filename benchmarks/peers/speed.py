r"""Training speed, ours against Avalanche, on the same machine in one run.

  python benchmarks/peers/speed.py \
      --avalanche_python=.venv-avalanche/bin/python \
      --data=../shared/data/cifar10 --strategies=er,derpp

For each strategy, runs our runner (`experiments.run`, the study's class-IL
protocol at 32 px) and then `avalanche_class_il.py` one after the other,
each alone, with the same short budget (`--steps` per task), and prints the
training seconds per step of the third task / experience: the first
compiles (ours) and warms up, the second adds replay (new shapes), the third
is steady state for both (each number covers the whole task, the start of
its data stream included, as the study's tables do). Each process uses
its library's default threads (XLA's pool; torch's `get_num_threads()`).
The table gives the machine's 1-minute load before each run: start it on
an idle machine, these numbers mean little otherwise. Standard library
only (it starts both programs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

STUDY_FLAGS = (
    '--config.backbone.image_size=32',
    '--config.data.num_tasks=5',
    '--config.data.classes_per_task=2',
    '--config.train.batch_size=32',
    '--config.train.first_task_multiplier=1',
    '--config.replay.buffer_size=200',
    '--config.replay.batch_size=32',
    '--config.train.stop_after_tasks=3',
)


def ours(strategy: str, data: str, out: Path, steps: int) -> float:
    """Our training seconds per step on the third task."""
    cmd = [
        sys.executable,
        '-m',
        'experiments.run',
        '--config=experiments/configs/class_il.py:seq_cifar10',
        f'--config.method={strategy}',
        f'--config.data.npz_dir={data}',
        f'--config.train.steps_per_task={steps}',
        f'--config.checkpoint.every_steps={10 * steps}',
        *STUDY_FLAGS,
        f'--workdir={out}',
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    task = json.loads((out / 'results.json').read_text())['per_task'][2]
    return task['train_s'] / task['steps']


def theirs(
    strategy: str, data: str, out: Path, steps: int, python: str
) -> float:
    """Avalanche's training seconds per iteration on the third experience."""
    script = Path(__file__).with_name('avalanche_class_il.py')
    cmd = [
        python,
        str(script),
        f'--strategy={strategy}',
        f'--data={data}',
        f'--out={out}',
        f'--max_iters={steps}',
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    res = json.loads((out / 'results.json').read_text())
    return res['iteration_loop_s'][2] / res['iterations'][2]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--avalanche_python', required=True)
    p.add_argument('--data', default='../shared/data/cifar10')
    p.add_argument('--out', default='runs/peers/speed')
    p.add_argument('--strategies', default='er')
    p.add_argument('--steps', type=int, default=100)
    p.add_argument(
        '--settle', type=float, default=60, help='seconds idle before each run'
    )
    args = p.parse_args(argv)
    if not Path(args.avalanche_python).exists():
        p.error(
            f'--avalanche_python={args.avalanche_python} does not exist: '
            'create the venv (benchmarks/peers/README.md) or pass its python.'
        )
    lines = [
        '| method | ours: s/step (load before) | Avalanche: s/step '
        '(load before) | Avalanche / ours |',
        '| --- | --- | --- | --- |',
    ]
    for s in args.strategies.split(','):
        stamp = time.strftime('%Y%m%d-%H%M%S')
        time.sleep(args.settle)
        load_o = os.getloadavg()[0]
        o = ours(s, args.data, Path(args.out) / f'ours_{s}_{stamp}', args.steps)
        time.sleep(args.settle)
        load_a = os.getloadavg()[0]
        a = theirs(
            s,
            args.data,
            Path(args.out) / f'avalanche_{s}_{stamp}',
            args.steps,
            args.avalanche_python,
        )
        lines.append(
            f'| `{s}` | {o:.3f} ({load_o:.1f}) | {a:.3f} ({load_a:.1f}) '
            f'| {a / o:.1f}x |'
        )
        print(lines[-1], flush=True)
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
