"""Job values across JSON boundaries, without pickle: a tagged JSON form that keeps numpy arrays
(dtype and shape), numpy scalars, NaN and infinities, tuples and non-string dict keys.

Used for JobSpec/ChildPlan `args`/`kwargs` and `JobResult.return_value` in JSON (the `wire` fields)
and for the value file the job writes (sandbox.job.results). A tag is a one-key object:
`{"__ndarray__": A}`, `{"__npscalar__": A}`, `{"__float__": "nan" | "inf" | "-inf"}`,
`{"__tuple__": [...]}`, `{"__dict__": [[key, value], ...]}`. A dict with string keys is itself
unless it would look like a tag (then `__dict__`), so decoding is exact. `A` is the boundary's own:
the base64 of the .npy bytes in JSON documents, a file number in the job's result directory.
JSON nested deeper than MAX_DEPTH (a list or dict takes one level, a tuple two, a dict with other
than string keys three) is refused both ways.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import IO, Annotated, Any, Callable

import numpy as np
from pydantic import BeforeValidator, PlainSerializer, ValidationInfo

MAX_DEPTH = 100
TAGS = ("__ndarray__", "__npscalar__", "__float__", "__tuple__", "__dict__")
_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class UnsupportedValue(ValueError):
    """A value that cannot cross to or from a job; `where` is its path in the value (`[0]['key']`)."""

    def __init__(self, reason: str, where: str = "") -> None:
        super().__init__(reason)
        self.reason, self.where = reason, where

    def __str__(self) -> str:
        where = self.where if len(self.where) <= 60 else self.where[:60] + "..."
        return f"{self.reason} (at {where})" if where else self.reason

    def inside(self, key: Any) -> "UnsupportedValue":
        self.where = f"[{key!r}]{self.where}"
        return self


def encode(value: Any, array: Callable[[np.ndarray], Any], depth: int = 0) -> Any:
    """The tagged JSON form of `value`; `array(a)` gives the payload `A` of each numpy array (0-d
    for a scalar). Raises UnsupportedValue for other types, object arrays and deep nesting."""
    if depth > MAX_DEPTH:
        raise UnsupportedValue(f"nested deeper than {MAX_DEPTH} levels (or it contains itself)")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, np.generic):
        return {"__npscalar__": array(_plain(np.asarray(value)))}
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": array(_plain(value))}
    if isinstance(value, list):
        return [_inside(i, item, array, depth + 1) for i, item in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [_inside(i, item, array, depth + 2) for i, item in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in TAGS):
            return {k: _inside(k, v, array, depth + 1) for k, v in value.items()}
        return {"__dict__": [[_inside(k, k, array, depth + 3), _inside(k, v, array, depth + 3)]
                             for k, v in value.items()]}
    hint = "; return value.to_numpy() for a Taichi field" if hasattr(value, "to_numpy") else ""
    raise UnsupportedValue(f"{type(value).__name__} is not supported (JSON values, numpy arrays and scalars, "
                           f"tuples and dicts are){hint}")


def _inside(key: Any, value: Any, array: Callable[[np.ndarray], Any], depth: int) -> Any:
    try:
        return encode(value, array, depth)
    except UnsupportedValue as err:
        raise err.inside(key) from None


def _plain(a: np.ndarray) -> np.ndarray:
    if a.dtype.hasobject:
        raise UnsupportedValue(f"numpy arrays of dtype {a.dtype} hold Python objects and are not supported")
    return a


def valid_text(data: Any, depth: int = 0) -> Any:
    """Parsed JSON (or a string) with each string made valid Unicode: a lone surrogate, which a JSON
    \\u escape or a file name that is not UTF-8 can put in a Python string, becomes "?", so what a
    job sent always serializes as UTF-8. ValueError past MAX_DEPTH levels of nesting."""
    if isinstance(data, str):
        return data if data.isascii() else data.encode("utf-8", "replace").decode()
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(data, list):
        return [valid_text(item, depth + 1) for item in data]
    if isinstance(data, dict):
        return {valid_text(k): valid_text(v, depth + 1) for k, v in data.items()}
    return data


def decode(data: Any, array: Callable[[Any], np.ndarray], depth: int = 0) -> Any:
    """The value of a tagged JSON form (parsed JSON); `array(A)` loads an array payload. Raises
    ValueError for anything malformed; never runs code."""
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    if data is None or isinstance(data, (bool, int, float, str)):
        return valid_text(data)
    if isinstance(data, list):  # the depths of encode(): those of the JSON nesting
        return [decode(item, array, depth + 1) for item in data]
    if not isinstance(data, dict):
        raise ValueError(f"unexpected {type(data).__name__}")
    if len(data) != 1 or next(iter(data)) not in TAGS:
        return {valid_text(k): decode(v, array, depth + 1) for k, v in data.items()}
    (tag, payload), = data.items()
    if tag == "__float__" and payload in _FLOATS:
        return _FLOATS[payload]
    if tag in ("__ndarray__", "__npscalar__"):
        loaded = array(payload)
        return loaded if tag == "__ndarray__" else loaded[()]
    if tag == "__tuple__" and isinstance(payload, list):
        return tuple(decode(item, array, depth + 2) for item in payload)
    if tag == "__dict__" and isinstance(payload, list):
        try:
            return {decode(k, array, depth + 3): decode(v, array, depth + 3) for k, v in payload}
        except (TypeError, ValueError) as err:
            raise ValueError(f"__dict__ holds something other than hashable [key, value] pairs: {err}") from None
    raise ValueError(f"malformed {tag}")


def load_npy(f: IO[bytes], size: int) -> np.ndarray:
    """numpy.load(allow_pickle=False) of `size` bytes of .npy from `f`, after checking that the header
    describes exactly those bytes (numpy would allocate what a forged header claims first)."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"unsupported .npy version {version}")
    read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, _, dtype = read_header(f)
    if dtype.hasobject:
        raise ValueError(f"object dtype {dtype} refused")
    if f.tell() + math.prod(shape) * dtype.itemsize != size:
        raise ValueError(f".npy header ({dtype}, shape {shape}) does not match its {size} bytes")
    f.seek(0)
    return np.load(f, allow_pickle=False)


