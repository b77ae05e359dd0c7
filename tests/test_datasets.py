"""Tests of experiments/datasets.py, the continual runner's data sources.

CIFAR comes from `tfds.testing.mock_data` (no TensorFlow, no download),
MIT-67 from a tiny fake folder of Pillow-written JPEGs in the layout of the
official release.
"""

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dlcft_jax import data as data_lib
from experiments import datasets


def _config(**fields):
    base = {
        'source': 'npz',
        'name': None,
        'npz_dir': None,
        'tfds_data_dir': None,
        'mit67_dir': None,
        'cache_dir': None,
    }
    base.update(fields)
    return ml_collections.ConfigDict(base)


# ---------------------------------------------------------------------------
# tfds.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    'name,num_classes', [('cifar10', 10), ('cifar100', 100)]
)
def test_tfds_cifar_from_mocked_source(name, num_classes):
    config = _config(source='tfds', name=name)
    with tfds.testing.mock_data(num_examples=7):
        ds = datasets.load(config)
        again = datasets.load(config)
        source = tfds.data_source(name, split='test', download=False)
        records = [source[i] for i in range(len(source))]
    assert ds.name == name and ds.num_classes == num_classes
    assert ds.augmentation == 'crop_flip'
    assert ds.mean == datasets.IMAGENET_MEAN
    assert ds.std == datasets.IMAGENET_STD
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.shape == (7, 32, 32, 3) and x.dtype == np.uint8
        assert y.shape == (7,) and y.dtype == np.int32
        assert y.min() >= 0 and y.max() < num_classes
    # The records themselves, in order; for CIFAR-100 the fine label.
    np.testing.assert_array_equal(
        ds.x_test, np.stack([r['image'] for r in records])
    )
    np.testing.assert_array_equal(ds.y_test, [r['label'] for r in records])
    # Deterministic.
    np.testing.assert_array_equal(ds.x_train, again.x_train)
    np.testing.assert_array_equal(ds.y_train, again.y_train)


def test_tfds_not_prepared_says_how_to_prepare(tmp_path):
    config = _config(
        source='tfds', name='cifar100', tfds_data_dir=str(tmp_path)
    )
    with pytest.raises(FileNotFoundError) as info:
        datasets.load(config)
    message = str(info.value)
    assert 'pip install tensorflow' in message
    assert (
        f'tfds build cifar100 --file_format=array_record --data_dir={tmp_path}'
        in message
    )
    assert '--config.data.npz_dir=DIR' in message


def test_tfds_needs_a_known_name(tmp_path):
    with pytest.raises(ValueError, match='data.name'):
        datasets.load(_config(source='tfds'))
    with pytest.raises(ValueError, match='Unknown tfds data set'):
        datasets.load(
            _config(source='tfds', name='no_such_set', tfds_data_dir=tmp_path)
        )


class _Source:
    """A list-like data source that counts batched reads."""

    def __init__(self, n, batched=True):
        self.n = n
        self.batched = batched
        self.batch_calls = 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {'label': i}

    def __getitems__(self, keys):
        if not self.batched:  # as in tfds.testing.mock_data
            raise TypeError('missing 1 required positional argument')
        self.batch_calls += 1
        return [self[i] for i in keys]


@pytest.mark.parametrize('batched', [True, False])
def test_read_records_batched_or_one_by_one(batched):
    n = 2 * datasets._TFDS_READ_CHUNK + 5
    source = _Source(n, batched=batched)
    records = datasets._read_records(source)
    assert [r['label'] for r in records] == list(range(n))
    assert source.batch_calls == (3 if batched else 0)


# ---------------------------------------------------------------------------
# MIT-67.
# ---------------------------------------------------------------------------

# Created in this (unsorted) order; labels follow the sorted names.
_CLASSES = {
    'zoo': (200, 30, 30),
    'airport': (30, 200, 30),
    'bar': (30, 30, 200),
}
_SIZES = [(300, 200), (64, 48), (256, 256)]  # (width, height) per image


