"""Read weights written by PyTorch, PyTorch Lightning and Jittor, without torch, without Jittor and
without executing anything from the file.

Formats, recognised by content rather than by suffix:

* PyTorch zip checkpoints (``torch.save`` since 1.6; ``.pt``, ``.pth``, ``.ckpt``): a zip holding
  ``PREFIX/data.pkl`` (the pickled object tree, protocol 2), ``PREFIX/data/KEY`` (raw storage bytes,
  one file per storage) and, in newer files, ``PREFIX/byteorder``. A tensor in the pickle is
  ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` where the storage is a
  persistent id ``('storage', torch.FloatStorage, KEY, location, numel)``; it is rebuilt here with
  numpy from the storage's dtype, offset, size and stride (bounds checked). A storage member is
  read up to the bytes the pickle says it holds and no further; a compressed member declaring more
  is refused before it is inflated. Half stays float16; BFloat16 becomes float32 (numpy has none).
* PyTorch's legacy (pre-1.6, non-zip) format, e.g. pytorch-fid's Inception weights: pickles of
  the magic number, the protocol version, the system info, the object tree (storage ids with one
  more field, a view, which must be None) and the storage key list, then each storage as an int64
  element count and its raw elements, in the order of that list.
* Lightning checkpoints: the same zip, with the weights under ``state_dict``.
* Jittor ``.pkl`` (``jt.save``): a protocol-4 pickle of dicts of ``jittor_core.Var`` (each pickled
  as a numpy array), followed by its SHA-1 and ``b"HCAJSLHD"``; the checksum is verified.
* Plain pickles of dicts of numpy arrays.
* safetensors: this project's checkpoints (their config read by ``weights.checkpoint.checkpoint_info``)
  and plain safetensors files.

Reading is lazy (``open_weights``): the object tree is unpickled, but each array stays in the file
as a ``LazyArray`` (its shape and dtype known) until ``numpy()`` reads it: zip members and legacy
storages are read when asked, and pickled arrays are skipped over by a pure-Python unpickler that
keeps their byte ranges. So a caller that converts and writes arrays one by one never holds the
whole file; ``read_weights`` reads everything, for small files.

Safety policy. Unpickling goes through the restricted unpicklers, whose ``find_class`` hands out only
a fixed whitelist: ``collections.OrderedDict``, the torch tensor/parameter/storage rebuilders,
numpy's array/dtype/scalar reconstruction, Jittor's ``Var`` (as "the array inside it") and
``_codecs.encode`` for latin-1 bytes. Each is replaced by a function written here that builds
numeric numpy arrays from validated arguments; nothing from torch, numpy internals, Jittor or the
file is imported or called. Arrays of object, string or structured dtype are refused.

Any other global (``os.system``, ``builtins.eval``, a Lightning callback class...) is never imported
or called. With ``strict=True`` it is refused at once: ``UnsafeFileError`` names the file and the
refused ``module.name``. By default it is replaced by an inert stand-in (calling, building or
filling it does nothing), because published Lightning checkpoints, LDM's and taming's among them,
pickle ``pytorch_lightning.callbacks...ModelCheckpoint`` in their ``callbacks`` section, which we
must be able to skip. Then only the weights are read: the top-level dict, or its ``state_dict`` when
there is one. A stand-in anywhere in the weights refuses the file with ``UnsafeFileError`` naming
it; the other sections (``callbacks``, ``optimizer_states``, ``hyper_parameters``...) are dropped
unread, and ``info`` lists them and every refused name met there, so callers can report them.
Either way no code from the file runs.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from weights.checkpoint import FORMAT_NAME, WeightsError, checkpoint_info

JITTOR_MARKER = b"HCAJSLHD"
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
ALLOWED_KINDS = "biufc"  # numpy dtype kinds accepted: bool, int, uint, float, complex
WEIGHTS_SECTION = "state_dict"  # where Lightning (and many others) keep the weights


class UnsafeFileError(WeightsError):
    """The file asks to run or build something outside the whitelist."""


def _refusal(source: str, qualified: str, where: str = "") -> UnsafeFileError:
    return UnsafeFileError(
        f"{source}: refused to load {qualified}{where}: weight files may only hold arrays/tensors, "
        "dicts, lists and plain values, and nothing in them is executed")


# ------------------------------------------------------------------------------------ stand-ins
class RefusedObject:
    """Inert stand-in for a global outside the whitelist: calling, building or filling it does nothing."""

    qualified_name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass

    def add(self, item):
        pass

    def __setitem__(self, key, value):
        pass

    def __repr__(self) -> str:
        return f"<refused {self.qualified_name}>"


def _stand_in(qualified: str) -> type:
    return type("RefusedObject", (RefusedObject,), {"qualified_name": qualified})


def _refused_name(obj) -> str | None:
    if isinstance(obj, RefusedObject) or (isinstance(obj, type) and issubclass(obj, RefusedObject)):
        return obj.qualified_name
    return None


# ------------------------------------------------------------------------------- numpy arrays
class _Marker:
    """A whitelisted name that stands for a type and may not be called (numpy.ndarray, torch.Tensor)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_NDARRAY = _Marker("numpy.ndarray")
