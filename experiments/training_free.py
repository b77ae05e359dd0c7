"""`run(config, workdir)`: the runner of the training-free methods.

NCM and RanPAC (`--config.method=ncm|ranpac`) train nothing: the features
of the pre-trained backbone are computed once per image, and a closed-form
classifier grows task by task. This runner shares the training runner's
input pipeline, evaluation and reporting (`experiments.train`), and has no
steps, optimizer, curvature, buffer or checkpoints (a run is redone in
seconds).

  set-up    check the config; load the data, split it into tasks; the
            backbone ψ0.
  for each task t = 0 .. T−1:
    fit         the task's training features enter the classifier
                (`fit_training_free`).
    evaluation  accuracy on the test data of every task seen so far (each
                test image's features computed once).
    report      log, TensorBoard, one printed line.
  outputs   results.json, summary.txt and results.png in WORKDIR.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dlcft_jax import parallel, prototypes
from experiments import (
    input_pipeline,
    methods,
    profiling,
    reporting,
    train,
)


def fit_training_free(free, config, method, z, y, num_classes, log):
    """NCM / RanPAC: task features `z`, head rows `y` added to the
    closed-form classifier `free` (None before the first task)."""
    opts = config.baselines
    if method.trainer == 'ncm':
        if free is None:
            free = prototypes.ncm_init(num_classes, z.shape[1])
        return prototypes.ncm_update(free, z, y)
    if free is None:
        # The ridge, once, on a held-out split of the first task.
        tr, va = prototypes.split_holdout(
            len(y), opts.ranpac_holdout, config.seed
        )
        ridge, scores = prototypes.choose_ridge(
            z[tr],
            y[tr],
            z[va],
            y[va],
            num_classes=num_classes,
            proj_dim=opts.ranpac_dim,
            seed=config.seed,
        )
        log.record(
            {
                'event': 'ranpac_ridge',
                'ridge': ridge,
                'validation_accuracy': {str(k): v for k, v in scores.items()},
            }
        )
        free = {
            'ridge': ridge,
            'state': prototypes.ranpac_init(
                z.shape[1], num_classes, opts.ranpac_dim, config.seed
            ),
        }
    state = prototypes.ranpac_update(free['state'], z, y)
    return {
        **free,
        'state': state,
        'w': prototypes.ranpac_solve(state, free['ridge']),
    }


def free_scores(free, config, method, z) -> np.ndarray:
    """Class scores of a training-free classifier on features `z`."""
    if method.trainer == 'ncm':
        scores = prototypes.ncm_scores(free, z, config.baselines.ncm_metric)
    else:
        scores = prototypes.ranpac_scores(free['state'], free['w'], z)
    return np.nan_to_num(scores, neginf=-1e30)


def run(config, workdir: str | Path) -> dict[str, Any]:
    """Runs a training-free method of `config` (see the module docstring);
    the config has been checked (`train.train_and_evaluate` calls this)."""
    t_start = time.time()
    profile = profiling.Profile().__enter__()
    workdir = Path(workdir)
    chief = jax.process_index() == 0
    data = train.load_data(config)
    tasks, num_classes = input_pipeline.make_tasks(config, data)
    method = methods.resolve(config)
    spec = train.batch_spec(config, data, num_classes, method)
    state = train.initial_state(config, data, tasks, num_classes, method, spec)
    state = parallel.host_replicate(jax.device_get(state))
    features = train.compile_functions().features
    train.announce(config, data, tasks, num_classes, chief)

    def outputs(images):
        return input_pipeline.apply_batched(
            features, state, images, config.eval.batch_size, data.augmentation
        )

    log = reporting.RunLog(workdir, chief=chief)
    acc: list[list[float | None]] = [[None] * len(tasks) for _ in tasks]
    per_task: list[dict[str, Any]] = []
    classifier, test_features = None, {}

    def scores_of(j):
        if j not in test_features:  # frozen: computed once per task
            test_features[j] = outputs(data.x_test[tasks[j].test_idx])
        return free_scores(classifier, config, method, test_features[j])

    stop = config.train.stop_after_tasks
    try:
        for t, task in enumerate(tasks):
            if stop is not None and t >= stop:
                break
            clock = time.time()
            with profile.phase('train', t):
                z = outputs(data.x_train[task.train_idx])
                classifier = fit_training_free(
                    classifier,
                    config,
                    method,
                    z,
                    task.train_rows,
                    num_classes,
                    log,
                )
            train_s = time.time() - clock
            clock = time.time()
            with profile.phase('eval', t):
                accuracy = train.evaluate(
                    config, tasks, t, num_classes, scores_of
                )
            acc[t][: len(accuracy)] = accuracy
            summary = train.task_summary(
                config,
                t,
                task,
                accuracy,
                acc,
                False,
                steps=0,
                train_s=train_s,
                input_wait_frac=0.0,
                curvature_s=0.0,
                eval_s=time.time() - clock,
            )
            per_task.append(summary)
            reporting.report_task(
                log, summary, acc, 0, chief=chief, joint=False
            )
    finally:
        log.close()
        profile.__exit__(None, None, None)

    results = train.results_record(
        config,
        data_name=data.name,
        tasks=tasks,
        num_classes=num_classes,
        joint=False,
        acc=acc,
        per_task=per_task,
        num_trained=len(tasks),
        wall_time_s=time.time() - t_start,
        method_record=method.as_dict(),
    )
    train.write_results(results, profile, time.time() - t_start, workdir, chief)
    if chief and not results['complete']:
        print(
            f'stopped after task {len(per_task)} of {len(tasks)} '
            f'(config.train.stop_after_tasks={stop}).'
        )
    return results
