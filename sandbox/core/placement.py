"""Where a job's inputs appear in its directory: the one rule `taichi-sandbox run --input`,
`inputs=` from Python and the node service's client share (standard library only); and `named`,
how notes about files list them.

An input is a file or a directory, written `SRC`, `SRC=DEST` or, from Python, a pair (SRC, DEST).
DEST is where it appears relative to the job's cwd. Without one:
- a path inside the caller's cwd keeps its place relative to it (`data/init.npy` and
  `$PWD/data/init.npy` are both at `data/init.npy`), as `python kernel.py` would find it;
- any other path (`../shared/mesh.obj`, `/data/run3`) is placed by its last name (`mesh.obj`,
  `run3`), as `cp -r SRC .` would.
`SRC=DEST` is split at the last `=`, unless a file named with the whole text exists. DEST is
relative, without `..`; two inputs at the same place, or one inside another's, are refused.
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath

NAMED = 5  # files named in a note; the rest are counted


def place(entry, cwd: str | None = None) -> tuple[str, str]:
    """(source path as given, destination relative to the job's cwd) of one `inputs` entry;
    `cwd`: the caller's (default: this process's). Raises ValueError naming the entry."""
    if isinstance(entry, (tuple, list)):
        if len(entry) != 2 or not all(isinstance(p, str) for p in entry):
            raise ValueError(f"{entry!r}: an input is a path, 'SRC=DEST' or a pair (SRC, DEST) of strings")
        source, dest = entry
    elif isinstance(entry, str):
        source, dest = entry, None
        if "=" in entry and not os.path.lexists(entry):
            source, dest = entry.rsplit("=", 1)
    else:
        raise ValueError(f"{entry!r}: an input is a path, 'SRC=DEST' or a pair (SRC, DEST) of strings")
    if not source or "\0" in source:
        raise ValueError(f"{entry!r}: no source path")
    if dest is None:
        cwd = cwd or os.getcwd()
        full = os.path.normpath(os.path.join(cwd, source))
        inside = os.path.relpath(full, cwd)
        if inside == ".":
            raise ValueError(f"{entry!r}: the caller's directory itself: give the files or directories the job "
                             "needs")
        dest = inside if inside != ".." and not inside.startswith("../") else PurePosixPath(full).name
    return source, destination(entry, dest)


def destination(entry, dest: str) -> str:
    """`dest` normalized: a relative path below the job's cwd. Raises ValueError naming `entry`."""
    name = os.path.normpath(dest) if dest else ""
    if not name or name in (".", "..") or name.startswith("/") or ".." in PurePosixPath(name).parts or "\0" in name:
        raise ValueError(f"{entry!r}: {dest!r} is not a place inside the job's directory (relative, no '..')")
    return name


def check_places(places: list[tuple[str, str]]) -> None:
    """ValueError when two inputs would be at the same place, or one inside another's."""
    where: dict[str, str] = {}
    for source, dest in places:
        if dest in where:
            raise ValueError(f"{where[dest]!r} and {source!r} would both be {dest!r} in the job's dir")
        where[dest] = source
    for source, dest in places:
        parts = dest.split("/")
        for above in ("/".join(parts[:n]) for n in range(1, len(parts))):
            if above in where:
                raise ValueError(f"{source!r} would be inside {where[above]!r} (at {above!r}) in the job's dir: "
                                 "give one of them")


def named(names: list[str]) -> str:
    """The first few of `names`, and how many more."""
    return ", ".join(names[:NAMED]) + (f" and {len(names) - NAMED} more" if len(names) > NAMED else "")
