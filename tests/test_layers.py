"""The layers, checked over the imports (docs/architecture.md "Layout").

Imports flow toward ``storage``; inside it, the domain is pure, PostgreSQL and
Redis are separate rooms, and one module knows HTTP. All SQL lives in
``storage/pg``. Each rule names the files that break it, so a failure says
where the change went wrong.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("storage", "api", "realtime", "delivery", "deploy")
EDGES = ("api", "realtime", "delivery")

DOMAIN_THIRD_PARTY = {"msgspec", "phonenumbers", "cryptography"}
"""What the domain may use beyond the standard library: none of them does I/O."""
STDLIB_IO = {"socket", "ssl", "smtplib", "asyncio", "subprocess", "http", "urllib", "selectors"}
"""Standard-library modules that reach outside the process: not in the domain."""

SQL = re.compile(
    r"^\s*(SELECT|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|WITH\s+\w+\s+AS|CREATE\s|ALTER\s|DROP\s)"
)


class Imported(msgspec.Struct, frozen=True):
    module: str
    """The importing module, dotted (``storage.pg.members``)."""
    name: str
    """What it imports, dotted (``storage.redis.queue``, ``psycopg``)."""


def module_of(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources(root: Path, packages: tuple[str, ...]) -> Iterator[Path]:
    for package in packages:
        yield from sorted((root / package).rglob("*.py"))


def imports(path: Path, root: Path) -> Iterator[Imported]:
    """Every import of a file, wherever it sits (functions and TYPE_CHECKING included)."""
    module = module_of(path, root)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Imported(module, alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in PACKAGES or node.module.startswith("storage"):
                # ``from storage.redis import key_names`` imports a module.
                for alias in node.names:
                    yield Imported(module, f"{node.module}.{alias.name}")
            else:
                yield Imported(module, node.module)


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def broken_rules(item: Imported) -> list[str]:
    """The rules ``item`` breaks (empty when it keeps them all)."""
    m, n = item.module, item.name
    top = n.split(".")[0]
    broken = []
    if within(m, "storage") and top in ("api", "realtime", "delivery", "deploy"):
        broken.append("storage imports no edge and no deploy code")
    if within(m, "storage.domain"):
        stdlib = top in sys.stdlib_module_names and top not in STDLIB_IO
        if not (stdlib or top in DOMAIN_THIRD_PARTY or within(n, "storage.domain")):
            broken.append("the domain imports msgspec and the standard library only (no I/O)")
    if within(m, "storage.redis") and (
        top in ("psycopg", "psycopg_pool")
        or within(n, "storage.pg")
        or (within(n, "storage.process") and not within(n, "storage.process.settings"))
    ):
        broken.append("storage.redis imports no PostgreSQL code and no process wiring")
    if within(m, "storage.pg") and (
        within(n, "storage.process") and not within(n, "storage.process.settings")
    ):
        broken.append("storage.pg imports no process wiring (settings only)")
    if within(m, "storage") and top == "starlette" and m != "storage.responses":
        broken.append("only storage.responses imports Starlette")
    edge = m.split(".")[0]
    if edge in EDGES and top in EDGES and top != edge:
        broken.append("api, realtime and delivery do not import each other")
    if edge in EDGES and top == "deploy":
        broken.append("the edges do not import deploy")
    return broken


def layer_violations(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    return [
        f"{item.module} imports {item.name}: {rule}"
        for path in sources(root, packages)
        for item in imports(path, root)
        for rule in broken_rules(item)
    ]


def sql_outside_pg(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    found = []
    for path in sources(root, packages):
        module = module_of(path, root)
        if within(module, "storage.pg"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            if SQL.match(node.value):
                found.append(f"{module}:{node.lineno}: {node.value.strip()[:60]!r}")
    return found


def test_the_layers_are_kept() -> None:
    assert layer_violations(ROOT) == []


def test_all_sql_lives_in_storage_pg() -> None:
    assert sql_outside_pg(ROOT) == []


@pytest.mark.parametrize(
    ("path", "source", "rule"),
    [
        ("storage/domain/x.py", "import psycopg\n", "no I/O"),
        ("storage/domain/x.py", "from storage.redis import queue\n", "no I/O"),
        ("storage/redis/x.py", "from storage.pg.database import Pool\n", "no PostgreSQL"),
        ("storage/pg/x.py", "from storage.process.services import Services\n", "settings only"),
        ("storage/pg/x.py", "from starlette.responses import Response\n", "Starlette"),
        ("storage/pg/x.py", "def f():\n    from api.errors import ApiError\n", "no edge"),
        ("api/x.py", "from realtime.hub import Hub\n", "each other"),
        ("delivery/x.py", "from deploy.stack import Stack\n", "deploy"),
    ],
)
def test_a_broken_rule_is_named(tmp_path: Path, path: str, source: str, rule: str) -> None:
    file = tmp_path / path
    file.parent.mkdir(parents=True)
    file.write_text(source)
    found = layer_violations(tmp_path, (path.split("/")[0],))
    assert len(found) == 1
    assert rule in found[0]
    assert found[0].startswith(module_of(file, tmp_path))


def test_sql_outside_storage_pg_is_found(tmp_path: Path) -> None:
    (tmp_path / "delivery").mkdir()
    (tmp_path / "delivery" / "x.py").write_text('Q = "SELECT id FROM member WHERE x = %s"\n')
    (tmp_path / "storage" / "pg").mkdir(parents=True)
    (tmp_path / "storage" / "pg" / "y.py").write_text('Q = "SELECT 1"\n')
    assert sql_outside_pg(tmp_path, ("delivery", "storage")) == [
        "delivery.x:1: 'SELECT id FROM member WHERE x = %s'"
    ]