_TORCH_TENSOR = _Marker("torch.Tensor")
_TORCH_PARAMETER = _Marker("torch.nn.parameter.Parameter")


def _checked_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.kind not in ALLOWED_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise WeightsError(f"arrays of dtype {dtype} are not allowed (only bool, integer, float, complex)")
    return dtype


class _DTypeSpec:
    """numpy.dtype(name, align, copy) followed by BUILD(state): only plain numeric dtypes."""

    def __init__(self, name, align=False, copy=True):
        if not isinstance(name, str):
            raise WeightsError(f"numpy dtype given as {type(name).__name__}, expected a string")
        self.dtype = _checked_dtype(name)

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 5:
            raise WeightsError("malformed numpy dtype state")
        byteorder, subarray, names, fields = state[1], state[2], state[3], state[4]
        if subarray is not None or names is not None or fields is not None:
            raise WeightsError("structured numpy dtypes are not allowed")
        if byteorder in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(byteorder)
        elif byteorder not in ("|", "="):
            raise WeightsError(f"unknown numpy byte order {byteorder!r}")


def _as_dtype(value) -> np.dtype:
    if isinstance(value, _DTypeSpec):
        return value.dtype
    if isinstance(value, np.dtype):
        return _checked_dtype(value)
    raise WeightsError(f"expected a numpy dtype, found {type(value).__name__}")


def _as_bytes(value) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):  # Python 2 pickles of numpy arrays store the raw bytes as latin-1 text
        return value.encode("latin-1")
    raise WeightsError(f"array data given as {type(value).__name__}, expected bytes")


def _shape(value, what: str = "shape") -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value):
        raise WeightsError(f"malformed {what}: {value!r}")
    return tuple(value)


