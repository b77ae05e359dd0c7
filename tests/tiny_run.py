"""The tiny class-IL run shared by the resume and scale tests."""

import json
import sys

from experiments.configs import class_il

TIMING_KEYS = (
    'wall_time_s',
    'train_s',
    'curvature_s',
    'eval_s',
    'input_wait_frac',
    'profile',
    'checkpoint_bytes',
)

# The tiny class-IL run: 2 tasks of 2 classes, 6 + 3 steps, replay on.
TINY = {
    'data.num_tasks': 2,
    'backbone.name': 'small_cnn',
    'backbone.image_size': 16,
    'train.batch_size': 8,
    'train.steps_per_task': 3,
    'train.log_every': 1,
    'curvature.num_batches': 2,
    'curvature.batch_size': 8,
    'replay.buffer_size': 10,
    'replay.batch_size': 4,
    'eval.batch_size': 16,
    'checkpoint.every_steps': 2,
}


def set_fields(config, overrides):
    """Sets `config` fields named by dotted keys ('train.batch_size')."""
    for key, value in overrides.items():
        node = config
        *path, leaf = key.split('.')
        for name in path:
            node = node[name]
        node[leaf] = value
    return config


def tiny_config(npz_dir, **overrides):
    config = set_fields(class_il.get_config(), {**TINY, **overrides})
    config.data.npz_dir = str(npz_dir)
    return config


def cli_flags(npz_dir, **overrides):
    return [f'--config.{k}={v}' for k, v in {**TINY, **overrides}.items()] + [
        f'--config.data.npz_dir={npz_dir}'
    ]


def cli_command(workdir, npz_dir, **overrides):
    """`python -m experiments.run` of the tiny run, as an argument list."""
    return [
        sys.executable,
        '-m',
        'experiments.run',
        '--config=experiments/configs/class_il.py',
        f'--workdir={workdir}',
        *cli_flags(npz_dir, **overrides),
    ]


#: The per-task objective record (experiments/convergence.py): float sums
#: whose rounding depends on how the examples are split over devices.
MEASURED = (
    'objective',
    'objective_head_optimum',
    'objective_gap',
    'head_grad_norm',
    'penalty',
    'objective_before_head_solve',
)


def without_timings(tree):
    """results minus the wall-clock fields (which differ between runs)."""
    if isinstance(tree, dict):
        return {
            k: without_timings(v)
            for k, v in tree.items()
            if k not in TIMING_KEYS
        }
    if isinstance(tree, list):
        return [without_timings(v) for v in tree]
    return tree


def read_results(workdir):
    return json.loads((workdir / 'results.json').read_text())
