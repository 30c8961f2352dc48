"""``manage.py ppq_master``: ``ppq master`` with the project's settings; the same flags (``--help``)."""

from __future__ import annotations

from ...commands import ClickCommand


class Command(ClickCommand):
    help = "Run ppq master with settings.PPQ (the flags of ppq master)."
    ppq_command = "master"
