"""No non-cryptographic randomness in the secure aggregation package; its secrets come from `secrets`."""

import ast
import re
from pathlib import Path

import fedtune.secagg

PACKAGE = Path(fedtune.secagg.__file__).parent
TEXT = re.compile(r"^\s*(import\s+random\b|from\s+random\s+import)|\bnp\.random\b|\bnumpy\.random\b", re.M)


def _violations(path: Path) -> list[str]:
    source = path.read_text()
    found = [f"{path.name}: text {m.group(0).strip()!r}" for m in TEXT.finditer(source)]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [
                f"{path.name}: import {a.name}" for a in node.names if a.name in ("random", "numpy.random")
            ]
        elif isinstance(node, ast.ImportFrom):
            names = {a.name for a in node.names}
            if node.module in ("random", "numpy.random") or (node.module == "numpy" and "random" in names):
                found.append(f"{path.name}: from {node.module} import {sorted(names)}")
        elif (
            isinstance(node, ast.Attribute)
            and node.attr == "random"
            and isinstance(node.value, ast.Name)
            and node.value.id in ("np", "numpy")
        ):
            found.append(f"{path.name}: {node.value.id}.random")
    return found


def test_no_non_cryptographic_randomness_in_secagg():
    files = sorted(PACKAGE.glob("**/*.py"))
    assert len(files) >= 10
    assert [v for f in files for v in _violations(f)] == []


def test_the_check_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import random\nfrom numpy import random as r\nimport numpy as np\nx = np.random.default_rng()\n"
    )
    assert len(_violations(bad)) >= 3
