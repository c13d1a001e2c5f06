"""Helix Desktop: the Qt window over the engine (generate, compare, charts, KV view, server, models)."""

APP_NAME = "Helix Desktop"
ORG_NAME = "Helix"
