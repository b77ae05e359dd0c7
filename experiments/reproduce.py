r"""The paper's result tables: the runs that fill them, and ours beside theirs.

  python -m experiments.reproduce --plan [--runs_root=runs/paper] \
      [--backbone_cifar=FILE] [--backbone_mit67=FILE] [--mit67_dir=DIR] \
      [--seeds=0,1,2]
  python -m experiments.reproduce --runs DIR [DIR ...] --out TABLES.md

`--plan` prints the one-time preparation (data and backbones) and then, table
by table, the exact `python -m experiments.run` command of every cell of the
three result tables of DLCFT (Shon et al., ECCV 2022, arXiv:2208.08112): the
data-IL table, the task-IL / class-IL table and the linearization × loss
ablation. A run that fills several cells (DLCFT is also the ablation's
"linearized + MSE" entry, OSLA its "non-linear + SCE" one, the joint-training
run serves both Seq-CIFAR-100 columns) is printed once, with the list of the
cells it fills. Run directories are `RUNS_ROOT/SETTING-BENCHMARK-METHOD`
(`-seedS` with `--seeds`); the placeholders CIFAR_BACKBONE, MIT67_BACKBONE and
MIT67_DIR stay in the commands unless the matching flag fills them.

Without `--plan` (or with `--runs`) the script reads the `results.json` of
finished runs (each DIR is a run directory, a `results.json` file, or a folder
searched recursively; default: `--runs_root`) and writes every table in
Markdown to `--out` (default `RUNS_ROOT/tables.md`): for each cell the paper's
number, ours and ours − paper. A cell without a run is shown as "—"; a run
that stopped early as its partial value with "(partial, k/T tasks)" and no
difference; several runs of one cell (seeds) as mean ± sample std with n.
Runs that fill no cell are listed at the end. It prints the path written.

The paper's numbers are in `TABLES` below, with the place each comes from.
They were read from the ECCV 2022 poster, whose row labels were partly lost:
the labels of data-IL rows 1–4 are inferred and flagged wherever they appear.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from absl import app, flags

PAPER = 'Shon et al., DLCFT, ECCV 2022 (arXiv:2208.08112)'

# ---------------------------------------------------------------------------
# The paper's numbers.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of a table: a setting on a benchmark.

    Attributes:
      setting: 'data_il', 'task_il' or 'class_il' (the config file's name).
      benchmark: the config parameter, e.g. 'seq_cifar100'.
      label: the column heading.
    """

    setting: str
    benchmark: str
    label: str


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a table.

    Attributes:
      method: the row's method name (`--config.method`, before `RUN_METHOD`).
      label: the row heading.
      paper: one value per column (% average accuracy after the last task);
        None where the paper reports nothing.
      source: where in the paper the numbers are.
      notes: keys of `NOTES` that apply to the whole row.
      cell_notes: (column index, note key) pairs for single cells.
      run_benchmark: (column index, benchmark) pairs: cells filled by a run on
        another benchmark than the column's (joint training).
    """

    method: str
    label: str
    paper: tuple[float | None, ...]
    source: str
    notes: tuple[str, ...] = ()
    cell_notes: tuple[tuple[int, str], ...] = ()
    run_benchmark: tuple[tuple[int, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Table:
    """One result table of the paper.

    Attributes:
      key: an identifier.
      short: a short name, used where a cell is named.
      title: the heading.
      source: where in the paper the table is.
      columns: the columns.
      rows: the rows.
    """

    key: str
    short: str
    title: str
    source: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]


_POSTER = "the ECCV 2022 poster's"

#: Every paper number used here, with its table and row in the paper.
TABLES: tuple[Table, ...] = (
    Table(
        key='data_il',
        short='data-IL',
        title='Data-IL: average accuracy (%) after the final task',
        source=f'{_POSTER} data-IL table',
        columns=(
            Column('data_il', 'seq_cifar100', 'Seq-CIFAR-100 (10 tasks)'),
            Column('data_il', 'seq_cifar100_100', 'Seq-CIFAR-100 (100 tasks)'),
            Column('data_il', 'seq_mit67', 'Seq-MIT-67 (4 tasks)'),
        ),
        rows=(
            Row(
                'ewc',
                'EWC',
                (78.74, 71.83, 63.48),
                'data-IL table, row 1',
                notes=('inferred_ewc_mas',),
            ),
            Row(
                'lwf',
                'LwF',
                (80.25, 70.95, 67.21),
                'data-IL table, row 2',
                notes=('inferred_lwf',),
            ),
            Row(
                'mas',
                'MAS',
                (78.88, 72.61, 63.68),
                'data-IL table, row 3',
                notes=('inferred_ewc_mas',),
            ),
            Row(
                'finetune',
                'Fine-tuning',
                (75.24, 52.50, 62.49),
                'data-IL table, row 4',
                notes=('inferred_finetune',),
            ),
            Row(
                'osla',
                'OSLA',
                (79.23, 73.10, 64.08),
                'data-IL table, row 5',
                cell_notes=((1, 'osla_100'),),
            ),
            Row(
                'kfac_nonlin_mse',
                'DLCFT w/o linearization',
                (81.95, 75.92, 70.55),
                'data-IL table, row 6',
            ),
            Row(
                'dlcft', 'DLCFT', (82.70, 80.07, 70.52), 'data-IL table, row 7'
            ),
            Row(
                'joint',
                'Joint training (upper bound)',
                (83.57, 83.57, 74.40),
                'data-IL table, row 8',
                notes=('joint',),
                run_benchmark=((1, 'seq_cifar100'),),
            ),
        ),
    ),
    Table(
        key='task_class_il',
        short='task-IL / class-IL',
        title=(
            'Task-IL and class-IL on Seq-CIFAR-100 (10 tasks): average '
            'accuracy (%) after the final task'
        ),
        source=f'{_POSTER} task-IL / class-IL table',
        columns=(
            Column('task_il', 'seq_cifar100', 'Task-IL'),
            Column('class_il', 'seq_cifar100', 'Class-IL'),
        ),
        rows=(
            Row('lwf', 'LwF', (92.16, None), 'task-IL / class-IL table, LwF'),
            Row('ewc', 'EWC', (77.44, None), 'task-IL / class-IL table, EWC'),
            Row(
                'osla', 'OSLA', (81.03, None), 'task-IL / class-IL table, OSLA'
            ),
            Row(
                'dlcft',
                'DLCFT',
                (95.79, 59.98),
                'task-IL / class-IL table, DLCFT (task-IL) and DLCFT with a '
                'small replay buffer (class-IL)',
                cell_notes=((1, 'dlcft_buffer'),),
            ),
            Row(
                'er',
                'ER',
                (79.14, 43.52),
                'task-IL / class-IL table, ER',
                notes=('buffer',),
            ),
            Row(
                'der',
                'DER',
                (91.47, 58.07),
                'task-IL / class-IL table, DER',
                notes=('buffer',),
            ),
            Row(
                'derpp',
                'DER++',
                (91.56, 53.29),
                'task-IL / class-IL table, DER++',
                notes=('buffer',),
            ),
        ),
    ),
    Table(
        key='ablation',
        short='ablation',
        title=(
            'Ablation, linearization × loss (all with the K-FAC penalty): '
            'average accuracy (%) after the final task'
        ),
        source=f'{_POSTER} ablation table',
        columns=(
            Column('data_il', 'seq_cifar100', 'Data-IL, 10 tasks'),
            Column('data_il', 'seq_cifar100_100', 'Data-IL, 100 tasks'),
            Column('class_il', 'seq_cifar100', 'Class-IL, 10 tasks'),
        ),
        rows=(
            Row(
                'kfac_nonlin_sce',
                'non-linear + SCE (= OSLA)',
                (79.23, 73.51, 44.93),
                'ablation table, row 1',
                cell_notes=((1, 'osla_100'),),
            ),
            Row(
                'kfac_nonlin_mse',
                'non-linear + MSE',
                (81.95, 75.92, 59.86),
                'ablation table, row 2',
            ),
            Row(
                'kfac_lin_sce',
                'linearized + SCE',
                (79.58, 73.18, 44.66),
                'ablation table, row 3',
            ),
            Row(
                'kfac_lin_mse',
                'linearized + MSE (= DLCFT)',
                (82.70, 80.07, 59.98),
                'ablation table, row 4',
            ),
        ),
    ),
)

#: Methods that are the same run as another method (one run fills both).
RUN_METHOD = {'kfac_lin_mse': 'dlcft', 'kfac_nonlin_sce': 'osla'}

#: Footnotes, by key.
NOTES = {
    'inferred_ewc_mas': (
        'Row label inferred: the poster lost the labels of data-IL rows 1-4. '
        'Rows 1 and 3 are EWC and MAS in some order (here row 1 = EWC, row 3 '
        '= MAS); EWC and MAS may be swapped.'
    ),
    'inferred_lwf': (
        'Row label inferred (row 2): probably LwF, the best baseline with '
        'few tasks and the weakest regularizer with 100 tasks.'
    ),
    'inferred_finetune': (
        'Row label inferred (row 4): probably fine-tuning, which has no '
        'regularizer and collapses with 100 small tasks.'
    ),
    'osla_100': (
        'The paper gives 73.10 (data-IL table) and 73.51 (ablation) for what '
        'should be the same run (non-linear network, SCE, K-FAC = OSLA); one '
        'of them is probably a transcription error. Our run is compared with '
        'each.'
    ),
    'joint': (
        'The paper has one joint-training number for Seq-CIFAR-100: the '
        'training data of 10 and 100 tasks is the same, so one run '
        '(data_il.py:seq_cifar100, method joint) fills both columns. Which '
        'model (linearized or not) the paper trained jointly is not known.'
    ),
    'dlcft_buffer': (
        'Class-IL DLCFT uses a small replay buffer; the paper does not give '
        'its size (here config.replay.buffer_size of class_il.py).'
    ),
    'buffer': (
        'Replay baseline; the paper does not give the buffer size (here '
        'config.replay.buffer_size of the config).'
    ),
}

# ---------------------------------------------------------------------------
# Cells and the runs that fill them.
# ---------------------------------------------------------------------------

RunKey = tuple[str, str, str]  # (setting, benchmark, method)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One reported number of the paper and the run that should match it."""

    table: Table
    row: Row
    column: Column
    index: int
    paper: float
    run: RunKey
    notes: tuple[str, ...]

    @property
    def name(self) -> str:
        return f'{self.table.short}: {self.row.label} / {self.column.label}'

    @property
    def inferred(self) -> bool:
        return any(n.startswith('inferred') for n in self.notes)


