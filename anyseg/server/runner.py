"""Serve an app with uvicorn from a background thread (notebooks, tests)."""
from __future__ import annotations

import threading
import time
from typing import NamedTuple


class RunningServer(NamedTuple):
    url: str
    server: object
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def run_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> RunningServer:
    """Start ``app`` on ``host:port`` (0 = a free port) and return once it accepts connections."""
    try:
        import uvicorn
    except ImportError as exc:  # pragma: no cover
        raise ImportError("serving needs uvicorn; install it with: pip install 'anyseg[server]'") from exc
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="anyseg-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()
    return RunningServer(f"http://{host}:{bound[1]}", server, thread)
