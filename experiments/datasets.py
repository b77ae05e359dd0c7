"""Host-side data sources of the continual runner (docs/method.md §1, §2.5).

`load(data_config)` returns a `Dataset`: the whole train and test splits as
uint8 NHWC arrays in host memory, with int32 labels, the number of classes,
the augmentation recipe and the normalisation statistics of the benchmark.
Three sources are supported:

* `'tfds'`: CIFAR-10 / CIFAR-100 read with `tfds.data_source`, which needs
  no TensorFlow once the data set is prepared in `array_record` format
  (preparing it does need TensorFlow; see `_tfds_not_prepared_message`).
  CIFAR-100 uses the fine `'label'` (100 classes).
* `'mit67'`: MIT Indoor-67 from the official folder layout
  (`Images/<class>/<file>.jpg`, `TrainImages.txt`, `TestImages.txt`),
  https://web.mit.edu/torralba/www/indoor.html. The JPEGs are decoded with
  Pillow (installed as a dependency of matplotlib), converted to RGB and
  resized to 256x256 (bilinear); the decoded arrays are cached as `.npz` so
  the ~6,700 images are decoded only once.
* `'npz'`: a folder with `train.npz` / `test.npz` (keys `image`, uint8 NHWC,
  and `label`), read with `dlcft_jax.data.load_npz`. Setting
  `data.npz_dir` selects this source whatever `data.source` says; with
  `source='npz'` and no `npz_dir`, the CIFAR-10 subset committed in
  `experiments/data/cifar10_5x2` is used.

`train_transform` / `test_transform` are the per-batch host transforms
('crop_flip' for CIFAR, 'crop' for MIT-67) and `data_il_chunks` splits a
training set into the equal, seeded chunks of the data-IL setting.
Everything is plain NumPy with explicit generators, so results are
reproducible given a seed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dlcft_jax import data as data_lib

SOURCES = ('tfds', 'npz', 'mit67')
AUGMENTATIONS = ('crop_flip', 'crop', 'none')

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIT67_MEAN = (0.4811, 0.4272, 0.3688)
MIT67_STD = (0.2656, 0.2584, 0.2606)

MIT67_URL = 'https://web.mit.edu/torralba/www/indoor.html'
MIT67_IMAGE_SIZE = 256  # stored size (the images are resized to this)
MIT67_CROP_SIZE = 224  # network input size (random / centre crop)

DEFAULT_NPZ_DIR = Path(__file__).resolve().parent / 'data' / 'cifar10_5x2'
DEFAULT_CACHE_DIR = Path('~/.cache/dlcft_jax/datasets')

# Bump when the layout or the decoding of the MIT-67 cache changes.
_MIT67_CACHE_VERSION = 1
_TFDS_READ_CHUNK = 1024
_MIT67_CACHE_KEYS = ('x_train', 'y_train', 'x_test', 'y_test')

# Augmentation of each data set name (`train_transform` accepts either).
_NAME_TO_AUGMENTATION = {
    'cifar10': 'crop_flip',
    'cifar100': 'crop_flip',
    'mit67': 'crop',
}

_log = logging.getLogger(__name__)
_check_images = data_lib._check_images  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image data set held in host memory.

    Attributes:
      name: 'cifar10', 'cifar100' (or another tfds name), 'mit67', or
        'npz:<dir>'.
      x_train: uint8 training images, shape (N, H, W, 3).
      y_train: int32 training labels in [0, num_classes), shape (N,).
      x_test: uint8 test images, shape (M, H, W, 3).
      y_test: int32 test labels in [0, num_classes), shape (M,).
      num_classes: Number of classes.
      augmentation: Training transform, one of `AUGMENTATIONS`: 'crop_flip'
        (CIFAR: zero-pad 4, random crop, horizontal flip), 'crop' (MIT-67:
        random 224x224 crop of the 256x256 image, no flip) or 'none'.
      mean: Per-channel mean in [0, 1] units, for normalising on device.
      std: Per-channel standard deviation in [0, 1] units.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    augmentation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self):
        for split in ('train', 'test'):
            x = getattr(self, f'x_{split}')
            y = getattr(self, f'y_{split}')
            what = f'{self.name} {split}'
            if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
                raise TypeError(
                    f'{what}: images and labels must be numpy arrays, got '
                    f'{type(x).__name__} and {type(y).__name__}.'
                )
            _check_images(x, name=f'{what} images')
            if y.dtype != np.int32 or y.shape != (x.shape[0],):
                raise ValueError(
                    f'{what}: labels must be int32 of shape ({x.shape[0]},) '
                    f'(one per image), got {y.dtype} {y.shape}.'
                )
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(
                    f'{what}: labels must lie in [0, {self.num_classes}), '
                    f'found range [{y.min()}, {y.max()}].'
                )
        if self.num_classes < 1:
            raise ValueError(
                f'{self.name}: num_classes must be >= 1, got '
                f'{self.num_classes}.'
            )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f'{self.name}: train images are {self.x_train.shape[1:]} but '
                f'test images are {self.x_test.shape[1:]}; both splits need '
                'the same image size.'
            )
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(
                f'{self.name}: augmentation {self.augmentation!r} is not one '
                f'of {AUGMENTATIONS}.'
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(
                f'{self.name}: mean and std need 3 values (RGB) and std > 0, '
                f'got {self.mean} and {self.std}.'
            )


# ---------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------


def load(data_config: Mapping[str, Any]) -> Dataset:
    """Loads the train and test splits described by `data_config`.

    Args:
      data_config: The run's `config.data` (an `ml_collections.ConfigDict`
        or a mapping). Fields read, each optional:
        * `npz_dir`: folder with train.npz / test.npz; when set it replaces
          any `source`.
        * `source`: 'tfds', 'npz' (default) or 'mit67'.
        * `name`: tfds name ('cifar10' or 'cifar100'); needed for 'tfds'.
        * `tfds_data_dir`: tfds data folder (None: tfds' default, i.e.
          $TFDS_DATA_DIR or ~/tensorflow_datasets).
        * `download`: let tfds download and prepare a missing data set
          (needs internet, and TensorFlow for CIFAR; default False).
        * `mit67_dir`: MIT-67 folder; needed for 'mit67'.
        * `cache_dir`: folder for the decoded MIT-67 arrays (None:
          ~/.cache/dlcft_jax/datasets).

    Returns:
      The `Dataset`.

    Raises:
      FileNotFoundError: If the data are missing or not prepared; the
        message says how to prepare them.
      ValueError: On an unknown source or data set name, or malformed data
        (wrong dtypes or shapes, labels out of range).
    """
    npz_dir = data_config.get('npz_dir')
    source = data_config.get('source') or 'npz'
    if npz_dir:
        return _load_npz(npz_dir)
    if source == 'npz':
        return _load_npz(DEFAULT_NPZ_DIR)
    if source == 'tfds':
        name = data_config.get('name')
        if not name:
            raise ValueError(
                "data.source='tfds' needs data.name (e.g. 'cifar10' or "
                "'cifar100')."
            )
        return _load_tfds(
            name,
            data_config.get('tfds_data_dir'),
            bool(data_config.get('download', False)),
        )
    if source == 'mit67':
        return _load_mit67(
            data_config.get('mit67_dir'), data_config.get('cache_dir')
        )
    raise ValueError(
        f'Unknown data.source {source!r}; expected one of {SOURCES} (or set '
        'data.npz_dir).'
    )


def _load_npz(npz_dir: str | os.PathLike[str]) -> Dataset:
    npz_dir = Path(npz_dir).expanduser()
    x_train, y_train = data_lib.load_npz(npz_dir, 'train')
    x_test, y_test = data_lib.load_npz(npz_dir, 'test')
    labels = np.concatenate([y_train, y_test])
    if labels.size and labels.min() < 0:
        raise ValueError(
            f'{npz_dir}: labels must be >= 0, found {labels.min()}.'
        )
    return Dataset(
        name=f'npz:{npz_dir}',
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=int(labels.max()) + 1 if labels.size else 1,
        augmentation='crop_flip',
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


# --- tfds. -----------------------------------------------------------------


def _tfds_not_prepared_message(
    name: str, split: str, data_dir: str | None, error: Exception
) -> str:
    where = data_dir or '$TFDS_DATA_DIR or ~/tensorflow_datasets'
    dir_flag = f' --data_dir={data_dir}' if data_dir else ''
    said = ' '.join(str(error).split())
    said = said if len(said) <= 300 else said[:297] + '...'
    return (
        f'The tfds data set {name!r} (split {split!r}) is not prepared in '
        f'array_record format in {where}. Prepare it once, on a machine '
        'with internet (this step needs TensorFlow; reading it back does '
        f'not): `pip install tensorflow && tfds build {name} '
        f'--file_format=array_record{dir_flag}`, then copy the data folder '
        '(by default ~/tensorflow_datasets) to this machine and point '
        '--config.data.tfds_data_dir at it (or, with internet and '
        'TensorFlow here, add --config.data.download=True). Alternatively '
        'pass '
        '--config.data.npz_dir=DIR, a folder with train.npz and test.npz '
        "holding 'image' (uint8 NHWC) and 'label'. "
        f'(tfds said: {type(error).__name__}: {said})'
    )


def _open_tfds(
    name: str, split: str, data_dir: str | None, download: bool = False
) -> Any:
    import tensorflow_datasets as tfds  # slow import; only when needed

    try:
        return tfds.data_source(
            name, split=split, data_dir=data_dir, download=download
        )
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f'Unknown tfds data set data.name={name!r}; use cifar10 or '
            'cifar100.'
        ) from e
    except Exception as e:  # tfds raises many types for unprepared data
        raise FileNotFoundError(
            _tfds_not_prepared_message(name, split, data_dir, e)
        ) from e


def _try_getitems(getitems, n: int) -> list[Any] | None:
    """The first n records through a batched reader, or None if the source
    cannot batch: `tfds.testing.mock_data`'s `__getitems__` raises
    TypeError. (A source without the method never gets here.)"""
    try:
        return list(getitems(list(range(n))))
    except TypeError:
        return None


def _read_records(source: Sequence[Any]) -> list[Any]:
    """All records of a data source, batched where the source allows it.

    Real `tfds` data sources read batches with `__getitems__`; the one that
    `tfds.testing.mock_data` builds has a broken `__getitems__` (a
    TypeError), so it is read one index at a time.
    """
    n = len(source)
    getitems = getattr(source, '__getitems__', None)
    if getitems is not None and n:
        first = _try_getitems(getitems, min(n, _TFDS_READ_CHUNK))
        if first is not None:
            records = first
            for start in range(len(first), n, _TFDS_READ_CHUNK):
                keys = list(range(start, min(n, start + _TFDS_READ_CHUNK)))
                records.extend(getitems(keys))
            return records
    return [source[i] for i in range(n)]


def _tfds_split(
    name: str, split: str, data_dir: str | None, download: bool = False
) -> tuple[np.ndarray, np.ndarray, int | None]:
    source = _open_tfds(name, split, data_dir, download)
    records = _read_records(source)
    if not records:
        raise ValueError(f'tfds data set {name!r} split {split!r} is empty.')
    for key in ('image', 'label'):
        if key not in records[0]:
            raise ValueError(
                f'tfds data set {name!r} has no {key!r} feature (found '
                f'{sorted(records[0])}); only image classification data '
                'sets with image/label features are supported.'
            )
    first = np.asarray(records[0]['image'])
    images = np.empty((len(records),) + first.shape, np.uint8)
    labels = np.empty((len(records),), np.int32)
    for i, record in enumerate(records):
        image = np.asarray(record['image'])
        if image.shape != first.shape or image.dtype != np.uint8:
            raise ValueError(
                f'tfds data set {name!r} split {split!r}: record {i} has a '
                f'{image.dtype} image of shape {image.shape}, record 0 '
                f'{first.dtype} {first.shape}; all images must be uint8 of '
                'one size.'
            )
        images[i] = image
        labels[i] = int(record['label'])
    num_classes = None
    info = getattr(source, 'dataset_info', None)
    if info is not None:
        feature = info.features['label']
        num_classes = getattr(feature, 'num_classes', None)
    return images, labels, num_classes


def _load_tfds(
    name: str, data_dir: str | None, download: bool = False
) -> Dataset:
    if data_dir:
        data_dir = os.path.expanduser(os.fspath(data_dir))
    x_train, y_train, classes_train = _tfds_split(
        name, 'train', data_dir, download
    )
    x_test, y_test, classes_test = _tfds_split(name, 'test', data_dir, download)
    num_classes = classes_train or classes_test
    if num_classes is None:
        num_classes = int(max(y_train.max(), y_test.max())) + 1
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=int(num_classes),
        augmentation='crop_flip',
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


# --- MIT-67. ---------------------------------------------------------------


def _mit67_layout_error(problem: str) -> FileNotFoundError:
    return FileNotFoundError(
        f'{problem}. data.mit67_dir must be the MIT Indoor-67 folder laid '
        'out as Images/<class>/<file>.jpg with the split lists '
        'TrainImages.txt and TestImages.txt (one <class>/<file>.jpg per '
        f'line) beside Images/; get indoorCVPR_09.tar and the two lists '
        f'from the official page {MIT67_URL}.'
    )


def _read_split_list(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    entries = [line.strip() for line in lines if line.strip()]
    if not entries:
        raise ValueError(f'{path} lists no images.')
    bad = [e for e in entries if '/' not in e.strip('/')]
    if bad:
        raise ValueError(
            f'{path}: every line must be <class>/<file>.jpg; found {bad[:3]}.'
        )
    return entries


def _decode_image(path: str) -> np.ndarray:
    """Decodes one image file to uint8 RGB of MIT67_IMAGE_SIZE squared."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    size = (MIT67_IMAGE_SIZE, MIT67_IMAGE_SIZE)
    with Image.open(path) as image:
        image = image.convert('RGB').resize(size, Image.Resampling.BILINEAR)
        return np.asarray(image, np.uint8)