def run_method(method: str) -> str:
    """The method name of the run that fills a row's cells."""
    return RUN_METHOD.get(method, method)


def cells(tables: Sequence[Table] = TABLES) -> list[Cell]:
    """Every reported cell of the tables, in reading order."""
    out = []
    for table in tables:
        for row in table.rows:
            override = dict(row.run_benchmark)
            extra = {}
            for i, note in row.cell_notes:
                extra.setdefault(i, []).append(note)
            for i, (column, value) in enumerate(
                zip(table.columns, row.paper, strict=True)
            ):
                if value is None:
                    continue
                benchmark = override.get(i, column.benchmark)
                key = (column.setting, benchmark, run_method(row.method))
                notes = row.notes + tuple(extra.get(i, ()))
                out.append(Cell(table, row, column, i, value, key, notes))
    return out


def runs_needed(tables: Sequence[Table] = TABLES) -> dict[RunKey, list[Cell]]:
    """The distinct runs of the tables, each with the cells it fills."""
    out: dict[RunKey, list[Cell]] = {}
    for cell in cells(tables):
        out.setdefault(cell.run, []).append(cell)
    return out


def workdir_name(key: RunKey, seed: int | None = None) -> str:
    """`SETTING-BENCHMARK-METHOD[-seedS]`, the run's folder under RUNS_ROOT."""
    name = '-'.join(key)
    return name if seed is None else f'{name}-seed{seed}'


