"""Kill training with SIGKILL at random moments, resume it as docs/resume.md says, compare with an uninterrupted run.

    python tools/kill_resume.py                                  # 20 kill points for each case
    python tools/kill_resume.py --cases single --points 5 --seed 1

The training is tests/helpers/kill_resume_worker.py: ``Model.train`` with ``LossScaleTrainStep`` and ``Lamb``,
a learning-rate schedule, 2 accumulation steps, a dataset reshuffled every epoch with noise per (epoch, row), and a
checkpoint every 5 steps (mindspore_lamb.resume). Cases:

* ``single``: one process, killed;
* ``msrun``: two CPU workers under ``msrun``; one of them (at random) is killed, the job fails, and
  ``msrun`` is run again with ``--resume``;
* ``msrun_shard``: the same with ``Lamb(shard_state=True)`` (every worker checkpoints its half of the moments);
* ``single_8bit``: ``single`` with ``Lamb(optim_bits=8)`` (8-bit codes and block scales in the checkpoints);
* ``msrun_shard_8bit``: ``msrun_shard`` with ``optim_bits=8`` (every worker checkpoints its blocks' codes and
  scales).

Each case first runs uninterrupted (the reference, which also gives the wall time). Each kill point then
starts a fresh run and kills it at a time drawn uniformly over the reference's wall time, or, for every
fourth point, as soon as a checkpoint's partial file appears (during the write). The run is then resumed
once, and its final checkpoints (weights, ``lamb_m.*``,
``lamb_v.*``, ``global_step``, loss scale, accumulators: every entry) and per-step loss logs are compared
bit for bit with the reference's. Prints one table row per kill point; exits 1 if any differs.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = os.path.join(ROOT, "tests", "helpers")
WORKER = os.path.join(HELPERS, "kill_resume_worker.py")
sys.path.insert(0, HELPERS)
import msrun_launch  # noqa: E402
from kill_resume_worker import EVERY, TOTAL_STEPS  # noqa: E402

CASES = {"single": [], "msrun": ["--distributed"], "msrun_shard": ["--distributed", "--shard_state"],
         "single_8bit": ["--optim_bits", "8"], "msrun_shard_8bit": ["--distributed", "--shard_state", "--optim_bits", "8"]}
TIMEOUT = 300         # seconds for one run (msrun: the whole job)
JOB_FAILS = 20        # seconds msrun gets, after a worker is killed, to end the job by itself


class Run:
    """One training run (a process, or msrun and its workers) started in `out`."""

    def __init__(self, case, out, resume):
        self.case, self.out = case, out
        args = [WORKER, out] + CASES[case] + (["--resume"] if resume else [])
        self.log = os.path.join(out, f"{'resume' if resume else 'run'}_{time.monotonic_ns()}.log")
        env = dict(os.environ, GLOG_v="3", PYTHONUNBUFFERED="1")
        if not case.startswith("msrun"):
            with open(self.log, "w") as log:
                self.proc = subprocess.Popen([sys.executable] + args, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            self.log_dir = None
        else:
            self.proc, self.log_dir = msrun_launch._start(out, args, msrun_launch._free_port(), 2)
        self.start = time.monotonic()

    def workers(self):
        """{rank: pid} of the training processes (msrun: its workers, not the scheduler)."""
        if not self.case.startswith("msrun"):
            return {0: self.proc.pid}
        found = {}
        for pid in msrun_launch.descendants(self.proc.pid):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            # msrun's `tail -f worker_<r>.log` children carry the same environment: match the script too
            if env.get(b"MS_ROLE") == b"MS_WORKER" and b"RANK_ID" in env and WORKER.encode() in cmdline:
                found[int(env[b"RANK_ID"])] = pid
        return found

    def wait(self, timeout=TIMEOUT):
        """(return code or None if it had to be killed, output)."""
        try:
            if not self.case.startswith("msrun"):
                self.proc.wait(timeout=max(1.0, self.start + timeout - time.monotonic()))
                output = open(self.log).read()
            else:
                output, _ = self.proc.communicate(timeout=max(1.0, self.start + timeout - time.monotonic()))
                output += msrun_launch._logs(self.log_dir)
            return self.proc.returncode, output
        except subprocess.TimeoutExpired:
            self.stop()
            if not self.case.startswith("msrun"):
                return None, open(self.log).read()
            return None, msrun_launch._logs(self.log_dir)

    def stop(self):
        """Kill everything this run started."""
        if not self.case.startswith("msrun"):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait()
        else:
            msrun_launch._kill(self.proc)
            self.proc.communicate()


def partial_files(out):
    """Checkpoint files being written (mindspore_lamb.resume.save's `.<prefix>-<step>.partial.*`)."""
    found = []
    for root, _, names in os.walk(os.path.join(out, "ckpt")):
        found += [os.path.join(root, n) for n in names if ".partial." in n]
    return found


def last_step(out):
    """The last step in the loss logs of `out` (0: none)."""
    steps = [0]
    for name in os.listdir(out):
        if name.startswith("loss_rank") and name.endswith(".jsonl"):
            for line in open(os.path.join(out, name)).read().splitlines():
                try:
                    steps.append(json.loads(line)["step"])
                except ValueError:
                    pass
    return max(steps)


def final_state(out):
    """({rank dir/file: {name: array}} of the newest checkpoint per directory, {log name: lines}). The run id
    (``resume_run``) is left out: the uninterrupted and the resumed run are two runs."""
    import mindspore as ms
    from mindspore_lamb.resume import RUN, checkpoints
    state = {}
    ckpt_root = os.path.join(out, "ckpt")
    for rank_dir in sorted(os.listdir(ckpt_root)) if os.path.isdir(ckpt_root) else []:
        found = checkpoints(os.path.join(ckpt_root, rank_dir), "ckpt")
        if found:
            step = max(found)
            state[f"{rank_dir}/ckpt-{step}"] = {k: v.asnumpy() for k, v in ms.load_checkpoint(found[step]).items()
                                                if k != RUN}
    logs = {name: open(os.path.join(out, name)).read().splitlines() for name in sorted(os.listdir(out))
            if name.startswith("loss_rank") and name.endswith(".jsonl")}
    return state, logs


def differences(state, reference):
    """What differs between two final_state()s (empty list: bit-identical)."""
    (ckpts, logs), (ref_ckpts, ref_logs) = state, reference
    out = []
    if sorted(ckpts) != sorted(ref_ckpts):
        return [f"final checkpoints {sorted(ckpts)} instead of {sorted(ref_ckpts)}"]
    for key, ref in ref_ckpts.items():
        got = ckpts[key]
        bad = [n for n in ref if n not in got or got[n].dtype != ref[n].dtype or got[n].shape != ref[n].shape
               or got[n].tobytes() != ref[n].tobytes()]
        bad += [n for n in got if n not in ref]
        if bad:
            out.append(f"{key}: {len(bad)} of {len(ref)} entries differ, e.g. {bad[:3]}")
    for name, ref in ref_logs.items():
        if logs.get(name) != ref:
            out.append(f"{name}: {len(logs.get(name, []))} lines, not the reference's {len(ref)} "
                       f"(first difference at line {_first_difference(logs.get(name, []), ref)})")
    return out


def _first_difference(a, b):
    return next((i + 1 for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)) + 1)


