"""Launch two local CPU workers with msrun for a test: a free port, this interpreter, logs on failure,
everything killed on timeout, one retry when the port was taken meanwhile."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

CLUSTER_TIME_OUT = 60         # msrun --cluster_time_out: how long a process waits for the others
PORT_FAILURE = "Failed to create the TCP server"   # scheduler.log when the master port got taken


def _msrun():
    """The msrun launcher of this environment (next to the interpreter, else on PATH), or skip."""
    here = os.path.join(os.path.dirname(sys.executable), "msrun")
    found = here if os.access(here, os.X_OK) else shutil.which("msrun")
    if not found:
        pytest.skip("msrun not found (it comes with the mindspore package: <venv>/bin/msrun)")
    return found


def _free_port():
    """A TCP port free on 127.0.0.1 right now (msrun's scheduler binds it a few seconds later)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    except OSError as err:
        pytest.skip(f"cannot bind a local TCP port for msrun's scheduler: {err}")


def _logs(log_dir):
    """The text of msrun's log files (scheduler and workers), for a failure message."""
    parts = []
    for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
        with open(os.path.join(log_dir, name), errors="replace") as f:
            text = f.read()
        parts.append(f"===== {name} (last 6000 characters) =====\n{text[-6000:]}")
    return "\n".join(parts) or f"(no logs in {log_dir})"


def _start(out_dir, script_args, port, workers):
    """Start msrun with `workers` local workers running `script_args` in its own process group; returns
    (process, log_dir)."""
    log_dir = os.path.join(out_dir, f"msrun_log_port{port}")
    # msrun starts each worker as `python <script>` from PATH: make that this interpreter's environment
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(os.environ, PATH=path, GLOG_v="2", PYTHONUNBUFFERED="1")
    cmd = [_msrun(), f"--worker_num={workers}", f"--local_worker_num={workers}", "--master_addr=127.0.0.1",
           f"--master_port={port}", "--join=True", f"--cluster_time_out={CLUSTER_TIME_OUT}",
           f"--log_dir={log_dir}", *script_args]
    proc = subprocess.Popen(cmd, cwd=out_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    return proc, log_dir


def descendants(pid):
    """Process ids below `pid` (Linux /proc; empty elsewhere)."""
    children = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill(proc):
    """Stop msrun and everything it started: msrun starts the workers with setsid (out of our process group), so
    SIGINT msrun first (its handler kills workers and scheduler), then SIGKILL whatever is left."""
    spawned = descendants(proc.pid)
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    sigkill(proc, spawned)


def sigkill(proc, pids):
    """SIGKILL `pids` (msrun's workers and scheduler), then msrun's process group."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass


def _wait(proc, deadline):
    """(returncode, output) of msrun; on timeout kills msrun, scheduler and workers and returns (None, output)."""
    try:
        output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        _kill(proc)
        output, _ = proc.communicate()
        return None, output


def run_two_workers(out_dir, script_args, timeout, during=None, workers=2):
    """Run `script_args` (a script and its arguments) as `workers` (default two) msrun workers; fail with the
    logs unless all exit 0 within `timeout` seconds. `during()` runs in this process meanwhile; its result
    is returned."""
    deadline = time.monotonic() + timeout
    port = _free_port()
    proc, log_dir = _start(out_dir, script_args, port, workers)
    try:
        result = during() if during is not None else None
    except BaseException:
        _kill(proc)
        proc.communicate()
        raise
    for attempt in range(2):
        code, output = _wait(proc, deadline)
        logs = _logs(log_dir)
        if code is None:
            print(output, "\n", logs)
            pytest.fail(f"msrun did not finish within {timeout} s (killed); logs in {log_dir} (printed above)")
        if code == 0:
            return result
        if PORT_FAILURE in logs:        # another job took the port between our check and the scheduler's bind
            if attempt == 0:
                port = _free_port()
                proc, log_dir = _start(out_dir, script_args, port, workers)
                continue
            pytest.skip(f"msrun's scheduler could not bind a local port twice (last {port}): {PORT_FAILURE}")
        print(output, "\n", logs)
        pytest.fail(f"msrun exited with code {code}; worker logs in {log_dir} (printed above)")
    return result