def _decode_all(paths: Sequence[str]) -> np.ndarray:
    out = np.empty(
        (len(paths), MIT67_IMAGE_SIZE, MIT67_IMAGE_SIZE, 3), np.uint8
    )
    workers = min(8, os.cpu_count() or 1)
    # Threads: Pillow releases the GIL while decoding and resizing.
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for i, image in enumerate(pool.map(_decode_image, paths)):
            out[i] = image
    return out


def _mit67_cache_path(
    cache_dir: Path, root: Path, classes: list[str], lists: list[bytes]
) -> Path:
    key = hashlib.sha256()
    key.update(f'v{_MIT67_CACHE_VERSION}:{MIT67_IMAGE_SIZE}:'.encode())
    key.update(str(root).encode() + b'\0')
    key.update('\n'.join(classes).encode() + b'\0')
    for content in lists:
        key.update(content + b'\0')
    return cache_dir / f'mit67_{key.hexdigest()[:20]}.npz'


def _load_mit67(
    mit67_dir: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str] | None,
) -> Dataset:
    if not mit67_dir:
        raise _mit67_layout_error(
            "data.source='mit67' but data.mit67_dir is not set"
        )
    root = Path(mit67_dir).expanduser().resolve()
    images_dir = root / 'Images'
    list_paths = [root / 'TrainImages.txt', root / 'TestImages.txt']
    missing = [p for p in [images_dir] + list_paths if not p.exists()]
    if missing:
        raise _mit67_layout_error(
            f'MIT-67 folder {root} lacks {", ".join(p.name for p in missing)}'
        )
    classes = sorted(
        p.name
        for p in images_dir.iterdir()
        if p.is_dir() and not p.name.startswith('.')
    )
    if not classes:
        raise _mit67_layout_error(f'{images_dir} has no class folders')
    class_index = {c: i for i, c in enumerate(classes)}

    lists = [p.read_bytes() for p in list_paths]
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
    cache_path = _mit67_cache_path(cache_dir, root, classes, lists)
    arrays = None
    if cache_path.is_file():
        try:
            with np.load(cache_path, allow_pickle=False) as cached:
                arrays = {k: cached[k] for k in cached.files}
        except (OSError, ValueError) as e:
            _log.warning('Ignoring unreadable cache %s: %s', cache_path, e)
        if arrays is not None and set(arrays) != set(_MIT67_CACHE_KEYS):
            _log.warning('Ignoring malformed cache %s', cache_path)
            arrays = None
    if arrays is None:
        arrays = {}
        for split, list_path in zip(('train', 'test'), list_paths, strict=True):
            entries = _read_split_list(list_path)
            unknown = sorted({e.split('/')[0] for e in entries} - set(classes))
            if unknown:
                raise _mit67_layout_error(
                    f'{list_path.name} names classes with no folder in '
                    f'{images_dir}: {unknown[:5]}'
                )
            paths = [str(images_dir / e) for e in entries]
            absent = [p for p in paths if not os.path.isfile(p)]
            if absent:
                raise _mit67_layout_error(
                    f'{len(absent)} of the {len(paths)} images listed in '
                    f'{list_path.name} are missing, e.g. {absent[:3]}'
                )
            arrays[f'x_{split}'] = _decode_all(paths)
            arrays[f'y_{split}'] = np.asarray(
                [class_index[e.split('/')[0]] for e in entries], np.int32
            )
        _write_cache(cache_path, arrays)
    return Dataset(
        name='mit67',
        x_train=arrays['x_train'],
        y_train=arrays['y_train'],
        x_test=arrays['x_test'],
        y_test=arrays['y_test'],
        num_classes=len(classes),
        augmentation='crop',
        mean=MIT67_MEAN,
        std=MIT67_STD,
    )


