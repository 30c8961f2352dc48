"""The Django app: ``settings.PPQ`` checked by ``manage.py check``, and ``@task`` pushes configured from it."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.core import checks

from ...errors import ConfigError


class PPQConfig(AppConfig):
    name = "ppq.contrib.django"
    label = "ppq"
    verbose_name = "ppq task queue"

    def ready(self) -> None:
        from ...client import set_default_config
        from .settings import ppq_config

        checks.register(check_settings)
        set_default_config(ppq_config)


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``settings.PPQ`` as ppq reads it: one error naming the bad key, if there is one."""
    from .settings import ppq_settings

    try:
        ppq_settings()
    except ConfigError as exc:
        return [checks.Error(str(exc), hint="See config.example.yaml for the keys and their values.",
                             id="ppq.E001")]
    return []
