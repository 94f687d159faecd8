"""Fail fast when the Hugging Face Hub is needed but cannot be reached.

Without this, a cold cache on an offline machine makes transformers/datasets retry for about a
minute before failing with a generic message. A one-socket probe answers in milliseconds and
the error says what to do.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from huggingface_hub import constants

OFFLINE_ADVICE = (
    "Download it once where there is network (`hf download NAME`, plus `--repo-type dataset` "
    "for a dataset), make that cache visible here through HF_HOME, and set HF_HUB_OFFLINE=1 "
    "to use it without network."
)


class HubUnavailableError(RuntimeError):
    """The hub is needed (nothing cached) but offline mode is on or the endpoint is unreachable."""


def hub_offline() -> bool:
    """Offline mode as set now (the library constant is read once, at import time)."""
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return constants.HF_HUB_OFFLINE or env in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` seconds."""
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True  # only the proxy knows; let the HTTP client try
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_unavailable(what: str) -> HubUnavailableError:
    """The error to raise when ``what`` is not cached and the hub cannot be used right now."""
    why = "HF_HUB_OFFLINE is set" if hub_offline() else f"{constants.ENDPOINT} cannot be reached"
    return HubUnavailableError(f"{what} is not in the local cache and {why}. {OFFLINE_ADVICE}")


def check_hub_reachable(what: str) -> None:
    """Raise :func:`hub_unavailable` at once, instead of after a minute of retries, when online
    mode is on but the endpoint does not answer."""
    if not hub_offline() and not hub_reachable():
        raise hub_unavailable(what)
