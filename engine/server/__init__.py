"""Helix's HTTP API: Helix routes, OpenAI-compatible routes, health and metrics (no Qt here).

``create_app`` builds the FastAPI app around an ``EngineHost``; ``ServerRunner`` serves it
on a background thread for the desktop app; ``python main.py serve`` serves it headless.
"""

from engine.server.app import create_app
from engine.server.runner import ServerRunner

__all__ = ["create_app", "ServerRunner"]
