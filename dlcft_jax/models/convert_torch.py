"""Reads PyTorch ResNet checkpoints and converts them to Flax variables.

No torch import is needed:

* ``read_torch_state_dict`` parses the ZIP format that ``torch.save`` has
  written by default since torch 1.6 (``<archive>/data.pkl`` plus one raw
  record ``<archive>/data/<key>`` per storage) with the restricted
  unpickler of `dlcft_jax.models.torch_pickle`, which can only build dicts
  of tensors; the legacy (non-zip) format and ``.safetensors`` files are
  delegated to `dlcft_jax.models.weights`.
* ``convert_resnet_state_dict`` maps torchvision/timm ResNet keys
  (``conv1.weight``, ``layer2.0.downsample.1.running_var``, ``fc.weight``,
  ...) to the names of `dlcft_jax.models.resnet`.
* ``load_resnet`` does both and caches the converted arrays as ``.npz``
  keyed by the source file's SHA-256.
"""

from __future__ import annotations

import collections
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from dlcft_jax.models.torch_pickle import StorageRef, TensorRef, Unpickler
from dlcft_jax.models.weights import (
    _conv_kernel,
    _flatten,
    _sha256_prefix,
    _unflatten,
    _write_npz_atomic,
    default_cache_dir,
    read_legacy_torch_state_dict,
    read_safetensors,
)

StateDict = dict[str, np.ndarray]
Variables = dict[str, Any]
Head = dict[str, np.ndarray]

# Bump when the converted layout changes, so stale caches are not reused.
_CACHE_VERSION = 1

# Torch checkpoint dicts that wrap the state dict, tried in this order.
_WRAPPER_KEYS = ('state_dict', 'model')

# Known depths: (block type, blocks per stage) -> name.
_KNOWN_RESNETS = {
    ('BasicBlock', (2, 2, 2, 2)): 'ResNet-18',
    ('BasicBlock', (3, 4, 6, 3)): 'ResNet-34',
    ('Bottleneck', (3, 4, 6, 3)): 'ResNet-50',
    ('Bottleneck', (3, 4, 23, 3)): 'ResNet-101',
    ('Bottleneck', (3, 8, 36, 3)): 'ResNet-152',
}


def _unwrap(obj: Any, path: str) -> dict[str, Any]:
    """Finds the dict of tensors inside a checkpoint.

    Args:
        obj: The unpickled object.
        path: File name for error messages.

    Returns:
        The innermost dict whose values are all tensors.

    Raises:
        ValueError: If no such dict is found.
    """
    for _ in range(len(_WRAPPER_KEYS) + 1):
        if not isinstance(obj, dict):
            break
        if obj and all(isinstance(v, TensorRef) for v in obj.values()):
            return obj
        inner = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)]
        if not inner:
            break
        obj = obj[inner[0]]
    found = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(
        f'{path}: no dict of tensors found (also looked under '
        f'{list(_WRAPPER_KEYS)}); found {found}'
    )


def _read_zip_state_dict(path: str | os.PathLike) -> StateDict:
    """Reads a zip-format ``torch.save`` file without torch.

    Only the storages referenced by the returned state dict are read, so an
    optimizer state stored alongside costs nothing but its pickle.

    Args:
        path: The ``.pth``/``.pt`` file.

    Returns:
        Dict key -> contiguous numpy array (same dtype as stored).
    """
    with zipfile.ZipFile(path) as zf:
        pickles = [
            n
            for n in zf.namelist()
            if n == 'data.pkl' or n.endswith('/data.pkl')
        ]
        if len(pickles) != 1:
            raise ValueError(f'{path}: expected one data.pkl, got {pickles}')
        prefix = pickles[0][: -len('data.pkl')]
        names = set(zf.namelist())
        byteorder = 'little'
        if f'{prefix}byteorder' in names:
            byteorder = zf.read(f'{prefix}byteorder').decode('ascii')
        if byteorder not in ('little', 'big'):
            raise ValueError(f'{path}: unknown byte order {byteorder!r}')
        with zf.open(pickles[0]) as f:
            obj = Unpickler(f).load()
        refs = _unwrap(obj, str(path))
        # One dtype per storage: torch refuses to save differently typed
        # views of the same storage, so a conflict means a corrupt file.
        storages: dict[str, StorageRef] = {}
        for name, ref in refs.items():
            known = storages.setdefault(ref.storage.key, ref.storage)
            if known.dtype != ref.storage.dtype:
                raise ValueError(f'{path}: storage of {name!r} has two dtypes')
        buffers: dict[str, np.ndarray] = {}
        for key, storage in storages.items():
            record = f'{prefix}data/{key}'
            nbytes = storage.numel * storage.dtype.itemsize
            if record not in names:
                raise ValueError(f'{path}: missing storage record {record}')
            # Checked before reading so a malformed entry cannot make us
            # inflate an arbitrary amount of data.
            if zf.getinfo(record).file_size != nbytes:
                raise ValueError(f'{path}: storage {key} size mismatch')
            dtype = storage.dtype
            if byteorder == 'big':
                dtype = dtype.newbyteorder('>')
            buffers[key] = np.frombuffer(zf.read(record), dtype).astype(
                storage.dtype, copy=False
            )
    # materialize keeps the memory order of a strided view (np.array with
    # order='K'), so a transposed tensor would come back Fortran-ordered.
    return {
        str(k): _c_order(ref.materialize(buffers)) for k, ref in refs.items()
    }