def reference_run(case, work):
    """The uninterrupted run: (its final_state, wall seconds)."""
    out = os.path.join(work, f"{case}_reference")
    os.makedirs(out)
    run = Run(case, out, resume=False)
    code, output = run.wait()
    wall = time.monotonic() - run.start
    if code != 0:
        raise SystemExit(f"{case}: the uninterrupted run failed (exit {code}):\n{output[-4000:]}")
    return final_state(out), wall


def kill_point(case, work, index, reference, wall, rng, write_step=None):
    """Start a run, kill one of its training processes at a random time or, with `write_step`, while it writes
    the checkpoint of that step; resume it; compare. Returns the table row as a dict."""
    out = os.path.join(work, f"{case}_point{index}")
    os.makedirs(out)
    run = Run(case, out, resume=False)
    deadline = run.start + (TIMEOUT if write_step else rng.uniform(0.0, wall))
    partial = []
    while time.monotonic() < deadline and run.proc.poll() is None:
        if write_step:
            partial = [f for f in partial_files(out) if f".ckpt-{write_step}.partial." in f]
            if partial:
                break
            time.sleep(0.0005)
        else:
            time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
    running = run.proc.poll() is None
    workers = run.workers()
    victim = None
    if running and workers:
        # during a write: the worker whose directory holds the partial file; else any worker
        owner = [r for r in workers if partial and f"rank{r}" in partial[0]]
        victim = owner[0] if owner else rng.choice(sorted(workers))
        try:
            os.kill(workers[victim], signal.SIGKILL)
        except OSError:
            victim = None
    at = time.monotonic() - run.start
    busy = partial_files(out)
    # msrun stops the other worker; its scheduler may linger until its cluster timeout: then it is stopped
    run.wait(timeout=at + JOB_FAILS if victim is not None and case.startswith("msrun") else TIMEOUT)
    step = last_step(out)
    if victim is None:
        doing = "no worker process yet: none killed" if running else "finished before the kill"
    elif busy:
        doing = f"writing {os.path.basename(busy[0]).split('.partial')[0].lstrip('.')}.ckpt"
    elif step >= TOTAL_STEPS:
        doing = "finishing (all steps done)"
    else:
        doing = f"training, step {step + 1}" if step else "starting (before step 1)"
    if case.startswith("msrun") and victim is not None:
        doing += f" (rank {victim} killed)"
    resumed = Run(case, out, resume=True)
    code, output = resumed.wait()
    froms = [line.split("resumed from step")[1].split()[0] for line in output.splitlines() if "resumed from step" in line]
    row = {"point": index, "kill_s": at, "doing": doing, "resumed_from": froms[0] if froms else "-", "exit": code}
    row["differences"] = differences(final_state(out), reference) if code == 0 else [f"resume exited {code}:\n"
                                                                                     f"{output[-3000:]}"]
    row["identical"] = not row["differences"]
    return row


