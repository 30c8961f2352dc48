"""``settings.PPQ`` as ppq's config, with errors that name the key."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ...config import Config, load_config
from ...errors import ConfigError

# The Django setting that holds ppq's config.
SETTING = "PPQ"


def ppq_settings() -> dict[str, Any]:
    """``settings.PPQ`` (an empty dict when it is not set), checked on its own: a ConfigError that
    names the setting and the key (``settings.PPQ: worker.port: must not be negative, got -1``)."""
    from django.conf import settings

    value = getattr(settings, SETTING, None)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"settings.{SETTING}: expected a dict of ppq config keys, got {type(value).__name__}")
    try:
        Config.from_settings(value)
    except ConfigError as exc:
        raise ConfigError(f"settings.{SETTING}: {exc}") from None
    return dict(value)


def ppq_config(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """The config of this project: the file ``PPQ_CONFIG`` names if any, ``settings.PPQ`` over it,
    ``PPQ_*`` variables over that, then ``overrides`` (dotted keys)."""
    env = os.environ if environ is None else environ
    return load_config(None, overrides, env, settings=ppq_settings())
