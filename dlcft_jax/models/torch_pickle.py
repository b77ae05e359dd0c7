"""The restricted unpickler shared by the PyTorch weight-file readers.

``torch.save`` writes a pickle whose tensors are calls of
``torch._utils._rebuild_tensor_v2`` (or ``_v3``/``_rebuild_parameter``) on
storages that are referenced by *persistent ids* and stored outside the
pickle. `Unpickler` reads such a pickle without torch: tensors come back as
`TensorRef` placeholders (a `StorageRef` plus offset, size and stride) that
the caller turns into numpy arrays with `TensorRef.materialize` once it has
read the storage bytes.

Why it is safe: a pickle can only construct or call objects that
``find_class`` hands out, and `Unpickler.find_class` hands out nothing but
the stand-ins of `ALLOWED_GLOBALS` (``collections.OrderedDict``, local
functions that merely record tensor metadata, and inert storage-type and
dtype markers). Every other global (``os.system``, ``builtins.eval``, a
class with a malicious ``__setstate__``, ...) raises
``pickle.UnpicklingError`` before anything runs, so a crafted file cannot
run code; it can hold only dicts, lists, tuples, strings, numbers and
tensors.

Formats:

* the legacy (non-zip) ``torch.save`` format (torch < 1.6, or
  ``_use_new_zipfile_serialization=False``): persistent ids
  ``('storage', type, key, location, numel, view)``; read by
  `dlcft_jax.models.weights.read_legacy_torch_state_dict`;
* the zip format (default since torch 1.6), ``data.pkl`` inside the archive:
  persistent ids ``('storage', type, key, location, numel)``, typed storages
  or (torch >= 2.1) an untyped storage plus a dtype for
  ``_rebuild_tensor_v3``; read by `dlcft_jax.models.convert_torch`.
"""

from __future__ import annotations

import collections
import pickle
from typing import Any

import ml_dtypes
import numpy as np

# torch.<Name>Storage -> element dtype. The first block is what the legacy
# format can hold; the second adds the zip format's storages that numpy (or
# ml_dtypes, a jax dependency) can represent; an untyped storage is bytes.
STORAGE_DTYPES: dict[str, np.dtype] = {
    'DoubleStorage': np.dtype('<f8'),
    'FloatStorage': np.dtype('<f4'),
    'HalfStorage': np.dtype('<f2'),
    'LongStorage': np.dtype('<i8'),
    'IntStorage': np.dtype('<i4'),
    'ShortStorage': np.dtype('<i2'),
    'CharStorage': np.dtype('i1'),
    'ByteStorage': np.dtype('u1'),
    'BoolStorage': np.dtype('?'),
    # Zip format only.
    'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'ComplexFloatStorage': np.dtype('<c8'),
    'ComplexDoubleStorage': np.dtype('<c16'),
    'UntypedStorage': np.dtype('u1'),
}

# dtypes that torch >= 2.1 pickles as an UntypedStorage plus a dtype object
# passed to ``_rebuild_tensor_v3`` (``torch.storage._new_dtypes``).
V3_DTYPES: dict[str, np.dtype] = {
    'uint16': np.dtype('<u2'),
    'uint32': np.dtype('<u4'),
    'uint64': np.dtype('<u8'),
    'float8_e4m3fn': np.dtype(ml_dtypes.float8_e4m3fn),
    'float8_e5m2': np.dtype(ml_dtypes.float8_e5m2),
    'float8_e4m3fnuz': np.dtype(ml_dtypes.float8_e4m3fnuz),
    'float8_e5m2fnuz': np.dtype(ml_dtypes.float8_e5m2fnuz),
}


class StorageType:
    """Stands in for a torch storage class: only carries the dtype."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name = name
        self.dtype = dtype


class TorchDType:
    """Stands in for a ``torch.<dtype>`` object (only `_rebuild_tensor_v3`)."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name = name
        self.dtype = dtype


class StorageRef:
    """A storage (or legacy view of one) whose bytes lie outside the pickle.

    `numel`, `view_offset` and `view_numel` count elements of `dtype`.
    """

    def __init__(
        self,
        dtype: np.dtype,
        key: str,
        numel: int,
        view_offset: int = 0,
        view_numel: int | None = None,
    ):
        self.dtype = dtype
        self.key = key
        self.numel = numel
        self.view_offset = view_offset
        self.view_numel = numel if view_numel is None else view_numel


