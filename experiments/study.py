r"""The CIFAR-10 study: every method, one budget, several seeds, one table.

  python -m experiments.study --grid=class_il_32 --seeds=0,1,2 \
      --data=../shared/data/cifar10 --root=runs/study
  python -m experiments.study --grid=class_il_32 --root=runs/study --collect \
      --export=results/cifar10_study

A grid is a setting, an input size and a list of methods (`GRIDS`). Every
run of every grid has the same protocol (`PROTOCOL`): all of CIFAR-10 in 5
tasks (class-IL / task-IL: 2 classes per task in natural order; data-IL: 5
random chunks of 10,000 images), EfficientNet-Lite0 with its ImageNet
weights, one epoch per task (313 steps of 32 current-task images, no longer
first task), the same crop + flip augmentation, and for the methods with a
replay buffer 32 replayed images per step from a 200-image reservoir (in
class-IL every method that trains with labels, `CLASS_IL_PROTOCOL`; in
task-IL and data-IL only er, der and derpp). Each run is one
`python -m experiments.run` process in ROOT/GRID/METHOD/seed_S;
extra `--config.*` flags after `--` go to every run (give them a `--tag`,
which names the variant's folder ROOT/GRID-TAG).

Seeds: seed 0 of every method runs first. Seeds above 0 then run for
`dlcft` and the three methods with the best seed-0 average accuracy other
than `dlcft`, `joint` and `joint_finetune` (bounds, not competitors): the
choice is made from the seed-0 table by this code, not by hand. A grid marked
`repeat='all'` repeats every method instead.

A run whose results.json is complete is skipped; an interrupted one resumes
from its checkpoints (the runner's own resume). A failed run is reported
and the grid goes on. `--collect` only aggregates. The aggregate, written to
ROOT/GRID.md and ROOT/GRID.png (and with `--export=DIR`, to DIR together with
each run's results.json, without checkpoints), has one row per method:
average accuracy after the last task, forgetting, accuracy on the newest
task after it, each as mean ± standard deviation over the seeds (sample
std, n − 1), and the wall time of a run (the runner's own clock,
compilation included, summed over resumes).

Methods that are the same run are run once: the ablation grid's
`kfac_lin_mse` is `dlcft` and `kfac_nonlin_sce` is `osla` (see
experiments/methods.py); the table says so.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from absl import app, flags

from experiments import methods

#: Flags every run of the study gets: the budget and data of the protocol.
PROTOCOL = (
    '--config.data.num_tasks=5',
    '--config.data.classes_per_task=2',
    '--config.train.batch_size=32',
    '--config.train.steps_per_task=313',  # one epoch of 10,000 images
    '--config.train.first_task_multiplier=1',
    '--config.replay.batch_size=32',
    '--config.checkpoint.every_steps=100',
)

#: Class-IL only: every method that replays labels gets the 200-image
#: buffer, as in the paper's class-IL table. Elsewhere the runner's default
#: applies: the buffer methods (er, der, derpp) get 200 images, every other
#: method none (the paper's task-IL and data-IL methods use no buffer).
CLASS_IL_PROTOCOL = ('--config.replay.buffer_size=200',)

#: Runs that are another method's run (same preset, same buffer).
SAME_AS = {'kfac_lin_mse': 'dlcft', 'kfac_nonlin_sce': 'osla'}


@dataclasses.dataclass(frozen=True)
class Grid:
    """One table of the study.

    Attributes:
      setting: 'class_il', 'task_il' or 'data_il'.
      image_size: input size of the backbone (CIFAR images are resized).
      methods: the rows, in the table's order (aliases of SAME_AS allowed).
      repeat: 'top3' (seeds > 0 for dlcft and the three best others) or
        'all' (every method gets every seed).
    """

    setting: str
    image_size: int
    methods: tuple[str, ...]
    repeat: str = 'top3'


_ABLATION = (
    'kfac_lin_mse',
    'kfac_lin_sce',
    'kfac_nonlin_mse',
    'kfac_nonlin_sce',
)

GRIDS = {
    'class_il_32': Grid(
        'class_il',
        32,
        (
            'dlcft',
            'ncm',
            'ranpac',
            'joint',
            'joint_finetune',
            'er',
            'derpp',
            'der',
            'finetune',
            'osla',
            *_ABLATION,
            'lwf',  # with the buffer, as every class-IL method; the
            'ewc',  # Avalanche comparison's other two
        ),
    ),
    'task_il_32': Grid(
        'task_il',
        32,
        (
            'dlcft',
            'joint',
            'joint_finetune',
            'finetune',
            'ewc',
            'lwf',
            'osla',
            'er',
            'der',
            'derpp',
        ),
    ),
    'data_il_32': Grid(
        'data_il',
        32,
        (
            'dlcft',
            'joint',
            'joint_finetune',
            'ncm',
            'ranpac',
            'finetune',
            'ewc',
            'mas',
            'lwf',
            'osla',
            *_ABLATION,
        ),
    ),
    'class_il_64': Grid(
        'class_il',
        64,
        ('dlcft', 'er', 'derpp', 'ncm', 'ranpac', 'joint', 'joint_finetune'),
        repeat='all',
    ),
}

_GRID = flags.DEFINE_enum('grid', None, sorted(GRIDS), 'The table to fill.')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds (seed 0 is always first).')
_ROOT = flags.DEFINE_string('root', 'runs/study', 'Folder of all runs.')
_DATA = flags.DEFINE_string(
    'data',
    None,
    'Folder with CIFAR-10 train.npz / test.npz; None: tfds `cifar10`.',
)
_METHODS = flags.DEFINE_list(
    'methods', None, "Only these rows of the grid (default: the grid's)."
)
_TAG = flags.DEFINE_string(
    'tag', None, 'Names a variant (required with extra --config flags).'
)
_COLLECT = flags.DEFINE_bool('collect', False, 'Only write the aggregate.')
_EXPORT = flags.DEFINE_string(
    'export', None, 'Also copy the aggregate and every results.json here.'
)


# ---------------------------------------------------------------------------
# Runs.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Study:
    """Where a grid's runs live and how each is launched."""

    grid: Grid
    name: str  # the grid's name, with '-TAG' for a variant
    root: Path
    data: str | None = None
    extra: tuple[str, ...] = ()

    def workdir(self, method: str, seed: int) -> Path:
        return (
            self.root / self.name / SAME_AS.get(method, method) / f'seed_{seed}'
        )

    def command(self, method: str, seed: int, workdir: str | None = None):
        g = self.grid
        data = (f'--config.data.npz_dir={self.data}',) if self.data else ()
        return [
            'python',
            '-m',
            'experiments.run',
            f'--config=experiments/configs/{g.setting}.py:seq_cifar10',
            f'--config.method={SAME_AS.get(method, method)}',
            f'--config.seed={seed}',
            f'--config.backbone.image_size={g.image_size}',
            *data,
            *PROTOCOL,
            *(CLASS_IL_PROTOCOL if g.setting == 'class_il' else ()),
            *self.extra,
            f'--workdir={workdir or self.workdir(method, seed)}',
        ]