def _write_cache(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes `arrays` to `path` atomically; a failure only logs."""
    tmp = path.with_name(f'{path.stem}.{os.getpid()}.tmp.npz')
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, **arrays)  # uncompressed: JPEG pixels barely shrink
        os.replace(tmp, path)
    except OSError as e:
        _log.warning('Could not write the MIT-67 cache %s: %s', path, e)
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# Transforms.
# ---------------------------------------------------------------------------


def _augmentation(name_or_augmentation: str) -> str:
    if name_or_augmentation in AUGMENTATIONS:
        return name_or_augmentation
    if name_or_augmentation in _NAME_TO_AUGMENTATION:
        return _NAME_TO_AUGMENTATION[name_or_augmentation]
    if name_or_augmentation.startswith('npz:'):
        return 'crop_flip'
    raise ValueError(
        f'Unknown augmentation or data set {name_or_augmentation!r}; expected '
        f'one of {AUGMENTATIONS} or {sorted(_NAME_TO_AUGMENTATION)}.'
    )


def _check_crop(images: np.ndarray, size: int) -> None:
    _check_images(images)
    if images.shape[1] < size or images.shape[2] < size:
        raise ValueError(
            f'Cannot crop {size}x{size} from images of shape '
            f'{images.shape[1:3]}.'
        )


def train_transform(
    name_or_augmentation: str, images: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Augments a training batch on the host.

    Args:
      name_or_augmentation: An augmentation ('crop_flip', 'crop', 'none') or a
        data set name ('cifar10', 'cifar100', 'mit67', 'npz:<dir>').
      images: uint8 batch, shape (N, H, W, 3).
      rng: Generator for the random offsets (and flips).

    Returns:
      A uint8 batch whose shape depends only on the input shape:
      'crop_flip' and 'none' keep (N, H, W, 3) ('crop_flip' is exactly
      `dlcft_jax.data.augment_crop_flip`), 'crop' gives (N, 224, 224, 3),
      a window at a uniform random offset per image (rows drawn first).

    Raises:
      ValueError: On an unknown augmentation or images that are not uint8
        NHWC RGB (or smaller than the crop).
    """
    augmentation = _augmentation(name_or_augmentation)
    if augmentation == 'crop_flip':
        return data_lib.augment_crop_flip(images, rng)
    if augmentation == 'none':
        _check_images(images)
        return images
    size = MIT67_CROP_SIZE
    _check_crop(images, size)
    n, h, w, _ = images.shape
    off_y = rng.integers(0, h - size + 1, size=n)
    off_x = rng.integers(0, w - size + 1, size=n)
    rows = off_y[:, None] + np.arange(size)[None, :]  # (N, S)
    cols = off_x[:, None] + np.arange(size)[None, :]  # (N, S)
    return images[
        np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]
    ]


