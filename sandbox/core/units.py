"""Human units in limits.toml, the CLI and JobSpecs: sizes, durations, counts, rates, and the
pydantic types that parse them. Each parser raises ValueError with a short reason."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Union

from pydantic import BeforeValidator, PlainSerializer

GiB = 1 << 30
MiB = 1 << 20

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
    "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
}
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "m": 60.0, "min": 60.0, "h": 3600.0}
_NUMBER_UNIT = re.compile(r"^\s*([+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z%]*)\s*$")
_UNLIMITED = {"none", "unlimited", "off"}
# The largest values accepted: beyond them a limit means nothing, and the kernel's and Python's C
# types (rlimits, cgroup files, timeouts) overflow. "unlimited" is the way to ask for no limit.
MAX_BYTES = 1 << 60  # 1 EiB
MAX_SECONDS = 1e9  # about 31 years
MAX_COUNT = (1 << 31) - 1
_COMPOUND = re.compile(r"^\s*(?:[0-9]*\.?[0-9]+(?:h|min|ms|us|m|s)\s*){2,}$")  # "1m30s", "1h 30m"
_PART = re.compile(r"([0-9]*\.?[0-9]+)(h|min|ms|us|m|s)")


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("expected a number")
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a finite number >= 0")
    return float(value)


def _at_most(value, ceiling, shown: str):
    if value > ceiling:
        raise ValueError(f"too large: at most {shown} (for no limit, 'unlimited')")
    return value


def _split(value: str, units: dict) -> tuple[float, float]:
    m = _NUMBER_UNIT.match(value)
    if not m or m.group(2).lower() not in units:
        raise ValueError(f"expected a number with a unit ({', '.join(u for u in units if u)})")
    return _number(float(m.group(1))), units[m.group(2).lower()]


def parse_size(value: Any) -> int | None:
    """Bytes from 1024, '512MiB', '2GiB', '1.5G'; None for 'unlimited'/'none'."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _UNLIMITED):
        return None
    if isinstance(value, str):
        number, scale = _split(value, _SIZE_UNITS)
        return int(_at_most(number * scale, MAX_BYTES, "1 EiB"))
    return int(_at_most(_number(value), MAX_BYTES, "1 EiB"))


def parse_duration(value: Any) -> float | None:
    """Seconds from 1.5, '250ms', '2s', '1m', '1m30s' (as `duration` writes them); None for
    'unlimited'/'none'."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _UNLIMITED):
        return None
    if isinstance(value, str) and _COMPOUND.match(value.lower()):
        seconds = _number(sum(float(n) * _TIME_UNITS[u] for n, u in _PART.findall(value.lower())))
    elif isinstance(value, str):
        number, scale = _split(value, _TIME_UNITS)
        seconds = _number(number * scale)
    else:
        seconds = _number(value)
    return _at_most(seconds, MAX_SECONDS, "1e9s")


def duration(seconds: float | None) -> str:
    """Seconds as people write them: '250ms', '1.5s', '2m', '1m30s', '4h' ('-' for None); three
    significant digits under a minute, tenths of a second under an hour, whole seconds above."""
    if seconds is None:
        return "-"
    if not math.isfinite(seconds):
        return str(seconds)
    if seconds < 0.9995:  # below what rounds to 1000ms
        return f"{seconds * 1000:.3g}ms" if seconds else "0s"
    if seconds < 59.95:
        return f"{seconds:.3g}s"
    hours, rest = divmod(round(seconds, 1) if seconds < 3600 else round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(hours, "h"), (minutes, "m"), (round(secs, 1), "s")]
    return "".join(f"{value:g}{unit}" for value, unit in parts if value)


def parse_gpu_memory(value: Any) -> int | float | None:
    """Bytes (int or size string) or a fraction of the device: a float in (0, 1] or 'NN%'."""
    if isinstance(value, str) and value.strip().endswith("%"):
        fraction = float(value.strip()[:-1]) / 100
        if not 0 < fraction <= 1:
            raise ValueError("a percentage must be in (0%, 100%]")
        return fraction
    if isinstance(value, float) and 0 < value <= 1:
        return value
    if isinstance(value, float) and not math.isnan(value) and value > 1:
        raise ValueError("a fraction of the device is in (0, 1]; bytes are a whole number or a size like '2GiB'")
    return parse_size(value)


def parse_address_space(value: Any) -> int | str | None:
    """'auto' (Taichi-aware, see `address_space_for`) or a size."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return parse_size(value)