def results(path: Path) -> dict | None:
    """A run's results.json if it is complete, else None."""
    path = path / 'results.json'
    if not path.exists():
        return None
    res = json.loads(path.read_text())
    return res if res.get('complete') else None


def _launch(study: Study, method: str, seed: int) -> int:
    """Runs (or resumes) one run; its output is appended to stdout.log.

    The machine's 1-minute load average is sampled every 15 s while the run
    goes and summed into load.json over resumes, so that the table can say
    which wall times were measured on a shared CPU.
    """
    workdir = study.workdir(method, seed)
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = study.command(method, seed)
    cmd[0] = sys.executable
    load_file = workdir / 'load.json'
    load = (
        json.loads(load_file.read_text())
        if load_file.exists()
        else {'sum': 0.0, 'samples': 0, 'cpus': os.cpu_count()}
    )
    with open(workdir / 'stdout.log', 'a') as log:
        log.write(f'\n$ {" ".join(cmd[1:])}\n')
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while True:
            try:
                rc = proc.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                load['sum'] += os.getloadavg()[0]
                load['samples'] += 1
    load_file.write_text(json.dumps(load) + '\n')
    return rc


def mean_load(workdir: Path) -> float | None:
    """The mean 1-minute load average during a run (None: not recorded)."""
    path = workdir / 'load.json'
    if not path.exists():
        return None
    load = json.loads(path.read_text())
    return load['sum'] / load['samples'] if load['samples'] else None


