"""The packages keep their layers: the data side (pipelines/) never imports the learning
side (cstp/), and the learning side never imports pipelines/ or DALI. Every module's
imports are read from its syntax tree, those inside functions included, so a lazy
import breaks the rule as surely as one at the top."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# package -> module prefixes its modules must not import
FORBIDDEN = {"pipelines": ("cstp",), "cstp": ("pipelines", "nvidia.dali")}


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, the source of the
    module `module` (dotted; relative imports are resolved against it). `from a import b`
    yields a.b as well as a, so that `from nvidia import dali` is seen."""
    package = module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] if node.level > 1 else package
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return found


def broken_rules(source: str, module: str) -> list[str]:
    top = module.split(".")[0]
    bad = []
    for line, name in imported_modules(source, module):
        for prefix in FORBIDDEN.get(top, ()):
            if name == prefix or name.startswith(prefix + "."):
                bad.append(f"line {line}: {top}/ imports {name}")
                break
    return sorted(set(bad))


def package_modules():
    for top in FORBIDDEN:
        for path in sorted((REPO / top).rglob("*.py")):
            # a package's __init__ is named pkg.__init__, so that its relative imports resolve in pkg
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            yield pytest.param(path, module, id=str(path.relative_to(REPO)))


@pytest.mark.parametrize("path, module", list(package_modules()))
def test_no_module_crosses_the_layers(path, module):
    assert broken_rules(path.read_text(), module) == [], path


def test_the_check_sees_every_form_of_a_forbidden_import():
    # what pipelines/show.py used to do inside its main(): a lazy import of the learning side
    lazy = "def main():\n    from cstp.config import ConfigError, load_config\n"
    assert broken_rules(lazy, "pipelines.show") == ["line 2: pipelines/ imports cstp.config",
                                                    "line 2: pipelines/ imports cstp.config.ConfigError",
                                                    "line 2: pipelines/ imports cstp.config.load_config"]
    assert broken_rules("import cstp\n", "pipelines.plan") == ["line 1: pipelines/ imports cstp"]
    assert broken_rules("import nvidia.dali.fn as fn\n", "cstp.engine") == ["line 1: cstp/ imports nvidia.dali.fn"]
    assert broken_rules("from nvidia import dali\n", "cstp.engine") == ["line 1: cstp/ imports nvidia.dali"]
    assert broken_rules("from pipelines.plan import PlanConfig\n", "cstp.models.r2plus1d")[0] == \
        "line 1: cstp/ imports pipelines.plan"
    # allowed: the own package (relative too), the other rule's names, look-alikes
    assert broken_rules("from .plan import Box\nimport nvidia.dali\nimport cstpx\n", "pipelines.show") == []
    assert broken_rules("from . import losses\nfrom .models import r2plus1d\nimport nvidia\n", "cstp.engine") == []
