"""One router per resource: generate (Helix routes), openai (/v1), system (health, ping, metrics)."""
