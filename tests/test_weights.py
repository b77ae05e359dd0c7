"""Tests for the restricted torch unpickler shared by the weight readers.

`dlcft_jax.models.torch_pickle.Unpickler` backs both the legacy (non-zip)
reader of `dlcft_jax.models.weights` and the zip reader of
`dlcft_jax.models.convert_torch`. The files here are written without torch:
pickles of stand-in classes whose globals are renamed to the torch ones, and
malicious pickles whose payload would create a marker file if it ran.
"""

from __future__ import annotations

import builtins
import collections
import io
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dlcft_jax.models import convert_torch, torch_pickle
from dlcft_jax.models import weights as weights_lib


class FloatStorage:
    """Pickled by reference, then renamed to ``torch.FloatStorage``."""


def _rebuild_tensor_v2(*args):
    """Pickled by reference, then renamed to ``torch._utils``'s."""
    raise AssertionError('never called: only its name is pickled')


class _Storage:
    """A float32 storage; pickled as a persistent id like torch's."""

    def __init__(self, key: str, numel: int, view=None):
        self.key, self.numel, self.view = key, numel, view


class _Tensor:
    """Pickles to a ``_rebuild_tensor_v2`` call, as a torch tensor does."""

    def __init__(self, storage: _Storage, offset, size, stride):
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        return _rebuild_tensor_v2, (
            *self.args,
            False,
            collections.OrderedDict(),
        )


class _TorchLikePickler(pickle.Pickler):
    """Writes storages as legacy 6-tuple or zip 5-tuple persistent ids."""

    def __init__(self, f, legacy: bool):
        super().__init__(f, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        pid = ('storage', FloatStorage, obj.key, 'cpu', obj.numel)
        return (*pid, obj.view) if self.legacy else pid


def _torch_like_pickle(obj, legacy: bool) -> bytes:
    buf = io.BytesIO()
    _TorchLikePickler(buf, legacy).dump(obj)
    data = buf.getvalue()
    for name, module in (
        ('FloatStorage', 'torch'),
        ('_rebuild_tensor_v2', 'torch._utils'),
    ):
        old = f'c{__name__}\n{name}\n'.encode()
        assert old in data
        data = data.replace(old, f'c{module}\n{name}\n'.encode())
    return data


# The three header records of a legacy file: magic, protocol, system info.
_LEGACY_HEADER = (
    weights_lib._LEGACY_MAGIC,
    weights_lib._LEGACY_PROTOCOL,
    {'protocol_version': 1001, 'little_endian': True},
)


def _write_legacy(path: Path, body: bytes, buffers: dict[str, np.ndarray]):
    """A legacy torch file: header records, pickle, keys, raw storages."""
    with open(path, 'wb') as f:
        f.write(b''.join(pickle.dumps(r, protocol=2) for r in _LEGACY_HEADER))
        f.write(body)
        pickle.dump(list(buffers), f, protocol=2)
        for flat in buffers.values():
            f.write(np.int64(flat.size).tobytes())
            f.write(flat.tobytes())


def _write_zip(path: Path, body: bytes, buffers: dict[str, np.ndarray]):
    """A zip torch file: ``archive/data.pkl`` plus one record per storage."""
    with zipfile.ZipFile(path, 'w') as zf:
        zf.writestr('archive/data.pkl', body)
        zf.writestr('archive/byteorder', 'little')
        for key, flat in buffers.items():
            zf.writestr(f'archive/data/{key}', flat.tobytes())


_BASE = np.arange(12, dtype=np.float32)


def test_legacy_layout_tensors_views_and_strides(tmp_path):
    """Legacy 6-tuple persistent ids, incl. a storage view."""
    storage = _Storage('0', 12)
    state = collections.OrderedDict(
        w=_Tensor(storage, 0, (3, 4), (4, 1)),
        t=_Tensor(storage, 4, (4, 2), (1, 4)),  # transposed slice
        v=_Tensor(_Storage('0', 12, view=('0v', 6, 6)), 1, (5,), (1,)),
    )
    path = tmp_path / 'legacy.pth'
    _write_legacy(path, _torch_like_pickle(state, True), {'0': _BASE})
    got = weights_lib.read_legacy_torch_state_dict(path)
    assert list(got) == ['w', 't', 'v']
    np.testing.assert_array_equal(got['w'], _BASE.reshape(3, 4))
    np.testing.assert_array_equal(got['t'], _BASE.reshape(3, 4).T[:, 1:])
    np.testing.assert_array_equal(got['v'], _BASE[7:12])
    assert all(a.dtype == np.float32 for a in got.values())


def test_zip_layout_tensors_and_strides(tmp_path):
    """Zip 5-tuple persistent ids."""
    storage = _Storage('0', 12)
    state = collections.OrderedDict(
        w=_Tensor(storage, 0, (3, 4), (4, 1)),
        t=_Tensor(storage, 4, (4, 2), (1, 4)),
    )
    path = tmp_path / 'zip.pth'
    _write_zip(path, _torch_like_pickle(state, False), {'0': _BASE})
    got = convert_torch.read_torch_state_dict(path)
    np.testing.assert_array_equal(got['w'], _BASE.reshape(3, 4))
    np.testing.assert_array_equal(got['t'], _BASE.reshape(3, 4).T[:, 1:])
    assert got['t'].flags['C_CONTIGUOUS']


@pytest.mark.parametrize(
    'pid',
    [
        ('storage', 'x', '0', 'cpu'),
        ('storage', 'x', '0', 'cpu', 1, None, None),
        ('module', 'x', '0', 'cpu', 1),
        'storage',
    ],
)
def test_unknown_persistent_ids_are_refused(pid):
    unpickler = torch_pickle.Unpickler(io.BytesIO())
    with pytest.raises(pickle.UnpicklingError, match='persistent id'):
        unpickler.persistent_load(pid)


def test_storage_of_unknown_type_is_refused():
    unpickler = torch_pickle.Unpickler(io.BytesIO())
    for pid in (
        ('storage', 'FloatStorage', '0', 'cpu', 1),
        ('storage', object(), '0', 'cpu', 1, None),
    ):
        with pytest.raises(pickle.UnpicklingError, match='known type'):
            unpickler.persistent_load(pid)


class _System:
    """Would run ``touch <marker>`` through ``os.system`` when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


class _Exec:
    """Would create <marker> through ``builtins.exec`` when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f'open({str(self.marker)!r}, "w").close()',)


