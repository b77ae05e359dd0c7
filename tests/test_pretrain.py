"""End-to-end tests of the pre-training runner on mocked TFDS data.

`tfds.testing.mock_data` (tfds 4.9) also mocks `tfds.data_source` without
TensorFlow: with no stored metadata for `imagenet_resized/32x32` it falls
back to `MockPolicy.USE_CODE` and generates random 32×32×3 uint8 images and
labels in [0, 1000) from the builder's features, deterministically per
index, for every split.
"""

import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tiny_run import tiny_config

from dlcft_jax import linearization
from dlcft_jax.models import resnet
from experiments import backbones, pretrain
from experiments.configs import pretrain_imagenet32, retune_imagenet_resnet18

_NUM_EXAMPLES = 16  # 2 steps per epoch at batch 8
_TOTAL_STEPS = 4


def _tiny_config(max_steps=None, evaluate=True):
    config = pretrain_imagenet32.get_config('tiny')
    config.eval.at_end = evaluate
    config.train.num_steps = _TOTAL_STEPS
    config.train.max_steps = max_steps
    config.train.log_every = 1
    config.checkpoint.every_steps = 2
    config.eval.batch_size = 8
    config.eval.max_examples = 8
    return config


def _run(config, workdir):
    with tfds.testing.mock_data(num_examples=_NUM_EXAMPLES):
        return pretrain.pretrain(config, workdir)


def _log(workdir):
    lines = (workdir / 'log.jsonl').read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(name='full_run', scope='module')
def fixture_full_run(tmp_path_factory):
    """An uninterrupted run of _TOTAL_STEPS steps."""
    workdir = tmp_path_factory.mktemp('full')
    summary = _run(_tiny_config(), workdir)
    return workdir, summary


def test_full_run_writes_checkpoints_log_and_backbone(full_run):
    workdir, summary = full_run
    assert summary['step'] == _TOTAL_STEPS and summary['complete']
    assert 0.0 <= summary['eval_accuracy'] <= 1.0
    steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir())
    assert steps == [2, 4]
    train_steps = [r['step'] for r in _log(workdir) if 'loss' in r]
    assert train_steps == [1, 2, 3, 4]
    info = backbones.backbone_info(workdir / 'backbone.npz')
    assert info['architecture'] == 'cifar_resnet18'
    assert info['model_kwargs'] == {
        'activation': 'leaky_relu',
        'width_multiplier': 0.125,
    }
    assert info['image_size'] == 32 and info['feature_dim'] == 64
    assert info['mean'] == list(pretrain_imagenet32.IMAGENET32_MEAN)


def test_resume_equals_uninterrupted_run(full_run, tmp_path):
    full_dir, _ = full_run
    # Evaluation is covered by the full run; skipping it here saves time.
    first = _run(_tiny_config(max_steps=2, evaluate=False), tmp_path)
    assert first['step'] == 2 and not first['complete']
    second = _run(_tiny_config(evaluate=False), tmp_path)
    assert second['step'] == _TOTAL_STEPS and second['complete']
    # The second invocation continued at step 3 rather than starting over.
    train_steps = [r['step'] for r in _log(tmp_path) if 'loss' in r]
    assert train_steps == [1, 2, 3, 4]
    _, resumed = backbones.load_backbone(tmp_path / 'backbone.npz')
    _, straight = backbones.load_backbone(full_dir / 'backbone.npz')
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)


def test_load_backbone_applies_and_linearizes(full_run):
    workdir, _ = full_run
    kwargs, variables = backbones.load_backbone(workdir / 'backbone.npz')
    assert 'fc' not in variables['params']
    model = resnet.cifar_resnet18(**kwargs)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))

    def apply(v, images):
        return model.apply(v, images)

    out = apply(variables, x)
    assert out.shape == (2, 64)
    f_lin = linearization.linearize(apply, variables)
    np.testing.assert_allclose(f_lin(variables, x), out, rtol=1e-5, atol=1e-5)


def test_pretrained_backbone_drives_a_dlcft_run(full_run, tmp_path, npz_dir):
    """The pre-training export loads as the backbone of a continual run."""
    from experiments import train  # pylint: disable=g-import-not-at-top

    workdir, _ = full_run
    # The tiny class-IL run on the exported backbone, 2 + 2 steps at 32 px.
    config = tiny_config(
        npz_dir,
        **{
            'backbone.name': 'cifar_resnet18',
            'backbone.checkpoint': str(workdir / 'backbone.npz'),
            'backbone.activation': 'leaky_relu',
            'backbone.image_size': 32,
            'train.steps_per_task': 2,
            'train.first_task_multiplier': 1,
            'compilation_cache_dir': '',
        },
    )
    results = train.train_and_evaluate(config, str(tmp_path / 'dlcft'))
    assert results['num_tasks'] == 2
    assert results['config']['backbone']['name'] == 'cifar_resnet18'
    log = [
        json.loads(line)
        for line in (tmp_path / 'dlcft' / 'log.jsonl').read_text().splitlines()
    ]
    assert all(np.isfinite(e['loss']) for e in log if 'loss' in e)
    # A wrong architecture name is caught with a message naming the right one.
    config.backbone.name = 'resnet18'
    with pytest.raises(train.ConfigError, match="'cifar_resnet18'"):
        train.train_and_evaluate(config, str(tmp_path / 'w'))


