"""nginx in front of the web nodes: the production snippet, rendered and run.

``deploy/nginx.conf`` is the production example, an http-level snippet
(upstream, map, server) that operators include from their own ``nginx.conf``.
This module makes every other configuration from that one file, so the tests
and a developer trying the proxy locally run what operators deploy:

- ``render_site`` replaces the upstream's servers (keeping their parameters,
  ``max_fails=`` and so on) and the listen address;
- ``render_main`` wraps a site in a complete configuration for an
  unprivileged, foreground nginx whose pid file, error log and temp files all
  live under one prefix directory;
- ``Nginx`` runs that configuration (``nginx -p <dir> -c <conf> -g 'daemon off;'``)
  as a child process.

``python -m deploy.nginx --upstream 127.0.0.1:9000 --upstream 127.0.0.1:9001``
prints the rendered snippet; with ``--prefix DIR`` the complete configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

SITE_CONF = Path(__file__).with_name("nginx.conf")
"""The production example."""
UPSTREAM = "koinonia_web"
DEBIAN_NGINX = Path("/usr/sbin/nginx")

_UPSTREAM_BLOCK = re.compile(
    r"^(?P<head>upstream\s+" + UPSTREAM + r"\s*\{\n)(?P<body>.*?)^\}", re.M | re.S
)
_SERVER_LINE = re.compile(
    r"^(?P<indent>[ \t]*)server\s+(?P<address>\S+?)(?P<params>(\s+[^;]*)?);\n", re.M
)
_LISTEN_LINE = re.compile(r"^(?P<indent>[ \t]*)listen\s+[^;]+;", re.M)
_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


class NginxError(Exception):
    """The configuration cannot be rendered, or nginx did not start."""


def find_nginx() -> Path | None:
    """The nginx binary: on PATH, or Debian's (``/usr/sbin`` is not on every PATH)."""
    found = shutil.which("nginx")
    if found:
        return Path(found)
    if os.access(DEBIAN_NGINX, os.X_OK):
        return DEBIAN_NGINX
    return None


def render_site(
    upstreams: Sequence[str],
    listen: str,
    *,
    template: str | None = None,
    upstream_header: str | None = None,
) -> str:
    """The snippet with these upstream servers (``host:port``) and listen address.

    Each server gets the parameters of the template's first server line.
    ``upstream_header`` names a response header that reports ``$upstream_addr``
    (every node tried, the one that answered last): for tests and debugging.
    """
    text = SITE_CONF.read_text() if template is None else template
    if not upstreams:
        raise NginxError("at least one upstream server is needed")
    block = _UPSTREAM_BLOCK.search(text)
    if block is None:
        raise NginxError(f"no `upstream {UPSTREAM} {{ ... }}` block in the template")
    body = block["body"]
    servers = list(_SERVER_LINE.finditer(body))
    if not servers:
        raise NginxError(f"upstream {UPSTREAM} lists no server")
    first = servers[0]
    lines = "".join(
        f"{first['indent']}server {address}{first['params'] or ''};\n" for address in upstreams
    )
    body = body[: first.start()] + lines + _SERVER_LINE.sub("", body[first.start() :])
    text = text[: block.start("body")] + body + text[block.end("body") :]
    listens = list(_LISTEN_LINE.finditer(text))
    if len(listens) != 1:
        raise NginxError(f"expected one listen directive in the template, found {len(listens)}")
    (found,) = listens
    replacement = f"{found['indent']}listen {listen};"
    if upstream_header is not None:
        if not re.fullmatch(r"[A-Za-z0-9-]+", upstream_header):
            raise NginxError(f"bad header name {upstream_header!r}")
        replacement += f"\n{found['indent']}add_header {upstream_header} $upstream_addr always;"
    return text[: found.start()] + replacement + text[found.end() :]


def render_main(
    site: str, prefix: Path, *, workers: int = 1, worker_connections: int = 4096
) -> str:
    """A complete configuration running ``site`` with every file under ``prefix``.

    As root, workers keep root's identity: nginx would otherwise switch them to
    ``nobody``, who cannot write temp files under a private directory.
    """
    prefix = prefix.resolve()
    user = f"user {pwd.getpwuid(0).pw_name};\n" if os.geteuid() == 0 else ""
    temp = "".join(f"    {name}_temp_path {prefix / 'temp' / name};\n" for name in _TEMP_PATHS)
    indented = "".join(f"    {line}".rstrip() + "\n" for line in site.splitlines())
    return (
        "# Rendered by deploy/nginx.py from deploy/nginx.conf.\n"
        f"{user}"
        f"worker_processes {workers};\n"
        f"pid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} warn;\n"
        f"events {{\n    worker_connections {worker_connections};\n}}\n"
        "http {\n"
        f"    access_log {prefix / 'access.log'};\n"
        f"{temp}\n"
        f"{indented}"
        "}\n"
    )


class Nginx:
    """One foreground nginx with its own prefix directory, as a child process."""

    def __init__(
        self,
        prefix: Path,
        upstreams: Sequence[str],
        listen_port: int,
        *,
        binary: Path | None = None,
        upstream_header: str | None = None,
    ) -> None:
        self.prefix = prefix.resolve()
        self.listen = f"127.0.0.1:{listen_port}"
        self.port = listen_port
        found = binary or find_nginx()
        if found is None:
            raise NginxError("nginx is not installed: install Debian's (apt-get install nginx)")
        self.binary = found
        site = render_site(upstreams, self.listen, upstream_header=upstream_header)
        self.conf = self.prefix / "nginx.conf"
        self.config_text = render_main(site, self.prefix)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def error_log(self) -> Path:
        return self.prefix / "error.log"

    def _command(self, *extra: str) -> list[str]:
        return [
            str(self.binary),
            "-p", str(self.prefix),
            "-c", str(self.conf),
            "-e", str(self.error_log),
            *extra,
        ]  # fmt: skip

    def start(self, timeout_s: float = 10.0) -> None:
        """Check the configuration, start nginx, return once it accepts connections."""
        (self.prefix / "temp").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.config_text)
        checked = subprocess.run(
            self._command("-t", "-q"), capture_output=True, timeout=timeout_s, check=False
        )
        if checked.returncode != 0:
            raise NginxError(f"nginx -t refused {self.conf}: {checked.stderr.decode().strip()}")
        self.process = subprocess.Popen(self._command("-g", "daemon off;"), start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise NginxError(f"nginx exited with {self.process.returncode}: {self.log_tail()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            time.sleep(0.05)
        self.stop()
        raise NginxError(f"nginx did not listen on {self.listen} within {timeout_s:.0f} s")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.error_log.read_text().splitlines()[-lines:])
        except OSError:
            return "(no error log)"

    def stop(self, timeout_s: float = 5.0) -> None:
        """Fast shutdown (SIGTERM closes every connection), then SIGKILL if need be."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.nginx", description="Render deploy/nginx.conf."
    )
    parser.add_argument(
        "--upstream", action="append", required=True, help="host:port of a web node (repeat)"
    )
    parser.add_argument("--listen", default="127.0.0.1:8080")
    parser.add_argument(
        "--prefix", type=Path, help="render a complete configuration with files under DIR"
    )
    args = parser.parse_args(argv)
    site = render_site(args.upstream, args.listen)
    print(site if args.prefix is None else render_main(site, args.prefix), end="")


if __name__ == "__main__":
    main()
