"""Import directions between layers, from the one rule table in ARCHITECTURE.md."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- import-rules"


@dataclass
class Layer:
    name: str
    packages: set[str]  # featcache/<package>/...
    modules: set[str]  # featcache/<module>.py
    may_import: set[str]  # layers
    forbidden: set[str]  # third-party top-level modules


def read_rules(doc: Path) -> dict[str, Layer]:
    """The rule table that follows the marker comment in ARCHITECTURE.md."""
    lines = doc.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(MARKER)) + 3  # marker, header, rule
    layers = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        name, modules, may, may_not = (cell.strip() for cell in line.strip("|").split("|"))
        names = {m.strip().strip("`") for m in modules.split(",")}
        layers[name] = Layer(name, {m.rstrip("/") for m in names if m.endswith("/")},
                             {m for m in names if not m.endswith("/")},
                             {x.strip() for x in may.split(",") if x.strip()},
                             {x.strip() for x in may_not.split(",") if x.strip()})
    return layers


def layer_of(parts: list[str], layers: dict[str, Layer], package: Path) -> str | None:
    """Layer of a module given as its dotted path inside the package (``[]`` is the package itself)."""
    first = parts[0] if parts else "__init__"
    if not (package / first).is_dir() and not (package / f"{first}.py").is_file():
        first = "__init__"  # a name defined in the package's __init__ (``from .. import __version__``)
    for layer in layers.values():
        if first in layer.packages or first in layer.modules:
            return layer.name
    return None


def imports(path: Path, package: Path) -> list[tuple[int, list[str] | None, str | None]]:
    """(line, dotted path inside the package or None, third-party top-level name or None) per import."""
    module = list(path.relative_to(package).with_suffix("").parts)
    here = module[:-1]  # the package this file is in (an __init__ is in its own folder too)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:  # relative: resolved against this file's package
            up = here[: len(here) - (node.level - 1)]
            targets = [up + node.module.split(".")] if node.module else [up + [a.name] for a in node.names]
            out += [(node.lineno, t, None) for t in targets]
            continue
        elif isinstance(node, ast.ImportFrom):
            names = [node.module.split(".")]
        else:
            continue
        for dotted in names:
            if dotted[0] == package.name:
                out.append((node.lineno, dotted[1:], None))
            else:
                out.append((node.lineno, None, dotted[0]))
    return out


def violations(package: Path, layers: dict[str, Layer]) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent)
        own = layer_of(list(path.relative_to(package).with_suffix("").parts), layers, package)
        if own is None:
            found.append(f"{rel}: in no layer of ARCHITECTURE.md")
            continue
        for line, inside, third in imports(path, package):
            if inside is not None:
                target = layer_of(inside, layers, package)
                if target not in layers[own].may_import:
                    found.append(f"{rel}:{line}: {own} imports {'.'.join([package.name, *inside])} ({target})")
            elif third in layers[own].forbidden:
                found.append(f"{rel}:{line}: {own} imports {third}")
    return found


RULES = read_rules(REPO / "ARCHITECTURE.md")


def test_the_package_follows_the_import_rules():
    assert set(RULES) == {"core", "store", "extract", "classify", "service", "cli"}
    assert "torch" in RULES["store"].forbidden and "cli" not in RULES["service"].may_import
    assert violations(REPO / "featcache", RULES) == []


def test_a_forbidden_import_fails(tmp_path):
    """The checker on a small package laid out like featcache, with one wrong import of each kind."""
    pkg = tmp_path / "featcache"
    files = {
        "__init__.py": "__version__ = '0'\n",
        "errors.py": "",
        "cli.py": "from .service import app\nfrom .store import cache\n",
        "store/__init__.py": "",
        "store/cache.py": "import zarr\nfrom ..errors import CacheError\nfrom . import names\n",
        "store/names.py": "def f():\n    import torch\n    from ..extract.decode import load_image\n",
        "extract/__init__.py": "",
        "extract/decode.py": "from ..store.cache import FeatureCache\nfrom featcache.classify import train\n",
        "classify/__init__.py": "from ..service.app import create_app\nfrom .. import __version__\n",
        "service/__init__.py": "",
        "service/app.py": "import fastapi\nfrom ..cli import main\nfrom ..classify import train\n",
        "newthing.py": "",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    assert violations(pkg, RULES) == [
        "featcache/classify/__init__.py:1: classify imports featcache.service.app (service)",
        "featcache/extract/decode.py:2: extract imports featcache.classify (classify)",
        "featcache/newthing.py: in no layer of ARCHITECTURE.md",
        "featcache/service/app.py:2: service imports featcache.cli (cli)",
        "featcache/store/names.py:2: store imports torch",
        "featcache/store/names.py:3: store imports featcache.extract.decode (extract)",
    ]
