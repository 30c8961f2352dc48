"""``manage.py ppq COMMAND``: any ``ppq`` command (push, status, dead...) with the project's settings."""

from __future__ import annotations

from ...commands import ClickCommand


class Command(ClickCommand):
    help = "Run a ppq command with settings.PPQ: manage.py ppq status, manage.py ppq push mod.func ARGS..."
