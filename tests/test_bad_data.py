"""Bad data ends the run with one message that says what is wrong (exit 2
through the command line); nothing is trained on silently wrong labels."""

import numpy as np
import pytest
from tiny_run import tiny_config

from experiments import datasets, input_pipeline, train


def _rewrite(npz_dir, split, **arrays):
    """Replaces arrays of SPLIT.npz in the tiny 4-class data folder."""
    path = npz_dir / f'{split}.npz'
    with np.load(path) as d:
        content = {k: d[k] for k in d.files}
    content.update(arrays)
    content = {k: v for k, v in content.items() if v is not None}
    np.savez(path, **content)


def _labels(npz_dir, split):
    with np.load(npz_dir / f'{split}.npz') as d:
        return d['label'], d['image']


def _shift_labels(npz_dir):
    for split in ('train', 'test'):
        y, _ = _labels(npz_dir, split)
        _rewrite(npz_dir, split, label=y + 1)


def _negative_label(npz_dir):
    y, _ = _labels(npz_dir, 'train')
    y = y.copy()
    y[0] = -1
    _rewrite(npz_dir, 'train', label=y)


def _class_without_test_images(npz_dir):
    y, x = _labels(npz_dir, 'test')
    keep = y != 2
    _rewrite(npz_dir, 'test', label=y[keep], image=x[keep])


def _float_images_with_nan(npz_dir):
    _, x = _labels(npz_dir, 'train')
    x = x.astype(np.float32)
    x[0, 0, 0, 0] = np.nan
    _rewrite(npz_dir, 'train', image=x)


def _grey_images(npz_dir):
    _, x = _labels(npz_dir, 'train')
    _rewrite(npz_dir, 'train', image=x[..., 0])


def _fewer_labels(npz_dir):
    y, _ = _labels(npz_dir, 'train')
    _rewrite(npz_dir, 'train', label=y[:-3])


def _no_label_key(npz_dir):
    _rewrite(npz_dir, 'test', label=None)


def _truncated(npz_dir):
    path = npz_dir / 'train.npz'
    path.write_bytes(path.read_bytes()[:5000])


def _not_a_zip(npz_dir):
    (npz_dir / 'test.npz').write_bytes(b'not an npz file at all')


BAD_DATA = {
    'labels 1..C instead of 0..C-1': (
        _shift_labels,
        r'class 0 of task 1 has no training images\. The labels run from 1',
    ),
    'negative label': (_negative_label, r'labels must be >= 0, found -1'),
    'a class without test images': (
        _class_without_test_images,
        r'class 2 of task 2 has no test images',
    ),
    'float images with NaN': (_float_images_with_nan, r'must be uint8'),
    'images without channels': (_grey_images, r'\(N, H, W, 3\)'),
    'fewer labels than images': (_fewer_labels, r'entries but there are'),
    'no label key': (_no_label_key, r"lacks key\(s\) \['label'\]"),
    'truncated npz': (_truncated, r'not a readable \.npz.*truncated'),
    'corrupt npz': (_not_a_zip, r'not a readable \.npz'),
}


@pytest.mark.parametrize('case', sorted(BAD_DATA))
def test_bad_data_is_refused_with_one_message(case, npz_dir, tmp_path):
    spoil, pattern = BAD_DATA[case]
    spoil(npz_dir)
    workdir = tmp_path / 'run'
    with pytest.raises(ValueError, match=pattern):
        train.train_and_evaluate(tiny_config(npz_dir), workdir)
    # Nothing but the (empty) work folder the user asked for.
    assert list(workdir.iterdir()) == []


def test_labels_no_task_uses_are_named(npz_dir, capsys):
    config = tiny_config(npz_dir, **{'data.num_tasks': 1})
    tasks, _ = input_pipeline.make_tasks(config, datasets.load(config.data))
    assert [t.classes for t in tasks] == [[0, 1]]
    assert 'labels [2, 3] belong to no task' in capsys.readouterr().out


def test_bad_data_on_the_command_line_exits_2(npz_dir, tmp_path, run_module):
    _shift_labels(npz_dir)
    proc = run_module(
        'experiments.run',
        '--config=experiments/configs/class_il.py',
        f'--config.data.npz_dir={npz_dir}',
        f'--workdir={tmp_path / "run"}',
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith('error: ')
    assert 'Traceback' not in proc.stderr
