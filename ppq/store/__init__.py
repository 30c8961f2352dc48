"""One queue_index's storage in Redis: the only part of ppq that imports redis.

    store.py    Store, the API the master calls: push, report, heartbeat, reap,
                move_due, cancel, records, counts; its parts (base classes) are
    admin.py    Admin: the dead list, listing, purge and pause
    schedules.py, limits.py, flows.py  ScheduleStore, LimitStore, FlowStore: periodic
                schedules, rate and concurrency limits, workflows
    presence.py Presence: the workers heard from, long-polls, watched tasks, wake-ups
    lua/*.lua   one Lua script per state change, each opening with its contract
                (KEYS, every ARGV[i], what it returns); fragments shared by several
                scripts (now.lua, module.lua, lease.lua, seen.lua) say which locals they expect
                and set, and are pulled in by an explicit "-- include: name.lua" line
    scripts.py  reads and assembles the scripts once, runs them with EVALSHA
    link.py     the connections: redis-py's client, the plain sockets the scripts use,
                the Locator that finds the primary behind Sentinel or in a cluster,
                and redis errors turned into StorageError
    records.py  decoding: Redis hashes and script rows into the dicts the master returns
    keys.py     the key layout under ppq:<queue_index>: (ppq:{<queue_index>}: in a
                cluster), built by keys_of only

Each module imports only those below it in this list, plus ppq's errors, codec and task.
"""

from .admin import LISTED_STATES, PURGE_BATCH
from .keys import keys_of
from .records import task_of
from .store import ANY_MODULE, Store

__all__ = ["ANY_MODULE", "LISTED_STATES", "PURGE_BATCH", "Store", "keys_of", "task_of"]
