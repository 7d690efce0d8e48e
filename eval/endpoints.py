"""Where the OpenAI-compatible judge may send its API key: the rules, checked at config load and again
when :class:`eval.judge.OpenAIJudge` is built.

The key is the value of the environment variable ``judge.api_key_env``, sent as a Bearer token to
``judge.base_url``. Secure by default:

* ``base_url`` is ``https://``; plain ``http://`` only to a loopback host (``localhost``, ``127.0.0.0/8``,
  ``::1``: a vLLM or ``transformers serve`` on this machine). No credentials in the URL.
* the key is sent only to a host listed in ``judge.api_key_hosts`` (default: ``api.openai.com``) or a
  loopback host. Exact host names: ``api.openai.com.example.net`` is not ``api.openai.com``.
* ``api_key_env`` names an API-key variable: ``[A-Za-z_][A-Za-z0-9_]*`` ending in ``_API_KEY``, ``_KEY``
  or ``_TOKEN`` (so ``HOME`` or ``AWS_SECRET_ACCESS`` cannot be sent by mistake), or null: no key is sent
  (an endpoint on another host that needs none).
* with ``base_url`` null the endpoint is the ``openai`` client's own (``OPENAI_BASE_URL`` from the
  environment, else ``https://api.openai.com/v1``), and it is checked the same way.

A rule broken is one line naming the field; the key itself is never read for a message or logged.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from moderator.cli import UsageError

DEFAULT_BASE_URL = "https://api.openai.com/v1"
BASE_URL_ENV = "OPENAI_BASE_URL"  # read by the openai client when base_url is None
DEFAULT_KEY_HOSTS = ("api.openai.com",)
LOOPBACK_NAMES = ("localhost",)
KEY_ENV_SUFFIXES = ("_API_KEY", "_KEY", "_TOKEN")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*|\[[0-9a-f:.]+\]|[0-9a-f:.]+")
NO_KEY = "EMPTY"  # what the client sends when no key is: a local server does not check it


class EndpointError(UsageError):
    """A judge endpoint setting breaks the rules above; ``field`` is the config field to fix (a ValueError,
    one line in CLIs)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP address (``127.0.0.0/8``, ``::1``)."""
    host = host.lower().strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def effective_base_url(base_url: str | None) -> tuple[str, str]:
    """The endpoint the client will call, and the setting it came from (for error messages)."""
    if base_url is not None:
        return base_url, "base_url"
    from_env = os.environ.get(BASE_URL_ENV)
    if from_env:
        return from_env, f"base_url (null, so ${BASE_URL_ENV})"
    return DEFAULT_BASE_URL, "base_url"


def check_key_hosts(hosts: Sequence[str], prefix: str = "judge.") -> None:
    if isinstance(hosts, str) or not isinstance(hosts, list | tuple):
        raise EndpointError(f"{prefix}api_key_hosts", f"must be a list of host names, got {hosts!r}")
    for host in hosts:
        if not isinstance(host, str) or not _HOST_NAME.fullmatch(host.lower()):
            raise EndpointError(
                f"{prefix}api_key_hosts", f"{host!r} is not a host name (write api.openai.com, not a URL)"
            )


def check_api_key_env(api_key_env: str | None, prefix: str = "judge.") -> None:
    if api_key_env is None:
        return
    if (
        not isinstance(api_key_env, str)
        or not _ENV_NAME.fullmatch(api_key_env)
        or not api_key_env.upper().endswith(KEY_ENV_SUFFIXES)
    ):
        raise EndpointError(
            f"{prefix}api_key_env",
            f"{api_key_env!r} does not name an API-key variable (a name ending in "
            f"{', '.join(KEY_ENV_SUFFIXES)}); null sends no key",
        )


def check_endpoint(
    base_url: str | None,
    api_key_env: str | None,
    api_key_hosts: Sequence[str] = DEFAULT_KEY_HOSTS,
    prefix: str = "judge.",
) -> str:
    """Check the judge's endpoint settings; returns the URL the client is to call.

    Raises :class:`EndpointError` naming ``<prefix>base_url`` / ``api_key_env`` / ``api_key_hosts``.
    """
    check_api_key_env(api_key_env, prefix)
    check_key_hosts(api_key_hosts, prefix)
    url, source = effective_base_url(base_url)
    field = f"{prefix}{source}"
    if not isinstance(url, str):
        raise EndpointError(field, f"must be a URL or null, got {url!r}")
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
    except ValueError as error:  # e.g. an unbalanced [ in the host
        raise EndpointError(field, f"not a URL ({error})") from None
    if parts.scheme not in ("http", "https") or not host:
        raise EndpointError(field, "must be an http(s) URL with a host, e.g. https://api.openai.com/v1")
    if parts.username is not None or parts.password is not None:
        # Never echo the URL: the credentials are in it.
        raise EndpointError(field, "holds credentials (user:password@); put the key in the variable api_key_env names")
    loopback = is_loopback(host)
    if parts.scheme == "http" and not loopback:
        raise EndpointError(
            field,
            f"plain http to {host} would send the prompts (and the key) unencrypted; use https, or http only to "
            "a loopback host (localhost, 127.0.0.1, ::1)",
        )
    allowed = {h.lower().strip("[]") for h in api_key_hosts}
    if api_key_env is not None and not loopback and host.lower() not in allowed:
        raise EndpointError(
            field,
            f"host {host} may not receive the key in ${api_key_env}: add {host} to {prefix}api_key_hosts "
            f"(now {sorted(allowed)}; loopback hosts are always allowed), or set {prefix}api_key_env: null "
            "to send no key",
        )
    return url.strip()
