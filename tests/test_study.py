"""The study driver: skips finished runs, picks seeds > 0 from the seed-0
table, aggregates mean ± std, and its command runs the real runner."""

import json
import subprocess
import sys

import numpy as np
import pytest

from experiments import study


def _write(workdir, acc_matrix, complete=True, wall=60.0, joint=False):
    workdir.mkdir(parents=True, exist_ok=True)
    last = [a for a in acc_matrix[-1] if a is not None]
    res = {
        'complete': complete,
        'joint': joint,
        'accuracy_matrix': acc_matrix,
        'average_accuracy': float(np.mean(last)),
        'forgetting': None if joint else 1.5,
        'wall_time_s': wall,
    }
    (workdir / 'results.json').write_text(json.dumps(res))


def _fake_launch(accuracy):
    """A launcher that writes a 2-task result whose final average accuracy
    is accuracy[method] + seed, and records each call."""
    calls = []

    def launch(s, method, seed):
        calls.append((method, seed))
        a = accuracy[method] + seed
        _write(s.workdir(method, seed), [[a, None], [a, a]])
        return 0

    return launch, calls


def _grid(methods, repeat='top3'):
    return study.Grid('class_il', 32, tuple(methods), repeat)


def test_seed_zero_first_then_dlcft_and_the_three_best_others(tmp_path):
    acc = {
        'dlcft': 10,
        'joint': 90,
        'joint_finetune': 95,
        'ranpac': 50,
        'er': 40,
        'derpp': 30,
        'ncm': 20,
    }
    s = study.Study(_grid(acc), 'g', tmp_path)
    launch, calls = _fake_launch(acc)
    status = study.run_grid(s, list(acc), [0, 1, 2], launch)
    assert calls[:7] == [(m, 0) for m in acc]
    # The joint runs are bounds, not competitors; ncm is the fourth best.
    assert calls[7:] == [
        (m, seed) for seed in (1, 2) for m in ('dlcft', 'ranpac', 'er', 'derpp')
    ]
    assert set(status.values()) == {'ran'}
    # A second call runs nothing.
    launch2, calls2 = _fake_launch(acc)
    status = study.run_grid(s, list(acc), [0, 1, 2], launch2)
    assert calls2 == [] and set(status.values()) == {'done'}


def test_incomplete_and_failed_runs(tmp_path):
    acc = {'dlcft': 10, 'er': 50}
    s = study.Study(_grid(acc), 'g', tmp_path)
    _write(s.workdir('er', 0), [[1.0, None]], complete=False)

    def launch(st, method, seed):
        return (
            3 if method == 'dlcft' else _fake_launch(acc)[0](st, method, seed)
        )

    status = study.run_grid(s, list(acc), [0, 1], launch)
    # The incomplete run is run again (the runner resumes it); the failed
    # seed 0 holds back seeds > 0.
    assert status == {('dlcft', 0): 'failed (3)', ('er', 0): 'ran'}


def test_aliases_are_one_run_and_repeat_all(tmp_path):
    names = ['dlcft', 'kfac_lin_mse', 'osla', 'kfac_nonlin_sce']
    s = study.Study(_grid(names, repeat='all'), 'g', tmp_path)
    launch, calls = _fake_launch({'dlcft': 1, 'osla': 2})
    study.run_grid(s, names, [0, 1], launch)
    assert calls == [('dlcft', 0), ('osla', 0), ('dlcft', 1), ('osla', 1)]
    rows = study.collect(s, names)
    text = study.table(s, rows)
    assert '`kfac_lin_mse` (= `dlcft`)' in text


def test_table_mean_std_and_newest(tmp_path):
    s = study.Study(_grid(['dlcft', 'joint']), 'g', tmp_path)
    for seed, a in enumerate((40.0, 44.0, 48.0)):
        _write(s.workdir('dlcft', seed), [[90.0, None], [a - 10, a + 10]])
    _write(s.workdir('joint', 0), [[70.0, 70.0]], joint=True, wall=120)
    rows = study.collect(s, ['dlcft', 'joint'])
    text = study.table(s, rows)
    std = np.std([40, 44, 48], ddof=1)
    assert '| `joint` | 0 | 70.00 | — | — | 2.0 min | 70.0 |' in text
    assert f'| `dlcft` | 0,1,2 | 44.00 ± {std:.2f} | 1.50 ± 0.00 |' in text
    assert f'54.0 ± {std:.1f}' in text  # newest task: a + 10
    # The joint row (70 %) comes first: rows are sorted by accuracy.
    assert text.index('`joint`') < text.index('`dlcft`')
    study.plot(s, rows, tmp_path / 'g.png')
    assert (tmp_path / 'g.png').read_bytes()[:4] == b'\x89PNG'
    out = tmp_path / 'export'
    study.export(s, rows, out, text)
    assert (out / 'g' / 'dlcft' / 'seed_2' / 'results.json').exists()
    assert 'dlcft' in (out / 'g.md').read_text()


def test_command_is_the_protocol(tmp_path):
    s = study.Study(study.GRIDS['class_il_64'], 'class_il_64', tmp_path, 'D')
    cmd = s.command('kfac_lin_mse', 2)
    assert '--config.method=dlcft' in cmd
    assert '--config.seed=2' in cmd
    assert '--config.backbone.image_size=64' in cmd
    assert '--config.data.npz_dir=D' in cmd
    assert '--config.train.steps_per_task=313' in cmd
    assert cmd[-1] == f'--workdir={tmp_path}/class_il_64/dlcft/seed_2'


