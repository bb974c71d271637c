"""Callables to the job: pickled with dill in the caller's process, unpickled only in the job's child.
That direction is trusted (the caller runs the job); nothing that comes from a job is ever unpickled.

A callable travels with its args and kwargs (anything dill can pickle). Taichi compiles kernels from
their source (`inspect.getsource`) and dill ships code, not source, so the source of every file whose
code is shipped by value goes along and is put into the child's `linecache`: kernels defined inside a
job function in a notebook cell, `python - < file` or a script the job cannot read still compile. The
caller's import path goes along too: functions of importable modules travel by reference and are
imported in the child. Taichi kernels and fields at the top level of a script or notebook hold state
of the caller's Taichi runtime and are refused, with what to do instead.
"""

from __future__ import annotations

import base64
import functools
import io
import linecache
import os
import stat
import sys
import types
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

MAX_SOURCE_BYTES = 1 << 20  # a larger file's source is not shipped (Taichi then needs to read it)
_HINT = "define them inside the job function, or in a module the job can import"


class Shipped(BaseModel):
    """A callable on its way to the job: `payload` is base64 of dill's
    (function, args, kwargs); `sources` the text of each file its shipped code came from; `path` the
    caller's sys.path."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    payload: str
    sources: dict[str, str] = {}
    path: list[str] = []


class ShippingError(ValueError):
    """A callable that cannot be shipped to a job. The message is one line and says what to do."""


def describe(fn: Any) -> str:
    """`module:qualname` of a callable (of the function inside a functools.partial)."""
    inner = fn.func if isinstance(fn, functools.partial) else fn
    module = getattr(inner, "__module__", None) or type(inner).__module__
    return f"{module}:{getattr(inner, '__qualname__', None) or type(inner).__qualname__}"


def prepare(data: Any) -> Any:
    """JobSpec input whose `kernel` is a callable (or "__main__:NAME") → its name and Shipped, with
    `args` and `kwargs` inside the payload. Anything else is returned unchanged."""
    if not isinstance(data, dict) or "shipped" in data:
        return data
    kernel = data.get("kernel")
    if isinstance(kernel, str) and kernel.startswith("__main__:"):
        kernel = getattr(sys.modules["__main__"], kernel.partition(":")[2], None)
        if not callable(kernel):
            raise ShippingError(f"__main__ has no function {data['kernel'].partition(':')[2]!r}")
    if isinstance(kernel, str) or not callable(kernel):
        return data
    shipped = ship(kernel, data.get("args", ()), data.get("kwargs", {}))
    return {**data, "kernel": shipped.name, "shipped": shipped, "args": [], "kwargs": {}}


def ship(fn: Callable, args: Any = (), kwargs: Any = None) -> Shipped:
    """Pickle `fn(*args, **kwargs)` for the job. Raises ShippingError (one line) when it cannot be."""
    name = describe(fn)
    buf = io.BytesIO()
    pickler = _pickler_class()(buf, name)
    try:
        pickler.dump((fn, list(args), dict(kwargs or {})))
    except ShippingError:
        raise
    except Exception as err:  # noqa: BLE001 - dill raises many types; each becomes the one-line error
        detail = (str(err).splitlines() or [""])[0][:300]
        raise ShippingError(f"cannot ship {name} to the job ({type(err).__name__}: {detail}): what it uses "
                            f"must be picklable; {_HINT}") from None
    sources = {f: s for f in sorted(pickler.filenames) if (s := _source(f)) is not None}
    path = [os.path.abspath(p or os.curdir) for p in sys.path if os.path.isdir(p or os.curdir)]
    return Shipped(name=name, payload=base64.b64encode(buf.getvalue()).decode(), sources=sources, path=path)


def receive(shipped: Shipped) -> tuple[Callable, list, dict]:
    """In the job's child: register the sources, extend sys.path, unpickle (function, args, kwargs)."""
    for filename, source in shipped.sources.items():
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # mtime None: kept
    sys.path.extend(p for p in shipped.path if p not in sys.path)
    import dill
    try:
        return dill.loads(base64.b64decode(shipped.payload))
    except ImportError as err:
        raise ShippingError(f"cannot load {shipped.name} in the job: {err} (its modules must be importable "
                            "by the job's uid)") from None


@functools.cache
def _pickler_class():
    import dill

    class Pickler(dill.Pickler):
        """dill's pickler that records the files of the code it ships and refuses Taichi state:
        kernels that would travel by value, fields and ndarrays (they live in the caller's runtime)."""

        def __init__(self, file, name: str) -> None:
            super().__init__(file, recurse=True)
            self.name, self.filenames = name, set()
            self.taichi_state = tuple(c for c in (_loaded("taichi.lang.field", "Field"),
                                                  _loaded("taichi.lang._ndarray", "Ndarray")) if c is not None)

        def save(self, obj, save_persistent_id=True):
            if isinstance(obj, types.CodeType):
                self.filenames.add(obj.co_filename)
            elif isinstance(obj, types.FunctionType) and getattr(obj, "_is_wrapped_kernel", False) \
                    and not _importable(obj):
                raise ShippingError(f"{self.name} uses the Taichi kernel {obj.__qualname__!r} of {obj.__module__}, "
                                    f"which cannot be shipped to the job: {_HINT.replace('them', 'kernels')}")
            elif self.taichi_state and isinstance(obj, self.taichi_state):
                raise ShippingError(f"{self.name} uses a Taichi {type(obj).__name__} created outside the job "
                                    f"function, which cannot be shipped to the job: "
                                    f"{_HINT.replace('them', 'fields and ndarrays')}")
            super().save(obj, save_persistent_id)

    return Pickler


def _loaded(module: str, name: str) -> type | None:
    """A class of an already imported module (Taichi objects exist only once Taichi is imported)."""
    return getattr(sys.modules.get(module), name, None)


def _importable(fn: types.FunctionType) -> bool:
    """Whether dill pickles `fn` by reference: its module (not __main__) holds it under its qualname."""
    module = sys.modules.get(fn.__module__ or "")
    if module is None or fn.__module__ == "__main__":
        return False
    obj: Any = module
    for part in fn.__qualname__.split("."):
        obj = getattr(obj, part, None)
    return obj is fn


def _source(filename: str) -> str | None:
    """The text the caller ran from `filename`: linecache (files, notebook cells), or the caller's
    stdin for `python - < script.py`."""
    text = "".join(linecache.getlines(filename))
    if not text and filename == "<stdin>":
        try:
            st = os.fstat(0)
            text = os.pread(0, st.st_size, 0).decode() if stat.S_ISREG(st.st_mode) else ""
        except (OSError, UnicodeDecodeError):
            text = ""
    return text if text and len(text) <= MAX_SOURCE_BYTES else None