# ------------------------------------------------------------------------------- lazy arrays
class LazyArray:
    """An array of a weight file read only when asked. ``shape`` and ``dtype`` (those of the array
    ``numpy()`` returns) are known without reading; each ``numpy()`` reads it from the file again,
    so a caller that converts and writes arrays one by one holds one at a time."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def numpy(self) -> np.ndarray:
        raise NotImplementedError

    def __array__(self, dtype=None, copy=None):
        array = self.numpy()
        return array if dtype is None else array.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.dtype} {self.shape}>"


def _from_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32: the upper half of a float32 (numpy has no bfloat16)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class _FileBytes:
    """A byte range of a file that the lazy unpickler skipped instead of reading."""

    path: str
    offset: int
    length: int


class _FileArray(LazyArray):
    """``shape`` elements of type ``stored`` (a numpy dtype in any byte order, or "bfloat16") at
    byte ``offset`` of a file, in C or Fortran order; read as native-order numpy (bfloat16 as float32)."""

    def __init__(self, path: str | os.PathLike, offset: int, stored, shape: tuple[int, ...], fortran: bool = False):
        self.path, self.offset, self.shape, self.fortran = str(path), int(offset), tuple(shape), fortran
        self.stored = stored if stored == "bfloat16" else _checked_dtype(stored)
        self.dtype = np.dtype(np.float32) if stored == "bfloat16" else self.stored.newbyteorder("=")

    def numpy(self) -> np.ndarray:
        count = math.prod(self.shape)
        file_dtype = np.dtype("<u2") if self.stored == "bfloat16" else self.stored
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            flat = np.fromfile(f, dtype=file_dtype, count=count)
        if flat.size != count:
            raise WeightsError(f"{self.path}: the array at byte {self.offset} is cut short "
                               f"({flat.size} of {count} elements; truncated file?)")
        if self.stored == "bfloat16":
            flat = _from_bfloat16(flat)
        elif not file_dtype.isnative:
            flat = flat.astype(self.dtype)
        return flat.reshape(self.shape, order="F" if self.fortran else "C")


def _file_array(raw: _FileBytes, dtype: np.dtype, shape: tuple[int, ...], fortran: bool = False) -> _FileArray:
    need = math.prod(shape) * dtype.itemsize
    if raw.length != need:
        raise WeightsError(f"array data holds {raw.length} bytes, {shape} of {dtype} needs {need}")
    return _FileArray(raw.path, raw.offset, dtype, shape, fortran)


def _array_from_bytes(raw: bytes, dtype: np.dtype, shape: tuple[int, ...], fortran: bool = False) -> np.ndarray:
    count = math.prod(shape)
    if len(raw) != count * dtype.itemsize:
        raise WeightsError(f"array data holds {len(raw)} bytes, {shape} of {dtype} needs {count * dtype.itemsize}")
    flat = np.frombuffer(raw, dtype=dtype, count=count)
    return flat.reshape(shape, order="F" if fortran else "C").astype(dtype.newbyteorder("="), copy=True)


class _ArrayProxy:
    """numpy.core.multiarray._reconstruct(ndarray, (0,), b'b') followed by BUILD(state)."""

    def __init__(self):
        self.array: np.ndarray | _FileArray | None = None

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise WeightsError("malformed numpy array state")
        shape, dtype, fortran, raw = state[-4:]
        if not isinstance(fortran, bool):
            raise WeightsError("malformed numpy array state (memory order)")
        if isinstance(raw, list):
            raise WeightsError("numpy arrays of Python objects are not allowed")
        if isinstance(raw, _FileBytes):
            self.array = _file_array(raw, _as_dtype(dtype), _shape(shape), fortran)
        else:
            self.array = _array_from_bytes(_as_bytes(raw), _as_dtype(dtype), _shape(shape), fortran)


def _np_reconstruct(subtype, shape, dtype_code):
    if subtype is not _NDARRAY:
        raise WeightsError(f"numpy reconstruction of {subtype!r} is not allowed (only numpy.ndarray)")
    return _ArrayProxy()


def _np_scalar(dtype, raw=None):
    dtype = _as_dtype(dtype)
    return _array_from_bytes(_as_bytes(raw), dtype, ())[()]


def _np_frombuffer(buffer, dtype, shape, order):
    if isinstance(buffer, _FileBytes):
        return _file_array(buffer, _as_dtype(dtype), _shape(shape), order == "F")
    return _array_from_bytes(_as_bytes(buffer), _as_dtype(dtype), _shape(shape), order == "F")


def _codecs_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise WeightsError(f"_codecs.encode is allowed only for latin-1 text, got {encoding!r}")
    return text.encode("latin-1")


def _jittor_var(data, *rest):
    """jittor_core.Var(ndarray): the array inside the Var."""
    if not isinstance(data, (_ArrayProxy, _FileArray, np.ndarray, np.generic)):
        raise WeightsError(f"a Jittor Var built from {type(data).__name__}, expected a numpy array")
    return data


# ------------------------------------------------------------------------------- torch tensors
_TORCH_STORAGES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
}


@dataclass(frozen=True)
class _StorageType:
    name: str  # numpy dtype name, or "bfloat16"

    @property
    def itemsize(self) -> int:
        return 2 if self.name == "bfloat16" else np.dtype(self.name).itemsize

    @property
    def result(self) -> np.dtype:
        """The numpy dtype its tensors are read as (bfloat16 as float32)."""
        return np.dtype(np.float32) if self.name == "bfloat16" else np.dtype(self.name)


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: _StorageType
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    """A tensor waiting to be read: a strided view of a storage."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    """torch._utils._rebuild_tensor(_v2)(storage, offset, size, stride[, requires_grad, hooks, metadata])."""
    if not isinstance(storage, _StorageRef):
        raise WeightsError(f"a tensor built on {type(storage).__name__}, expected a storage of the checkpoint")
    size, stride = _shape(size, "tensor size"), _shape(stride, "tensor stride")
    if len(size) != len(stride) or not isinstance(storage_offset, int) or storage_offset < 0:
        raise WeightsError(f"malformed tensor: size {size}, stride {stride}, offset {storage_offset!r}")
    if math.prod(size) > 0:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise WeightsError(f"tensor of size {size} (stride {stride}, offset {storage_offset}) reaches past "
                               f"its storage of {storage.numel} elements")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    """torch._utils._rebuild_parameter(_with_state)(data, ...): the tensor itself."""
    if not isinstance(data, (_TensorRef, _ArrayProxy, _FileArray, np.ndarray)):
        raise WeightsError(f"a parameter built from {type(data).__name__}, expected a tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    """torch._tensor._rebuild_from_type_v2: allowed for plain tensors and parameters without state."""
    if new_type not in (_TORCH_TENSOR, _TORCH_PARAMETER) or state:
        raise WeightsError(f"tensor subclass {new_type!r} with state is not allowed")
    if func not in (_rebuild_tensor, _rebuild_parameter):
        raise WeightsError("tensor rebuilt by a function outside the whitelist")
    return func(*args)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TORCH_TENSOR,
    ("torch.nn.parameter", "Parameter"): _TORCH_PARAMETER,
    ("torch", "Size"): tuple,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTypeSpec,
    ("_codecs", "encode"): _codecs_encode,
    ("jittor", "jittor_core.Var"): _jittor_var,
    ("jittor_core", "Var"): _jittor_var,
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = _np_reconstruct
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = _np_scalar
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = _np_frombuffer
for _name, _dtype in _TORCH_STORAGES.items():
    _ALLOWED[("torch", _name)] = _StorageType(_dtype)


class _Restricted:
    """``find_class`` and ``persistent_load`` of the restricted unpicklers: ``find_class`` returns
    only the whitelist above (see the module docstring). With ``torch_storages`` (a PyTorch
    checkpoint's object pickle) persistent ids name raw storages of the file; in any other pickle a
    persistent id is an error. ``refused`` lists the globals that were replaced by inert stand-ins."""

    def _restrict(self, source: str, strict: bool, torch_storages: bool) -> None:
        self.source = source
        self.strict = strict
        self.torch_storages = torch_storages
        self.refused: list[str] = []
        self._storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str):
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        qualified = f"{module}.{name}"
        if self.strict:
            raise _refusal(self.source, qualified)
        if qualified not in self.refused:
            self.refused.append(qualified)
        return _stand_in(qualified)

    def persistent_load(self, pid):
        if not self.torch_storages:
            raise WeightsError(f"{self.source}: the pickle refers to external data but is not inside a "
                               "PyTorch zip checkpoint")
        # zip format: (typename, type, key, location, numel); legacy (pre-1.6) format: the same and
        # a view (None, or (view key, offset, size) of a storage shared by several views)
        if not isinstance(pid, tuple) or len(pid) not in (5, 6):
            raise WeightsError(f"{self.source}: malformed storage reference {pid!r}")
        if len(pid) == 6 and pid[5] is not None:
            raise WeightsError(f"{self.source}: storage views of PyTorch's legacy format are not supported; "
                               "re-save the file with torch.save(torch.load(path), new_path)")
        typename, storage_type, key, _location, numel = pid[:5]
        typename = typename.decode("ascii") if isinstance(typename, bytes) else typename
        if typename != "storage" or not isinstance(storage_type, _StorageType):
            refused = _refused_name(storage_type)
            if refused:
                raise _refusal(self.source, refused, " (as a tensor storage)")
            raise WeightsError(f"{self.source}: unsupported storage reference {typename!r} of {storage_type!r}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise WeightsError(f"{self.source}: malformed storage reference {pid!r}")
        ref = self._storages.setdefault(key, _StorageRef(key, storage_type, numel))
        if ref.dtype != storage_type:
            raise WeightsError(f"{self.source}: storage {key} is used with two dtypes")
        return ref


class RestrictedUnpickler(_Restricted, pickle.Unpickler):
    """The restricted unpickler (C implementation), for pickles without array data in them."""

    def __init__(self, file, source: str, strict: bool = False, torch_storages: bool = False):
        pickle.Unpickler.__init__(self, file)
        self._restrict(source, strict, torch_storages)


LAZY_BYTES = 1 << 16   # bytes objects this large are skipped by the lazy unpickler (pickle's frame size)


class _LazyUnpickler(_Restricted, pickle._Unpickler):
    """The restricted unpickler in pure Python, reading a seekable file, which skips the payload of
    every large bytes object (a numpy array's data in a Jittor ``.pkl`` or a plain pickle) and
    leaves its byte range in its place, so the arrays are read later one at a time instead of all
    at once. Pickle writes payloads of 64 KiB and more outside its frames, straight after their
    opcode and length, so they sit in the file as they are; one inside a frame is read normally."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, source: str, strict: bool = False):
        pickle._Unpickler.__init__(self, file)
        self._restrict(source, strict, torch_storages=False)
        self._file = file
        self._size = os.fstat(file.fileno()).st_size

    def _payload(self, length: int, mutable: bool = False):
        if length < LAZY_BYTES or self._unframer.current_frame is not None:
            data = self.read(length)
            if len(data) != length:
                raise WeightsError(f"{self.source}: the pickle is cut short (truncated file?)")
            return bytearray(data) if mutable else data
        offset = self._file.tell()
        if offset + length > self._size:
            raise WeightsError(f"{self.source}: an array of {length} bytes at byte {offset} reaches past the "
                               f"end of the file ({self._size} bytes; truncated download?)")
        self._file.seek(length, io.SEEK_CUR)
        return _FileBytes(self.source, offset, length)

    def _load_short_binbytes(self):
        self.append(self._payload(self.read(1)[0]))

    def _load_binbytes(self):
        (length,) = struct.unpack("<I", self.read(4))
        self.append(self._payload(length))

    def _load_binbytes8(self):
        (length,) = struct.unpack("<Q", self.read(8))
        self.append(self._payload(length))

    def _load_bytearray8(self):
        (length,) = struct.unpack("<Q", self.read(8))
        self.append(self._payload(length, mutable=True))

    dispatch[pickle.SHORT_BINBYTES[0]] = _load_short_binbytes
    dispatch[pickle.BINBYTES[0]] = _load_binbytes
    dispatch[pickle.BINBYTES8[0]] = _load_binbytes8
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8


# ------------------------------------------------------------------------------- file formats
MAX_OBJECT_PICKLE = 256 << 20   # a checkpoint's object tree (data.pkl) holds names and shapes, no data


class _StorageTensor(LazyArray):
    """A tensor of a PyTorch checkpoint, read from its storage when asked."""

    def __init__(self, storages: "_ZipStorages | _LegacyStorages", ref: _TensorRef):
        self.storages, self.ref = storages, ref
        self.shape, self.dtype = ref.size, ref.storage.dtype.result

    def numpy(self) -> np.ndarray:
        return _strided(self.storages.storage(self.ref.storage), self.ref)


class _ZipStorages:
    """Raw storages ``PREFIX/data/KEY`` of a PyTorch zip checkpoint, read one at a time on request.

    A member is read up to the bytes its tensors need (the furthest element any tensor of the
    object tree reaches, never more than the storage size the pickle declares) and no further: a
    compressed member that would inflate past that is refused before anything is inflated, so a
    small file cannot claim gigabytes of memory by declaring a huge storage."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, source: str, reach: Mapping[str, int]):
        self.archive, self.prefix, self.source, self.reach = archive, prefix, source, reach
        order = "little"
        if f"{prefix}byteorder" in archive.namelist():
            order = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise WeightsError(f"{source}: unknown byte order {order!r}")
        self.order = "<" if order == "little" else ">"

    def storage(self, ref: _StorageRef) -> np.ndarray:
        name = f"{self.prefix}data/{ref.key}"
        try:
            member = self.archive.getinfo(name)
        except KeyError:
            raise WeightsError(f"{self.source}: storage {name} is missing from the archive") from None
        if member.file_size < ref.numel * ref.dtype.itemsize:
            raise WeightsError(f"{self.source}: storage {name} holds {member.file_size} bytes, needs "
                               f"{ref.numel * ref.dtype.itemsize}")
        count = min(ref.numel, self.reach.get(ref.key, ref.numel))
        need = count * ref.dtype.itemsize
        if member.compress_type != zipfile.ZIP_STORED and member.file_size > need:
            raise WeightsError(f"{self.source}: zip member {name} inflates to {member.file_size} bytes but its "
                               f"tensors need {need}; refused without inflating it (a corrupt or hostile file)")
        with self.archive.open(member) as stream:
            raw = stream.read(need)
        if len(raw) != need:
            raise WeightsError(f"{self.source}: storage {name} is cut short ({len(raw)} of {need} bytes)")
        return _decode_storage(raw, ref, self.order, count)


class _LegacyStorages:
    """Raw storages of PyTorch's legacy (pre-1.6) format, which follow the pickles in the file:
    for each key of the storage-key list, an int64 element count and the elements. Their places
    are noted in one pass that reads only the counts; each storage is read when asked."""

    def __init__(self, stream, path: Path, keys: list, refs: dict[str, _StorageRef], order: str):
        self.path, self.source, self.order = path, str(path), order
        self._offsets: dict[str, int] = {}
        size = os.fstat(stream.fileno()).st_size
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise WeightsError(f"{path}: malformed storage key list in a legacy PyTorch file")
        for key in keys:
            header = stream.read(8)
            if len(header) != 8:
                raise WeightsError(f"{path}: storage {key} is missing (file truncated?)")
            (numel,) = struct.unpack(order + "q", header)
            ref = refs.get(key)
            if ref is None or numel != ref.numel:
                raise WeightsError(f"{path}: storage {key} holds {numel} elements, the pickle named "
                                   f"{None if ref is None else ref.numel}")
            offset = stream.tell()
            if offset + numel * ref.dtype.itemsize > size:
                raise WeightsError(f"{path}: storage {key} is truncated")
            self._offsets[key] = offset
            stream.seek(numel * ref.dtype.itemsize, io.SEEK_CUR)
        missing = sorted(set(refs) - set(self._offsets))
        if missing:
            raise WeightsError(f"{path}: storages {', '.join(missing[:5])} are named but not stored")

    def storage(self, ref: _StorageRef) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(self._offsets[ref.key])
            raw = f.read(ref.numel * ref.dtype.itemsize)
        return _decode_storage(raw, ref, self.order)


def _decode_storage(raw: bytes, ref: _StorageRef, order: str, count: int | None = None) -> np.ndarray:
    """The first ``count`` (default: all) elements of a storage as native-order numpy (a read-only
    view of ``raw`` when no conversion is needed: the tensor is copied out of it next)."""
    count = ref.numel if count is None else count
    if len(raw) != count * ref.dtype.itemsize:
        raise WeightsError(f"storage {ref.key} holds {len(raw)} bytes, needs {count * ref.dtype.itemsize}")
    if ref.dtype.name == "bfloat16":
        return _from_bfloat16(np.frombuffer(raw, dtype=np.dtype("u2").newbyteorder(order), count=count))
    dtype = np.dtype(ref.dtype.name).newbyteorder(order)
    values = np.frombuffer(raw, dtype=dtype, count=count)
    return values if dtype.isnative else values.astype(dtype.newbyteorder("="))


def _strided(values: np.ndarray, ref: _TensorRef) -> np.ndarray:
    """The tensor's strided view of its storage, copied (bounds were checked in _rebuild_tensor)."""
    view = np.lib.stride_tricks.as_strided(values[ref.offset:], shape=ref.size,
                                           strides=tuple(s * values.itemsize for s in ref.stride))
    return np.array(view, copy=True)


def _looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 0 < length < 100_000_000 and head[8:9] == b"{"


def _load_one(stream, source: str, strict: bool, torch_storages: bool = False, what: str = "weight file",
              lazy: bool = False):
    """One restricted pickle from ``stream``: (object, its unpickler). ``lazy``: leave large bytes
    objects in the file (``stream`` must be a seekable file)."""
    if lazy:
        unpickler = _LazyUnpickler(stream, source, strict=strict)
    else:
        unpickler = RestrictedUnpickler(stream, source, strict=strict, torch_storages=torch_storages)
    try:
        return unpickler.load(), unpickler
    except UnsafeFileError:
        raise
    except WeightsError as exc:
        raise WeightsError(str(exc) if str(exc).startswith(source) else f"{source}: {exc}") from None
    except Exception as exc:  # a malformed or hostile pickle: any failure means "not loadable"
        raise WeightsError(f"{source}: not a readable {what} ({type(exc).__name__}: {exc})") from None


def _read_torch_zip(path: Path, strict: bool):
    archive = zipfile.ZipFile(path)
    pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise WeightsError(f"{path}: a zip file but not a PyTorch checkpoint (expected one PREFIX/data.pkl, "
                           f"found {len(pickles)})")
    member = archive.getinfo(pickles[0])
    if member.file_size > MAX_OBJECT_PICKLE:
        raise WeightsError(f"{path}: zip member {member.filename} declares {member.file_size} bytes; a "
                           f"checkpoint's object tree is far smaller (limit {MAX_OBJECT_PICKLE} bytes)")
    prefix = pickles[0][: -len("data.pkl")]
    obj, unpickler = _load_one(io.BytesIO(archive.read(member)), str(path), strict, torch_storages=True)
    return obj, unpickler.refused, _ZipStorages(archive, prefix, str(path), _storage_reach(obj))


def _storage_reach(obj) -> dict[str, int]:
    """For each storage key, how many of its elements the tensors in ``obj`` reach (the furthest
    element any of them uses, plus one)."""
    reach: dict[str, int] = {}
    pending = [obj]
    while pending:
        item = pending.pop()
        if isinstance(item, _TensorRef):
            last = item.offset + sum((n - 1) * s for n, s in zip(item.size, item.stride)) + 1
            used = last if math.prod(item.size) > 0 else 0
            reach[item.storage.key] = max(reach.get(item.storage.key, 0), used)
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return reach


def _jittor_body(path: Path) -> int | None:
    """The length of the pickle of a Jittor ``.pkl`` (the file less its SHA-1 and marker) after
    checking the checksum in one streamed pass; None for a file without Jittor's marker."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 28:
            return None
        f.seek(size - 28)
        trailer = f.read(28)
        if not trailer.endswith(JITTOR_MARKER):
            return None
        body, digest = size - 28, hashlib.sha1()
        f.seek(0)
        for _ in range(0, body, 1 << 20):
            digest.update(f.read(min(1 << 20, body - f.tell())))
    if digest.digest() != trailer[:20]:
        raise WeightsError(f"{path}: Jittor file checksum does not match (truncated or corrupted download?)")
    return body


def _read_pickle(path: Path, strict: bool):
    fmt = "jittor-pkl" if _jittor_body(path) is not None else "pickle"
    with open(path, "rb") as stream:
        obj, unpickler = _load_one(stream, str(path), strict, lazy=True)
    return obj, unpickler.refused, fmt


def _legacy_magic(head: bytes) -> bool:
    """Whether a pickle starts with PyTorch's legacy magic number (pickled as a LONG1)."""
    magic = TORCH_LEGACY_MAGIC.to_bytes(10, "little")
    return head[2:4] == b"\x8a\x0a" and head[4:14] == magic if len(head) >= 14 else False


def _read_torch_legacy(path: Path, strict: bool):
    """PyTorch's pre-1.6 format: pickles of the magic number, the protocol version (1001), the
    system info and the object (storages as persistent ids), then the list of storage keys, then
    the raw storages in that order."""
    source = str(path)
    with open(path, "rb") as stream:
        def load(torch_storages=False):
            return _load_one(stream, source, strict, torch_storages, what="legacy PyTorch file")

        magic, _ = load()
        protocol, _ = load()
        sys_info, _ = load()
        if magic != TORCH_LEGACY_MAGIC or protocol != 1001 or not isinstance(sys_info, dict):
            raise WeightsError(f"{source}: not a legacy PyTorch file (magic {magic!r}, protocol {protocol!r})")
        order = "<" if sys_info.get("little_endian", True) else ">"
        obj, unpickler = load(torch_storages=True)
        keys, _ = load()
        storages = _LegacyStorages(stream, path, keys, unpickler._storages, order)
    return obj, unpickler.refused, storages


# ------------------------------------------------------------------------------- the weights
def _flatten(obj, prefix: str, source: str, out: dict, plain: dict, seen: set[int]) -> None:
    if id(obj) in seen:
        raise WeightsError(f"{source}: {prefix or 'the weights'} refer to themselves")
    if isinstance(obj, dict):
        seen.add(id(obj))
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                refused = _refused_name(key)
                if refused:
                    raise _refusal(source, refused, f" (as a key in '{prefix or 'the weights'}')")
                raise WeightsError(f"{source}: weight names must be strings, found {type(key).__name__}")
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), source, out, plain, seen)
        seen.discard(id(obj))
        return
    refused = _refused_name(obj)
    if refused:
        raise _refusal(source, refused, f" (found at '{prefix}')" if prefix else " (as the file content)")
    if isinstance(obj, (_ArrayProxy, _TensorRef, LazyArray, np.ndarray, np.generic)):
        out[prefix] = obj
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        plain[prefix] = obj
    else:
        raise WeightsError(f"{source}: {prefix or 'the file content'} is a {type(obj).__name__}, "
                           "expected an array or a dict of arrays")


