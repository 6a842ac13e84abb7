"""HTTP API and browser labelling app for SAM (``anyseg serve``).

``create_app(model, settings)`` builds the FastAPI app; ``ServerSettings`` holds the folder,
annotations file, token and limits; ``run_in_thread(app)`` serves it from a background thread (for
notebooks and tests). FastAPI, uvicorn and python-multipart come with ``pip install 'anyseg[server]'``.
"""
from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "run_in_thread"]


def create_app(model, settings=None, **concept):
    from .app import create_app as _create_app

    return _create_app(model, settings, **concept)


def run_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    from .runner import run_in_thread as _run

    return _run(app, host, port)
