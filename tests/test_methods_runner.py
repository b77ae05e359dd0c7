"""Every method runs in the runner, in each setting where the paper uses it.

The tiny class-IL run (2 tasks of 2 classes, a random small CNN, 6 + 3
steps) for every method; task-IL and data-IL for the methods of the paper's
tables in those settings; joint trains once on the union; NCM's accuracies
are those of the class means of the frozen features.
"""

import numpy as np
import pytest
from tiny_run import TINY, set_fields, tiny_config

from dlcft_jax import data_terms as dterms
from experiments import backbones, datasets, input_pipeline, methods, train
from experiments.configs import data_il, task_il

# Where the paper's tables use each method (docs/method.md §9.1-9.3), beyond
# class-IL.
TASK_IL = ('lwf', 'ewc', 'osla', 'er', 'der', 'derpp', 'joint')
DATA_IL = ('ewc', 'mas', 'lwf', 'osla', 'kfac_nonlin_mse', 'joint', 'ncm')


def _config(npz_dir, setting, method):
    if setting == 'class_il':
        config = tiny_config(npz_dir, method=method)
    else:
        module = task_il if setting == 'task_il' else data_il
        config = set_fields(module.get_config(), dict(TINY))
        config.data.npz_dir = str(npz_dir)
        config.method = method
        if setting == 'task_il':
            config.replay.buffer_size = None  # the method's default
    config.compilation_cache_dir = ''
    config.baselines.ranpac_dim = 64
    config.replay.batch_size = 4
    return config


def _check(results, method, num_tasks=2):
    assert results['complete'] and results['method'] == method
    row = results['accuracy_matrix'][-1]
    assert len(row) == num_tasks
    assert all(a is not None and 0.0 <= a <= 100.0 for a in row)
    np.testing.assert_allclose(results['average_accuracy'], np.mean(row))


@pytest.mark.parametrize('method', sorted(methods.METHODS))
def test_every_method_runs_the_tiny_class_il(tmp_path, npz_dir, method):
    config = _config(npz_dir, 'class_il', method)
    results = train.train_and_evaluate(config, str(tmp_path / 'w'))
    _check(results, method)
    m = methods.get(method)
    if m.trainer == 'joint':
        assert len(results['accuracy_matrix']) == 1
        assert results['forgetting'] is None
    else:
        assert len(results['accuracy_matrix']) == 2
    steps = [p['steps'] for p in results['per_task']]
    if not m.trains:
        assert steps == [0, 0]
    elif m.trainer == 'joint':
        # the union, for the sequence's total budget (6 + 3 steps)
        assert steps == [9]
        assert results['per_task'][0]['train_examples'] == 80
    else:
        assert steps == [6, 3]


@pytest.mark.parametrize('method', TASK_IL)
def test_task_il_methods_run(tmp_path, npz_dir, method):
    results = train.train_and_evaluate(
        _config(npz_dir, 'task_il', method), str(tmp_path / 'w')
    )
    _check(results, method)


@pytest.mark.parametrize('method', DATA_IL)
def test_data_il_methods_run(tmp_path, npz_dir, method):
    results = train.train_and_evaluate(
        _config(npz_dir, 'data_il', method), str(tmp_path / 'w')
    )
    _check(results, method)


def test_ncm_scores_are_the_class_means_of_frozen_features(tmp_path, npz_dir):
    config = _config(npz_dir, 'class_il', 'ncm')
    config.baselines.ncm_metric = 'euclidean'
    results = train.train_and_evaluate(config, str(tmp_path / 'w'))
    # Independently: features g(x; ψ0), class means, nearest mean among the
    # classes seen so far.
    data = datasets.load(config.data)
    apply_fn, variables = backbones.build_backbone(config, data.mean, data.std)
    tasks, _ = input_pipeline.make_tasks(config, data)

    def feats(x):
        x = datasets.test_transform(data.augmentation, x)
        return np.asarray(apply_fn(variables, x), np.float64)

    means = {}
    for t, task in enumerate(tasks):
        z = feats(data.x_train[task.train_idx])
        for c in np.unique(task.train_rows):
            means[int(c)] = z[task.train_rows == c].mean(0)
        seen = sorted(means)
        mu = np.stack([means[c] for c in seen])
        for j in range(t + 1):
            zt = feats(data.x_test[tasks[j].test_idx])
            d = ((zt[:, None, :] - mu[None]) ** 2).sum(-1)
            pred = np.asarray(seen)[np.argmin(d, 1)]
            want = 100.0 * np.mean(pred == tasks[j].test_rows)
            np.testing.assert_allclose(
                results['accuracy_matrix'][t][j], want, atol=1e-9
            )


def test_method_defaults_follow_the_published_ones(npz_dir):
    er = methods.resolve(_config(npz_dir, 'class_il', 'er'))
    opt = er.optimizer
    assert (opt.learning_rate, opt.momentum, opt.weight_decay) == (0.03, 0, 0)
    assert er.network.bn_train and not er.network.linearized
    assert er.penalty is None and er.replay.insert == 'stream'
    alphas = {
        n: methods.resolve(_config(npz_dir, 'class_il', n)).replay
        for n in ('der', 'derpp')
    }
    assert alphas['der'].logit_weight == 0.3 and alphas['der'].draws == 1
    assert alphas['derpp'].logit_weight == 0.1
    assert alphas['derpp'].second_draw_weight == 0.5
    osla = methods.resolve(_config(npz_dir, 'class_il', 'osla'))
    assert (osla.network.linearized, osla.loss, osla.penalty.kind) == (
        False,
        'ce',
        'kfac',
    )
    assert (osla.optimizer.name, osla.optimizer.learning_rate) == ('sgd', 1e-3)
    grid = {
        name: methods.resolve(_config(npz_dir, 'data_il', name))
        for name in (
            'kfac_lin_mse',
            'kfac_lin_sce',
            'kfac_nonlin_mse',
            'kfac_nonlin_sce',
        )
    }
    assert {(c.network.linearized, c.loss) for c in grid.values()} == {
        (True, 'mse'),
        (True, 'ce'),
        (False, 'mse'),
        (False, 'ce'),
    }
    assert all(c.penalty.kind == 'kfac' for c in grid.values())
    lwf = methods.resolve(_config(npz_dir, 'task_il', 'lwf'))
    assert lwf.terms[1] == dterms.Distillation('kl', 1.0, 2)
    dlcft = methods.resolve(_config(npz_dir, 'task_il', 'dlcft'))
    assert not dlcft.penalty.head


def test_buffer_methods_need_a_buffer(tmp_path, npz_dir):
    config = _config(npz_dir, 'class_il', 'der')
    config.replay.buffer_size = 0
    with pytest.raises(train.ConfigError, match='replay.buffer_size'):
        train.train_and_evaluate(config, str(tmp_path / 'w'))