def unique(names: Sequence[str]) -> list[str]:
    """The runs behind `names` (aliases folded), in order."""
    out = []
    for n in names:
        n = SAME_AS.get(n, n)
        if n not in out:
            out.append(n)
    return out


def repeated(study: Study, names: Sequence[str]) -> list[str] | None:
    """The methods that get seeds > 0; None while seed 0 is unfinished."""
    runs = unique(names)
    if study.grid.repeat == 'all':
        return runs
    acc = {}
    for n in runs:
        res = results(study.workdir(n, 0))
        if res is None:
            return None
        acc[n] = res['average_accuracy']
    others = sorted(
        (n for n in runs if n != 'dlcft' and methods.get(n).trainer != 'joint'),
        key=lambda n: -acc[n],
    )
    return [n for n in runs if n == 'dlcft' or n in others[:3]]


def run_grid(
    study: Study,
    names: Sequence[str],
    seeds: Sequence[int],
    launch: Callable[[Study, str, int], int] = _launch,
) -> dict[tuple[str, int], str]:
    """Runs what is missing: seed 0 of every method, then the other seeds.

    Returns:
      {(method, seed): 'done' | 'ran' | 'failed (rc)'} for every run tried.
    """
    status = {}

    def go(n, s):
        if results(study.workdir(n, s)) is not None:
            status[n, s] = 'done'
            return
        print(f'[{study.name}] {n} seed {s}: running', flush=True)
        rc = launch(study, n, s)
        status[n, s] = 'ran' if rc == 0 else f'failed ({rc})'
        print(f'[{study.name}] {n} seed {s}: {status[n, s]}', flush=True)

    rest = sorted(s for s in seeds if s != 0)
    if 0 in seeds or rest:
        for n in unique(names):
            go(n, 0)
    if rest:
        chosen = repeated(study, names)
        if chosen is None:
            print(
                f'[{study.name}] seed 0 is unfinished (a run failed): '
                'seeds > 0 wait for it.',
                flush=True,
            )
            return status
        print(f'[{study.name}] seeds {rest} for {chosen}', flush=True)
        for s in rest:
            for n in chosen:
                go(n, s)
    return status


# ---------------------------------------------------------------------------
# Aggregate.
# ---------------------------------------------------------------------------


def _newest(res: dict) -> float | None:
    """Accuracy on the newest task after the last task (None for joint)."""
    if res.get('joint'):
        return None
    return [a for a in res['accuracy_matrix'][-1] if a is not None][-1]


def _curve(res: dict) -> list[float]:
    """Average accuracy on the seen tasks after each task."""
    return [
        float(np.mean([a for a in row if a is not None]))
        for row in res['accuracy_matrix']
    ]


