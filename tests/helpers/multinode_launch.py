"""Launch msrun as two "nodes" on this machine for a test: node 0 and node 1 each run
``msrun --worker_num=2 --local_worker_num=1 --node_rank=<n> --master_addr=127.0.0.1 --master_port=<port>``,
the commands two real machines would run (docs/distributed.md, "Several machines").

On one machine both launches see 127.0.0.1 as their own address, so both start a scheduler (msrun starts
one wherever `master_addr` is local); node 1's cannot bind the port node 0's holds, and node 1's msrun then
exits 1 after its worker has finished. Node 1 is therefore started once node 0's scheduler listens, and is
held to: its worker exited 0 and its scheduler failed on the port alone.
"""
import os
import re
import subprocess
import sys
import time

import pytest

from msrun_launch import CLUSTER_TIME_OUT, PORT_FAILURE, _free_port, _kill, _logs, _msrun, _wait

WORKER_FAILURE = re.compile(r"Worker process \d+ exit with exception")   # msrun's line for a failed worker


def _start_node(out_dir, script_args, port, node_rank):
    """Start node `node_rank`'s msrun (one local worker of two) in its own process group; (process, log_dir)."""
    log_dir = os.path.join(out_dir, f"msrun_log_port{port}_node{node_rank}")
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(os.environ, PATH=path, GLOG_v="2", PYTHONUNBUFFERED="1")
    cmd = [_msrun(), "--worker_num=2", "--local_worker_num=1", f"--node_rank={node_rank}",
           "--master_addr=127.0.0.1", f"--master_port={port}", "--join=True",
           f"--cluster_time_out={CLUSTER_TIME_OUT}", f"--log_dir={log_dir}", *script_args]
    proc = subprocess.Popen(cmd, cwd=out_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    return proc, log_dir


def _listening(port):
    """True once a socket listens on TCP `port` (Linux /proc/net/tcp; True where that cannot be read)."""
    try:
        with open("/proc/net/tcp") as f:
            rows = [line.split() for line in f.read().splitlines()[1:]]
    except OSError:
        return True
    return any(row[1].endswith(f":{port:04X}") and row[3] == "0A" for row in rows)


def run_two_nodes(out_dir, script_args, timeout):
    """Run `script_args` (a script and its arguments) as rank 0 on "node 0" and rank 1 on "node 1"; fail with
    the logs unless both workers exit 0 within `timeout` seconds. Returns the two nodes' log directories."""
    deadline = time.monotonic() + timeout
    for attempt in range(2):
        port = _free_port()
        node0, log0 = _start_node(out_dir, script_args, port, 0)
        started = min(deadline, time.monotonic() + CLUSTER_TIME_OUT)
        while not _listening(port) and node0.poll() is None and time.monotonic() < started:
            time.sleep(0.2)
        node1, log1 = _start_node(out_dir, script_args, port, 1)
        code0, output0 = _wait(node0, deadline)
        if code0 != 0:
            _kill(node1)
        code1, output1 = _wait(node1, deadline)
        if code0 != 0 and PORT_FAILURE in _logs(log0):   # the port was taken before node 0 bound it
            if attempt == 0:
                continue
            pytest.skip(f"msrun's scheduler could not bind a local port twice (last {port}): {PORT_FAILURE}")
        # node 1's own scheduler loses the port to node 0's (one machine only); its worker must have succeeded
        node1_ok = code1 == 0 or (code1 is not None and PORT_FAILURE in _logs(log1)
                                  and not WORKER_FAILURE.search(output1))
        if code0 == 0 and node1_ok:
            return log0, log1
        print(output0, "\n", _logs(log0), "\n", output1, "\n", _logs(log1))
        if code0 is None or code1 is None:
            pytest.fail(f"the two msrun nodes did not finish within {timeout} s (killed); logs printed above")
        pytest.fail(f"msrun exited with code {code0} on node 0, {code1} on node 1; logs in {log0}, {log1} "
                    "(printed above)")