def command(
    key: RunKey,
    runs_root: str,
    *,
    backbone_cifar: str | None = None,
    backbone_mit67: str | None = None,
    mit67_dir: str | None = None,
    seed: int | None = None,
) -> str:
    """The `python -m experiments.run` command line of one run."""
    setting, benchmark, method = key
    parts = [
        'python -m experiments.run',
        f'--config=experiments/configs/{setting}.py:{benchmark}',
        f'--config.method={method}',
    ]
    if benchmark == 'seq_mit67':
        parts += [
            '--config.backbone.checkpoint='
            + shlex.quote(backbone_mit67 or 'MIT67_BACKBONE'),
            '--config.data.mit67_dir=' + shlex.quote(mit67_dir or 'MIT67_DIR'),
        ]
    else:
        parts.append(
            '--config.backbone.checkpoint='
            + shlex.quote(backbone_cifar or 'CIFAR_BACKBONE')
        )
    if seed is not None:
        parts.append(f'--config.seed={seed}')
    workdir = os.path.join(runs_root, workdir_name(key, seed))
    parts.append('--workdir=' + shlex.quote(workdir))
    return ' '.join(parts)


def _note_tags(notes: Iterable[str]) -> str:
    tags = []
    if any(n.startswith('inferred') for n in notes):
        tags.append('row label inferred')
    if 'inferred_ewc_mas' in notes:
        tags.append('EWC and MAS may be swapped')
    if 'osla_100' in notes:
        tags.append('paper: 73.10 in the data-IL table, 73.51 in the ablation')
    return f' [{"; ".join(tags)}]' if tags else ''


