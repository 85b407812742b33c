"""Clients: the typed Python client, the command line and the offline LLM API."""