def _array_of(value, storages, name: str, source: str) -> "np.ndarray | LazyArray":
    """The array a flattened value stands for: numpy arrays as they are, the rest lazily."""
    if isinstance(value, _ArrayProxy):
        if value.array is None:
            raise WeightsError(f"{source}: {name}: incomplete numpy array")
        value = value.array
    elif isinstance(value, _TensorRef):
        if storages is None:
            raise WeightsError(f"{source}: {name}: tensor outside a PyTorch checkpoint")
        value = _StorageTensor(storages, value)
    elif not isinstance(value, (np.ndarray, LazyArray)):
        value = np.asarray(value)
    try:
        _checked_dtype(value.dtype)
    except WeightsError as exc:
        raise WeightsError(f"{source}: {name}: {exc}") from None
    return value


@dataclass
class ForeignInfo:
    """What ``read_weights`` found besides the weights."""

    format: str                       # torch-zip | jittor-pkl | pickle | safetensors | iidm-safetensors
    layout: str = "state_dict"        # state_dict | lightning | wrapped (other dict with state_dict) | checkpoint
    ignored_sections: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)   # refused globals met in ignored sections
    values: dict[str, Any] = field(default_factory=dict)  # plain values (epoch, global_step, ...)
    checkpoint: dict[str, Any] | None = None            # kind/config/extra of this project's files

    def describe(self) -> list[str]:
        """Plain-words lines for a user."""
        lines = []
        if self.ignored_sections:
            lines.append("ignored the sections without weights: " + ", ".join(self.ignored_sections))
        if self.refused:
            lines.append("not loaded (never imported or run): " + ", ".join(sorted(self.refused)))
        return lines


