"""What both front ends of `taichi-sandbox` (`cli` in-process, `client` of the node service) read
from a command line: the script's argv (only after `--`), an entry function's arguments, the entry
function itself (checked before any job starts, without running the user's code), and a jobs.toml
manifest. Only `json` at import (ast, difflib and the import system's finder when an entry is
checked): the client's way to the service stays light.

Every check raises `UsageError`: one line, naming the word or value at fault, for exit status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


class UsageError(ValueError):
    """A command line that cannot be run; the message is one line."""


def split_argv(args: list[str]) -> tuple[list[str], list[str]]:
    """(the command's own words, the script's argv): the script's argv is what follows `--`."""
    cut = args.index("--") if "--" in args else len(args)
    return list(args[:cut]), list(args[cut + 1:])


def refuse_stray(stray: list[str], words: list[str]) -> None:
    """Raise UsageError for positional words the command does not take (`stray`, found among the
    command's own `words`): the script's argv goes after `--`, and `--wall-time 5 min` is two words."""
    if not stray:
        return
    word = stray[0]
    message = f"unexpected argument {word!r}: the script's arguments go after '--' (run FILE [OPTIONS] -- ARGS)"
    at = words.index(word) if word in words else -1
    if at >= 2 and words[at - 2].startswith("--") and word.isalpha():  # `--wall-time 5 min`
        message += f"; for a value with a unit, write it as one word: {words[at - 2]} {words[at - 1]}{word}"
    raise UsageError(message)


def entry_args(extra: list[str]) -> list:
    """Arguments for FILE:FUNCTION: each a JSON value, else the string itself."""
    def value(text: str):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return [value(a) for a in extra]


def check_entry(target: str, function: str) -> None:
    """Raise UsageError unless `function` is defined at the top level of `target` (a .py file, or a
    module found on sys.path), suggesting the closest name for a typo. Reads the source with `ast`:
    nothing of the user's is imported or run. A file that does not parse, defines names dynamically
    (`import *`) or a module without Python source is left to the job."""
    import ast
    import difflib
    if target.endswith(".py"):
        path = Path(target)
    else:
        path = _module_source(target)
        if path is None:
            return
    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (OSError, SyntaxError, ValueError):
        return
    names = _top_level_names(tree)
    if names is None or function in names:
        return
    close = difflib.get_close_matches(function, sorted(names), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f" (it defines: {', '.join(sorted(names)[:8]) or 'nothing'})"
    raise UsageError(f"entry {function!r}: no function {function!r} in {target}{hint}")


def _module_source(module: str) -> Path | None:
    """The .py file of `module`, found on sys.path like an import would, without importing its
    packages; None when it has no Python source here. Raises UsageError when there is no such module."""
    from importlib.machinery import PathFinder
    path, origin = None, None
    for depth, part in enumerate(module.split(".")):
        spec = PathFinder.find_spec(part, path) if part.isidentifier() else None
        if spec is None:
            if depth == 0 and part in sys.builtin_module_names:
                return None
            raise UsageError(f"kernel {module!r}: no module named {'.'.join(module.split('.')[:depth + 1])!r}")
        path, origin = spec.submodule_search_locations, spec.origin
    return Path(origin) if origin and origin.endswith(".py") else None


def _top_level_names(tree: "ast.Module") -> set[str] | None:
    """Names a module binds at its top level (defs, classes, assignments, imports, also inside a
    top-level `if`/`try`/`with`/`for`); None when it imports `*` (they cannot be known without running it)."""
    import ast
    names: set[str] = set()
    statements = list(tree.body)
    while statements:
        node = statements.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(alias.name == "*" for alias in node.names):
                return None
            names.update(alias.asname or alias.name.partition(".")[0] for alias in node.names)
        else:
            names.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
            for field in ("body", "orelse", "finalbody", "handlers"):
                statements += getattr(node, field, [])
    return names


def manifest(path: Path) -> list[dict]:
    """[[job]] tables of a jobs.toml, each a JobSpec's fields (kernel, arch, tenant, limits, ...).
    Raises ConfigError (one line)."""
    from .core.limits import ConfigError, read_file, tomllib  # pydantic: only where a manifest is read

    data = read_file(path, "manifest", tomllib.loads)
    jobs = data.get("job")
    if set(data) != {"job"} or not isinstance(jobs, list) or not all(isinstance(j, dict) for j in jobs):
        raise ConfigError(f"{path}: expected only [[job]] tables")
    return jobs
