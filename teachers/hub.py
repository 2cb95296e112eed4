"""Whether the Hugging Face hub can be reached, found out in about a second instead of the
library's ~23 s of retries (and a dozen warning lines) on a machine without network."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from urllib.parse import urlparse

TIMEOUT_S = 2.0
_PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def hub_endpoint() -> str:
    """The hub's address (``$HF_ENDPOINT`` or https://huggingface.co)."""
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except ImportError:
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def offline_reason() -> str | None:
    """Why the hub cannot be reached (``HF_HUB_OFFLINE`` set, no name resolution, no TCP
    connection within ``TIMEOUT_S``), or None when it answers or cannot be tested (behind a proxy,
    where only the library's own request tells)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in _PROXIES):
        return None
    return _probe(hub_endpoint())


@lru_cache(maxsize=None)
def _probe(endpoint: str) -> str | None:
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S):
            return None
    except socket.gaierror:
        return f"{host} cannot be resolved: no network"
    except OSError as e:
        return f"{host}:{port} does not answer within {TIMEOUT_S:g} s: {type(e).__name__}"
