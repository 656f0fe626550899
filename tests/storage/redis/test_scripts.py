"""The Lua scripts: one file each under storage/redis/lua, every one loaded by some
module through ``lua(name)``, and every one accepted by a real Redis."""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from deploy.embedded_redis import EmbeddedRedis
from storage.redis.scripts import lua

ROOT = Path(__file__).resolve().parents[3]
LUA_DIR = ROOT / "storage" / "redis" / "lua"
PACKAGES = ("storage", "api", "realtime", "delivery", "deploy")


def files() -> set[str]:
    return {path.stem for path in LUA_DIR.glob("*.lua")}


def loaded() -> dict[str, str]:
    """Every literal ``lua("<name>")`` in the packages: name -> the module asking."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id == "lua"
                ):
                    assert len(node.args) == 1, f"{path}:{node.lineno}: lua() takes one name"
                    arg = node.args[0]
                    name = arg.value if isinstance(arg, ast.Constant) else None
                    assert isinstance(name, str), f"{path}:{node.lineno}: lua() takes a literal"
                    found[name] = str(path.relative_to(ROOT))
    return found


def test_every_script_file_is_loaded_and_every_loaded_name_exists() -> None:
    names = loaded()
    assert names, "no lua() call found"
    assert sorted(files() - names.keys()) == [], "script files no module loads"
    assert {n: m for n, m in names.items() if n not in files()} == {}, "names with no file"


@pytest.mark.parametrize("name", sorted(files()))
def test_a_script_says_its_keys_and_argv_first(name: str) -> None:
    head = " ".join(itertools.takewhile(lambda line: line.startswith("--"), lua(name).splitlines()))
    assert "KEYS" in head, head
    assert "ARGV" in head, head


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    server = EmbeddedRedis(Path(tmp_path_factory.mktemp("redis")), persist=False)
    url = server.start()
    try:
        with redis.Redis.from_url(url) as connection:
            yield connection
    finally:
        server.stop()


@pytest.mark.parametrize("name", sorted(files()))
def test_redis_accepts_the_script(client: redis.Redis, name: str) -> None:
    source = lua(name)
    sha = client.script_load(source)
    assert client.script_exists(sha) == [True]
