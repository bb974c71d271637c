"""Errors in what people give the sandbox (limits, specs, limits.toml, requests): `ConfigError`, and
pydantic's ValidationError as one line for people, "field: problem (got VALUE)" per field, with the
closest valid name suggested for an unknown one. The CLI, the Python API and the node service all
word their errors here."""

from __future__ import annotations

import difflib
import re
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

_PLAIN = re.compile(r"[A-Za-z0-9_-]+")  # a field name or key shown as it is; others (a list index too) in repr


class ConfigError(ValueError):
    """A limit, profile, spec or limits.toml value is invalid. The message is one line.

    `detail` is the message without the leading "SOURCE: ", so callers can re-attribute it;
    `fields` the (field, problem) pairs it was made of, where it came from a model's validation.
    """

    def __init__(self, message: str, detail: str | None = None, fields: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.detail = detail if detail is not None else message
        self.fields = fields


def describe(err: ValidationError, model: type[BaseModel] | None = None) -> str:
    """A pydantic ValidationError as one line for people: "field: problem (got VALUE)" per field at
    fault, joined by "; " (never pydantic's repr of the whole input). An unknown key of `model` (or
    of a model inside it) suggests the closest valid name."""
    return joined(problems(err, model))


def joined(fields: tuple[tuple[str, str], ...]) -> str:
    return "; ".join(f"{field}: {problem}" for field, problem in fields)


def problems(err: ValidationError, model: type[BaseModel] | None = None) -> tuple[tuple[str, str], ...]:
    """(field, problem) per field at fault in `err` (see `describe`)."""
    found: dict[str, str] = {}
    for error in err.errors():
        loc = tuple(error["loc"])
        field = ".".join(p if isinstance(p, str) and _PLAIN.fullmatch(p) else repr(p) for p in loc) or "value"
        inner = (error.get("ctx") or {}).get("error")
        if isinstance(inner, ConfigError) and inner.fields:  # a nested model's own one-line error
            for name, problem in inner.fields:
                found.setdefault(f"{field}.{name}" if loc else name, problem)
        elif field in found:  # a union's members each report the same input
            continue
        elif error["type"] == "missing":
            found[field] = "required"
        elif error["type"] == "extra_forbidden":
            close = closest(str(loc[-1]), _names_at(model, loc[:-1]))
            found[field] = "unknown key" + (f" (did you mean {close!r}?)" if close else "")
        else:
            message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            found[field] = f"{message.splitlines()[0] if message else 'invalid'} (got {_shown_input(error)})"
    return tuple(found.items())


def _shown_input(error: dict) -> str:
    shown = repr(error.get("input"))
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _names_at(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The field names of the model at `loc` inside `model`, through Optional, lists and dicts of
    models (a list index or dict key keeps the element's model); [] where there is none."""
    for part in loc:
        if model is not None and part in model.model_fields:
            model = _model_in(model.model_fields[part].annotation)
    return sorted(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The (first) pydantic model an annotation holds: itself, or inside Optional/Union/list/dict."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def no_such(field: str, value: Any, known) -> str:
    """"FIELD: no such FIELD (got VALUE; did you mean the closest? / known: ...)"."""
    close = closest(value, known) if isinstance(value, str) else None
    hint = f"did you mean {close!r}?" if close else f"known: {', '.join(sorted(known)) or 'none defined'}"
    return f"{field}: no such {field.replace('_', ' ')} (got {value!r}; {hint})"


def closest(name: str, known) -> str | None:
    """The valid name a typo of `name` most likely meant, if any is close."""
    found = difflib.get_close_matches(name, sorted(known), n=1)
    return found[0] if found else None