def test_transform(augmentation: str, images: np.ndarray) -> np.ndarray:
    """Prepares an evaluation batch: the deterministic twin of the above.

    Args:
      augmentation: As for `train_transform` (a data set name works too).
      images: uint8 batch, shape (N, H, W, 3).

    Returns:
      'crop_flip' / 'none': `images` unchanged; 'crop': the central
      224x224 window, shape (N, 224, 224, 3).

    Raises:
      ValueError: As for `train_transform`.
    """
    if _augmentation(augmentation) != 'crop':
        _check_images(images)
        return images
    size = MIT67_CROP_SIZE
    _check_crop(images, size)
    top = (images.shape[1] - size) // 2
    left = (images.shape[2] - size) // 2
    return np.ascontiguousarray(images[:, top : top + size, left : left + size])


test_transform.__test__ = False  # not a pytest test when imported there


# ---------------------------------------------------------------------------
# Data-IL split.
# ---------------------------------------------------------------------------


def data_il_chunks(
    num_train: int, num_tasks: int, seed: int
) -> list[np.ndarray]:
    """Splits the training set into the equal chunks of data-IL.

    See docs/method.md §1.1.

    A permutation drawn from `np.random.default_rng(seed)` is cut into
    `num_tasks` contiguous pieces of `num_train // num_tasks` indices (the
    remainder is dropped); each piece is returned sorted.

    Args:
      num_train: Number of training examples.
      num_tasks: Number of tasks (chunks).
      seed: Seed of the permutation.

    Returns:
      `num_tasks` pairwise disjoint, ascending int64 index arrays of equal
      length.

    Raises:
      ValueError: If `num_tasks < 1` or there are fewer examples than tasks.
    """
    if num_tasks < 1:
        raise ValueError(f'num_tasks must be >= 1, got {num_tasks}.')
    if num_train < num_tasks:
        raise ValueError(
            f'Cannot split {num_train} training examples into {num_tasks} '
            'non-empty tasks.'
        )
    order = np.random.default_rng(seed).permutation(num_train)
    size = num_train // num_tasks
    return [
        np.sort(order[t * size : (t + 1) * size]).astype(np.int64)
        for t in range(num_tasks)
    ]


