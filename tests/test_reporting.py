"""Tests for experiments.reporting (event files, plots, tables, progress)."""

import io
import json
import re

import numpy as np
import pytest

from dlcft_jax import metrics
from experiments import reporting


def _results(num_tasks: int, seed: int = 0) -> dict:
    """A results.json-like dict with a random lower-triangular matrix."""
    rng = np.random.default_rng(seed)
    acc = [[None] * num_tasks for _ in range(num_tasks)]
    for i in range(num_tasks):
        for j in range(i + 1):
            acc[i][j] = float(rng.uniform(40, 95))
    return {
        'setting': 'class_il',
        'method': 'dlcft',
        'num_tasks': num_tasks,
        'task_classes': [[2 * t, 2 * t + 1] for t in range(num_tasks)],
        'accuracy_matrix': acc,
        'average_accuracy': metrics.average_accuracy(acc),
        'forgetting': metrics.forgetting(acc),
        'backward_transfer': metrics.backward_transfer(acc),
        'per_task': [
            {'task': t, 'train_s': 10.0 + t, 'curvature_s': 2.5}
            for t in range(num_tasks)
        ],
        'wall_time_s': 1234.0,
        'config': {},
    }


# ------------------------------------------------------------ run log


def test_run_log_writes_jsonl_and_tensorboard_reads_the_events(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    with reporting.RunLog(tmp_path) as log:
        for step in range(5):
            log.record({'step': step, 'loss': 1.0 / (step + 1)})
            log.scalars({'a/loss': 1.0 / (step + 1), 'b': step}, step)
    lines = (tmp_path / 'log.jsonl').read_text().splitlines()
    assert [json.loads(x)['step'] for x in lines] == list(range(5))
    acc = event_accumulator.EventAccumulator(str(tmp_path / 'tensorboard'))
    acc.Reload()
    assert sorted(acc.Tags()['scalars']) == ['a/loss', 'b']
    loss = acc.Scalars('a/loss')
    assert [e.step for e in loss] == list(range(5))
    np.testing.assert_allclose(
        [e.value for e in loss], [1.0 / (s + 1) for s in range(5)], rtol=1e-6
    )
    assert [e.value for e in acc.Scalars('b')] == [0, 1, 2, 3, 4]


def test_run_log_off_the_chief_writes_nothing(tmp_path):
    with reporting.RunLog(tmp_path, chief=False) as log:
        log.record({'step': 1})
        log.scalars({'a': 1.0}, 1)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ plots


@pytest.mark.parametrize('num_tasks', [1, 5, 100])
def test_save_plots_writes_png(tmp_path, num_tasks):
    import matplotlib.image

    results = _results(num_tasks)
    path = reporting.save_plots(results, tmp_path / 'sub' / 'plot.png')
    assert path == tmp_path / 'sub' / 'plot.png'
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert 400 <= height <= 800 and 1000 <= width <= 1600
    # Not a blank canvas.
    assert image[..., :3].std() > 0.05


# ------------------------------------------------------------------ table


def test_summary_table_small():
    results = _results(3)
    text = reporting.summary_table(results)
    m = results['accuracy_matrix']
    lines = text.splitlines()
    assert lines[0] == 'class_il / dlcft: 3 tasks'
    row1 = lines[3].split()
    # task, classes, own, final, forgetting, train s, curvature s.
    assert row1[:2] == ['1', '0,1']
    assert row1[2:4] == [f'{m[0][0]:.2f}', f'{m[2][0]:.2f}']
    assert row1[4] == f'{max(m[0][0], m[1][0]) - m[2][0]:.2f}'
    assert row1[5:] == ['10.0', '2.5']
    assert lines[5].split()[4] == '-'  # The last task cannot be forgotten.
    assert lines[7].split() == ['sum', '33.0', '7.5']
    assert f"average accuracy {results['average_accuracy']:.2f}%" in text
    assert f"forgetting {results['forgetting']:.2f}" in text
    assert f"backward transfer {results['backward_transfer']:.2f}" in text
    assert 'wall time 1234 s' in text
    # The per-task forgetting averages to the run's forgetting.
    forgets = [float(line.split()[4]) for line in lines[3:5]]
    assert np.mean(forgets) == pytest.approx(results['forgetting'], abs=0.01)
    assert max(len(line) for line in lines) <= 80


def test_summary_table_many_tasks_fits_screen():
    results = _results(100)
    results['task_classes'] = [list(range(10))] * 100
    text = reporting.summary_table(results)
    lines = text.splitlines()
    assert len(lines) <= 40
    assert max(len(line) for line in lines) <= 80
    assert '... 80 more tasks ...' in text
    assert lines[3].split()[:2] == ['1', '0-9']
    assert any(line.split()[:1] == ['100'] for line in lines)
    assert 'sum' in text and f'{sum(10.0 + t for t in range(100)):.1f}' in text


def test_summary_table_minimal_results():
    # Only the matrix: metrics are computed, times shown as '-'.
    text = reporting.summary_table({'accuracy_matrix': [[50.0]]})
    assert 'average accuracy 50.00%' in text
    assert 'wall time -' in text


# --------------------------------------------------------------- progress

_METRICS = {
    'loss': 0.51234,
    'data_loss': 0.5,
    'penalty': 0.01234,
    'accuracy': np.float32(0.8125),
    'images_per_s': 1530.4,
}


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_plain_stream():
    out = io.StringIO()
    progress = reporting.Progress(25, task=1, num_tasks=10, stream=out)
    for step in range(1, 26):
        progress.update(step, _METRICS)
    progress.close()
    text = out.getvalue()
    assert '\r' not in text
    lines = text.splitlines()
    assert [re.search(r'step (\d+)/25', s).group(1) for s in lines] == [
        '10',
        '20',
        '25',
    ]
    for field in (
        'task 2/10',
        'loss 0.5123',
        'penalty 0.0123',
        'acc 81.2%',
        '1530 img/s',
        'ETA',
    ):
        assert field in lines[0]
    assert 'took' in lines[-1]


def test_progress_tty_draws_a_tqdm_bar():
    out = _Tty()
    with reporting.Progress(4, task=0, num_tasks=3, stream=out) as p:
        for step in range(1, 5):
            p.update(step, _METRICS)
    text = out.getvalue()
    assert text.startswith('\rtask 1/3:')
    last = text.rstrip('\n').split('\r')[-1]
    assert '4/4' in last and '100%' in last
    assert 'loss 0.5123' in last and 'img/s' in last
    assert text.endswith('\n')  # the bar is left on its own line


def test_progress_rejects_one_based_task():
    with pytest.raises(ValueError, match='0-based'):
        reporting.Progress(10, task=3, num_tasks=3)


def test_summary_table_chunk_size():
    results = _results(2)
    results['chunk_size'] = 2500
    lines = reporting.summary_table(results).splitlines()
    assert lines[1].split()[:2] == ['task', 'chunk']
    assert lines[3].split()[:3] == ['1', '2500', 'imgs']


def test_throughput_reads_a_window_and_restarts():
    meter = reporting.Throughput()
    meter.add(32, 0.0)
    meter.add(32, 0.0)
    first = meter.read()
    assert first['images_per_s'] > 0 and first['input_wait_frac'] == 0.0
    assert meter.read()['images_per_s'] == 0.0  # a fresh window