def _log(text):
    print(text, flush=True)


def run_case(case, points, work, rng, write_every=4, log=_log):
    """Reference + `points` kill points of one case; returns the rows."""
    t0 = time.monotonic()
    reference, wall = reference_run(case, work)
    log(f"\n{case}: uninterrupted run {wall:.1f} s; {points} kill points")
    log(f"| {'kill at':>8} | {'what was being done':<44} | resumed from step | identical |")
    log(f"|{'-' * 10}|{'-' * 46}|{'-' * 19}|{'-' * 11}|")
    rows = []
    for index in range(points):
        during_write = index % write_every == write_every - 1     # else at a random time
        write_step = rng.randrange(EVERY, TOTAL_STEPS, EVERY) if during_write else None
        row = kill_point(case, work, index, reference, wall, rng, write_step)
        rows.append(row)
        log(f"| {row['kill_s']:7.2f}s | {row['doing']:<44} | {row['resumed_from']:>17} | "
            f"{'yes' if row['identical'] else 'NO'} |")
        for difference in row["differences"]:
            log(f"    {difference}")
    log(f"{case}: {sum(r['identical'] for r in rows)}/{len(rows)} identical, {time.monotonic() - t0:.0f} s in all")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="single,msrun,msrun_shard", help="comma-separated, of: " + ", ".join(CASES))
    p.add_argument("--points", type=int, default=20, help="kill points per case (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times and of which worker is killed")
    p.add_argument("--workdir", help="keep the runs here (default: a temporary directory, deleted)")
    args = p.parse_args(argv)
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"--cases {args.cases}: unknown {unknown}; choose from {sorted(CASES)}")
    if args.points < 1:
        raise SystemExit(f"--points {args.points}: must be >= 1")
    work = args.workdir or tempfile.mkdtemp(prefix="kill_resume_")
    os.makedirs(work, exist_ok=True)
    rng = random.Random(args.seed)
    try:
        rows = {case: run_case(case, args.points, os.path.join(work, case), rng) for case in cases}
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    bad = sum(not r["identical"] for case_rows in rows.values() for r in case_rows)
    print(f"\n{'all identical' if not bad else f'{bad} kill points NOT identical'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