def open_weights(path: str | os.PathLike, strict: bool = False) -> tuple[dict[str, Any], ForeignInfo]:
    """The weights of a PyTorch / Lightning / Jittor / safetensors file as name -> array, without
    reading their data: each value is a numpy array (small ones) or a ``LazyArray`` whose
    ``numpy()`` reads it, so the whole file is never in memory at once.

    Nested dicts are flattened with dots. See the module docstring for what is refused; ``strict``
    refuses any global outside the whitelist even in sections that are not read."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weight file not found")
    with open(path, "rb") as f:
        head = f.read(16)
    if zipfile.is_zipfile(path):
        obj, refused, storages = _read_torch_zip(path, strict)
        info = ForeignInfo("torch-zip")
    elif _looks_like_safetensors(head):
        return _read_safetensors(path)
    elif head[:1] == b"\x80" and _legacy_magic(head):
        obj, refused, storages = _read_torch_legacy(path, strict)
        info = ForeignInfo("torch-legacy")
    elif head[:1] == b"\x80":
        obj, refused, fmt = _read_pickle(path, strict)
        storages, info = None, ForeignInfo(fmt)
    else:
        raise WeightsError(f"{path}: unknown format (expected a PyTorch zip checkpoint, a Jittor .pkl, "
                           "a pickle of arrays or a safetensors file)")

    source = str(path)
    refused_top = _refused_name(obj)
    if refused_top:
        raise _refusal(source, refused_top, " (as the file content)")
    if not isinstance(obj, dict):
        raise WeightsError(f"{source}: expected a dict of weights, found a {type(obj).__name__}")
    weights = obj
    if isinstance(obj.get(WEIGHTS_SECTION), dict):
        weights = obj[WEIGHTS_SECTION]
        info.layout = "lightning" if "pytorch-lightning_version" in obj else "wrapped"
        for key, value in obj.items():
            if key == WEIGHTS_SECTION:
                continue
            if value is None or isinstance(value, (bool, int, float, str)):
                info.values[str(key)] = value
            else:
                info.ignored_sections.append(str(key))
    flat: dict[str, Any] = {}
    _flatten(weights, "", source, flat, info.values, set())
    if not flat:
        raise WeightsError(f"{source}: no arrays found (top-level keys: {', '.join(map(str, list(obj)[:10]))})")
    arrays = {name: _array_of(value, storages, name, source) for name, value in flat.items()}
    # Every stand-in that reached the weights raised above; the rest sat in ignored sections.
    info.refused = sorted(set(refused))
    return arrays, info


def read_weights(path: str | os.PathLike, strict: bool = False) -> tuple[dict[str, np.ndarray], ForeignInfo]:
    """``open_weights`` with every array read: name -> numpy array."""
    arrays, info = open_weights(path, strict)
    return {name: value.numpy() if isinstance(value, LazyArray) else value for name, value in arrays.items()}, info


_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "bfloat16", "I64": "<i8", "I32": "<i4",
                       "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1",
                       "BOOL": "bool"}


def _read_safetensors(path: Path) -> tuple[dict[str, LazyArray], ForeignInfo]:
    """A safetensors file's header (8-byte little-endian length, then JSON: each array's dtype,
    shape and byte range after the header), every array left in the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a readable safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + length
    arrays: dict[str, LazyArray] = {}
    for name, entry in header.items():
        try:
            stored = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = _shape(entry["shape"])
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError, WeightsError):
            raise WeightsError(f"{path}: malformed safetensors entry for {name!r}") from None
        itemsize = 2 if stored == "bfloat16" else np.dtype(stored).itemsize
        if begin < 0 or end - begin != math.prod(shape) * itemsize or start + end > size:
            raise WeightsError(f"{path}: array {name} ({entry['dtype']} {list(shape)}) does not fit its byte range "
                               f"{begin}..{end} of the file (truncated or corrupt?)")
        arrays[name] = _FileArray(path, start + begin, stored, shape)
    if isinstance(metadata, dict) and metadata.get("format") == FORMAT_NAME:
        checkpoint = checkpoint_info(path, metadata)
        return arrays, ForeignInfo("iidm-safetensors", layout="checkpoint", checkpoint=checkpoint)
    return arrays, ForeignInfo("safetensors")