def _cell_phrase(cell: Cell) -> str:
    return (
        f'{cell.row.label} / {cell.column.label}: paper {cell.paper:.2f}'
        f'{_note_tags(cell.notes)}'
    )


def plan_text(
    runs_root: str = 'runs/paper',
    *,
    backbone_cifar: str | None = None,
    backbone_mit67: str | None = None,
    mit67_dir: str | None = None,
    seeds: Sequence[int] = (),
    tables: Sequence[Table] = TABLES,
) -> str:
    """The preparation and every table's commands, as printed by `--plan`."""
    needed = runs_needed(tables)
    n_cells = sum(len(c) for c in needed.values())
    seed_list: list[int | None] = list(seeds) or [None]
    cifar = backbone_cifar or 'CIFAR_BACKBONE'
    pretrain_dir = os.path.join(runs_root, 'pretrain_imagenet32')
    lines = [
        f'# The result tables of {PAPER}:',
        f'# {len(needed)} runs fill {n_cells} cells'
        + (f', each run with seeds {list(seeds)}.' if seeds else '.'),
        '',
        '## One-time preparation',
        '',
        '# CIFAR-100 for tfds, once, on a machine with TensorFlow and internet'
        ' (the runs',
        '# read it without TensorFlow; add --data_dir=DIR and pass',
        '# --config.data.tfds_data_dir=DIR to the runs to use another folder):',
        'pip install tensorflow && tfds build cifar100 '
        '--file_format=array_record',
        '# The CIFAR backbone: CIFAR ResNet-18 (leaky ReLU) pre-trained on '
        'ImageNet 32x32',
        '# (needs `tfds build imagenet_resized/32x32 '
        '--file_format=array_record --data_dir=DIR`',
        f'# first); CIFAR_BACKBONE = {runs_root}/pretrain_imagenet32/'
        'backbone.npz:',
        'python -m experiments.pretrain '
        '--config=experiments/configs/pretrain_imagenet32.py '
        f'--workdir={shlex.quote(pretrain_dir)} '
        '--config.data.tfds_data_dir=DIR',
        '# MIT67_BACKBONE: torchvision ResNet-18 ImageNet weights '
        '(resnet18-f37072fd.pth), or',
        '# the leaky-ReLU re-tuned backbone.npz of '
        'experiments/configs/retune_imagenet_resnet18.py.',
        '# MIT67_DIR: MIT Indoor-67 '
        '(https://web.mit.edu/torralba/www/indoor.html), a folder with',
        '# Images/, TrainImages.txt and TestImages.txt.',
    ]
    if backbone_cifar:
        lines.append(f'# CIFAR_BACKBONE is {cifar} here.')
    printed: dict[RunKey, str] = {}
    for table in tables:
        lines += [
            '',
            f'## {table.title}',
            f'# Paper numbers: {table.source}.',
            '',
        ]
        for cell in cells([table]):
            key = cell.run
            if key in printed:
                lines.append(
                    f'# {_cell_phrase(cell)}: the run above, {printed[key]}'
                )
                continue
            fills = needed[key]
            if len(fills) == 1:
                lines.append(f'# {_cell_phrase(cell)}')
            else:
                lines.append(f'# One run fills {len(fills)} cells:')
                for other in fills:
                    lines.append(
                        f'#   {other.table.short}: {_cell_phrase(other)}'
                    )
            for seed in seed_list:
                lines.append(
                    command(
                        key,
                        runs_root,
                        backbone_cifar=backbone_cifar,
                        backbone_mit67=backbone_mit67,
                        mit67_dir=mit67_dir,
                        seed=seed,
                    )
                )
            printed[key] = ', '.join(
                os.path.join(runs_root, workdir_name(key, s)) for s in seed_list
            )
    used = list(dict.fromkeys(n for c in cells(tables) for n in c.notes))
    if used:
        lines += ['', '## Notes', '']
        lines += [f'# {NOTES[n]}' for n in used]
    lines += [
        '',
        '## Tables',
        '',
        '# When runs have finished (partial runs are shown as such):',
        'python -m experiments.reproduce '
        f'--runs {shlex.quote(runs_root)} '
        f'--out {shlex.quote(os.path.join(runs_root, "tables.md"))}',
    ]
    return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------
