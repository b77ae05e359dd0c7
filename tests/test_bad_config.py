"""Every configuration mistake a user can make ends before any work, with
exit status 2 and one line that names the field and says what to change."""

import re
import subprocess
import sys

import pytest
from tiny_run import tiny_config

from experiments import cli, config_checks, train

# (overrides of the tiny run, a pattern the message must contain)
BAD_CONFIGS = {
    'unknown method': ({'method': 'ewc2'}, r"config.method='ewc2'.*'ewc'"),
    'unknown setting': ({'setting': 'class-il'}, r'config.setting'),
    'unknown backbone': (
        {'backbone.name': 'efficientnet_lite'},
        r"backbone.name.*did you mean 'efficientnet_lite0'",
    ),
    'unknown curvature': ({'curvature.kind': 'ekfac'}, r'curvature.kind'),
    'unknown trainable': ({'train.trainable': 'head'}, r'train.trainable'),
    'unknown optimizer': ({'optim.name': 'adamw'}, r'optim.name'),
    'unknown schedule': ({'optim.schedule': 'cosine'}, r'optim.schedule'),
    'zero batch': ({'train.batch_size': 0}, r'train.batch_size'),
    'zero steps': ({'train.steps_per_task': 0}, r'steps_per_task'),
    'negative learning rate': (
        {'optim.learning_rate': -0.1},
        r'optim.learning_rate=-0.1 must be > 0',
    ),
    'zero alpha': ({'optim.alpha': 0.0}, r'optim.alpha=0.0 must be > 0'),
    'negative weight decay': (
        {'optim.weight_decay': -1e-5},
        r'optim.weight_decay.*>= 0',
    ),
    'negative buffer': ({'replay.buffer_size': -1}, r'replay.buffer_size'),
    'zero tasks': ({'data.num_tasks': 0}, r'data.num_tasks'),
    'validation share of 1': ({'data.validation': 1.0}, r'data.validation'),
    'replay with task-IL': (
        {'setting': 'task_il', 'replay.buffer_size': 200},
        r'replay.buffer_size=200 with setting task_il',
    ),
    'buffer method without buffer': (
        {'method': 'er', 'replay.buffer_size': 0},
        r"'er' replays from a buffer",
    ),
    'overlapping class groups': (
        {'data.class_groups': ((0, 1), (1, 2))},
        r'class_groups repeats a class',
    ),
    'unequal class groups': (
        {'data.class_groups': ((0, 1), (2, 3, 4))},
        r'groups of equal size',
    ),
    'image too small for the backbone': (
        {'backbone.name': 'efficientnet_lite0', 'backbone.image_size': 16},
        r'image_size=16 is too small for efficientnet_lite0.*at least 32',
    ),
}


@pytest.mark.parametrize('case', sorted(BAD_CONFIGS))
def test_bad_config_is_refused_before_any_work(case, npz_dir, tmp_path):
    overrides, pattern = BAD_CONFIGS[case]
    workdir = tmp_path / 'run'
    with pytest.raises(cli.ConfigError, match=pattern):
        train.train_and_evaluate(tiny_config(npz_dir, **overrides), workdir)
    assert not workdir.exists()  # nothing written


@pytest.mark.parametrize(
    'overrides,pattern',
    [
        ({'data.num_tasks': 6}, r'6 tasks x 2 classes need 12 classes'),
        ({'data.class_groups': ((0, 1), (12, 13))}, r'outside 0..'),
    ],
)
def test_tasks_the_data_cannot_give_are_refused(
    overrides, pattern, npz_dir, tmp_path
):
    with pytest.raises(cli.ConfigError, match=pattern):
        train.train_and_evaluate(
            tiny_config(npz_dir, **overrides), tmp_path / 'run'
        )


def test_batch_that_does_not_divide_over_the_devices(npz_dir, monkeypatch):
    monkeypatch.setattr(config_checks.jax, 'device_count', lambda: 3)
    with pytest.raises(cli.ConfigError, match='does not divide by the 3'):
        config_checks.check_devices(tiny_config(npz_dir))


def test_workdir_that_is_a_file_or_cannot_be_created(npz_dir, tmp_path):
    afile = tmp_path / 'a_file'
    afile.write_text('x')
    with pytest.raises(cli.ConfigError, match='is a file'):
        train.train_and_evaluate(tiny_config(npz_dir), afile)
    # Below a file no folder can be made (also as root, unlike chmod).
    with pytest.raises(cli.ConfigError, match='cannot be created'):
        train.train_and_evaluate(tiny_config(npz_dir), afile / 'run')
    assert afile.read_text() == 'x'


def _cli(args, cwd):
    return subprocess.run(
        [sys.executable, '-m', 'experiments.run', *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


# Mistakes on the command line itself: absl and ml_collections would print
# a traceback or a help screen.
CLI_CASES = {
    'missing config file': (
        ['--config=experiments/configs/clas_il.py'],
        r'clas_il.py: no such config file',
    ),
    'unknown benchmark': (
        ['--config=experiments/configs/class_il.py:seq_cifar11'],
        r"Unknown class_il parameter 'seq_cifar11'",
    ),
    'misspelled section': (
        ['--config=experiments/configs/class_il.py', '--config.trian.seed=1'],
        r"--config.trian.seed: the config has no field 'trian'.*\"train\"",
    ),
    'misspelled field': (
        [
            '--config=experiments/configs/class_il.py',
            '--config.train.batch_sise=8',
        ],
        r"no field 'batch_sise'.*\"batch_size\"",
    ),
    'value of the wrong type': (
        [
            '--config=experiments/configs/class_il.py',
            '--config.train.batch_size=eight',
        ],
        r'batch_size=eight',
    ),
    'unknown flag': (
        ['--config=experiments/configs/class_il.py', '--wrkdir=x'],
        r"Unknown command line flag 'wrkdir'.*workdir",
    ),
    'bad config value': (
        ['--config=experiments/configs/class_il.py', '--config.method=ewc2'],
        r"config.method='ewc2' is unknown",
    ),
}


@pytest.mark.parametrize('case', sorted(CLI_CASES))
def test_command_line_mistake_gives_one_line_and_exit_2(
    case, repo_root, tmp_path
):
    args, pattern = CLI_CASES[case]
    if not any(a.startswith('--wrkdir') for a in args):
        args = [*args, f'--workdir={tmp_path / "run"}']
    proc = _cli(args, repo_root)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
    assert 'Traceback' not in proc.stderr + proc.stdout
    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / 'run').exists()


def test_a_backbone_file_of_another_architecture(npz_dir, tmp_path):
    import jax
    import numpy as np

    from dlcft_jax import models
    from experiments import backbones

    net = models.cifar_resnet18(width_multiplier=0.0625)
    path = tmp_path / 'backbone.npz'
    backbones.save_backbone(
        path,
        net.init(jax.random.key(0), np.zeros((1, 32, 32, 3))),
        {
            'format_version': backbones.BACKBONE_FORMAT_VERSION,
            'architecture': 'cifar_resnet18',
            'model_kwargs': {'width_multiplier': 0.0625},
        },
    )
    config = tiny_config(
        npz_dir,
        **{
            'backbone.name': 'resnet18',
            'backbone.image_size': 32,
            'backbone.checkpoint': str(path),
        },
    )
    with pytest.raises(
        cli.ConfigError, match=r"holds a cifar_resnet18.*'cifar_resnet18'"
    ):
        train.train_and_evaluate(config, tmp_path / 'run')
