"""Task functions with @ppq.periodic schedules, imported by masters through master.schedule_modules."""

import ppq


@ppq.periodic(every=3600, name="hourly-add", args=[1, 2], max_retry=2)
@ppq.task
def add(a, b):
    return a + b
