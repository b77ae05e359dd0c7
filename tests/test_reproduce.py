"""experiments.reproduce: the plan of the paper's runs and the result tables."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from experiments import reproduce

# The runs the paper's three tables need, written out by hand (not derived
# from reproduce.TABLES): (config file, benchmark, method).
_DATA_IL_METHODS = (
    'finetune',
    'ewc',
    'mas',
    'lwf',
    'osla',
    'kfac_nonlin_mse',
    'dlcft',
)
EXPECTED_RUNS = (
    {
        ('data_il', b, m)
        for b in ('seq_cifar100', 'seq_cifar100_100', 'seq_mit67')
        for m in _DATA_IL_METHODS
    }
    # Joint: one run for both CIFAR-100 columns, one for MIT-67.
    | {('data_il', 'seq_cifar100', 'joint'), ('data_il', 'seq_mit67', 'joint')}
    | {
        ('task_il', 'seq_cifar100', m)
        for m in ('lwf', 'ewc', 'osla', 'dlcft', 'er', 'der', 'derpp')
    }
    | {('class_il', 'seq_cifar100', m) for m in ('er', 'der', 'derpp', 'dlcft')}
    # Ablation: kfac_lin_mse = dlcft and kfac_nonlin_sce = osla share runs.
    | {
        ('data_il', b, 'kfac_lin_sce')
        for b in ('seq_cifar100', 'seq_cifar100_100')
    }
    | {
        ('class_il', 'seq_cifar100', m)
        for m in ('osla', 'kfac_nonlin_mse', 'kfac_lin_sce')
    }
)

_RUN = 'python -m experiments.run '
_COMMAND = re.compile(
    r'^python -m experiments\.run '
    r'--config=experiments/configs/(\w+)\.py:(\w+) '
    r'--config\.method=(\w+) (.*)--workdir=(\S+)$'
)


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', 'experiments.reproduce', *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd or Path(__file__).resolve().parents[1],
    )


def _commands(text: str) -> list[tuple[str, str, str, str, str]]:
    out = []
    for line in text.splitlines():
        if line.startswith(_RUN):
            m = _COMMAND.match(line)
            assert m, line
            out.append(m.groups())
    return out


def test_plan_prints_one_command_per_distinct_run():
    proc = _cli('--plan')
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    commands = _commands(text)
    keys = [(c[0], c[1], c[2]) for c in commands]
    # Every cell's run, and each shared run printed once.
    assert len(keys) == len(set(keys)) == len(EXPECTED_RUNS) == 39
    assert set(keys) == EXPECTED_RUNS
    for setting, benchmark, method, middle, workdir in commands:
        assert workdir == f'runs/paper/{setting}-{benchmark}-{method}'
        if benchmark == 'seq_mit67':
            assert middle == (
                '--config.backbone.checkpoint=MIT67_BACKBONE '
                '--config.data.mit67_dir=MIT67_DIR '
            )
        else:
            assert middle == '--config.backbone.checkpoint=CIFAR_BACKBONE '
    # No run of its own for the aliases of shared cells.
    assert 'kfac_lin_mse' not in {k[2] for k in keys}
    assert 'kfac_nonlin_sce' not in {k[2] for k in keys}
    assert ('data_il', 'seq_cifar100_100', 'joint') not in keys


def test_plan_groups_commands_by_table_after_the_preparation():
    text = _cli('--plan').stdout
    lines = text.splitlines()
    first_command = next(
        i for i, line in enumerate(lines) if line.startswith(_RUN)
    )
    prep = '\n'.join(lines[:first_command])
    assert 'tfds build cifar100' in prep
    assert (
        'python -m experiments.pretrain '
        '--config=experiments/configs/pretrain_imagenet32.py'
    ) in prep
    headings = [i for i, line in enumerate(lines) if line.startswith('## ')]
    titles = [lines[i] for i in headings]
    assert titles[0] == '## One-time preparation'
    data_il = next(i for i in headings if lines[i].startswith('## Data-IL'))
    task_il = next(i for i in headings if lines[i].startswith('## Task-IL'))
    ablation = next(i for i in headings if lines[i].startswith('## Ablation'))
    assert first_command > data_il
    # Which table each command first appears under.
    section = {}
    for i, line in enumerate(lines):
        if line.startswith(_RUN):
            (setting, benchmark, method, _, _) = _commands(line)[0]
            start = max(h for h in headings if h < i)
            section[(setting, benchmark, method)] = lines[start]
    assert {k for k, v in section.items() if v == lines[data_il]} == {
        k for k in EXPECTED_RUNS if k[0] == 'data_il'
    } - {
        ('data_il', b, 'kfac_lin_sce')
        for b in ('seq_cifar100', 'seq_cifar100_100')
    }
    assert section[('class_il', 'seq_cifar100', 'dlcft')] == lines[task_il]
    assert section[('class_il', 'seq_cifar100', 'osla')] == lines[ablation]
    assert (
        section[('data_il', 'seq_cifar100', 'kfac_lin_sce')]
        == (lines[ablation])
    )
    # The shared DLCFT run says which cells it fills, and the ablation points
    # back to it instead of printing it again.
    dlcft = next(
        i
        for i, line in enumerate(lines)
        if line.endswith('--workdir=runs/paper/data_il-seq_cifar100-dlcft')
    )
    block = '\n'.join(lines[dlcft - 3 : dlcft])
    assert 'One run fills 2 cells' in block
    assert 'DLCFT / Seq-CIFAR-100 (10 tasks): paper 82.70' in block
    assert (
        'linearized + MSE (= DLCFT) / Data-IL, 10 tasks: paper 82.70' in block
    )
    later = '\n'.join(lines[ablation:])
    assert 'the run above, runs/paper/data_il-seq_cifar100-dlcft' in later
    # The joint run fills both CIFAR-100 columns.
    joint = next(
        i
        for i, line in enumerate(lines)
        if line.endswith('--workdir=runs/paper/data_il-seq_cifar100-joint')
    )
    assert 'Seq-CIFAR-100 (100 tasks): paper 83.57' in '\n'.join(
        lines[joint - 3 : joint]
    )


def test_plan_marks_inferred_rows_and_shows_paper_numbers():
    text = _cli('--plan').stdout
    lines = text.splitlines()

    def comment_before(workdir_end: str) -> str:
        i = next(
            i
            for i, line in enumerate(lines)
            if line.endswith(f'--workdir={workdir_end}')
        )
        return lines[i - 1]

    for method, paper in (
        ('ewc', '78.74'),
        ('mas', '78.88'),
        ('lwf', '80.25'),
        ('finetune', '75.24'),
    ):
        c = comment_before(f'runs/paper/data_il-seq_cifar100-{method}')
        assert f'paper {paper}' in c and 'row label inferred' in c, c
    assert 'EWC and MAS may be swapped' in comment_before(
        'runs/paper/data_il-seq_mit67-ewc'
    )
    c = comment_before('runs/paper/task_il-seq_cifar100-dlcft')
    assert 'paper 95.79' in c and 'inferred' not in c
    assert 'paper 43.52' in comment_before(
        'runs/paper/class_il-seq_cifar100-er'
    )


def test_plan_fills_placeholders_root_and_seeds(tmp_path):
    proc = _cli(
        '--plan',
        f'--runs_root={tmp_path}/r',
        '--backbone_cifar=/w/pre/backbone.npz',
        '--backbone_mit67=/w/resnet18.pth',
        '--mit67_dir=/data/mit 67',
        '--seeds=0,1',
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert 'CIFAR_BACKBONE --' not in text and 'MIT67_DIR --' not in text
    commands = [line for line in text.splitlines() if line.startswith(_RUN)]
    assert len(commands) == 2 * len(EXPECTED_RUNS)
    assert (
        'python -m experiments.run '
        '--config=experiments/configs/data_il.py:seq_mit67 '
        '--config.method=dlcft --config.backbone.checkpoint=/w/resnet18.pth '
        "--config.data.mit67_dir='/data/mit 67' --config.seed=1 "
        f'--workdir={tmp_path}/r/data_il-seq_mit67-dlcft-seed1'
    ) in commands
    assert (
        'python -m experiments.run '
        '--config=experiments/configs/class_il.py:seq_cifar100 '
        '--config.method=er --config.backbone.checkpoint=/w/pre/backbone.npz '
        f'--config.seed=0 --workdir={tmp_path}/r/class_il-seq_cifar100-er-seed0'
    ) in commands


def test_paper_numbers_match_the_paper():
    """A hand-typed subset of the poster's tables against `TABLES`."""
    by = {
        (t.key, r.label): dict(
            zip((c.label for c in t.columns), r.paper, strict=True)
        )
        for t in reproduce.TABLES
        for r in t.rows
    }
    assert by[('data_il', 'DLCFT')] == {
        'Seq-CIFAR-100 (10 tasks)': 82.70,
        'Seq-CIFAR-100 (100 tasks)': 80.07,
        'Seq-MIT-67 (4 tasks)': 70.52,
    }
    assert by[('data_il', 'EWC')]['Seq-CIFAR-100 (10 tasks)'] == 78.74  # row 1
    assert by[('data_il', 'LwF')]['Seq-MIT-67 (4 tasks)'] == 67.21  # row 2
    assert by[('data_il', 'MAS')]['Seq-CIFAR-100 (100 tasks)'] == 72.61  # row 3
    assert by[('data_il', 'Fine-tuning')]['Seq-CIFAR-100 (100 tasks)'] == 52.50
    assert by[('data_il', 'OSLA')]['Seq-CIFAR-100 (100 tasks)'] == 73.10
    assert by[('data_il', 'Joint training (upper bound)')] == {
        'Seq-CIFAR-100 (10 tasks)': 83.57,
        'Seq-CIFAR-100 (100 tasks)': 83.57,
        'Seq-MIT-67 (4 tasks)': 74.40,
    }
    assert by[('task_class_il', 'DLCFT')] == {
        'Task-IL': 95.79,
        'Class-IL': 59.98,
    }
    assert by[('task_class_il', 'DER')] == {'Task-IL': 91.47, 'Class-IL': 58.07}
    assert by[('task_class_il', 'LwF')] == {'Task-IL': 92.16, 'Class-IL': None}
    assert by[('ablation', 'non-linear + SCE (= OSLA)')] == {
        'Data-IL, 10 tasks': 79.23,
        'Data-IL, 100 tasks': 73.51,
        'Class-IL, 10 tasks': 44.93,
    }
    assert by[('ablation', 'linearized + SCE')]['Class-IL, 10 tasks'] == 44.66
    cells = reproduce.cells()
    assert len(cells) == 8 * 3 + 3 + 2 * 4 + 4 * 3
    inferred = {c.row.method for c in cells if c.inferred}
    assert inferred == {'ewc', 'mas', 'lwf', 'finetune'}
    # Only the data-IL rows are inferred (EWC and MAS also run in task-IL).
    assert all(c.table.key == 'data_il' for c in cells if c.inferred)


