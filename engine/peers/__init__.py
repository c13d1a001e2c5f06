"""Other inference servers run beside Helix on loopback (vLLM's CPU build), for the bench and the
remote-engine tests: a venv of their own, a free port, start, wait until ready, stop."""

from engine.peers.helix import HelixServer
from engine.peers.process import PeerError, ServerProcess, free_port
from engine.peers.vllm import DEFAULT_VENV, VLLMServer, ensure_venv

__all__ = ["DEFAULT_VENV", "HelixServer", "PeerError", "ServerProcess", "VLLMServer", "ensure_venv", "free_port"]