def _write_mit67(root):
    """Writes a fake MIT-67 folder: 3 images per class, 2 train / 1 test."""
    train, test = [], []
    for name, color in _CLASSES.items():
        (root / 'Images' / name).mkdir(parents=True)
        for k, size in enumerate(_SIZES):
            image = Image.new('RGB', size, color)
            if k == 1:
                image = image.convert('L')  # a grayscale file
            image.save(root / 'Images' / name / f'{name}_{k}.jpg', quality=95)
            (test if k == 2 else train).append(f'{name}/{name}_{k}.jpg')
    # A file with detail, to compare the resizing with Pillow's own.
    ramp = np.add.outer(np.arange(90), np.arange(130)).astype(np.uint8)
    Image.fromarray(np.stack([ramp, ramp[::-1], 255 - ramp], -1)).save(
        root / 'Images' / 'bar' / 'ramp.jpg', quality=95
    )
    train.append('bar/ramp.jpg')
    (root / 'TrainImages.txt').write_text('\n'.join(train) + '\n')
    (root / 'TestImages.txt').write_text('\r\n'.join(test))
    return train, test


@pytest.fixture(name='mit67')
def fixture_mit67(tmp_path):
    root = tmp_path / 'mit67'
    train, test = _write_mit67(root)
    config = _config(
        source='mit67', mit67_dir=str(root), cache_dir=str(tmp_path / 'cache')
    )
    return config, train, test


def test_mit67_decodes_resizes_and_labels(mit67):
    config, train, test = mit67
    ds = datasets.load(config)
    assert ds.name == 'mit67' and ds.num_classes == 3
    assert ds.augmentation == 'crop'
    assert ds.mean == datasets.MIT67_MEAN and ds.std == datasets.MIT67_STD
    assert ds.x_train.shape == (len(train), 256, 256, 3)
    assert ds.x_test.shape == (len(test), 256, 256, 3)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    classes = sorted(_CLASSES)  # ['airport', 'bar', 'zoo']
    expected = [classes.index(e.split('/')[0]) for e in train]
    np.testing.assert_array_equal(ds.y_train, expected)
    # Listed order (zoo, airport, bar), labels of the sorted names.
    np.testing.assert_array_equal(ds.y_test, [2, 0, 1])
    # Solid images keep their colour (JPEG is lossy, hence the tolerance);
    # the grayscale file becomes three equal channels.
    for image, entry in zip(ds.x_test, test, strict=True):
        color = np.array(_CLASSES[entry.split('/')[0]])
        assert np.abs(image.reshape(-1, 3).mean(0) - color).max() < 4
    gray = ds.x_train[train.index('zoo/zoo_1.jpg')]
    assert (gray[..., 0] == gray[..., 1]).all()
    assert (gray[..., 1] == gray[..., 2]).all()
    # Bilinear resizing of the RGB image, exactly as Pillow does it.
    path = config.mit67_dir + '/Images/bar/ramp.jpg'
    with Image.open(path) as image:
        want = image.convert('RGB').resize((256, 256), Image.BILINEAR)
    np.testing.assert_array_equal(ds.x_train[-1], np.asarray(want))


def test_mit67_cache_is_written_and_reused(mit67, monkeypatch, tmp_path):
    config, train, _ = mit67
    first = datasets.load(config)
    cached = list((tmp_path / 'cache').glob('mit67_*.npz'))
    assert len(cached) == 1

    def no_decoding(path):
        raise AssertionError(f'decoded {path} despite the cache')

    monkeypatch.setattr(datasets, '_decode_image', no_decoding)
    second = datasets.load(config)
    np.testing.assert_array_equal(second.x_train, first.x_train)
    np.testing.assert_array_equal(second.y_test, first.y_test)
    assert second.num_classes == first.num_classes

    # Another train list is another cache entry: it is decoded again.
    root = tmp_path / 'mit67'
    (root / 'TrainImages.txt').write_text('\n'.join(train[:2]))
    with pytest.raises(AssertionError, match='despite the cache'):
        datasets.load(config)