# ---------------------------------------------------------------------------
# Tables from fake run directories.
# ---------------------------------------------------------------------------


def _write_run(
    path: Path,
    setting: str,
    benchmark: str,
    method: str,
    acc: float,
    *,
    seed: int = 0,
    done: int | None = None,
    num_tasks: int = 10,
) -> Path:
    done = num_tasks if done is None else done
    path.mkdir(parents=True)
    results = {
        'complete': done == num_tasks,
        'tasks_done': done,
        'setting': setting,
        'benchmark': benchmark,
        'method': method,
        'num_tasks': num_tasks,
        'accuracy_matrix': [[acc]],
        'average_accuracy': acc,
        'config': {'seed': seed, 'train': {'steps_per_task': 10_000}},
    }
    (path / 'results.json').write_text(json.dumps(results))
    return path


def _tables(markdown: str) -> dict[str, dict[str, list[str]]]:
    """{heading: {row label: cells}} of every Markdown table in the text."""
    out: dict[str, dict[str, list[str]]] = {}
    heading = None
    for line in markdown.splitlines():
        if line.startswith('## '):
            heading = line[3:]
        elif line.startswith('| ') and not line.startswith('| ---'):
            cells = [c.strip() for c in line.strip().strip('|').split('|')]
            out.setdefault(heading, {})[cells[0]] = cells[1:]
    return out