# Reading runs.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What the tables need from one `results.json`."""

    path: str  # the run directory
    setting: str
    benchmark: str
    method: str
    average_accuracy: float | None
    complete: bool
    tasks_done: int | None
    num_tasks: int | None
    seed: int | None
    steps_per_task: int | None

    @property
    def key(self) -> RunKey:
        return (self.setting, self.benchmark, run_method(self.method))


def _results_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_file():
            files.append(path)
        elif (path / 'results.json').is_file():
            files.append(path / 'results.json')
        elif path.is_dir():
            files += sorted(path.rglob('results.json'))
        else:
            raise FileNotFoundError(
                f'{p} is neither a run directory, a results.json file nor a '
                'folder of runs.'
            )
    seen, out = set(), []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            out.append(f)
    return out


def read_run(path: Path) -> RunResult:
    """Parses one `results.json`.

    Raises:
      ValueError: when the file is not the results of `experiments.run`.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f'cannot read {path}: {e}') from e
    if not isinstance(data, dict):
        raise ValueError(f'{path} does not hold a JSON object')
    missing = [
        k
        for k in ('setting', 'benchmark', 'method', 'average_accuracy')
        if k not in data
    ]
    if missing:
        raise ValueError(f'{path} lacks {", ".join(missing)}')
    config = data.get('config') or {}
    train = config.get('train') or {}
    done, total = data.get('tasks_done'), data.get('num_tasks')
    complete = data.get('complete')
    if complete is None:
        complete = done is None or total is None or done == total
    acc = data['average_accuracy']
    return RunResult(
        path=str(path.parent),
        setting=str(data['setting']),
        benchmark=str(data['benchmark']),
        method=str(data['method']),
        average_accuracy=None if acc is None else float(acc),
        complete=bool(complete),
        tasks_done=done,
        num_tasks=total,
        seed=config.get('seed'),
        steps_per_task=train.get('steps_per_task'),
    )


def collect_runs(paths: Sequence[str]) -> tuple[list[RunResult], list[str]]:
    """(runs, problems): every results.json under `paths`, parsed."""
    runs, problems = [], []
    for f in _results_files(paths):
        try:
            runs.append(read_run(f))
        except ValueError as e:
            problems.append(str(e))
    return runs, problems


# ---------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------

MISSING = '—'


def _fmt(x: float) -> str:
    return f'{x:.2f}'


def _signed(x: float) -> str:
    return f'{x:+.2f}'


@dataclasses.dataclass(frozen=True)
class CellValue:
    """Our number for one cell: text for the table and the difference."""

    ours: str
    diff: str
    mean: float | None = None


def cell_value(paper: float, runs: Sequence[RunResult]) -> CellValue:
    """Formats our result for a cell whose paper number is `paper`.

    Complete runs are averaged (mean ± sample std, with n when n > 1); partial
    runs are shown only when no run of the cell is complete, and never get a
    difference.
    """
    done = [r for r in runs if r.complete and r.average_accuracy is not None]
    partial = [
        r for r in runs if not r.complete and r.average_accuracy is not None
    ]
    if done:
        values = [r.average_accuracy for r in done]
        mean = statistics.fmean(values)
        if len(values) == 1:
            text = _fmt(mean)
        else:
            std = statistics.stdev(values)
            text = f'{_fmt(mean)} ± {_fmt(std)} (n={len(values)})'
        if partial:
            text += f' (+{len(partial)} partial not counted)'
        return CellValue(text, _signed(mean - paper), mean)
    if partial:
        text = '; '.join(
            f'{_fmt(r.average_accuracy)} (partial, '
            f'{r.tasks_done if r.tasks_done is not None else "?"}/'
            f'{r.num_tasks if r.num_tasks is not None else "?"} tasks)'
            for r in sorted(partial, key=lambda r: -(r.tasks_done or 0))
        )
        return CellValue(text, 'n/a')
    return CellValue(MISSING, MISSING)


def _md_escape(text: str) -> str:
    return text.replace('|', '\\|')


def _tag(notes: Iterable[str], letters: dict[str, str]) -> str:
    """' [a,c]': the letters of `notes`; a new note gets the next letter."""
    out = []
    for n in notes:
        if n not in letters:
            letters[n] = 'abcdefghijklmnopqrstuvwxyz'[len(letters)]
        out.append(letters[n])
    return f' [{",".join(out)}]' if out else ''


def tables_markdown(
    runs: Sequence[RunResult],
    problems: Sequence[str] = (),
    tables: Sequence[Table] = TABLES,
) -> str:
    """All tables in Markdown: the paper's numbers, ours, and ours − paper."""
    by_key: dict[RunKey, list[RunResult]] = {}
    for r in runs:
        by_key.setdefault(r.key, []).append(r)
    needed = runs_needed(tables)
    lines = [
        f'# {PAPER}: the paper\'s tables and this reimplementation',
        '',
        'Average accuracy (%) after the final task. "paper": the number read '
        'from the ECCV 2022 poster; "ours": our run (mean ± sample standard '
        'deviation over n runs where there are several); "Δ": ours − paper. '
        f'{MISSING}: no run yet. "n/r": not reported by the paper. A run that '
        'stopped early is shown with "(partial, k/T tasks)" and no difference. '
        'Letters in brackets refer to the notes under each table.',
    ]
    for table in tables:
        letters: dict[str, str] = {}
        header = ['method']
        for c in table.columns:
            header += [f'{c.label}: paper', 'ours', 'Δ']
        lines += [
            '',
            f'## {table.title}',
            '',
            f'Paper numbers: {table.source} ({PAPER}).',
            '',
        ]
        lines.append('| ' + ' | '.join(header) + ' |')
        lines.append('|' + ' --- |' * len(header))
        row_cells = {}
        for cell in cells([table]):
            row_cells[(cell.row.label, cell.index)] = cell
        for row in table.rows:
            out = [_md_escape(row.label + _tag(row.notes, letters))]
            cell_extra = dict(row.cell_notes)
            for i, value in enumerate(row.paper):
                if value is None:
                    out += ['n/r', '', '']
                    continue
                cell = row_cells[(row.label, i)]
                v = cell_value(value, by_key.get(cell.run, []))
                paper = _fmt(value)
                if i in cell_extra:
                    paper += _tag([cell_extra[i]], letters)
                out += [paper, _md_escape(v.ours), v.diff]
            lines.append('| ' + ' | '.join(out) + ' |')
        if letters:
            lines.append('')
            for note, letter in letters.items():
                lines.append(f'[{letter}] {NOTES[note]}  ')
    # Which run filled which cell, and the runs outside the tables.
    used = [r for r in runs if r.key in needed]
    other = [r for r in runs if r.key not in needed]
    lines += ['', '## Runs read', '']
    if used:
        lines.append(
            '| run directory | setting | benchmark | method | seed | '
            'tasks done | steps per task | average accuracy | cells |'
        )
        lines.append('|' + ' --- |' * 9)
        for r in sorted(used, key=lambda r: (r.key, r.path)):
            names = '; '.join(c.name for c in needed[r.key])
            lines.append(
                '| '
                + ' | '.join(
                    _md_escape(str(x))
                    for x in (
                        r.path,
                        r.setting,
                        r.benchmark,
                        r.method,
                        '' if r.seed is None else r.seed,
                        f'{r.tasks_done}/{r.num_tasks}',
                        '' if r.steps_per_task is None else r.steps_per_task,
                        ''
                        if r.average_accuracy is None
                        else _fmt(r.average_accuracy),
                        names,
                    )
                )
                + ' |'
            )
    else:
        lines.append('No run fills a cell of the tables yet.')
    if other or problems:
        lines += ['', "## Runs not in the paper's tables", '']
        for r in sorted(other, key=lambda r: (r.key, r.path)):
            acc = (
                ''
                if r.average_accuracy is None
                else f', average accuracy {_fmt(r.average_accuracy)}'
            )
            status = (
                '' if r.complete else f', partial {r.tasks_done}/{r.num_tasks}'
            )
            lines.append(
                f'* {r.path}: setting {r.setting}, benchmark {r.benchmark}, '
                f'method {r.method}{acc}{status}'
            )
        for p in problems:
            lines.append(f'* not a run of experiments.run: {p}')
    return '\n'.join(lines) + '\n'