# ---------------------------------------------------------------------------
# Validation split.
# ---------------------------------------------------------------------------


def hold_out(data: Dataset, fraction: float, seed: int = 0) -> Dataset:
    """The same data set with a validation split in place of the test set.

    From every class, `round(fraction * n_c)` training images (at least one)
    drawn with `np.random.default_rng(seed)` leave the training set and
    become the test set; the real test set is not used at all. Hyper-
    parameters are tuned on runs with this split and then reported on the
    real test set. The split does not depend on the run's seed, so every
    method and seed is tuned on the same images.

    Args:
      data: The loaded data set.
      fraction: Share of each class held out, in (0, 1).
      seed: Seed of the split (config.data.validation_seed).

    Returns:
      A `Dataset` named '<name>:val<fraction>' whose x_train / y_train are
      the remaining training images and x_test / y_test the held-out ones,
      both in their original order.

    Raises:
      ValueError: If `fraction` is not in (0, 1) or a class has fewer than
        two training images.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(
            f'config.data.validation={fraction} must lie in (0, 1) (a share '
            'of each class of the training set), or be 0 to test on the '
            'test set.'
        )
    rng = np.random.default_rng(seed)
    held = np.zeros(len(data.y_train), bool)
    for c in range(data.num_classes):
        idx = np.flatnonzero(data.y_train == c)
        if len(idx) == 0:
            continue
        if len(idx) < 2:
            raise ValueError(
                f'{data.name}: class {c} has {len(idx)} training image; a '
                'validation split needs at least 2 per class.'
            )
        k = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        held[rng.choice(idx, k, replace=False)] = True
    return dataclasses.replace(
        data,
        name=f'{data.name}:val{fraction:g}',
        x_train=data.x_train[~held],
        y_train=data.y_train[~held],
        x_test=data.x_train[held],
        y_test=data.y_train[held],
    )
