"""The paper's benchmark configs build and run a few steps on mock data.

Seq-CIFAR-100 comes from `tfds.testing.mock_data` (random images and
labels, no download, no TensorFlow) and Seq-MIT-67 from a fake folder in
the MIT Indoor-67 layout. Each config runs with its own setting, task
structure (10 or 100 tasks, 4 chunks), data pipeline and backbone
architecture; only the budgets (steps, batch sizes) and the backbone's
width or input size are cut down, and the pre-trained weights are random.
"""

import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tiny_run import set_fields

from dlcft_jax import models
from experiments import backbones, train
from experiments.configs import class_il, data_il, task_il

SMALL = {
    'train.steps_per_task': 2,
    'train.batch_size': 8,
    'train.log_every': 1,
    'curvature.num_batches': 1,
    'curvature.batch_size': 8,
    'eval.batch_size': 400,
    'checkpoint.every_steps': 0,
}


def _random_backbone(path, architecture, **kwargs):
    """A randomly initialised backbone export, as experiments.pretrain
    writes it (the pre-trained weights are not part of the test)."""
    net = {
        'cifar_resnet18': models.cifar_resnet18,
        'resnet18': models.resnet18,
    }[architecture](**kwargs)
    variables = net.init(jax.random.key(0), np.zeros((1, 32, 32, 3)))
    backbones.save_backbone(
        path,
        variables,
        {
            'format_version': backbones.BACKBONE_FORMAT_VERSION,
            'architecture': architecture,
            'model_kwargs': kwargs,
            'dataset': 'random (test)',
        },
    )
    return str(path)


@pytest.fixture(name='cifar_backbone', scope='module')
def fixture_cifar_backbone(tmp_path_factory):
    # The CIFAR ResNet-18 of the paper at 1/16 width.
    return _random_backbone(
        tmp_path_factory.mktemp('backbone') / 'backbone.npz',
        'cifar_resnet18',
        width_multiplier=0.0625,
        activation='leaky_relu',
    )


@pytest.mark.parametrize(
    'module,benchmark,num_tasks',
    [
        (class_il, 'seq_cifar100', 10),
        (task_il, 'seq_cifar100', 10),
        (data_il, 'seq_cifar100', 10),
        (data_il, 'seq_cifar100_100', 100),
    ],
)
def test_seq_cifar100_configs_run_on_mock_data(
    tmp_path, cifar_backbone, module, benchmark, num_tasks
):
    config = module.get_config(benchmark)
    assert config.data.source == 'tfds' and config.data.name == 'cifar100'
    assert config.backbone.name == 'cifar_resnet18'
    assert config.data.num_tasks == num_tasks
    assert config.train.batch_size == 128  # the paper's
    set_fields(config, SMALL)
    config.backbone.checkpoint = cifar_backbone
    if config.setting == 'class_il':
        config.replay.batch_size = 8
    # 100 tasks (each evaluated on the whole test set): the first 3 here.
    done = min(num_tasks, 10)
    if done < num_tasks:
        config.train.stop_after_tasks = 3
        done = 3
    workdir = tmp_path / 'run'
    # Random examples, per split: 8 per chunk of 100 tasks, 40 per chunk of
    # 10; in class- and task-IL every class of every task needs images in
    # both splits (the runner refuses an empty class), so 2,000 (20 per
    # class on average; with the mock's fixed seed none is missing).
    examples = 800 if num_tasks == 100 else 400
    if config.setting != 'data_il':
        examples = 2000
    with tfds.testing.mock_data(num_examples=examples):
        results = train.train_and_evaluate(config, str(workdir))
    assert results['data'] == 'cifar100'
    assert results['num_tasks'] == num_tasks
    assert results['tasks_done'] == done
    assert results['complete'] == (done == num_tasks)
    acc = results['accuracy_matrix']
    assert len(acc) == num_tasks and all(
        0.0 <= acc[i][j] <= 100.0 for i in range(done) for j in range(i + 1)
    )
    if config.setting == 'task_il':
        # The authors' grouping, ten 10-way heads.
        assert results['task_classes'][0] == [
            64,
            67,
            7,
            75,
            50,
            84,
            93,
            87,
            29,
            63,
        ]
        assert results['num_classes'] == 100
    if config.setting == 'class_il':
        assert results['task_classes'][1] == list(range(10, 20))
    if config.setting == 'data_il':
        sizes = {p['chunk_size'] for p in results['per_task']}
        assert sizes == {examples // num_tasks}
    for name in ('results.json', 'summary.txt', 'results.png', 'log.jsonl'):
        assert (workdir / name).is_file(), name
    log = [
        json.loads(line)
        for line in (workdir / 'log.jsonl').read_text().splitlines()
    ]
    assert sum(e.get('event') == 'task_end' for e in log) == done


def _fake_mit67(root, classes=5, per_class=10):
    """MIT Indoor-67's layout: Images/<class>/<file>.jpg and the lists."""
    rng = np.random.default_rng(0)
    train, test = [], []
    for c in range(classes):
        folder = root / 'Images' / f'room{c}'
        folder.mkdir(parents=True)
        for k in range(per_class):
            size = tuple(int(v) for v in rng.integers(200, 400, size=2))
            pixels = rng.integers(
                0, 255, size=size[::-1] + (3,), dtype=np.uint8
            )
            Image.fromarray(pixels).save(folder / f'{k}.jpg')
            (test if k >= 8 else train).append(f'room{c}/{k}.jpg')
    (root / 'TrainImages.txt').write_text('\n'.join(train) + '\n')
    (root / 'TestImages.txt').write_text('\n'.join(test) + '\n')


def test_seq_mit67_config_runs_on_a_fake_folder(tmp_path):
    config = data_il.get_config('seq_mit67')
    assert config.data.source == 'mit67' and config.data.num_tasks == 4
    assert config.backbone.name == 'resnet18'
    assert config.backbone.image_size == 224
    _fake_mit67(tmp_path / 'mit67')
    set_fields(config, SMALL)
    config.data.mit67_dir = str(tmp_path / 'mit67')
    config.data.cache_dir = str(tmp_path / 'cache')
    config.train.batch_size = 4
    config.curvature.batch_size = 4
    # The ImageNet-layout ResNet-18 at 32 px instead of 224 (CPU time).
    config.backbone.image_size = 32
    config.backbone.checkpoint = _random_backbone(
        tmp_path / 'resnet18.npz', 'resnet18', activation='leaky_relu'
    )
    results = train.train_and_evaluate(config, str(tmp_path / 'run'))
    assert results['data'] == 'mit67' and results['num_classes'] == 5
    assert [p['chunk_size'] for p in results['per_task']] == [10] * 4
    acc = results['accuracy_matrix']
    # The same full test set for every task.
    assert all(row[j] == row[0] for i, row in enumerate(acc) for j in range(i))
