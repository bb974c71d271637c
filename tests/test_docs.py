"""The documentation: every link stays in the repository and resolves, every example is referenced,
and the README's runnable snippets run."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
AUTOLINK = re.compile(r"<(https?://[^>\s]+)>")
RUNNABLE = re.compile(r"<!-- test: runnable -->\s*\n```python\n(.*?)^```", re.M | re.S)


def prose(text: str) -> str:
    """The markdown without fenced code blocks and code spans, where links are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(path: Path) -> list[str]:
    text = prose(path.read_text())
    return INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text) + AUTOLINK.findall(text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", path.read_text()), re.M):
        base, n = slug(heading), 0
        while (candidate := base if n == 0 else f"{base}-{n}") in found:
            n += 1
        found.add(candidate)
    return found


def test_the_documents_exist():
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    assert {"README.md", "SECURITY.md", "docs/containment.md", "docs/operators.md", "docs/service.md",
            "docs/ray.md", "docs/performance.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves_inside_the_repository(doc: Path):
    bad = []
    for target in links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):
            assert target.startswith(("https://", "http://", "mailto:")), f"{doc.name}: odd scheme: {target}"
            continue
        path_part, _, anchor = target.partition("#")
        dest = (doc.parent / path_part).resolve() if path_part else doc
        if not dest.is_relative_to(ROOT):
            bad.append(f"{target}: leaves the repository")
        elif not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{doc.relative_to(ROOT)}: " + "; ".join(bad)


def test_no_document_names_a_path_outside_the_repository():
    """Not even as plain text: the facts are stated in the docs, with public sources."""
    for doc in DOCS:
        text = doc.read_text()
        assert "../shared" not in text and "minimal.py" not in text, doc.name


def test_the_readme_is_for_researchers_first():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 500
    headings = re.findall(r"^## (.+)$", FENCE.sub("", text), re.M)
    assert headings[0] == "Quickstart"
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    for needed in ("pip install", "make setup", "taichi-sandbox run my_kernel.py", "run_kernel", "@sandboxed",
                   "notebook", "pytest.mark.sandbox", "make demo", "make test"):
        assert needed in quickstart, needed
    assert "http://" not in quickstart and "https://" not in quickstart


def test_every_example_is_referenced():
    linked = {(doc.parent / t.partition("#")[0]).resolve() for doc in DOCS for t in links(doc)}
    examples = [p for p in sorted((ROOT / "examples").iterdir()) if p.is_file() and not p.name.startswith(".")]
    assert examples
    missing = [p.name for p in examples if p.resolve() not in linked]
    assert not missing, f"examples linked from no document: {missing}"


def test_the_readme_snippets_marked_runnable_run(tmp_path: Path):
    """Each ```python block after `<!-- test: runnable -->` runs as a script, from a directory
    holding the bundled kernels as the README's paths expect."""
    snippets = RUNNABLE.findall((ROOT / "README.md").read_text())
    assert snippets, "the README has no runnable snippet"
    shutil.copytree(ROOT / "kernels", tmp_path / "kernels")
    for i, code in enumerate(snippets):
        script = tmp_path / f"snippet_{i}.py"
        script.write_text(code)
        env = {**os.environ, "TAICHI_SANDBOX_LIMITS": str(ROOT / "limits.toml"),
               "XDG_STATE_HOME": str(tmp_path / "state")}
        p = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, f"snippet {i}:\n{code}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
        for expected in re.findall(r"^print\(.*?#\s*(\S+)", code, re.M):
            assert expected in p.stdout, f"snippet {i}: {expected!r} not printed:\n{p.stdout}"


def test_the_readme_pytest_snippet_passes_under_the_plugin(tmp_path: Path):
    """The ```python block after `<!-- test: pytest -->` is a test module that passes in the sandbox."""
    code = re.search(r"<!-- test: pytest -->\s*\n```python\n(.*?)^```", (ROOT / "README.md").read_text(),
                     re.M | re.S).group(1)
    (tmp_path / "test_snippet.py").write_text(code)
    tmp_path.chmod(0o755)
    (tmp_path / "test_snippet.py").chmod(0o644)
    env = {**os.environ, "TAICHI_SANDBOX_LIMITS": str(ROOT / "limits.toml"), "XDG_STATE_HOME": str(tmp_path / "state")}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_snippet.py"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "1 passed" in p.stdout, p.stdout[-3000:] + p.stderr[-2000:]


def test_the_readme_quickstart_commands_run_a_kernel_of_ones_own(tmp_path: Path):
    """Each `taichi-sandbox run my_kernel.py ...` line of the quickstart, on a script that prints its argv."""
    quickstart = (ROOT / "README.md").read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = [shlex.split(line, comments=True) for line in quickstart.splitlines()
                if line.startswith("taichi-sandbox run my_kernel.py")]
    assert commands
    (tmp_path / "my_kernel.py").write_text("import sys\nimport taichi as ti\nti.init(arch=ti.cpu)\n"
                                           "print('argv', sys.argv[1:])\n")
    tmp_path.chmod(0o755)
    (tmp_path / "my_kernel.py").chmod(0o644)
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("TAICHI_SANDBOX_LIMITS", None)  # the bundled limits, as for a user
    for command in commands:
        argv = [str(Path(sys.executable).parent / "taichi-sandbox"), *command[1:]]
        p = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and "verdict: ok" in p.stderr, f"{command}\n{p.stdout}\n{p.stderr}"
        script_args = command[command.index("--") + 1:] if "--" in command else []
        assert f"argv {script_args!r}" in p.stdout, f"{command}\n{p.stdout}"
