"""End-to-end runner test on a tiny config: real files written and read back."""

import json

import numpy as np
import pytest
from tiny_run import tiny_config

from experiments import input_pipeline, train
from experiments.configs import data_il, task_il


def _tiny_config(npz_dir, method='dlcft'):
    return tiny_config(
        npz_dir,
        method=method,
        **{'train.log_every': 2, 'compilation_cache_dir': ''},
    )


@pytest.mark.parametrize(
    'method,curvature',
    [('dlcft', 'kfac'), ('dlcft', 'tkfac'), ('finetune', '')],
)
def test_class_il_run_writes_complete_results(
    tmp_path, npz_dir, method, curvature
):
    workdir = tmp_path / 'run'
    config = _tiny_config(npz_dir, method)
    if curvature:
        config.curvature.kind = curvature
    results = train.train_and_evaluate(config, str(workdir))
    on_disk = json.loads((workdir / 'results.json').read_text())
    assert on_disk['average_accuracy'] == results['average_accuracy']
    for key in (
        'setting',
        'method',
        'num_tasks',
        'accuracy_matrix',
        'average_accuracy',
        'forgetting',
        'backward_transfer',
        'wall_time_s',
        'config',
    ):
        assert key in on_disk, key
    assert on_disk['setting'] == 'class_il' and on_disk['method'] == method
    r = on_disk['accuracy_matrix']
    assert len(r) == 2 and r[0][1] is None
    assert all(0.0 <= r[i][j] <= 100.0 for i in range(2) for j in range(i + 1))
    # Class-IL average accuracy after the last task: mean over tasks seen.
    np.testing.assert_allclose(
        on_disk['average_accuracy'], (r[1][0] + r[1][1]) / 2
    )
    np.testing.assert_allclose(on_disk['forgetting'], r[0][0] - r[1][0])
    assert on_disk['config']['backbone']['name'] == 'small_cnn'
    log = [
        json.loads(line)
        for line in (workdir / 'log.jsonl').read_text().split('\n')
        if line
    ]
    assert any(e.get('event') == 'task_end' for e in log)
    assert all(np.isfinite(e['loss']) for e in log if 'loss' in e)
    penalty = on_disk['method_record']['penalty']
    assert (penalty and penalty['kind']) == (curvature or None)
    if method == 'dlcft':
        # The second task's steps carry the K-FAC and head penalty.
        assert any(e.get('task') == 1 and e.get('penalty', 0) > 0 for e in log)
    # TensorBoard's own reader loads the runner's events.
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(str(workdir / 'tensorboard'))
    events.Reload()
    tags = events.Tags()['scalars']
    assert 'train/loss' in tags and 'eval/average_accuracy' in tags
    last = events.Scalars('eval/average_accuracy')[-1]
    assert last.step == 9  # 6 + 3 steps
    np.testing.assert_allclose(last.value, on_disk['average_accuracy'], 1e-6)


def test_bad_config_ends_with_one_clear_message(tmp_path, npz_dir):
    config = _tiny_config(npz_dir)
    config.method = 'ewc2'
    with pytest.raises(train.ConfigError, match="config.method.*'ewc'"):
        train.train_and_evaluate(config, str(tmp_path / 'w'))
    config = _tiny_config(npz_dir)
    config.curvature.batch_size = 500  # a task has 40 training images
    with pytest.raises(train.ConfigError, match='config.curvature.batch_size'):
        train.train_and_evaluate(config, str(tmp_path / 'w'))
    config = _tiny_config(npz_dir)
    config.train.log_every = 0
    with pytest.raises(train.ConfigError, match='log_every'):
        train.train_and_evaluate(config, str(tmp_path / 'w'))
    config = _tiny_config(npz_dir)
    config.data.num_tasks = 3  # 6 classes, the data has 4
    with pytest.raises(ValueError, match='class'):
        train.train_and_evaluate(config, str(tmp_path / 'w'))


def test_command_line_reports_missing_data(tmp_path, run_module):
    out = run_module(
        'experiments.run',
        '--config=experiments/configs/class_il.py',
        f'--config.data.npz_dir={tmp_path / "nowhere"}',
        f'--workdir={tmp_path / "w"}',
    )
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith('error:') and 'nowhere' in last


def test_task_il_scores_each_task_with_its_own_head(tmp_path, npz_dir):
    config = _tiny_config(npz_dir)
    config.setting = 'task_il'
    config.replay.buffer_size = 0
    results = train.train_and_evaluate(config, str(tmp_path / 'task'))
    assert results['method_record']['penalty']['head'] is False
    r = results['accuracy_matrix']
    # Two classes per head: every entry is a 2-way accuracy.
    assert all(0.0 <= r[i][j] <= 100.0 for i in range(2) for j in range(i + 1))
    m_train, m_test = input_pipeline.class_masks(config, 1, 4)
    np.testing.assert_array_equal(m_train, [0, 0, 1, 1])
    np.testing.assert_array_equal(m_test[0], [1, 1, 0, 0])


def test_data_il_splits_the_data_and_tests_on_everything(tmp_path, npz_dir):
    config = _tiny_config(npz_dir)
    config.setting = 'data_il'
    config.replay.buffer_size = 0
    from experiments import datasets  # pylint: disable=g-import-not-at-top

    tasks, num_classes = input_pipeline.make_tasks(
        config, datasets.load(config.data)
    )
    assert num_classes == 4 and len(tasks) == 2
    assert len(tasks[0].train_idx) == len(tasks[1].train_idx) == 40
    assert not set(tasks[0].train_idx) & set(tasks[1].train_idx)
    assert len(tasks[0].test_idx) == 40  # the full test set, every task
    results = train.train_and_evaluate(config, str(tmp_path / 'data'))
    r = results['accuracy_matrix']
    assert r[1][0] == r[1][1]  # the same full test set
    np.testing.assert_allclose(results['average_accuracy'], r[1][1])


@pytest.mark.parametrize('module', [task_il, data_il])
def test_setting_configs_take_the_seq_cifar10_parameter(module):
    config = module.get_config('seq_cifar10')
    assert config.setting == module.__name__.rsplit('.', 1)[-1]
    with pytest.raises(ValueError, match='seq_cifar10'):
        module.get_config('seq_cifar1000')


def test_validation_split_replaces_the_test_set(tmp_path, npz_dir):
    config = _tiny_config(npz_dir, method='ncm')
    config.data.validation = 0.25
    results = train.train_and_evaluate(config, str(tmp_path / 'val'))
    assert results['data'].endswith(':val0.25')
    # 2 tasks x 2 classes, a quarter of each class's training images.
    from experiments import datasets  # pylint: disable=g-import-not-at-top

    n = np.bincount(datasets.load(config.data).y_train)
    kept = [n[c] - round(0.25 * n[c]) for c in range(4)]
    assert [p['train_examples'] for p in results['per_task']] == [
        kept[0] + kept[1],
        kept[2] + kept[3],
    ]
    config.data.validation = 1.0
    with pytest.raises(train.ConfigError, match='config.data.validation'):
        train.train_and_evaluate(config, str(tmp_path / 'bad'))
