"""Tests for the host-side data utilities in dlcft_jax.data."""

import hashlib
import os
import re

import numpy as np
import pytest

from dlcft_jax import data

_SUBSET_DIR = os.path.join(
    os.path.dirname(__file__), '..', 'experiments', 'data', 'cifar10_5x2'
)


def _random_images(n: int, seed: int = 0, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(
        0, 256, (n, size, size, 3), dtype=np.uint8
    )


# ---------------------------------------------------------------------------
# load_npz
# ---------------------------------------------------------------------------


def test_load_npz_from_dir_and_file(tmp_path):
    images = _random_images(5)
    labels = np.arange(5, dtype=np.int64)
    np.savez_compressed(tmp_path / 'train.npz', image=images, label=labels)
    for source in (tmp_path, tmp_path / 'train.npz'):
        x, y = data.load_npz(source, 'train')
        np.testing.assert_array_equal(x, images)
        np.testing.assert_array_equal(y, labels)
        assert x.dtype == np.uint8 and y.dtype == np.int32


def test_load_npz_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='test.npz'):
        data.load_npz(tmp_path, 'test')


@pytest.mark.parametrize(
    'arrays,error,match',
    [
        ({'image': _random_images(2)}, ValueError, 'label'),
        (
            {'image': _random_images(3), 'label': np.zeros(2)},
            ValueError,
            'integer',
        ),
        (
            {'image': _random_images(3), 'label': np.zeros(2, np.int64)},
            ValueError,
            '2 entries but there are 3 images',
        ),
        (
            {
                'image': np.zeros((2, 4, 4, 3), np.float32),
                'label': np.zeros(2, np.int64),
            },
            ValueError,
            'uint8',
        ),
        (
            {
                'image': np.zeros((2, 3, 4, 4), np.uint8),
                'label': np.zeros(2, np.int64),
            },
            ValueError,
            'NHWC',
        ),
    ],
    ids=['no_label', 'float_label', 'count', 'float_image', 'nchw'],
)
def test_load_npz_errors(tmp_path, arrays, error, match):
    np.savez(tmp_path / 'bad.npz', **arrays)
    with pytest.raises(error, match=match):
        data.load_npz(tmp_path / 'bad.npz', 'train')


def test_committed_cifar10_subset_matches_readme():
    with open(os.path.join(_SUBSET_DIR, 'README.md')) as f:
        readme = f.read()
    total = 0
    for split, per_class in (('train', 300), ('test', 100)):
        path = os.path.join(_SUBSET_DIR, f'{split}.npz')
        total += os.path.getsize(path)
        with open(path, 'rb') as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        assert re.search(rf'`{split}.npz`.*{digest}', readme), split
        images, labels = data.load_npz(_SUBSET_DIR, split)
        assert images.shape == (10 * per_class, 32, 32, 3)
        np.testing.assert_array_equal(
            np.bincount(labels), np.full(10, per_class)
        )
    assert total < 12_000_000


# ---------------------------------------------------------------------------
# Class-incremental splits
# ---------------------------------------------------------------------------


def test_split_natural_order_is_disjoint_and_covers():
    labels = np.repeat(np.arange(10), 3)
    tasks = data.class_incremental_split(labels, 2, 5)
    assert [t.tolist() for t in tasks] == [
        [0, 1],
        [2, 3],
        [4, 5],
        [6, 7],
        [8, 9],
    ]
    indices = [data.task_indices(labels, t) for t in tasks]
    joined = np.concatenate(indices)
    # Every example belongs to exactly one task.
    np.testing.assert_array_equal(np.sort(joined), np.arange(labels.size))
    for t, idx in zip(tasks, indices, strict=True):
        assert set(labels[idx].tolist()) == set(t.tolist())


def test_split_custom_order_and_subset_of_classes():
    labels = np.arange(100)
    order = np.random.default_rng(0).permutation(100)
    tasks = data.class_incremental_split(labels, 10, 3, class_order=order)
    np.testing.assert_array_equal(np.concatenate(tasks), order[:30])
    assert len(np.unique(np.concatenate(tasks))) == 30


def test_split_errors_say_what_to_change():
    labels = np.arange(10)
    with pytest.raises(ValueError, match='lower classes_per_task or num_tasks'):
        data.class_incremental_split(labels, 3, 4)
    with pytest.raises(ValueError, match=r'labels must lie in \[0, 10\)'):
        data.class_incremental_split(np.array([0, 10]), 2, 5, num_classes=10)
    with pytest.raises(ValueError, match=r'labels must lie'):
        data.class_incremental_split(np.array([-1, 3]), 1, 1, num_classes=10)
    with pytest.raises(ValueError, match='repeat'):
        data.class_incremental_split(labels, 2, 2, class_order=[0, 1, 1, 2])
    with pytest.raises(ValueError, match='outside'):
        data.class_incremental_split(labels, 1, 2, class_order=[0, 12])
    with pytest.raises(ValueError, match='extend class_order'):
        data.class_incremental_split(labels, 2, 2, class_order=[0, 1, 2])


# ---------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------


