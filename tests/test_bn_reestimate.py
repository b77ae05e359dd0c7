"""BatchNorm statistics re-estimated on the first task, and head-only runs."""

import jax
import numpy as np
from tiny_run import tiny_config

from experiments import backbones, datasets, train


def test_reestimated_statistics_are_the_batch_statistics(npz_dir):
    config = tiny_config(npz_dir)
    data = datasets.load(config.data)
    apply_fn, variables = backbones.build_backbone(config)
    x = data.x_train[:16]
    # One batch: eval mode with the new statistics = train mode on it.
    new = backbones.reestimate_batch_stats(
        apply_fn.train, variables, x, 1, 16, datasets.test_transform, 'none'
    )
    want, _ = apply_fn.train(variables, x)
    np.testing.assert_allclose(apply_fn(new, x), want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(apply_fn(variables, x), want, atol=1e-3)
    # Two batches: the average of the two batches' statistics.
    two = backbones.reestimate_batch_stats(
        apply_fn.train,
        variables,
        data.x_train[:32],
        2,
        16,
        datasets.test_transform,
        'none',
    )
    b = [
        backbones.reestimate_batch_stats(
            apply_fn.train,
            variables,
            data.x_train[i : i + 16],
            1,
            16,
            datasets.test_transform,
            'none',
        )['batch_stats']
        for i in (0, 16)
    ]
    jax.tree.map(
        lambda t, u, v: np.testing.assert_allclose(
            t, (u + v) / 2, rtol=1e-4, atol=1e-6
        ),
        two['batch_stats'],
        *b,
    )
    # The weights are untouched.
    jax.tree.map(
        np.testing.assert_array_equal, new['params'], variables['params']
    )


def test_runs_with_reestimated_statistics_and_head_only(tmp_path, npz_dir):
    config = tiny_config(
        npz_dir,
        **{
            'backbone.bn_reestimate': 2,
            'train.trainable': 'none',
            'compilation_cache_dir': '',
        },
    )
    res = train.train_and_evaluate(config, str(tmp_path / 'w'))
    assert res['complete']
    assert res['config']['backbone']['bn_reestimate'] == 2
