"""``manage.py ppq_worker``: ``ppq worker`` with the project's settings; the same flags (``--help``)."""

from __future__ import annotations

from ...commands import ClickCommand


class Command(ClickCommand):
    help = "Run ppq worker with settings.PPQ (the flags of ppq worker)."
    ppq_command = "worker"