def _stat(values: list[float | None], digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return '—'
    if len(values) == 1:
        return f'{values[0]:.{digits}f}'
    return f'{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}'


@dataclasses.dataclass
class Row:
    method: str
    runs: list[dict]
    seeds: list[int]
    loads: list[float | None] = dataclasses.field(default_factory=list)

    @property
    def accuracy(self) -> list[float]:
        return [r['average_accuracy'] for r in self.runs]


def collect(study: Study, names: Sequence[str]) -> list[Row]:
    """One row per method name with every complete seed's results."""
    rows = []
    for n in names:
        base = study.root / study.name / SAME_AS.get(n, n)
        runs, seeds, loads = [], [], []
        for d in sorted(base.glob('seed_*'), key=lambda p: int(p.name[5:])):
            res = results(d)
            if res is not None:
                runs.append(res)
                seeds.append(int(d.name[5:]))
                loads.append(mean_load(d))
        rows.append(Row(n, runs, seeds, loads))
    return rows


def table(study: Study, rows: list[Row]) -> str:
    """The Markdown table of a grid (rows sorted by mean accuracy)."""
    g = study.grid
    head = [
        (
            f'### {study.name}: {g.setting}, CIFAR-10 5 tasks, '
            f'EfficientNet-Lite0 at {g.image_size} px'
        ),
        '',
        (
            '| method | seeds | average accuracy % | forgetting '
            '| newest task % | wall time / run | after each task (mean) |'
        ),
        '| --- | --- | --- | --- | --- | --- | --- |',
    ]
    done = sorted(
        (r for r in rows if r.runs), key=lambda r: -np.mean(r.accuracy)
    )
    body = []
    for r in done:
        name = f'`{r.method}`'
        if r.method in SAME_AS:
            name += f' (= `{SAME_AS[r.method]}`)'
        wall = np.mean([x['wall_time_s'] for x in r.runs]) / 60
        known = [x for x in r.loads if x is not None]
        load = f' (load {np.mean(known):.1f})' if known else ''
        mean_curve = np.mean([_curve(x) for x in r.runs], 0)
        curve = ' / '.join(f'{a:.1f}' for a in mean_curve)
        body.append(
            f'| {name} | {",".join(map(str, r.seeds))} | '
            f'{_stat(r.accuracy)} | '
            f'{_stat([x["forgetting"] for x in r.runs])} | '
            f'{_stat([_newest(x) for x in r.runs], 1)} | '
            f'{wall:.1f} min{load} | {curve} |'
        )
    body += [
        f'| `{r.method}` | — | not run yet | | | | |'
        for r in rows
        if not r.runs
    ]
    cmd = ' '.join(study.command('METHOD', 0, 'ROOT/METHOD/seed_S'))
    cmd = cmd.replace('--config.seed=0', '--config.seed=S')
    foot = [
        '',
        'Every run: `' + cmd + '`. '
        'Mean ± sample std over the seeds listed; forgetting is the mean drop '
        'from the best accuracy on each earlier task to its final one '
        '(undefined for `joint`, one run on the union); newest task: '
        'accuracy on the last task after training on it; after each task: the '
        'average accuracy on the tasks seen so far. Wall time: the runner\'s '
        'own clock (compilation included); load: the mean 1-minute load '
        'average of the machine during the run where it was recorded (one '
        'run alone loads these 2 cores to about 2-3; two runs side by side, '
        'about 4-5, and each takes longer).',
    ]
    return '\n'.join(head + body + foot) + '\n'


def plot(study: Study, rows: list[Row], path: Path) -> None:
    """Average accuracy after each task (mean ± std over seeds) and the final
    average accuracy per method."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    done = sorted(
        (r for r in rows if r.runs and r.method not in SAME_AS),
        key=lambda r: -np.mean(r.accuracy),
    )
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap('tab20').colors
    styles = iter(('--', ':', '-.'))
    for i, r in enumerate(done):
        curves = np.array([_curve(x) for x in r.runs])
        if curves.shape[1] == 1:  # joint: one evaluation at the end
            left.axhline(
                curves.mean(),
                ls=next(styles, '--'),
                c='k',
                lw=1,
                label=r.method,
            )
            continue
        x = np.arange(1, curves.shape[1] + 1)
        (line,) = left.plot(
            x,
            curves.mean(0),
            marker='o',
            label=r.method,
            color=colors[i % len(colors)],
            lw=2.5 if r.method == 'dlcft' else 1.2,
        )
        if len(curves) > 1:
            sd = curves.std(0, ddof=1)
            left.fill_between(
                x,
                curves.mean(0) - sd,
                curves.mean(0) + sd,
                color=line.get_color(),
                alpha=0.2,
            )
    left.set_xticks(
        range(1, 1 + max(len(r.runs[0]['accuracy_matrix']) for r in done))
    )
    left.set_xlabel('tasks learned')
    left.set_ylabel('average accuracy on seen tasks (%)')
    left.legend(fontsize=7, ncol=2)
    left.grid(alpha=0.3)
    names = [r.method for r in done][::-1]
    means = [np.mean(r.accuracy) for r in done][::-1]
    sds = [np.std(r.accuracy, ddof=1) if len(r.runs) > 1 else 0 for r in done][
        ::-1
    ]
    colors = ['C3' if n == 'dlcft' else 'C0' for n in names]
    right.barh(names, means, xerr=sds, color=colors, capsize=3)
    right.set_xlabel('average accuracy after the last task (%)')
    right.grid(alpha=0.3, axis='x')
    fig.suptitle(
        f'{study.name}: {study.grid.setting}, CIFAR-10, EfficientNet-Lite0 '
        f'at {study.grid.image_size} px'
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def export(study: Study, rows: list[Row], out: Path, text: str) -> None:
    """The aggregate, the plot and each run's results.json under `out`."""
    dest = out / study.name
    dest.mkdir(parents=True, exist_ok=True)
    for r in rows:
        if r.method in SAME_AS:
            continue
        for s in r.seeds:
            src = study.workdir(r.method, s) / 'results.json'
            d = dest / r.method / f'seed_{s}'
            d.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, d / 'results.json')
    kinds = sorted(
        {
            f"{x.get('device_kind', '?')} ({x.get('platform', '?')})"
            for r in rows
            for x in r.runs
        }
    )
    stamp = (
        f'Aggregated {datetime.date.today().isoformat()} on {_machine()}; '
        f'the runs ran on {", ".join(kinds) or "-"}.\n\n'
    )
    (out / f'{study.name}.md').write_text(stamp + text)
    shutil.copyfile(study.root / f'{study.name}.png', out / f'{study.name}.png')


