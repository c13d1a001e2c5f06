"""Helix's HTTP API: Helix routes, OpenAI-compatible routes, health and metrics (no Qt here).

``create_app`` builds the FastAPI app around an ``EngineHost``; ``ServerRunner`` serves it
on a background thread for the desktop app; ``python main.py serve`` serves it headless.
Imported lazily, so ``main.py`` (which imports ``engine.server.cli``) starts on a machine
without fastapi/uvicorn, e.g. a GPU box used only for ``bench``.
"""

__all__ = ["create_app", "ServerRunner"]


def __getattr__(name: str):
    if name == "create_app":
        from engine.server.app import create_app

        return create_app
    if name == "ServerRunner":
        from engine.server.runner import ServerRunner

        return ServerRunner
    raise AttributeError(name)
