"""Serve a class from several QuLab processes behind HAProxy, on one machine.

    python3 deploy/serve.py --replicas 2 --port 8501      # then open http://HOST:8501

Starts N `streamlit run app.py` processes on free ports, writes an HAProxy
configuration like deploy/haproxy.cfg with one server line each, and runs HAProxy (Debian's
`haproxy` package) in front of them. Every process gets this environment: with DATABASE_URL and
REDIS_URL set (PostgreSQL + Redis) any process opens any sandbox, so a learner whose process dies
is sent to another one and finds their data; QULAB_REPLICAS is set to N so that each process
takes its share of PostgreSQL's connections from the start (each also counts the replicas
PostgreSQL shows, so it is a floor, not a must). On the embedded default each process keeps its
own sandboxes and the cookie keeps each learner on one; when a process dies, the process its
learners are sent to adopts their sandbox files (no live process holds them) with their rows.
Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = Path(__file__).resolve().parent / "haproxy.cfg"
START_SECONDS = 60.0
SERVER_COOKIE = "QULAB_SERVER"  # haproxy.cfg's stickiness cookie: app1, app2, … per process


def haproxy_config(*, listen_port: int, app_ports: list[int], bind: str = "*") -> str:
    """deploy/haproxy.cfg with this frontend port and one server line per app process."""
    text = TEMPLATE.read_text()
    servers = "".join(
        f"    server app{number} 127.0.0.1:{port} check cookie app{number}\n"
        for number, port in enumerate(app_ports, start=1)
    )
    lines = [
        line for line in text.splitlines(keepends=True) if not line.strip().startswith("server ")
    ]
    text = "".join(lines).rstrip("\n") + "\n" + servers
    return text.replace("bind *:8501", f"bind {bind}:{listen_port}")


@dataclass
class ClassServers:
    """The app processes, HAProxy, and where each listens."""

    port: int  # HAProxy's: what learners open
    app_ports: list[int]
    apps: list[subprocess.Popen] = field(default_factory=list)
    haproxy: Optional[subprocess.Popen] = None
    workspace: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="qulab-class-")))

    @property
    def url(self) -> str:
        """The address learners open."""
        return f"http://127.0.0.1:{self.port}"

    def kill_app(self, number: int) -> None:
        """SIGKILL one app process (1-based), as a crash would."""
        process = self.apps[number - 1]
        process.send_signal(signal.SIGKILL)
        process.wait(10)


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def draw_one_page(port: int, url_path: str = "instructor", seconds: float = START_SECONDS) -> None:
    """Open one session on the process and draw a page, as a browser would, then leave.

    Running app.py once installs what it installs per process (pages/common/reconnect.py: a tab
    sent here after its own process died must find its clicks working from the first one) and
    warms imports. /instructor makes no sandbox.
    """
    import asyncio

    import websockets
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    async def draw() -> None:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/_stcore/stream", subprotocols=["streamlit"], max_size=None
        ) as socket:
            message = BackMsg()
            message.rerun_script.page_name = url_path
            await socket.send(message.SerializeToString())
            while True:
                forward = ForwardMsg()
                forward.ParseFromString(await socket.recv())
                if forward.WhichOneof("type") == "script_finished":
                    return

    # In a thread of its own: the caller's thread may be running an event loop already.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as worker:
        worker.submit(asyncio.run, asyncio.wait_for(draw(), seconds)).result()


def wait_until_healthy(url: str, process: subprocess.Popen, seconds: float = START_SECONDS) -> None:
    """Poll /_stcore/health until it answers ok (bounded); fail if the process exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode} before it answered")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer,
        ):
            if answer.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {seconds:g} s")


@contextlib.contextmanager
def serve_class(
    replicas: int,
    *,
    port: Optional[int] = None,
    environment: Optional[Mapping[str, str]] = None,
    bind: str = "127.0.0.1",
    python: str = sys.executable,
) -> Iterator[ClassServers]:
    """N app processes behind HAProxy, ready; all stopped on leaving."""
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(haproxy).exists():
        raise RuntimeError("HAProxy is not installed (apt-get install haproxy)")
    app_ports = [free_port() for _ in range(replicas)]
    servers = ClassServers(port or free_port(), app_ports)
    env = {**os.environ, **(environment or {}), "QULAB_REPLICAS": str(replicas)}
    try:
        for number, app_port in enumerate(app_ports, start=1):
            log = (servers.workspace / f"app{number}.log").open("wb")
            servers.apps.append(
                subprocess.Popen(
                    [python, "-m", "streamlit", "run", str(ROOT / "app.py"),
                     "--server.headless", "true", "--server.address", "127.0.0.1",
                     "--server.port", str(app_port)],
                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
        for app_port, process in zip(app_ports, servers.apps, strict=True):
            wait_until_healthy(f"http://127.0.0.1:{app_port}", process)
            draw_one_page(app_port)
        config = servers.workspace / "haproxy.cfg"
        config.write_text(haproxy_config(listen_port=servers.port, app_ports=app_ports, bind=bind))
        log = (servers.workspace / "haproxy.log").open("wb")
        servers.haproxy = subprocess.Popen(
            [haproxy, "-W", "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        wait_until_healthy(servers.url, servers.haproxy)
        yield servers
    finally:
        for process in [servers.haproxy, *servers.apps]:
            if process is not None and process.poll() is None:
                process.terminate()
        for process in [servers.haproxy, *servers.apps]:
            if process is not None:
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
        shutil.rmtree(servers.workspace, ignore_errors=True)


def main() -> None:
    """The command line: serve until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2, help="app processes (one per core)")
    parser.add_argument("--port", type=int, default=8501, help="the port learners open")
    parser.add_argument("--bind", default="*", help="HAProxy's listening address")
    arguments = parser.parse_args()
    if not os.environ.get("DATABASE_URL"):
        print("Note: no DATABASE_URL: each process keeps its own sandboxes (see the docstring).")
    with serve_class(arguments.replicas, port=arguments.port, bind=arguments.bind) as servers:
        print(f"{arguments.replicas} QuLab processes behind HAProxy at http://HOST:{servers.port}")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
