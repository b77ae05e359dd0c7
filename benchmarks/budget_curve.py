r"""Accuracy and objective gap against the budget: Adam DLCFT and the solvers.

The runs are the CIFAR-10 study's (same protocol and driver), one study
variant per budget, class-IL at 32 px, seed 0:

  for n in 1000 3000; do
    python -m experiments.study --grid=class_il_32 --seeds=0 \
        --methods=dlcft,dlcft_kfac,dlcft_head --tag=steps$n \
        --root=runs/study --data=DIR -- --config.train.steps_per_task=$n
  done
  python -m experiments.study --grid=class_il_32 --seeds=0 \
      --methods=dlcft,dlcft_kfac,dlcft_head --root=runs/study --data=DIR
  python -m benchmarks.budget_curve --study_root=runs/study \
      --curve_out=results/cifar10_study/budget_curve

(313 steps per task is the grid itself, untagged.) For each method and
budget this collects the average accuracy after the last task, the sum over
tasks of the objective's gap to its closed-form head optimum
(`experiments/convergence.py`), the last task's objective, and the wall
time, into OUT.json, OUT.md and one plot OUT.png (accuracy and gap against
steps per task and against wall time). A budget whose run is missing or
unfinished is left out and named.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags

_ROOT = flags.DEFINE_string('study_root', 'runs/study', 'The study root.')
_GRID = flags.DEFINE_string('study_grid', 'class_il_32', 'The study grid.')
_METHODS = flags.DEFINE_list(
    'curve_methods', ['dlcft', 'dlcft_kfac', 'dlcft_head'], 'Rows.'
)
_STEPS = flags.DEFINE_list('budgets', ['313', '1000', '3000'], 'Budgets.')
_SEED = flags.DEFINE_integer('curve_seed', 0, 'The seed of the runs.')
_OUT = flags.DEFINE_string(
    'curve_out', 'results/cifar10_study/budget_curve', 'Output path stem.'
)


def folder(root: Path, grid: str, steps: int, method: str, seed: int) -> Path:
    name = grid if steps == 313 else f'{grid}-steps{steps}'
    return root / name / method / f'seed_{seed}'


def point(results: dict, steps: int) -> dict:
    """One (method, budget) point of the curve."""
    per = results['per_task']
    gaps = [p.get('objective_gap') for p in per]
    return {
        'steps_per_task': steps,
        'average_accuracy': results['average_accuracy'],
        'objective_gap_sum': (
            None if any(g is None for g in gaps) else float(sum(gaps))
        ),
        'last_objective': per[-1].get('objective'),
        'wall_time_s': results['wall_time_s'],
    }


def collect(root, grid, methods, budgets, seed):
    curves, missing = {}, []
    for m in methods:
        curves[m] = []
        for n in budgets:
            path = folder(root, grid, n, m, seed) / 'results.json'
            res = json.loads(path.read_text()) if path.exists() else None
            if res is None or not res.get('complete'):
                missing.append(f'{m} at {n} steps')
                continue
            curves[m].append(point(res, n))
    return curves, missing


def table(curves: dict, missing: list[str]) -> str:
    lines = [
        '| method | steps / task | average accuracy | Σ objective gap | '
        'last J_t | wall time |',
        '|---|---|---|---|---|---|',
    ]
    for m, pts in curves.items():
        for p in pts:
            gap = p['objective_gap_sum']
            last = p['last_objective']
            lines.append(
                f'| `{m}` | {p["steps_per_task"]} | '
                f'{p["average_accuracy"]:.2f} % | '
                f'{"-" if gap is None else f"{gap:.3f}"} | '
                f'{"-" if last is None else f"{last:.3f}"} | '
                f'{p["wall_time_s"] / 60:.1f} min |'
            )
    if missing:
        lines.append('')
        lines.append('Not run or unfinished: ' + ', '.join(missing) + '.')
    return '\n'.join(lines) + '\n'


def plot(curves: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for m, pts in curves.items():
        if not pts:
            continue
        steps = [p['steps_per_task'] for p in pts]
        wall = [p['wall_time_s'] / 60 for p in pts]
        acc = [p['average_accuracy'] for p in pts]
        gap = [p['objective_gap_sum'] or float('nan') for p in pts]
        for ax, x in ((axes[0][0], steps), (axes[0][1], wall)):
            ax.plot(x, acc, marker='o', label=m)
        for ax, x in ((axes[1][0], steps), (axes[1][1], wall)):
            ax.plot(x, gap, marker='o', label=m)
    for ax in axes[0]:
        ax.set_ylabel('average accuracy after task 5 (%)')
    for ax in axes[1]:
        ax.set_ylabel('Σ gap to the head optimum')
        ax.set_yscale('log')
    for ax in (axes[0][0], axes[1][0]):
        ax.set_xlabel('steps per task')
        ax.set_xscale('log')
    for ax in (axes[0][1], axes[1][1]):
        ax.set_xlabel('wall time (min)')
    axes[0][0].legend()
    fig.suptitle('class-IL CIFAR-10, EfficientNet-Lite0 32 px, seed 0')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    budgets = [int(s) for s in _STEPS.value]
    curves, missing = collect(
        Path(_ROOT.value), _GRID.value, _METHODS.value, budgets, _SEED.value
    )
    out = Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = table(curves, missing)
    out.with_suffix('.md').write_text(text)
    out.with_suffix('.json').write_text(json.dumps(curves, indent=1) + '\n')
    plot(curves, out.with_suffix('.png'))
    print(text)


if __name__ == '__main__':
    app.run(main)