@pytest.mark.parametrize('missing', ['TestImages.txt', 'Images'])
def test_mit67_missing_layout_is_explained(mit67, missing):
    config, _, _ = mit67
    path = datasets.Path(config.mit67_dir) / missing
    if path.is_dir():
        path.rename(path.with_name('elsewhere'))
    else:
        path.unlink()
    with pytest.raises(FileNotFoundError) as info:
        datasets.load(config)
    message = str(info.value)
    assert missing in message
    assert 'Images/<class>/<file>.jpg' in message
    assert datasets.MIT67_URL in message


def test_mit67_missing_image_or_dir(mit67):
    config, _, _ = mit67
    (datasets.Path(config.mit67_dir) / 'Images' / 'bar' / 'bar_0.jpg').unlink()
    with pytest.raises(FileNotFoundError, match='bar/bar_0.jpg'):
        datasets.load(config)
    with pytest.raises(FileNotFoundError, match='mit67_dir is not set'):
        datasets.load(_config(source='mit67'))


# ---------------------------------------------------------------------------
# npz, validation.
# ---------------------------------------------------------------------------


def test_npz_dir_overrides_source(npz_dir):
    for source in ('tfds', 'mit67', 'npz'):
        ds = datasets.load(_config(source=source, npz_dir=str(npz_dir)))
        assert ds.name == f'npz:{npz_dir}'
    x, y = data_lib.load_npz(npz_dir, 'train')
    np.testing.assert_array_equal(ds.x_train, x)
    np.testing.assert_array_equal(ds.y_train, y)
    assert ds.num_classes == 4 and ds.augmentation == 'crop_flip'


def test_older_config_without_source_uses_committed_subset():
    ds = datasets.load(ml_collections.ConfigDict({'npz_dir': None}))
    assert ds.name == f'npz:{datasets.DEFAULT_NPZ_DIR}'
    assert ds.num_classes == 10 and ds.x_train.shape[1:] == (32, 32, 3)


def test_unknown_source_and_bad_arrays_raise():
    with pytest.raises(ValueError, match='Unknown data.source'):
        datasets.load(_config(source='imagenet'))
    x = np.zeros((4, 8, 8, 3), np.uint8)
    y = np.array([0, 1, 2, 1], np.int32)
    fields = {
        'name': 't',
        'x_train': x,
        'y_train': y,
        'x_test': x,
        'y_test': y,
        'num_classes': 3,
        'augmentation': 'none',
        'mean': (0.5,) * 3,
        'std': (0.5,) * 3,
    }
    datasets.Dataset(**fields)  # valid
    for bad, match in [
        ({'num_classes': 2}, r'labels must lie in \[0, 2\)'),
        ({'y_test': y[:3]}, 'one per image'),
        ({'y_train': y.astype(np.int64)}, 'int32'),
        ({'x_test': x.astype(np.float32)}, 'uint8'),
        ({'x_test': np.zeros((4, 9, 8, 3), np.uint8)}, 'same image size'),
        ({'augmentation': 'flip'}, 'augmentation'),
    ]:
        with pytest.raises(ValueError, match=match):
            datasets.Dataset(**{**fields, **bad})


# ---------------------------------------------------------------------------
# Data-IL chunks.
# ---------------------------------------------------------------------------


def test_data_il_chunks_are_equal_disjoint_and_seeded():
    chunks = datasets.data_il_chunks(103, 4, seed=0)
    assert [len(c) for c in chunks] == [25] * 4
    joined = np.concatenate(chunks)
    assert np.unique(joined).size == 100 and joined.max() < 103
    assert all((np.diff(c) > 0).all() for c in chunks)
    again = datasets.data_il_chunks(103, 4, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(chunks, again, strict=True))
    other = datasets.data_il_chunks(103, 4, seed=1)
    assert not all(
        np.array_equal(a, b) for a, b in zip(chunks, other, strict=True)
    )
    with pytest.raises(ValueError):
        datasets.data_il_chunks(3, 4, seed=0)
    with pytest.raises(ValueError):
        datasets.data_il_chunks(10, 0, seed=0)


