"""ppq in a Django project (``pip install ppq[django]``).

Add ``"ppq.contrib.django"`` to ``INSTALLED_APPS`` and, optionally, a ``PPQ`` setting: a dict
with the keys of ppq's YAML config (``{"worker": {"master_hosts": [...]}, "auth_token": ...}``),
checked as the file is, each error naming its key (``manage.py check`` reports them too).
``PPQ_*`` variables and command-line flags override it, as they override the file.

- ``@task`` functions in an app's ``tasks`` module are pushed with ``.push()`` as anywhere,
  through a client configured from ``settings.PPQ``;
- ``python manage.py ppq_worker`` (and ``ppq_master``, ``ppq_up``, or ``ppq COMMAND`` for any
  ``ppq`` command) take the flags of ``ppq worker`` (``master``, ``up``...). A worker started
  this way imports each installed app's ``tasks`` module and runs its tasks without listing
  them in ``worker.allowed_modules``; every executor sets Django up, and closes the database
  connections that are unusable or past ``CONN_MAX_AGE`` before and after each task, as a
  request does;
- :func:`push_on_commit` pushes when the current transaction commits, and not at all if it
  rolls back.
"""

from __future__ import annotations

from .push import push_on_commit
from .settings import ppq_config, ppq_settings

__all__ = ["ppq_config", "ppq_settings", "push_on_commit"]
