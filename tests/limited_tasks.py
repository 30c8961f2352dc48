"""A module whose @task declares limits (tests/test_limits.py)."""

import ppq


@ppq.task(rate_limit="3/m", concurrency_limit=2)
def send(to):
    return to