# ---------------------------------------------------------------------------
# Transforms.
# ---------------------------------------------------------------------------


def _coordinate_images(n, size):
    """uint8 images whose pixel (y, x) of image i holds (y, x, i)."""
    y, x = np.meshgrid(np.arange(size), np.arange(size), indexing='ij')
    return np.stack(
        [np.stack([y, x, np.full_like(y, i)], -1) for i in range(n)]
    ).astype(np.uint8)


@pytest.mark.parametrize('name', ['crop_flip', 'cifar100'])
def test_crop_flip_is_augment_crop_flip(name):
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3))
    images = images.astype(np.uint8)
    out = datasets.train_transform(name, images, np.random.default_rng(3))
    want = data_lib.augment_crop_flip(images, np.random.default_rng(3))
    assert out.shape == images.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, want)


def test_crop_is_a_random_224_window_without_flip():
    images = _coordinate_images(12, 256)
    out = datasets.train_transform('crop', images, np.random.default_rng(0))
    assert out.shape == (12, 224, 224, 3) and out.dtype == np.uint8
    offsets = set()
    for i in range(12):
        top, left, index = out[i, 0, 0].astype(int)
        assert index == i
        window = images[i, top : top + 224, left : left + 224]
        np.testing.assert_array_equal(out[i], window)
        offsets.add((top, left))
    assert len(offsets) > 1  # per-image offsets
    again = datasets.train_transform('mit67', images, np.random.default_rng(0))
    np.testing.assert_array_equal(out, again)


def test_test_transform_and_identities():
    images = _coordinate_images(3, 256)
    centre = datasets.test_transform('crop', images)
    np.testing.assert_array_equal(centre, images[:, 16:240, 16:240])
    assert centre.shape == (3, 224, 224, 3)
    for augmentation in ('crop_flip', 'none'):
        assert datasets.test_transform(augmentation, images) is images
    rng = np.random.default_rng(0)
    assert datasets.train_transform('none', images, rng) is images
    with pytest.raises(ValueError, match='Unknown augmentation'):
        datasets.train_transform('flip', images, rng)
    with pytest.raises(ValueError, match='Cannot crop'):
        datasets.train_transform('crop', images[:, :200], rng)


def test_hold_out_is_a_stratified_validation_split():
    data = datasets.load({})  # the committed CIFAR-10 subset
    val = datasets.hold_out(data, 0.1, seed=0)
    n = np.bincount(data.y_train, minlength=data.num_classes)
    held = np.bincount(val.y_test, minlength=data.num_classes)
    np.testing.assert_array_equal(held, np.round(0.1 * n))
    assert len(val.y_train) + len(val.y_test) == len(data.y_train)
    # The held-out images are training images, disjoint from those kept.
    flat = data.x_train.reshape(len(data.x_train), -1)
    rows = {r.tobytes(): i for i, r in enumerate(flat)}
    kept = {
        rows[r.tobytes()] for r in val.x_train.reshape(len(val.x_train), -1)
    }
    out = {rows[r.tobytes()] for r in val.x_test.reshape(len(val.x_test), -1)}
    assert not kept & out and len(kept | out) == len(data.y_train)
    # The same split for every call; another seed gives another one.
    again = datasets.hold_out(data, 0.1, seed=0)
    np.testing.assert_array_equal(again.y_test, val.y_test)
    np.testing.assert_array_equal(again.x_test, val.x_test)
    other = datasets.hold_out(data, 0.1, seed=1)
    assert not np.array_equal(other.x_test, val.x_test)
    with pytest.raises(ValueError, match='validation'):
        datasets.hold_out(data, 1.0)