def npy_parts(a: np.ndarray) -> tuple[bytes, memoryview]:
    """The .npy form of `a` as (header, data): the data a view of `a`'s memory where it is
    C-contiguous (else of a contiguous copy), so a large array can be written out without a copy."""
    fmt = np.lib.format
    a = a if a.flags.c_contiguous else np.array(a, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
    buf = io.BytesIO()
    header = fmt.header_data_from_array_1_0(a)
    try:
        fmt.write_array_header_1_0(buf, header)
    except ValueError:  # a header over 64 KiB (a huge structured dtype)
        buf = io.BytesIO()
        fmt.write_array_header_2_0(buf, header)
    return buf.getvalue(), memoryview(a.reshape(-1).view(np.uint8))


def npy_bytes(a: np.ndarray) -> bytes:
    return b"".join(npy_parts(a))


def _to_base64(a: np.ndarray) -> str:
    return base64.b64encode(npy_bytes(a)).decode()


def _from_base64(payload: Any) -> np.ndarray:
    if not isinstance(payload, str):
        raise ValueError("array payload is not a string")
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error as err:
        raise ValueError(f"array payload is not base64: {err}") from None
    return load_npy(io.BytesIO(data), len(data))


def _no_array(a: np.ndarray) -> None:
    return None


def decode_json_fields(data: Any, names: tuple[str, ...]) -> Any:
    """`data` (a model's parsed JSON) with the job values in `names` decoded, for models with a custom
    __init__ (pydantic validates their JSON through it, in Python mode, so `wire` cannot tell)."""
    if not isinstance(data, dict):
        return data
    return {**data, **{name: decode(data[name], _from_base64) for name in names if name in data}}


def wire(kind: Any, check: bool) -> Any:
    """`kind` annotated for job values: tagged JSON (arrays as base64 .npy) in JSON dumps and loads;
    in Python, the value itself, checked to be encodable when `check`."""
    def validate(value: Any, info: ValidationInfo) -> Any:
        if info.mode == "json":
            return decode(value, _from_base64)
        if check:
            encode(value, _no_array)
        return value
    return Annotated[kind, BeforeValidator(validate), PlainSerializer(lambda v: encode(v, _to_base64),
                                                                      when_used="json")]