def _count(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in _UNLIMITED):
        return None
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]+\s*", value):  # from a command line
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected a whole number")
    return _at_most(value, MAX_COUNT, str(MAX_COUNT))


def positive(parser):
    """A pydantic validator: `parser`'s value, which must be greater than zero (or None or a word)."""
    def check(value: Any):
        parsed = parser(value)
        if parsed is not None and not isinstance(parsed, str) and parsed <= 0:
            raise ValueError("must be greater than zero")
        return parsed
    return BeforeValidator(check)


def bounded(parser, what: str, default: float | None = None):
    """A pydantic validator: `parser`'s value, which cannot be "unlimited" (`what` it bounds says
    why); None is `default` where there is one."""
    def check(value: Any):
        if value is None and default is not None:
            return default
        parsed = parser(value)
        if parsed is None:
            raise ValueError(f"cannot be unlimited: it is {what}; give a duration, e.g. '2s'")
        return parsed
    return BeforeValidator(check)


def _plausible(parser, floor: float, hint: str):
    """`positive(parser)` that also rejects a value below `floor` written without a unit: most likely
    a typo (a bare number is bytes or seconds), explained by `hint`."""
    checked = positive(parser).func

    def check(value: Any):
        parsed = checked(value)
        if parsed is None:  # "unlimited"
            return parsed
        single = _NUMBER_UNIT.match(value) if isinstance(value, str) else None
        has_unit = isinstance(value, str) and (single is None or bool(single.group(2)))  # None: "1m30s"
        if parsed < floor and not has_unit:
            raise ValueError(f"without a unit this is {hint}")
        return parsed
    return BeforeValidator(check)


Seconds = Annotated[Union[float, None], positive(parse_duration)]
Bytes = Annotated[Union[int, None], positive(parse_size)]
# A bare number under 10 ms or 1 MiB is almost always a forgotten unit (`--memory 1 GiB` unquoted is `1`).
# Such a value, when meant, is serialized with its unit so that it survives a JSON round trip.
PlausibleSeconds = Annotated[Union[float, None], _plausible(
    parse_duration, 0.01, "seconds, under 10 ms: likely a typo; give the unit, e.g. '10ms', '2s' or '1m'"),
    PlainSerializer(lambda v: f"{v * 1000:g}ms" if v is not None and v < 0.01 else v)]
PlausibleBytes = Annotated[Union[int, None], _plausible(
    parse_size, MiB, "bytes, under 1 MiB: likely a typo; give the unit, e.g. '512MiB' or '2GiB' (on a command "
    "line without a space, or quoted: '1 GiB'), or '100KiB' if you mean that little"),
    PlainSerializer(lambda v: f"{v}B" if v is not None and v < MiB else v)]
Count = Annotated[Union[int, None], positive(_count)]
Quota = Annotated[Union[int, None], BeforeValidator(parse_size)]  # bytes; 0 allowed ("none of it")


def parse_rate(value: Any) -> float | None:
    """Jobs per second from 2, '2/s', '120/m', '1000/h'; None for 'unlimited'."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _UNLIMITED):
        return None
    if isinstance(value, str):
        count, _, per = value.partition("/")
        per_seconds = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}.get(per.strip().lower())
        if per_seconds is None:
            raise ValueError("expected a rate like '2/s', '120/m' or '1000/h'")
        return _number(float(count)) / per_seconds
    return _number(value)
