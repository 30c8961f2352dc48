"""Imported first by every executor of a worker started through Django (hooks.preload_in_executors):
sets Django up in an executor started afresh, and closes the database connections that are
unusable or past ``CONN_MAX_AGE`` before and after each task, as Django does around a request."""

from __future__ import annotations

from typing import Any

import django
from django.apps import apps
from django.db import close_old_connections

from ...worker.hooks import add_hook

if not apps.ready:
    django.setup()


def close_connections(context: dict[str, Any]) -> None:
    close_old_connections()


add_hook("on_task_executing", close_connections)
add_hook("on_task_executed", close_connections)