def _c_order(a: np.ndarray) -> np.ndarray:
    """C-contiguous `a`; unlike np.ascontiguousarray, keeps 0-d arrays 0-d."""
    return a if a.flags.c_contiguous else a.copy(order='C')


def _strip_module_prefix(state_dict: StateDict) -> StateDict:
    """Removes the ``module.`` prefix that DataParallel/DDP adds to keys."""
    prefix = 'module.'
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def _is_safetensors(path: str | os.PathLike) -> bool:
    """Suffix, or header: 8-byte little-endian length, then a JSON object."""
    if str(path).endswith('.safetensors'):
        return True
    with open(path, 'rb') as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b'{'


def read_torch_state_dict(path: str | os.PathLike) -> StateDict:
    """Reads a PyTorch state dict from any common file format, without torch.

    Formats: zip-format ``torch.save`` (default since torch 1.6), the legacy
    ``torch.save`` format and ``.safetensors``. In the zip format, a
    checkpoint dict holding the tensors under ``'state_dict'`` or
    ``'model'`` is unwrapped. A ``module.`` prefix on every key (from
    ``nn.DataParallel``/DDP) is stripped in all formats.

    Args:
        path: The file.

    Returns:
        Dict key -> contiguous numpy array (same dtype as stored).

    Raises:
        pickle.UnpicklingError: If a pickle references anything besides
            dicts, tensors and storages (e.g. a function to call).
        ValueError: If the file is malformed or holds no dict of tensors.
    """
    if zipfile.is_zipfile(path):
        state = _read_zip_state_dict(path)
    elif _is_safetensors(path):
        state = read_safetensors(path)
    else:
        # The legacy reader can return a strided tensor Fortran-ordered.
        state = {
            k: _c_order(v)
            for k, v in read_legacy_torch_state_dict(path).items()
        }
    return _strip_module_prefix(state)


def _stage_depths(state_dict: StateDict) -> list[int]:
    """Blocks per stage, from the ``layer{i}.{j}.`` keys."""
    depths = []
    pattern = re.compile(r'layer(\d+)\.(\d+)\.')
    found: dict[int, set[int]] = collections.defaultdict(set)
    for key in state_dict:
        m = pattern.match(key)
        if m:
            found[int(m.group(1))].add(int(m.group(2)))
    i = 1
    while i in found:
        depths.append(max(found[i]) + 1)
        i += 1
    return depths


def describe_resnet_state_dict(state_dict: StateDict) -> str:
    """Guesses the architecture of a ResNet state dict, for messages.

    Args:
        state_dict: Key -> array.

    Returns:
        E.g. ``'ResNet-50 (Bottleneck blocks [3, 4, 6, 3], 7x7 stem, 1000
        classes)'`` or a note that it does not look like a ResNet.
    """
    depths = _stage_depths(state_dict)
    if not depths or 'conv1.weight' not in state_dict:
        first = list(state_dict)[:5]
        return f'not a torchvision/timm ResNet (first keys: {first})'
    bottleneck = 'layer1.0.conv3.weight' in state_dict
    block = 'Bottleneck' if bottleneck else 'BasicBlock'
    name = _KNOWN_RESNETS.get((block, tuple(depths)), 'ResNet')
    stem = np.shape(state_dict['conv1.weight'])
    parts = [f'{block} blocks {depths}']
    if len(stem) == 4:
        parts.append(f'{stem[2]}x{stem[3]} stem')
        if stem[2] == 3 and name == 'ResNet-18':
            name = 'CIFAR ResNet-18'
    if 'fc.weight' in state_dict:
        parts.append(f'{np.shape(state_dict["fc.weight"])[0]} classes')
    return f'{name} ({", ".join(parts)})'