def test_augment_keeps_shape_dtype_and_is_deterministic():
    images = _random_images(16)
    a = data.augment_crop_flip(images, np.random.default_rng(1))
    b = data.augment_crop_flip(images, np.random.default_rng(1))
    assert a.shape == images.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    # The input is not modified in place.
    np.testing.assert_array_equal(images, _random_images(16))


def test_flip_only_returns_image_or_mirror():
    images = _random_images(64)
    out = data.augment_crop_flip(images, np.random.default_rng(0), pad=0)
    same = np.all(out == images, axis=(1, 2, 3))
    mirrored = np.all(out == images[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored)
    # Both outcomes occur (each has probability 1/2 per image).
    assert same.sum() > 10 and mirrored.sum() > 10
    # Mirroring a mirror restores the image: applying flip-only twice gives
    # back the input exactly where the two draws agreed.
    twice = data.augment_crop_flip(out, np.random.default_rng(1), pad=0)
    back = np.all(twice == images, axis=(1, 2, 3))
    assert back.sum() > 10 and not back.all()


def test_crop_is_a_window_of_the_zero_padded_image():
    pad, n = 4, 24
    images = _random_images(n, size=8)
    out = data.augment_crop_flip(images, np.random.default_rng(2), pad=pad)
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = []
    for k in range(n):
        matches = []
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                window = padded[k, dy : dy + 8, dx : dx + 8]
                if np.array_equal(out[k], window) or np.array_equal(
                    out[k], window[:, ::-1]
                ):
                    matches.append((dy, dx))
        assert matches, f'image {k} is not a padded crop'
        offsets.append(matches[0])
    # Crops are actually shifted, not always centred.
    assert len(set(offsets)) > 5


# ---------------------------------------------------------------------------
# Batch iterators
# ---------------------------------------------------------------------------


def test_batches_static_shape_and_epoch_permutation():
    n, bs = 40, 8
    images = _random_images(n, size=4)
    labels = np.arange(n, dtype=np.int32)
    it = data.batches(images, labels, bs, np.random.default_rng(0), epochs=2)
    out = list(it)
    assert len(out) == 2 * n // bs
    for b in out:
        assert b['image'].shape == (bs, 4, 4, 3) and b['label'].shape == (bs,)
        # Images and labels stay paired.
        np.testing.assert_array_equal(b['image'], images[b['label']])
    epoch1 = np.concatenate([b['label'] for b in out[:5]])
    epoch2 = np.concatenate([b['label'] for b in out[5:]])
    np.testing.assert_array_equal(np.sort(epoch1), labels)
    np.testing.assert_array_equal(np.sort(epoch2), labels)
    # Reshuffled between epochs.
    assert not np.array_equal(epoch1, epoch2)


def test_batches_remainder_handling():
    n, bs = 10, 4
    images = _random_images(n, size=2)
    labels = np.arange(n, dtype=np.int32)
    dropped = list(
        data.batches(images, labels, bs, np.random.default_rng(0), epochs=1)
    )
    assert len(dropped) == 2
    kept = list(
        data.batches(
            images,
            labels,
            bs,
            np.random.default_rng(0),
            drop_remainder=False,
            epochs=1,
        )
    )
    assert len(kept) == 3 and all(b['label'].shape == (bs,) for b in kept)
    # Every example is seen at least once in the epoch.
    assert set(np.concatenate([b['label'] for b in kept])) == set(range(n))
    # Fewer examples than a batch still gives full batches without dropping.
    small = list(
        data.batches(
            images[:3],
            labels[:3],
            8,
            np.random.default_rng(0),
            drop_remainder=False,
            epochs=1,
        )
    )
    assert len(small) == 1 and small[0]['label'].shape == (8,)
    with pytest.raises(ValueError, match='drop_remainder=False'):
        next(data.batches(images, labels, 16, np.random.default_rng(0)))


def test_batches_infinite_by_default_and_deterministic():
    images = _random_images(6, size=2)
    labels = np.arange(6, dtype=np.int32)
    it_a = data.batches(images, labels, 4, np.random.default_rng(3))
    it_b = data.batches(images, labels, 4, np.random.default_rng(3))
    for _ in range(10):  # more batches than one epoch holds
        np.testing.assert_array_equal(next(it_a)['label'], next(it_b)['label'])


def test_eval_batches_pad_with_mask():
    n, bs = 10, 4
    images = _random_images(n, size=2)
    labels = np.arange(1, n + 1, dtype=np.int32)
    out = list(data.eval_batches(images, labels, bs))
    assert len(out) == 3
    for b in out:
        assert b['image'].shape == (bs, 2, 2, 3)
        assert b['mask'].dtype == np.float32
    np.testing.assert_array_equal(out[-1]['mask'], [1, 1, 0, 0])
    np.testing.assert_array_equal(out[-1]['label'][2:], [0, 0])
    assert not out[-1]['image'][2:].any()
    mask = np.concatenate([b['mask'] for b in out]).astype(bool)
    # The real rows, in order, are exactly the input.
    np.testing.assert_array_equal(
        np.concatenate([b['label'] for b in out])[mask], labels
    )
    np.testing.assert_array_equal(
        np.concatenate([b['image'] for b in out])[mask], images
    )
    assert mask.sum() == n