_PAYLOADS = {'os.system': (_System, os.system), 'exec': (_Exec, builtins.exec)}


def _payload(kind: str, marker: Path) -> tuple[bytes, str]:
    """(pickle of a dict holding the payload, the global it references)."""
    cls, func = _PAYLOADS[kind]
    # fix_imports=False keeps 'builtins' (protocol 2 would write
    # '__builtin__'); os.system pickles as posix.system on Linux.
    body = pickle.dumps({'w': cls(marker)}, protocol=2, fix_imports=False)
    return body, f'{func.__module__}.{func.__name__}'


@pytest.mark.parametrize('kind', sorted(_PAYLOADS))
def test_payload_runs_under_plain_pickle(tmp_path, kind):
    """Control: the payloads below really run code when not restricted."""
    marker = tmp_path / 'ran'
    body, _ = _payload(kind, marker)
    pickle.loads(body)
    assert marker.exists()


def _write_raw(path: Path, body: bytes, buffers: dict[str, np.ndarray]):
    """The pickle alone: the legacy reader unpickles it as a header record."""
    del buffers
    path.write_bytes(body)


# layout -> (file writer, reader): the malicious pickle as the state dict of
# a legacy file, as the first header record of one, and as a zip data.pkl.
_LAYOUTS = {
    'legacy': (_write_legacy, weights_lib.read_legacy_torch_state_dict),
    'legacy header': (_write_raw, weights_lib.read_legacy_torch_state_dict),
    'zip': (_write_zip, convert_torch.read_torch_state_dict),
}


@pytest.mark.parametrize('layout', sorted(_LAYOUTS))
@pytest.mark.parametrize('kind', sorted(_PAYLOADS))
def test_readers_refuse_code_without_running_it(tmp_path, kind, layout):
    marker = tmp_path / 'ran'
    body, refused = _payload(kind, marker)
    write, read = _LAYOUTS[layout]
    path = tmp_path / 'evil.pth'
    write(path, body, {})
    with pytest.raises(pickle.UnpicklingError) as info:
        read(path)
    message = str(info.value)
    assert re.match(f'refusing to unpickle {re.escape(refused)}: ', message)
    assert 'only dicts of tensors' in message
    assert not marker.exists(), 'the payload ran'