def convert_resnet_state_dict(
    state_dict: StateDict, *, keep_fc: bool = True
) -> tuple[Variables, Head | None]:
    """Maps a torchvision/timm ResNet state dict to Flax variables.

    Works for BasicBlock and Bottleneck nets of any depth and for the CIFAR
    ResNet-18 (same keys, 3x3 stem). Conv weights OIHW -> HWIO, linear
    (out, in) -> (in, out), BatchNorm weight/bias -> scale/bias,
    running_mean/var -> mean/var; ``num_batches_tracked`` is dropped.

    Args:
        state_dict: Key -> array (``conv1.weight``, ``bn1.running_mean``,
            ``layer1.0.conv1.weight``, ``layer2.0.downsample.0.weight``,
            ``fc.weight``, ...).
        keep_fc: Whether to return the ``fc`` classifier; if False, its keys
            are consumed but ignored.

    Returns:
        (variables, head): variables = {'params': ..., 'batch_stats': ...}
        of the backbone (no 'fc'), as float32 numpy arrays; head =
        {'kernel': (in, out), 'bias': (out,)} or None if the state dict has
        no ``fc`` (or `keep_fc` is False).

    Raises:
        ValueError: If a key is missing, left over or has an unexpected
            shape; the message names the keys (first 10) and the
            architecture the checkpoint seems to be.
    """
    unused = {k for k in state_dict if not k.endswith('num_batches_tracked')}
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}

    def fail(msg: str) -> ValueError:
        arch = describe_resnet_state_dict(state_dict)
        return ValueError(f'{msg}; the checkpoint looks like {arch}')

    def take(key: str, ndim: int) -> np.ndarray:
        if key not in state_dict:
            raise fail(f'missing key {key!r}')
        if key not in unused:
            raise fail(f'key {key!r} used twice')
        unused.discard(key)
        value = np.asarray(state_dict[key], np.float32)
        if value.ndim != ndim:
            raise fail(f'{key!r} has shape {value.shape}, expected {ndim}-D')
        return value

    def conv(dst: dict[str, Any], name: str, src: str) -> int:
        w = take(f'{src}.weight', 4)
        dst[name] = {'kernel': _conv_kernel(w)}
        return w.shape[0]

    def bn(
        pdst: dict[str, Any],
        sdst: dict[str, Any],
        name: str,
        src: str,
        channels: int,
    ) -> None:
        p = {'scale': take(f'{src}.weight', 1), 'bias': take(f'{src}.bias', 1)}
        s = {
            'mean': take(f'{src}.running_mean', 1),
            'var': take(f'{src}.running_var', 1),
        }
        for k, v in {**p, **s}.items():
            if v.shape != (channels,):
                raise fail(
                    f'{src} {k} has shape {v.shape}, expected ({channels},) '
                    'to match the preceding conv'
                )
        pdst[name] = p
        sdst[name] = s

    depths = _stage_depths(state_dict)
    if not depths:
        raise fail('no layer{i}.{j}.* keys')
    n_convs = 3 if 'layer1.0.conv3.weight' in state_dict else 2
    bn(params, stats, 'bn1', 'bn1', conv(params, 'conv1', 'conv1'))
    for i, depth in enumerate(depths, start=1):
        for j in range(depth):
            src = f'layer{i}.{j}'
            bp: dict[str, Any] = {}
            bs: dict[str, Any] = {}
            for c in range(1, n_convs + 1):
                out = conv(bp, f'conv{c}', f'{src}.conv{c}')
                bn(bp, bs, f'bn{c}', f'{src}.bn{c}', out)
            if f'{src}.downsample.0.weight' in state_dict:
                out = conv(bp, 'downsample_conv', f'{src}.downsample.0')
                bn(bp, bs, 'downsample_bn', f'{src}.downsample.1', out)
            params[f'layer{i}_{j}'] = bp
            stats[f'layer{i}_{j}'] = bs
    head = None
    if 'fc.weight' in state_dict or 'fc.bias' in state_dict:
        fc_w = take('fc.weight', 2)
        fc_b = take('fc.bias', 1)
        if fc_b.shape != fc_w.shape[:1]:
            raise fail(f'fc.bias {fc_b.shape} does not match fc.weight')
        if keep_fc:
            head = {'kernel': np.ascontiguousarray(fc_w.T), 'bias': fc_b}
    if unused:
        left = sorted(unused)
        raise fail(
            f'{len(left)} state-dict keys left over (first 10: {left[:10]})'
        )
    return {'params': params, 'batch_stats': stats}, head


def resnet_cache_file(
    path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Where `load_resnet` caches the conversion of `path`.

    Args:
        path: The source checkpoint.
        cache_dir: Cache directory; None -> `weights.default_cache_dir()`.

    Returns:
        ``<cache_dir>/resnet_v<version>_<sha256[:16]>.npz``.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache / f'resnet_v{_CACHE_VERSION}_{_sha256_prefix(path)}.npz'


def load_resnet(
    path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None
) -> tuple[Variables, Head | None]:
    """Loads a torchvision/timm ResNet checkpoint as Flax variables.

    The first call reads and converts the file and caches the result (see
    `resnet_cache_file`); later calls with the same source bytes read the
    cache instead.

    Args:
        path: ``.pth``/``.pt`` (zip or legacy torch) or ``.safetensors``.
        cache_dir: Cache directory; None -> `weights.default_cache_dir()`.

    Returns:
        (variables, head) as in `convert_resnet_state_dict`, numpy arrays.
    """
    cache_file = resnet_cache_file(path, cache_dir)
    if cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as data:
            tree = _unflatten({k: data[k] for k in data.files})
        variables = {
            'params': tree['params'],
            'batch_stats': tree['batch_stats'],
        }
        return variables, tree.get('head')
    variables, head = convert_resnet_state_dict(read_torch_state_dict(path))
    tree = dict(variables)
    if head is not None:
        tree['head'] = head
    _write_npz_atomic(cache_file, _flatten(tree))
    return variables, head


__all__ = [
    'convert_resnet_state_dict',
    'describe_resnet_state_dict',
    'load_resnet',
    'read_torch_state_dict',
    'resnet_cache_file',
]