def _find(tables: dict[str, Any], prefix: str) -> dict[str, list[str]]:
    return next(v for k, v in tables.items() if k.startswith(prefix))


@pytest.fixture(name='runs')
def fixture_runs(tmp_path):
    root = tmp_path / 'runs'
    seeds = [81.2, 82.0, 83.5]
    for s, acc in enumerate(seeds):
        _write_run(
            root / 'dlcft' / f's{s}',
            'data_il',
            'seq_cifar100',
            'dlcft',
            acc,
            seed=s,
        )
    _write_run(root / 'ewc', 'data_il', 'seq_cifar100', 'ewc', 77.24)
    _write_run(
        root / 'osla100',
        'data_il',
        'seq_cifar100_100',
        'kfac_nonlin_sce',  # the ablation's name of the OSLA run
        72.60,
        num_tasks=100,
    )
    _write_run(root / 'joint', 'data_il', 'seq_cifar100', 'joint', 84.07)
    _write_run(
        root / 'er_partial',
        'class_il',
        'seq_cifar100',
        'er',
        61.0,
        done=3,
    )
    _write_run(root / 'mystery', 'class_il', 'seq_cifar100', 'foo', 12.5)
    _write_run(root / 'cifar10', 'data_il', 'seq_cifar10', 'dlcft', 50.5)
    return root, seeds