# ------------------------------------------------------------------------------- name mapping
@dataclass
class Selection:
    """Weights kept after a prefix was stripped and training-only names were dropped, with a report."""

    weights: dict[str, np.ndarray]
    prefix: str = ""
    dropped: dict[str, list[str]] = field(default_factory=dict)   # drop prefix -> original names
    outside_prefix: list[str] = field(default_factory=list)

    def describe(self, limit: int = 4) -> list[str]:
        """Plain-words lines saying what was left out and why."""
        lines = []
        for drop, names in self.dropped.items():
            if names:
                example = ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")
                lines.append(f"ignored {len(names)} training-only weight(s) under '{drop}' ({example})")
        if self.outside_prefix:
            example = ", ".join(self.outside_prefix[:limit]) + (" ..." if len(self.outside_prefix) > limit else "")
            lines.append(f"ignored {len(self.outside_prefix)} weight(s) outside '{self.prefix}' ({example})")
        return lines


def select_weights(arrays: Mapping[str, np.ndarray], prefix: str = "",
                   drop: Iterable[str] = ("loss.",)) -> Selection:
    """Keep the names under ``prefix`` (stripped), leaving out names starting with any ``drop``
    prefix (matched on the original name), e.g. ``loss.`` (discriminator and LPIPS) in LDM / taming
    autoencoder checkpoints, or ``first_stage_model.`` kept from a whole LDM checkpoint."""
    drop = tuple(drop)
    selection = Selection({}, prefix, {d: [] for d in drop})
    for name in sorted(arrays):
        hit = next((d for d in drop if name.startswith(d)), None)
        if hit is not None:
            selection.dropped[hit].append(name)
        elif not name.startswith(prefix):
            selection.outside_prefix.append(name)
        else:
            selection.weights[name[len(prefix):]] = arrays[name]
    return selection


def find_prefix(names: Iterable[str], anchor: str, candidates: Iterable[str] = ("",)) -> str:
    """The prefix under which ``anchor`` (a name the network surely has) appears, trying ``candidates``
    first, then any prefix that ends where the anchor begins; "" when none matches."""
    names = set(names)
    for candidate in candidates:
        if candidate + anchor in names:
            return candidate
    hits = sorted(name[: -len(anchor)] for name in names if name.endswith("." + anchor))
    return hits[0] if len(hits) == 1 else ""
