"""The repository's promises about itself: the README's commands are the ones CI runs, every file
says what it owns, the copy-out files stand alone, and every shipped config is valid."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STANDALONE = ["losses.py", "projection.py", "selection.py", "evaluate.py", "data.py", "model.py", "optimizer.py"]
PROJECT_MODULES = {p.stem for p in ROOT.glob("*.py")}


def readme_code_blocks() -> list[str]:
    return re.findall(r"```(?:bash|sh)?\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    test_blocks = [b.strip() for b in readme_code_blocks() if "pytest" in b]
    assert test_blocks, "README.md shows no test command"
    assert test_blocks[0] in ci_lines, f"README's test command {test_blocks[0]!r} is not run by .ci/run"


def test_readme_install_command_uses_requirements():
    install = [b.strip() for b in readme_code_blocks() if "pip install" in b]
    assert install and "-r requirements.txt" in install[0]


def test_requirements_pin_torch_and_torchvision():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    assert "torch==2.14.1" in lines and "torchvision==0.29.1" in lines


@pytest.mark.parametrize("path", sorted(p.name for p in ROOT.glob("*.py"))
                         + sorted(f"benchmarks/{p.name}" for p in (ROOT / "benchmarks").glob("*.py"))
                         + sorted(f"tests/{p.name}" for p in (ROOT / "tests").glob("*.py")))
def test_every_python_file_has_a_module_docstring(path):
    tree = ast.parse((ROOT / path).read_text())
    assert ast.get_docstring(tree), f"{path} has no module docstring"


@pytest.mark.parametrize("name", STANDALONE)
def test_library_files_import_no_other_project_file(name):
    tree = ast.parse((ROOT / name).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & (PROJECT_MODULES - {Path(name).stem}), f"{name} imports {imported & PROJECT_MODULES}"


def test_library_files_never_call_cuda_directly():
    for name in STANDALONE + ["train.py", "build.py"]:
        assert ".cuda()" not in (ROOT / name).read_text(), f"{name} calls .cuda(); use .to(device)"


def test_readme_config_reference_lists_every_key():
    import config
    import train

    readme = (ROOT / "README.md").read_text()
    missing = [key for key in config.flatten(train.DEFAULTS) if f"| `{key}` |" not in readme]
    assert not missing, f"README's configuration table lacks {missing}"


def test_readme_python_example_runs(monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README.md shows no Python example"
    monkeypatch.chdir(ROOT)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    assert "MAP@R" in capsys.readouterr().out