def test_tables_from_run_directories(tmp_path, runs):
    root, seeds = runs
    out = tmp_path / 'out' / 'TABLES.md'
    proc = _cli(
        '--runs',
        str(root / 'dlcft'),  # a parent folder, searched recursively
        str(root / 'ewc'),
        str(root / 'osla100' / 'results.json'),
        str(root / 'joint'),
        '--runs',
        str(root / 'er_partial'),
        str(root / 'mystery'),
        str(root / 'cifar10'),
        f'--out={out}',
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f'wrote {out}'
    text = out.read_text()
    tables = _tables(text)
    data_il = _find(tables, 'Data-IL')
    # Columns: [paper, ours, Δ] x (10 tasks, 100 tasks, MIT-67).
    mean = statistics.fmean(seeds)
    std = statistics.stdev(seeds)
    assert data_il['DLCFT'][0:3] == [
        '82.70',
        f'{mean:.2f} ± {std:.2f} (n=3)',
        f'{mean - 82.70:+.2f}',
    ]
    assert data_il['DLCFT'][0:3] == ['82.70', '82.23 ± 1.17 (n=3)', '-0.47']
    assert data_il['DLCFT'][3:9] == ['80.07', '—', '—', '70.52', '—', '—']
    assert data_il['EWC [a]'][0:3] == ['78.74', '77.24', '-1.50']
    assert data_il['Fine-tuning [c]'][0:3] == ['75.24', '—', '—']
    # The run named kfac_nonlin_sce fills OSLA's cells in both tables.
    assert data_il['OSLA'][3:6] == ['73.10 [d]', '72.60', '-0.50']
    ablation = _find(tables, 'Ablation')
    assert ablation['non-linear + SCE (= OSLA)'][3:6] == [
        '73.51 [a]',
        '72.60',
        '-0.91',
    ]
    # The DLCFT runs also fill the ablation's linearized + MSE cell.
    assert (
        ablation['linearized + MSE (= DLCFT)'][0:3] == (data_il['DLCFT'][0:3])
    )
    # Joint: the seq_cifar100 run is read for both CIFAR-100 columns.
    joint = data_il['Joint training (upper bound) [e]']
    assert joint[0:6] == ['83.57', '84.07', '+0.50', '83.57', '84.07', '+0.50']
    assert joint[6:9] == ['74.40', '—', '—']
    # A partial run: its value, marked, and no difference.
    ti = _find(tables, 'Task-IL')
    assert ti['ER [b]'][3:6] == ['43.52', '61.00 (partial, 3/10 tasks)', 'n/a']
    assert ti['ER [b]'][0:3] == ['79.14', '—', '—']
    assert ti['LwF'][3:6] == ['n/r', '', '']
    # Inferred labels are flagged with their note.
    assert '[a] Row label inferred' in text
    assert 'EWC and MAS may be swapped' in text
    # Runs outside the tables are listed, not dropped or guessed into cells.
    other = text.split("## Runs not in the paper's tables")[1]
    assert 'method foo' in other and 'benchmark seq_cifar10,' in other
    read = text.split('## Runs read')[1].split('## Runs not')[0]
    assert 'mystery' not in read and 'dlcft/s2' in read


def test_tables_default_to_runs_root_and_partial_runs_are_not_averaged(
    tmp_path,
):
    root = tmp_path / 'paper'
    _write_run(root / 'a', 'class_il', 'seq_cifar100', 'dlcft', 60.0, seed=0)
    _write_run(
        root / 'b', 'class_il', 'seq_cifar100', 'dlcft', 10.0, seed=1, done=2
    )
    _write_run(
        root / 'c',
        'class_il',
        'seq_cifar100',
        'kfac_lin_mse',  # same run as dlcft
        61.0,
        seed=2,
    )
    proc = _cli(f'--runs_root={root}')
    assert proc.returncode == 0, proc.stderr
    written = root / 'tables.md'
    assert proc.stdout.strip() == f'wrote {written}'
    tables = _tables(written.read_text())
    cell = _find(tables, 'Task-IL')['DLCFT'][3:6]
    assert cell == [
        '59.98 [a]',
        '60.50 ± 0.71 (n=2) (+1 partial not counted)',
        '+0.52',
    ]
    ablation = _find(tables, 'Ablation')
    assert ablation['linearized + MSE (= DLCFT)'][6:9] == [
        '59.98',
        '60.50 ± 0.71 (n=2) (+1 partial not counted)',
        '+0.52',
    ]


def test_plan_and_tables_together_and_errors(tmp_path):
    root = tmp_path / 'r'
    _write_run(root / 'x', 'data_il', 'seq_mit67', 'dlcft', 70.0, num_tasks=4)
    proc = _cli('--plan', f'--runs_root={root}', f'--out={tmp_path}/t.md')
    assert proc.returncode == 0, proc.stderr
    assert 'python -m experiments.run' in proc.stdout
    assert proc.stdout.rstrip().endswith(f'wrote {tmp_path}/t.md')
    mit = _find(_tables((tmp_path / 't.md').read_text()), 'Data-IL')
    assert mit['DLCFT'][6:9] == ['70.52', '70.00', '-0.52']
    missing = _cli(f'--runs={tmp_path}/nowhere', f'--out={tmp_path}/u.md')
    assert missing.returncode == 2
    assert 'nowhere' in missing.stderr and '--plan' in missing.stderr
    bad = _cli('--plan', 'stray')
    assert bad.returncode != 0


def test_no_runs_gives_all_missing_cells(tmp_path):
    (tmp_path / 'empty').mkdir()
    path = reproduce.write_tables([str(tmp_path / 'empty')], tmp_path / 'e.md')
    text = Path(path).read_text()
    tables = _tables(text)
    for heading, rows in tables.items():
        if heading.startswith('Runs'):
            continue
        for label, cells in rows.items():
            if label == 'method':
                continue
            for paper, ours, diff in zip(
                cells[0::3], cells[1::3], cells[2::3], strict=True
            ):
                if paper == 'n/r':
                    assert ours == diff == ''
                else:
                    assert ours == diff == '—', (heading, label)
    assert 'No run fills a cell of the tables yet.' in text
