"""The walking system end to end: the seed's call runs on a real worker process."""

from ppq import Client, PyroFunc, encode_parameters

from .conftest import wait_for


def test_seed_push_task_runs_on_a_worker(master, spawn):
    address = f"127.0.0.1:{master.port}"
    spawn.worker(address, allow="time,tasks")
    client = PyroFunc(f"PYRO:queue@127.0.0.1:{master.port}", retry=1, random_idx=True, threaded=True)
    task_id = client("push_task", "sleep", module="time", parameters=encode_parameters([0], {}), queue_index=0)
    info = wait_for(lambda: (i := client("get_task_info", task_id, 0)) and i["state"] == "done" and i,
                    what="the seed task to finish")
    assert info["func"] == "sleep" and info["module"] == "time"
    assert Client([address]).result(Client([address]).push("tasks.add", 2, 3), timeout=20) == 5
