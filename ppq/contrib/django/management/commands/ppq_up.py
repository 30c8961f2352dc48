"""``manage.py ppq_up``: ``ppq up`` with the project's settings; the same flags (``--help``)."""

from __future__ import annotations

from ...commands import ClickCommand


class Command(ClickCommand):
    help = "Run ppq up with settings.PPQ (the flags of ppq up)."
    ppq_command = "up"
