"""The repository's promises about itself: README's commands are the ones CI runs, the copy-out files
stand alone, the configuration reference lists every key, and every link in the docs resolves inside
the repository. (README's Python example is run by tests/test_readme.py.)"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STANDALONE = ["losses.py", "projection.py", "selection.py", "evaluate.py", "data.py", "model.py", "optimizer.py"]
PROJECT_MODULES = {p.stem for p in ROOT.glob("*.py")}
DOCS = sorted(p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md")])


def readme_shell_blocks() -> list[str]:
    """The fenced blocks of README.md marked bash or sh, or not marked at all, in order."""
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    return [body for language, body in blocks if language in ("", "bash", "sh")]


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    test_blocks = [b.strip() for b in readme_shell_blocks() if "pytest" in b]
    assert test_blocks, "README.md shows no test command"
    assert test_blocks[0] in ci_lines, f"README's test command {test_blocks[0]!r} is not run by .ci/run"


def test_readme_install_command_uses_requirements():
    install = [b.strip() for b in readme_shell_blocks() if "pip install" in b]
    assert install and "-r requirements.txt" in install[0]


def project_imports(name: str) -> set[str]:
    """The project modules that file `name` imports (anywhere in it)."""
    imported = set()
    for node in ast.walk(ast.parse((ROOT / name).read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    return imported & (PROJECT_MODULES - {Path(name).stem})


@pytest.mark.parametrize("name", STANDALONE)
def test_library_files_import_no_other_project_file(name):
    assert not project_imports(name), f"{name} imports {project_imports(name)}"


def test_design_md_lists_what_each_file_imports_from_the_project():
    rows = re.findall(r"^\| (\w+\.py) \| .* \| ([^|]*) \|$", (ROOT / "docs/DESIGN.md").read_text(), flags=re.M)
    assert {name for name, _ in rows} == {p.name for p in ROOT.glob("*.py")}
    for name, listed in rows:
        if listed.strip() != "all of the above":  # train.py
            documented = set() if listed.strip() == "nothing" else set(re.findall(r"\w+", listed))
            assert documented == project_imports(name), f"docs/DESIGN.md's row of {name}"


def test_library_files_never_call_cuda_directly():
    for name in STANDALONE + ["train.py", "build.py"]:
        assert ".cuda()" not in (ROOT / name).read_text(), f"{name} calls .cuda(); use .to(device)"


def test_configuration_reference_lists_every_key():
    import config

    reference = (ROOT / "docs/configuration.md").read_text()
    missing = [key for key in config.flatten(config.DEFAULTS) if f"| `{key}` |" not in reference]
    assert not missing, f"docs/configuration.md's table lacks {missing}"


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.*)$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", DOCS)
def test_every_link_resolves_inside_the_repository(page):
    """A clone has nothing outside the repository: every relative link names a file (and heading) in it."""
    path = ROOT / page
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)  # links inside code blocks are code
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.is_relative_to(ROOT) and linked.exists(), f"{page} links to {target}, which is not in the repository"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked.read_text()), f"{page} links to {target}: no such heading"
