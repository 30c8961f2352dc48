"""One module per queue system under test; task modules imported by the worker subprocesses.

Kept empty on purpose: worker processes import ``peers.<system>_app`` and must not
pay for the driver's imports.
"""
