"""Integrations of ppq with frameworks, each an optional extra: :mod:`ppq.contrib.django` (``ppq[django]``)."""