def write_tables(paths: Sequence[str], out: str) -> str:
    """Reads the runs under `paths` and writes the Markdown tables to `out`."""
    runs, problems = collect_runs(paths)
    text = tables_markdown(runs, problems)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    return str(out_path)


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program, so that
    importing this module next to another absl program defines nothing)."""
    flags.DEFINE_bool(
        'plan', False, 'Print the preparation and the command of every cell.'
    )
    flags.DEFINE_multi_string(
        'runs',
        None,
        'Run directories, results.json files or folders searched recursively '
        '(`--runs A B C` or `--runs A --runs B`); default: --runs_root.',
    )
    flags.DEFINE_string(
        'out', None, 'Markdown file to write (default: RUNS_ROOT/tables.md).'
    )
    flags.DEFINE_string(
        'runs_root', 'runs/paper', 'Folder of the run directories.'
    )
    flags.DEFINE_string(
        'backbone_cifar',
        None,
        'backbone.npz of experiments.pretrain (fills CIFAR_BACKBONE).',
    )
    flags.DEFINE_string(
        'backbone_mit67',
        None,
        'ResNet-18 .pth or backbone.npz for MIT-67 (fills MIT67_BACKBONE).',
    )
    flags.DEFINE_string(
        'mit67_dir', None, 'The MIT Indoor-67 folder (fills MIT67_DIR).'
    )
    flags.DEFINE_list(
        'seeds',
        [],
        'Seeds: one command per seed (--config.seed=S, workdir suffix -seedS); '
        "default: one run with the config's seed.",
    )


def main(argv: Sequence[str]) -> None:
    extra = list(argv[1:])
    runs_given = FLAGS['runs'].present
    if extra and not runs_given:
        raise app.UsageError(f'Unexpected arguments: {extra}')
    try:
        seeds = [int(s) for s in FLAGS.seeds]
    except ValueError as e:
        raise app.UsageError(f'--seeds must be integers: {e}') from e
    if FLAGS.plan:
        print(
            plan_text(
                FLAGS.runs_root,
                backbone_cifar=FLAGS.backbone_cifar,
                backbone_mit67=FLAGS.backbone_mit67,
                mit67_dir=FLAGS.mit67_dir,
                seeds=seeds,
            ),
            end='',
        )
    if FLAGS.plan and not (runs_given or FLAGS['out'].present):
        return
    paths = (list(FLAGS.runs or []) + extra) or [FLAGS.runs_root]
    out = FLAGS.out or os.path.join(FLAGS.runs_root, 'tables.md')
    try:
        written = write_tables(paths, out)
    except FileNotFoundError as e:
        print(f'error: {e} Run the commands of --plan first.', file=sys.stderr)
        sys.exit(2)
    print(f'wrote {written}')


if __name__ == '__main__':
    define_flags()
    app.run(main)
