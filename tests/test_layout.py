"""The package layering the README promises: `model/` (and `weights.py`, `kernels/`) import nothing from `train/`,
`eval/`, `bench/` or `tests/`, so the models load and run without the training and evaluation code. Every import
statement counts, including those inside functions."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPPER = ("train", "eval", "bench", "tests")


def imported_modules(file: Path) -> set[str]:
    tree = ast.parse(file.read_text(), filename=str(file))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_model_layer_imports_nothing_above_it():
    files = sorted([*(ROOT / "model").glob("*.py"), *(ROOT / "kernels").glob("*.py"), ROOT / "weights.py"])
    assert len(files) > 10
    bad = {f"{f.relative_to(ROOT)}: {m}" for f in files for m in imported_modules(f)
           if m.split(".")[0] in UPPER}
    assert not bad, sorted(bad)


def test_the_walk_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef g():\n    from train.common import x\n    import eval.cli as c\n")
    assert imported_modules(f) == {"os", "train.common", "eval.cli"}
