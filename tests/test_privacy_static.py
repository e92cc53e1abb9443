"""No global random generator anywhere in the privacy package: every draw takes a generator argument."""

import ast
import re
from pathlib import Path

import fedtune.privacy

PACKAGE = Path(fedtune.privacy.__file__).parent
# numpy.random is allowed only for constructing a Generator from an explicit seed (OS entropy)
NUMPY_CONSTRUCTORS = {"Generator", "PCG64", "SeedSequence"}
TORCH_DRAWS = {"rand", "randn", "randint", "randperm", "normal", "poisson", "bernoulli", "multinomial"}
TEXT = re.compile(r"^\s*(import\s+random\b|from\s+random\s+import)|\brandom\.(random|gauss|seed)\(", re.M)


def _inside_fork_rng(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """torch.manual_seed is allowed only inside `with torch.random.fork_rng(...)` (scoped LoRA dropout)."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.With):
            for item in node.items:
                call = item.context_expr
                if isinstance(call, ast.Call) and ast.unparse(call.func) == "torch.random.fork_rng":
                    return True
    return False


def _violations(path: Path) -> list[str]:
    source = path.read_text()
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = [f"{path.name}: text {m.group(0).strip()!r}" for m in TEXT.finditer(source)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name in ("random", "numpy.random")]
            found += [f"{path.name}: import {name}" for name in names]
        elif isinstance(node, ast.ImportFrom):
            if node.module in ("random", "numpy.random") or (
                node.module == "numpy" and "random" in {a.name for a in node.names}
            ):
                found.append(f"{path.name}: from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            inner = node.value
            if (
                inner.attr == "random"
                and isinstance(inner.value, ast.Name)
                and inner.value.id in ("np", "numpy")
                and node.attr not in NUMPY_CONSTRUCTORS
            ):
                found.append(f"{path.name}:{node.lineno}: np.random.{node.attr}")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            seeded = "generator" in {k.arg for k in node.keywords}
            in_place = name.endswith((".normal_", ".uniform_", ".bernoulli_", ".random_", ".exponential_"))
            draws = in_place or (name.startswith("torch.") and name.split(".")[-1] in TORCH_DRAWS)
            if name in ("torch.seed", "np.random.seed", "torch.random.seed"):
                found.append(f"{path.name}:{node.lineno}: {name}")
            elif name == "torch.manual_seed" and not _inside_fork_rng(node, parents):
                found.append(f"{path.name}:{node.lineno}: torch.manual_seed outside fork_rng")
            elif draws and not seeded:
                found.append(f"{path.name}:{node.lineno}: {name} without generator=")
    return found


def test_no_global_randomness_in_privacy():
    files = sorted(PACKAGE.glob("**/*.py"))
    assert len(files) >= 9
    assert [v for f in files for v in _violations(f)] == []


def test_the_check_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import random\nimport numpy as np\nimport torch\n"
        "a = np.random.normal(0, 1, 3)\nb = torch.randn(3)\ntorch.manual_seed(0)\n"
        "c = torch.empty(3).normal_()\nd = np.random.default_rng()\n"
    )
    assert len(_violations(bad)) >= 6
    good = tmp_path / "good.py"
    good.write_text(
        "import numpy as np\nimport torch\ng = torch.Generator()\nx = torch.randn(3, generator=g)\n"
        "r = np.random.Generator(np.random.PCG64(5))\n"
        "with torch.random.fork_rng(devices=[]):\n    torch.manual_seed(1)\n"
    )
    assert _violations(good) == []
