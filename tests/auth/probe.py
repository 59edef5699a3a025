"""A cluster options handler that lets tests see who the API thinks the caller is.

Loaded by the API process (``options.handler: tests.auth.probe:whoami``). Submitting a
cluster with ``whoami=True`` fails *before* any process starts, with a 422 whose message
is the authenticated user as JSON; the official client raises it as ``ValueError``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

WHOAMI_FIELD = {"field": "whoami", "type": "bool", "default": False}


def whoami(options: Mapping[str, Any], user: Any) -> dict[str, Any]:
    if options.get("whoami"):
        raise ValueError(
            json.dumps(
                {"name": user.name, "groups": sorted(user.groups), "admin": bool(user.admin)}
            )
        )
    return {}


def decode_whoami(error: BaseException) -> dict[str, Any]:
    """The user JSON from the client's ``ValueError``."""
    text = str(error)
    return json.loads(text[text.index("{") :])