@pytest.mark.slow
def test_driver_runs_the_runner(tmp_path):
    """The real command line: one training-free run on the bundled subset,
    its table and plot; a second call skips it."""
    args = [
        sys.executable,
        '-m',
        'experiments.study',
        '--grid=class_il_32',
        '--methods=ncm',
        f'--root={tmp_path}',
        '--data=experiments/data/cifar10_5x2',
        '--tag=tiny',
        '--',
        '--config.eval.batch_size=100',
        '--config.train.steps_per_task=4',
    ]
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(
        (tmp_path / 'class_il_32-tiny/ncm/seed_0/results.json').read_text()
    )
    assert res['complete'] and res['config']['train']['steps_per_task'] == 4
    load = json.loads(
        (tmp_path / 'class_il_32-tiny/ncm/seed_0/load.json').read_text()
    )
    assert load['cpus'] >= 1 and load['samples'] >= 0
    text = (tmp_path / 'class_il_32-tiny.md').read_text()
    assert f"| `ncm` | 0 | {res['average_accuracy']:.2f} |" in text
    assert (tmp_path / 'class_il_32-tiny.png').exists()
    again = subprocess.run(args, capture_output=True, text=True, check=False)
    assert again.returncode == 0 and 'running' not in again.stdout


def test_avalanche_table_puts_both_libraries_side_by_side(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        'peers_table', 'benchmarks/peers/table.py'
    )
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    ours = tmp_path / 'ours' / 'er' / 'seed_0'
    _write(ours, [[90.0, None], [20.0, 80.0]])
    res = json.loads((ours / 'results.json').read_text())
    res['per_task'] = [
        {'train_s': 10.0, 'steps': 100},
        {'train_s': 30.0, 'steps': 100},
    ]
    (ours / 'results.json').write_text(json.dumps(res))
    (ours / 'load.json').write_text(json.dumps({'sum': 9.0, 'samples': 3}))
    av = tmp_path / 'av' / 'er_seed0'
    av.mkdir(parents=True)
    (av / 'results.json').write_text(
        json.dumps(
            {
                'complete': True,
                'average_accuracy': 30.0,
                'forgetting': 60.0,
                'newest': 50.0,
                'average_accuracy_seen_classes': 35.0,
                'forgetting_seen_classes': 55.0,
                'newest_seen_classes': 60.0,
                'wall_time_s': 600.0,
                'iteration_loop_s': [40.0, 60.0],
                'iterations': [100, 100],
                'mean_load_1min': 2.25,
            }
        )
    )
    out = table.rows(tmp_path / 'av', tmp_path / 'ours')
    assert out[2] == (
        '| `er` | 0 | 50.00 / 1.50 / 80.0 | 35.00 / 55.00 / 60.0 | '
        '30.00 / 60.00 / 50.0 | 1.0 min / 10.0 min | '
        '0.200 s (load 3.0) / 0.500 s (load 2.2) |'
    )
    assert len(out) == 3  # no other strategy has results


def test_speed_compares_the_third_task_of_both(tmp_path, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        'peers_speed', 'benchmarks/peers/speed.py'
    )
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    calls = []

    def fake_run(cmd, check, stdout):
        calls.append(cmd)
        out = next(
            a.split('=', 1)[1]
            for a in cmd
            if a.startswith('--workdir=') or a.startswith('--out=')
        )
        out = tmp_path / out
        out.mkdir(parents=True)
        if '-m' in cmd:  # ours: 3 tasks, the third is the steady state
            res = {
                'per_task': [{'train_s': t, 'steps': 100} for t in (90, 40, 20)]
            }
        else:
            res = {'iteration_loop_s': [80, 70, 60], 'iterations': [100] * 3}
        (out / 'results.json').write_text(json.dumps(res))

    monkeypatch.setattr(speed.subprocess, 'run', fake_run)
    monkeypatch.chdir(tmp_path)
    python = tmp_path / 'python'
    python.write_text('')
    speed.main([f'--avalanche_python={python}', '--settle=0', '--out=o'])
    assert '--config.train.stop_after_tasks=3' in calls[0]
    assert '--max_iters=100' in calls[1]
    assert calls[1][0] == str(python)
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith('| `er` | 0.200 (') and row.endswith('| 3.0x |')
    assert '| 0.600 (' in row
    with pytest.raises(SystemExit):  # a missing venv: one clear error
        speed.main(['--avalanche_python=nowhere'])


def test_only_class_il_gives_every_method_the_buffer(tmp_path):
    for grid, has in (('class_il_32', True), ('task_il_32', False)):
        s = study.Study(study.GRIDS[grid], grid, tmp_path)
        assert (
            '--config.replay.buffer_size=200' in s.command('dlcft', 0)
        ) is has


def test_variant_flags_are_kept_with_the_runs(tmp_path):
    folder = tmp_path / 'class_il_32-val'
    flags_ = ('--config.data.validation=0.1',)
    assert study.variant_flags(folder, flags_, collect=False) == flags_
    # Collecting (or continuing) without the flags reads them back.
    assert study.variant_flags(folder, (), collect=True) == flags_
    with pytest.raises(study.app.UsageError, match='validation=0.1'):
        study.variant_flags(folder, ('--config.optim.alpha=5',), collect=False)