def _machine() -> str:
    """The CPU the aggregate was made on (its model name on Linux)."""
    cpu = platform.processor() or platform.machine()
    info = Path('/proc/cpuinfo')
    if info.exists():
        names = [
            line.split(':', 1)[1].strip()
            for line in info.read_text().splitlines()
            if line.startswith('model name')
        ]
        cpu = names[0] if names else cpu
    return f'{os.cpu_count()} CPU cores ({cpu})'


def variant_flags(
    folder: Path, extra: tuple[str, ...], collect: bool
) -> tuple[str, ...]:
    """The extra --config flags of a variant's runs, kept in
    FOLDER/variant_flags.json: written by its first run, read back when the
    same variant is collected or continued, and a different set is
    refused (its runs would not be one variant)."""
    path = folder / 'variant_flags.json'
    if path.exists():
        saved = tuple(json.loads(path.read_text()))
        if extra and extra != saved:
            raise app.UsageError(
                f'{folder} holds runs made with {list(saved)}, not '
                f'{list(extra)}: give the same flags (or none), or a new '
                '--tag.'
            )
        return saved
    if extra and not collect:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(list(extra)) + '\n')
    return extra


def main(argv):
    extra = tuple(argv[1:])
    bad = [a for a in extra if not a.startswith('--config.')]
    if bad:
        raise app.UsageError(f'Only --config.* flags may follow --, got {bad}.')
    if extra and not _TAG.value:
        raise app.UsageError(
            'Extra --config flags change the runs: name the variant with '
            '--tag=NAME so that its runs get their own folder.'
        )
    grid = GRIDS[_GRID.value]
    names = _METHODS.value or list(grid.methods)
    unknown = [n for n in names if n not in methods.METHODS]
    if unknown:
        raise app.UsageError(f'Unknown methods {unknown}.')
    try:
        seeds = sorted({int(s) for s in _SEEDS.value})
    except ValueError:
        raise app.UsageError(
            f'--seeds must be integers, got {_SEEDS.value}.'
        ) from None
    name = _GRID.value + (f'-{_TAG.value}' if _TAG.value else '')
    extra = variant_flags(Path(_ROOT.value) / name, extra, _COLLECT.value)
    study = Study(grid, name, Path(_ROOT.value), _DATA.value, extra)
    if not _COLLECT.value:
        run_grid(study, names, seeds)
    rows = collect(study, names)
    text = table(study, rows)
    study.root.mkdir(parents=True, exist_ok=True)
    (study.root / f'{name}.md').write_text(text)
    plot(study, rows, study.root / f'{name}.png')
    if _EXPORT.value:
        export(study, rows, Path(_EXPORT.value), text)
    print(text)


if __name__ == '__main__':
    flags.mark_flag_as_required('grid')
    app.run(main)
