"""Use what the local Hugging Face caches hold first, and fail fast when the hub is needed but
cannot be reached.

A cached copy must load on a machine without network whether or not HF_HUB_OFFLINE is set:
online, ``datasets`` asks the hub first and reads its cache only once that fails. When nothing
is cached, a cold cache on an offline machine makes transformers/datasets retry for about a
minute before failing with a generic message; a one-socket probe answers in milliseconds and
the error says what to do.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from datasets import Dataset, load_dataset
from datasets.packaged_modules.cache.cache import Cache
from huggingface_hub import constants, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import LocalEntryNotFoundError

log = logging.getLogger(__name__)

OFFLINE_ADVICE = (
    "Download it once where there is network (`hf download NAME`, plus `--repo-type dataset` "
    "for a dataset) and make that cache visible here through HF_HOME: a cached copy is used "
    "without network, with or without HF_HUB_OFFLINE=1."
)
COMMIT = re.compile(r"[0-9a-f]{40}")


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


def _cached_commit(path: str, revision: str) -> str | None:
    """The commit ``revision`` names, if it is one or the hub cache recorded it (``refs/``)."""
    if COMMIT.fullmatch(revision):
        return revision
    # datasets fetches a repository's README.md first, so every cached revision holds one.
    readme = try_to_load_from_cache(path, "README.md", revision=revision, repo_type="dataset")
    return Path(readme).parent.name if isinstance(readme, str) else None


def _prepared_copy(
    path: str, name: str | None, split: str, revision: str | None, cache_dir: str | None
) -> Dataset | None:
    """The Arrow tables an earlier ``load_dataset`` wrote, read the way ``datasets`` reads them
    when offline (its ``cache`` builder); with a ``revision``, only when prepared from it."""
    try:
        builder = Cache(
            cache_dir=cache_dir,
            dataset_name=path.split("/")[-1],
            repo_id=path,
            config_name=name,
            version="auto",
            hash="auto",
        )
    except (ValueError, OSError):  # nothing (fully) prepared, or several configs and no name
        return None
    # A hub copy is prepared under the commit it was downloaded at; without a revision the
    # latest copy stands in for the default branch, as it does for datasets when offline.
    if revision is not None and builder.hash != _cached_commit(path, revision):
        return None
    try:
        return builder.as_dataset(split=split)
    except (ValueError, FileNotFoundError):  # prepared without this split
        return None


def _downloaded_copy(
    path: str, name: str | None, split: str, revision: str | None, cache_dir: str | None
) -> Dataset | None:
    """The repository files in the hub cache (`hf download` leaves only these, and datasets
    does not read them when offline), loaded as a local folder."""
    try:
        folder = snapshot_download(
            path, repo_type="dataset", revision=revision, local_files_only=True
        )
    except LocalEntryNotFoundError:  # not downloaded, or known to be incomplete
        return None
    try:
        return load_dataset(folder, name, split=split, cache_dir=cache_dir)
    except (OSError, ValueError) as err:  # e.g. an interrupted download lacks a split's files
        log.warning(
            "the cached files of %s in %s do not load (%s): trying the hub", path, folder, err
        )
        return None


def load_cached_dataset(
    path: str,
    name: str | None,
    split: str,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> Dataset | None:
    """``split`` of hub dataset ``path`` from the local caches without any network request, or
    None when neither holds it.

    First the prepared Arrow copy in ``cache_dir`` (default HF_DATASETS_CACHE), then the
    downloaded repository files in HF_HUB_CACHE (prepared into ``cache_dir`` on first use).
    """
    for source in (_prepared_copy, _downloaded_copy):
        dataset = source(path, name, split, revision, cache_dir)
        if dataset is not None:
            where = Path(dataset.cache_files[0]["filename"]).parent if dataset.cache_files else ""
            log.info("%s split %r: read from the local cache %s", path, split, where)
            return dataset
    return None