def test_batch_size_not_divisible_by_devices():
    config = _tiny_config()
    config.train.batch_size = 7
    with pytest.raises(pretrain.ConfigError, match='multiple of the number'):
        pretrain._check_config(config, num_devices=2, num_hosts=1)


def test_batch_larger_than_dataset(tmp_path):
    config = _tiny_config()
    config.train.batch_size = 32
    with pytest.raises(pretrain.ConfigError, match='exceeds the 16'):
        _run(config, tmp_path)


def test_retune_config_requires_init_checkpoint(tmp_path):
    config = retune_imagenet_resnet18.get_config()
    with pytest.raises(pretrain.ConfigError, match='init_checkpoint is req'):
        pretrain._check_config(config, num_devices=1, num_hosts=1)
    config.model.init_checkpoint = str(tmp_path / 'missing.pth')
    with pytest.raises(FileNotFoundError, match='no such file'):
        pretrain._check_config(config, num_devices=1, num_hosts=1)


def test_cli_reports_missing_init_checkpoint(tmp_path, run_module):
    result = run_module(
        'experiments.pretrain',
        '--config=experiments/configs/retune_imagenet_resnet18.py',
        f'--workdir={tmp_path / "run"}',
        timeout=120,
    )
    assert result.returncode == 2
    assert 'error: model.init_checkpoint is required' in result.stderr


def _torchvision_state_dict(variables):
    """Flax ResNet variables under torchvision's state-dict keys."""
    flat = {}
    for path, value in jax.tree_util.tree_leaves_with_path(variables):
        keys = [k.key for k in path]
        collection, module, leaf = keys[0], keys[1:-1], keys[-1]
        name = '.'.join(
            m.replace('_', '.', 1) if m.startswith('layer') else m
            for m in module
        )
        name = name.replace('downsample_conv', 'downsample.0')
        name = name.replace('downsample_bn', 'downsample.1')
        value = np.asarray(value)
        if leaf == 'kernel':
            # HWIO -> OIHW for convs, (in, out) -> (out, in) for the fc.
            value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
            suffix = 'weight'
        elif collection == 'batch_stats':
            suffix = {'mean': 'running_mean', 'var': 'running_var'}[leaf]
        else:
            suffix = {'scale': 'weight', 'bias': 'bias'}[leaf]
        flat[f'{name}.{suffix}'] = np.ascontiguousarray(value)
    return flat


def test_retune_starts_from_init_checkpoint(tmp_path):
    safetensors_numpy = pytest.importorskip('safetensors.numpy')
    model = resnet.resnet18(activation='relu', num_classes=1000)
    variables = model.init(
        jax.random.PRNGKey(1), np.zeros((1, 32, 32, 3)), train=False
    )
    path = tmp_path / 'resnet18.safetensors'
    safetensors_numpy.save_file(_torchvision_state_dict(variables), str(path))

    config = retune_imagenet_resnet18.get_config()
    config.model.init_checkpoint = str(path)
    # 32 px and a zero learning rate keep it cheap and make the trained
    # weights equal the checkpoint's (BN statistics still update).
    config.data.image_size = 32
    config.data.resize_size = 36
    config.train.batch_size = 8
    config.train.num_steps = 1
    config.optim.learning_rate = 0.0
    config.optim.weight_decay = 0.0
    config.eval.at_end = False  # compiling a ResNet-18 eval step is slow
    config.data.num_workers = 2
    config.data.tfds_data_dir = str(tmp_path / 'tfds')
    workdir = tmp_path / 'run'
    # imagenet2012's mock images have random sizes, which exercises the
    # resize + crop path.
    with tfds.testing.mock_data(num_examples=_NUM_EXAMPLES):
        summary = pretrain.pretrain(config, workdir)
    assert summary['complete']
    kwargs, backbone = backbones.load_backbone(workdir / 'backbone.npz')
    assert kwargs == {'activation': 'leaky_relu'}
    assert backbones.backbone_info(workdir / 'backbone.npz')['mean'] == list(
        retune_imagenet_resnet18.IMAGENET_MEAN
    )
    want, _ = resnet.split_head(jax.device_get(variables))
    jax.tree.map(
        np.testing.assert_array_equal, backbone['params'], want['params']
    )


def test_resize_crop_flip_preprocessing():
    config = retune_imagenet_resnet18.get_config()
    config.data.image_size = 8
    config.data.resize_size = 10
    image = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    train = pretrain.preprocess(image, config, np.random.default_rng(0))
    assert train.shape == (8, 8, 3) and train.dtype == np.uint8
    # Evaluation: shorter side to 10 (-> 10x15), then the centre 8x8 crop.
    out = pretrain.preprocess(image, config, None)
    resized = pretrain._resize_shorter(image, 10)
    assert resized.shape == (10, 15, 3)
    np.testing.assert_array_equal(out, resized[1:9, 3:11])
    grey = pretrain.preprocess(image[:, :, 0], config, None)
    assert grey.shape == (8, 8, 3)
