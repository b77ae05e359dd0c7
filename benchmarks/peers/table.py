r"""Avalanche's class-IL runs beside ours, as one Markdown table.

  python benchmarks/peers/table.py --avalanche=runs/peers/avalanche \
      --ours=runs/study/class_il_32 --out=results/cifar10_study/avalanche.md

Reads AVALANCHE/STRATEGY_seedS/results.json (benchmarks/peers/
avalanche_class_il.py) and OURS/METHOD/seed_S/results.json (experiments.study)
and writes, for each strategy and seed both have, the average accuracy after
the last task, the forgetting, the accuracy on the newest task, the wall
time of each and the training seconds per step (the step loop alone: no
compilation, set-up, curvature or evaluation), each with the machine's mean
1-minute load during the run (these are 2-core machines shared with other
runs, so compare speeds only at similar load). Avalanche's accuracies are
given under both test rules: the argmax over all 10 classes (Avalanche's
own) and over the classes seen so far (ours). Needs only the standard
library, so it runs outside both environments.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STRATEGIES = ('er', 'der', 'derpp', 'lwf', 'ewc')


def _load(path: Path) -> dict | None:
    if not path.exists():
        return None
    res = json.loads(path.read_text())
    return res if res.get('complete') else None


def _ours(res: dict) -> tuple[float, float, float, float]:
    last = [a for a in res['accuracy_matrix'][-1] if a is not None]
    return (
        res['average_accuracy'],
        res['forgetting'],
        last[-1],
        res['wall_time_s'],
    )


def _ours_speed(res: dict, workdir: Path) -> tuple[float, float | None]:
    """Training seconds per step and the mean load (None: not recorded)."""
    tasks = res['per_task']
    per_step = sum(t['train_s'] for t in tasks) / sum(t['steps'] for t in tasks)
    load_file = workdir / 'load.json'
    load = None
    if load_file.exists():
        rec = json.loads(load_file.read_text())
        load = rec['sum'] / rec['samples'] if rec['samples'] else None
    return per_step, load


def _theirs_speed(res: dict) -> tuple[float, float | None]:
    per_step = sum(res['iteration_loop_s']) / sum(res['iterations'])
    return per_step, res.get('mean_load_1min')


def _speed(per_step: float, load: float | None) -> str:
    return f'{per_step:.3f} s' + ('' if load is None else f' (load {load:.1f})')


def rows(avalanche: Path, ours: Path, seeds=(0, 1, 2)) -> list[str]:
    out = [
        (
            '| method | seed | ours: accuracy / forgetting / newest '
            '| Avalanche, seen-class argmax (our rule) '
            '| Avalanche, 10-way argmax (its rule) '
            '| wall time: ours / Avalanche '
            '| training s/step: ours / Avalanche |'
        ),
        '| --- | --- | --- | --- | --- | --- | --- |',
    ]
    for name in STRATEGIES:
        for seed in seeds:
            a = _load(avalanche / f'{name}_seed{seed}' / 'results.json')
            workdir = ours / name / f'seed_{seed}'
            o = _load(workdir / 'results.json')
            if a is None and o is None:
                continue
            cell = (
                '—'
                if o is None
                else '{:.2f} / {:.2f} / {:.1f}'.format(*_ours(o)[:3])
            )
            if a is None:
                seen = full = '—'
            else:
                seen = '{:.2f} / {:.2f} / {:.1f}'.format(
                    a['average_accuracy_seen_classes'],
                    a['forgetting_seen_classes'],
                    a['newest_seen_classes'],
                )
                full = '{:.2f} / {:.2f} / {:.1f}'.format(
                    a['average_accuracy'], a['forgetting'], a['newest']
                )
            wall = '{} / {}'.format(
                '—' if o is None else f"{o['wall_time_s'] / 60:.1f} min",
                '—' if a is None else f"{a['wall_time_s'] / 60:.1f} min",
            )
            speed = '{} / {}'.format(
                '—' if o is None else _speed(*_ours_speed(o, workdir)),
                '—' if a is None else _speed(*_theirs_speed(a)),
            )
            out.append(
                f'| `{name}` | {seed} | {cell} | {seen} | {full} | {wall} '
                f'| {speed} |'
            )
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--avalanche', default='runs/peers/avalanche')
    p.add_argument('--ours', default='runs/study/class_il_32')
    p.add_argument('--out', default=None)
    args = p.parse_args(argv)
    text = '\n'.join(rows(Path(args.avalanche), Path(args.ours))) + '\n'
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


if __name__ == '__main__':
    main()
