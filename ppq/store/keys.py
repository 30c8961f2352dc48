"""The Redis keys of one queue_index, all under ``ppq:<queue_index>:``.

In a Redis Cluster the prefix is ``ppq:{<queue_index>}:`` instead: the braces make
``<queue_index>`` the hash tag of every key, so all of one queue_index's keys sit in
one hash slot (one node) and each script's keys are local to the node it runs on.
A single Redis keeps ``ppq:<queue_index>:``, so data stored before stays valid.

Built in one place, :func:`keys_of`; the Lua scripts get that prefix as ``ARGV[1]``
(``P`` in their text) and append the names below.

    t:<id>         hash   the task record (fields below), or a workflow's node (workflow.lua)
    t:<id>:kids    list   a workflow node's children's ids, in order
    t:<id>:res     hash   a running group's member results so far, pos -> result
    stage:<root>   hash   a big workflow being stored in chunks (ppq/store/flows.py): token, digest,
                          total, written, state; with stage:<root>:kids (the root's children),
                          stage:<root>:part (a node's children sent so far) and stage:<root>:q:<n>
                          (the ids of its first steps of priority n, until they are released)
    staged         zset   the roots of those stagings -> when they count abandoned
    queue          list   ids ready to run, FIFO (RPUSH in, LPOP out), of priority 0
    queue:p:<n>    list   ready ids of priority n (1-9), FIFO; leased before ``queue``, highest n first
    priorities     zset   the priorities n that may have a ``queue:p:<n>`` list (score n); a lease reads
                          it with one ZREVRANGE and drops a priority whose list it finds empty
    queue:m:<module>  list  ready ids of <module> that a lease took off ``queue`` for a worker
                          that may not run them (lease.lua), in queue order; leased before
                          ``queue`` by workers that may
    parked         zset   the modules that may have a ``queue:m:<module>`` list, every score 0
                          (read by name: ZRANGEBYLEX)
    queue:f:<func> list   ready ids of function <func> (module.func) held back by its rate or
                          concurrency limit (lease.lua, limits.lua), in queue order; leased
                          before ``queue`` once the function is due in ``throttled``
    throttled      zset   functions with a ``queue:f:<func>`` list -> when the next may start
                          ('+inf': when a slot frees)
    limits         hash   'rate:<func>' -> '10/s' | '20/m' | '1000/h'; 'conc:<func>' -> N
    buckets        hash   func -> '<tokens>:<time>', its token bucket when last used
    slots          hash   func -> its tasks running under its concurrency limit (the record's
                          field ``slot`` names the function of a task holding one)
    delayed        zset   ids waiting for their eta (score), incl. retry backoff
    running        zset   ids handed out, score = lease deadline
    dead           zset   ids that exhausted their retries, score = time of death
    keys           hash   de-duplication key -> id, while that task waits
    stats          hash   counters: pushed, leased, done, errors (failed attempts), retried, dead,
                          expired (leases that ran out), expired_tasks (tasks not started before
                          their expiry), cancelled, released, purged; parked, the ids in all
                          the ``queue:m:<module>`` and ``queue:f:<func>`` lists; and pending, the
                          workflow steps stored whose turn has not come (workflow.lua)
    rate           hash   d:<10 s bucket> / f:<bucket> -> tasks done / failed attempts
    workers        hash   worker id -> msgpack of its last reported info
    workers:seen   zset   worker id -> time after which it counts as gone
    waiting        zset   ids someone waits on (Client.result) -> until when
    paused         hash   'queue' -> when the whole queue_index was paused; 'worker:<id>' -> when
                          that worker was: nothing is leased to what is paused
    waiters        zset   long-polls waiting for tasks -> until when; wake is
                          published only while one is registered
    s:<name>       hash   a periodic schedule; schedules, schedules:names, schedules:pending
                          rank, list and track them (ppq/store/schedules.py)
    wake           channel  published with the number of tasks made ready
    finished       channel  published with the id of a waited-on task that ended

Task record fields: body (msgpack of the target, parameters and timeout),
state, created, eta, key, the options that differ from their defaults
(max_retry, retry_delay, result_ttl, priority, expires: a unix time), and as the task lives: started finished
worker lease attempts retry expiries result error traceback cancel slot; in a workflow
wf pos take maxp. A workflow node's: kind state parent pos n next remaining maxr bytes onerr ttl created started
finished result error failed_task, and the root's digest.
"""

from __future__ import annotations


def keys_of(queue_index: int, cluster: bool = False) -> str:
    """The prefix of every Redis key of one queue_index (hash-tagged in a ``cluster``)."""
    return f"ppq:{{{queue_index}}}:" if cluster else f"ppq:{queue_index}:"
