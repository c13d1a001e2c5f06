"""Engine connections: "This PC" (the in-process engine) or a remote OpenAI-compatible endpoint, saved in settings."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass

from engine.remote import Endpoint
from helix_desktop.settings import AppSettings

logger = logging.getLogger(__name__)

LOCAL_NAME = "This PC"
REMOTES_KEY = "connections/remotes"
CURRENT_KEY = "connections/current"


@dataclass(frozen=True)
class Connection:
    """Where Generate, Chat, Compare and the charts send their work; ``url`` "" means this PC's engine."""

    name: str = LOCAL_NAME
    url: str = ""
    api_key: str = ""

    @property
    def is_local(self) -> bool:
        return not self.url

    def endpoint(self) -> Endpoint:
        """The remote's endpoint; raises RemoteError naming what is wrong with the URL."""
        return Endpoint(self.url, self.api_key or None)


LOCAL = Connection()


def make_remote(name: str, url: str, api_key: str = "") -> Connection:
    """A validated remote connection (RemoteError says what to fix in the URL; a name is required)."""
    name = name.strip()
    if not name or name == LOCAL_NAME:
        raise ValueError(f"give the connection a name other than {LOCAL_NAME!r}, e.g. 'GPU box'")
    endpoint = Endpoint(url, api_key or None)  # normalises the URL (no trailing /v1) or raises
    return Connection(name, endpoint.url, endpoint.api_key or "")


class ConnectionStore:
    """The saved remotes and the chosen connection. The API key is kept in the settings file, which lives in
    the user's own app-data folder (see README, Security)."""

    def __init__(self, settings: AppSettings):
        self.settings = settings
        self.remotes: list[Connection] = self._load()

    def _load(self) -> list[Connection]:
        raw = self.settings.get_str(REMOTES_KEY, "[]")
        try:
            items = json.loads(raw)
            return [make_remote(i["name"], i["url"], i.get("api_key", "")) for i in items]
        except (ValueError, TypeError, KeyError) as exc:  # a hand-edited file must not stop the app
            logger.warning("ignoring unreadable saved connections (%s)", exc)
            return []

    @property
    def all(self) -> list[Connection]:
        return [LOCAL, *self.remotes]

    def get(self, name: str) -> Connection | None:
        return next((c for c in self.all if c.name == name), None)

    def add(self, connection: Connection) -> None:
        """Add or replace (same name) a remote and save."""
        self.remotes = [c for c in self.remotes if c.name != connection.name] + [connection]
        self._save()

    def remove(self, name: str) -> None:
        self.remotes = [c for c in self.remotes if c.name != name]
        self._save()
        if self.current.name == name:
            self.current = LOCAL

    @property
    def current(self) -> Connection:
        return self.get(self.settings.get_str(CURRENT_KEY, LOCAL_NAME)) or LOCAL

    @current.setter
    def current(self, connection: Connection) -> None:
        self.settings.set(CURRENT_KEY, connection.name)
        self.settings.sync()

    def _save(self) -> None:
        self.settings.set(REMOTES_KEY, json.dumps([asdict(c) for c in self.remotes]))
        self.settings.sync()
        if os.name == "posix" and any(c.api_key for c in self.remotes):
            try:  # the file now holds API keys: readable by this user only
                self.settings.path.chmod(0o600)
            except OSError as exc:
                logger.warning("could not restrict %s to your user (%s)", self.settings.path, exc)