class TensorRef:
    """A tensor to be materialised once the storage bytes have been read."""

    def __init__(
        self,
        storage: StorageRef,
        offset: int,
        size: tuple[int, ...],
        stride: tuple[int, ...],
    ):
        if not isinstance(storage, StorageRef):
            raise pickle.UnpicklingError('tensor without a storage')
        self.storage = storage
        self.offset = int(offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)

    def materialize(self, buffers: dict[str, np.ndarray]) -> np.ndarray:
        """Builds a C-contiguous copy of the tensor from its storage.

        Args:
            buffers: Storage key -> flat array of the whole storage.

        Returns:
            The tensor, a fresh array of the storage's dtype.

        Raises:
            ValueError: If size and stride disagree or the view addresses
                elements outside the storage.
        """
        if len(self.size) != len(self.stride):
            raise ValueError('tensor size and stride ranks differ')
        flat = buffers[self.storage.key]
        start = self.storage.view_offset
        flat = flat[start : start + self.storage.view_numel]
        # The furthest element addressed must lie inside the storage.
        last = self.offset + sum(
            (n - 1) * s
            for n, s in zip(self.size, self.stride, strict=True)
            if n > 0
        )
        if any(s < 0 for s in self.stride) or (
            0 not in self.size and (self.offset < 0 or last >= flat.size)
        ):
            raise ValueError('tensor view lies outside its storage')
        if 0 in self.size:
            return np.zeros(self.size, flat.dtype)
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.size,
            strides=tuple(s * itemsize for s in self.stride),
            writeable=False,
        )
        return np.array(view, order='C', copy=True)


def _rebuild_tensor_v2(
    storage,
    storage_offset,
    size,
    stride,
    requires_grad=False,
    backward_hooks=None,
    metadata=None,
) -> TensorRef:
    """Safe stand-in for ``torch._utils._rebuild_tensor_v2``."""
    del requires_grad, backward_hooks, metadata  # Irrelevant for weights.
    return TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage,
    storage_offset,
    size,
    stride,
    requires_grad,
    backward_hooks,
    dtype,
    metadata=None,
) -> TensorRef:
    """Safe stand-in for ``torch._utils._rebuild_tensor_v3``.

    The storage is untyped (bytes); the tensor's dtype comes separately and
    offsets/strides count elements of that dtype, so the storage is re-viewed
    as that dtype.
    """
    del requires_grad, backward_hooks, metadata
    if not isinstance(storage, StorageRef) or not isinstance(dtype, TorchDType):
        raise pickle.UnpicklingError('malformed _rebuild_tensor_v3 call')
    itemsize = dtype.dtype.itemsize
    if storage.numel % itemsize:
        raise pickle.UnpicklingError('storage size is not a multiple of dtype')
    typed = StorageRef(dtype.dtype, storage.key, storage.numel // itemsize)
    return TensorRef(typed, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    """Safe stand-in for ``torch._utils._rebuild_parameter[_with_state]``."""
    del requires_grad, backward_hooks, state  # A parameter is its tensor.
    if not isinstance(data, TensorRef):
        raise pickle.UnpicklingError('parameter without a tensor')
    return data


# (module, name) -> what a pickle gets for that global: the only objects a
# torch weight file may reference. Stand-ins carry data; none has side
# effects.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    **{
        ('torch', name): StorageType(name, dtype)
        for name, dtype in STORAGE_DTYPES.items()
    },
    ('torch.storage', 'UntypedStorage'): StorageType(
        'UntypedStorage', STORAGE_DTYPES['UntypedStorage']
    ),
    **{
        ('torch', name): TorchDType(name, dtype)
        for name, dtype in V3_DTYPES.items()
    },
}


class Unpickler(pickle.Unpickler):
    """Unpickler for torch weight pickles that refuses any other global.

    Only ordered dicts, tensors, parameters, storage classes and a few dtype
    objects can be built (see `ALLOWED_GLOBALS`); tensors come back as
    `TensorRef`s.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(
            f'refusing to unpickle {module}.{name}: only dicts of tensors '
            '(a torch state dict or checkpoint) are allowed'
        )

    def persistent_load(self, pid: Any) -> StorageRef:
        # Zip format: ('storage', type, key, location, numel);
        # legacy format: the same plus a view (None or (key, offset, numel)).
        if not (
            isinstance(pid, tuple)
            and len(pid) in (5, 6)
            and pid[0] == 'storage'
        ):
            raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(storage_type, StorageType):
            raise pickle.UnpicklingError('storage without a known type')
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return StorageRef(storage_type.dtype, str(key), int(numel))
        _, view_offset, view_numel = view
        return StorageRef(
            storage_type.dtype,
            str(key),
            int(numel),
            int(view_offset),
            int(view_numel),
        )


__all__ = [
    'ALLOWED_GLOBALS',
    'STORAGE_DTYPES',
    'V3_DTYPES',
    'StorageRef',
    'StorageType',
    'TensorRef',
    'TorchDType',
    'Unpickler',
]
