"""Pushing when the current database transaction commits."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ...client import Client, default_client
from ...task import new_id


def push_on_commit(target: str | Callable[..., Any], *args: Any, kwargs: dict[str, Any] | None = None,
                   using: str | None = None, client: Client | None = None, **options: Any) -> str:
    """Push ``target(*args, **kwargs)`` once the transaction open on database ``using`` commits (at
    once outside ``transaction.atomic()``); never if it rolls back. Returns the task's id now.

    ``target`` is a ``@task`` function (its decorator's options and client apply) or a dotted
    name; ``options`` are :meth:`Client.push`'s. A push that fails at commit raises there, as
    ``transaction.on_commit`` callbacks do: the transaction is committed by then.
    """
    from django.db import transaction

    task_id = str(options.pop("task_id", None) or new_id())
    push_with = getattr(target, "push_with", None)
    call_args: Sequence[Any] = args

    def push() -> None:
        if push_with is not None and client is None:
            push_with(call_args, kwargs, task_id=task_id, **options)
        else:
            (client or default_client()).push(target, *call_args, kwargs=kwargs, task_id=task_id, **options)

    transaction.on_commit(push, using=using)
    return task_id
