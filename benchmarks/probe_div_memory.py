"""What MindSpore's CPU division kernels leave allocated: Div (`x / y`) against RealDiv, the same quotients
(docs/distributed.md, "Where a sharded worker's memory goes"; backends/composite.py divides with RealDiv).

    python benchmarks/probe_div_memory.py                 # 100 MiB of float32 in 50 slices, both operators
    python benchmarks/probe_div_memory.py --mib 200 --slices 10

Each operator runs in a child process of its own (a fresh memory pool): a GRAPH_MODE cell divides the slices
of a float32 vector one after the other (each slice read after the previous quotient is summed, so one slice's
buffers are alive at a time) and sums each quotient. Reported: the child's peak RSS growth over two calls
(VmHWM, reset before the first), in MiB and in multiples of the vector's bytes, and whether both operators
gave the same sums bit for bit.
"""
import argparse
import json
import os
import subprocess
import sys

OPERATORS = ("Div", "RealDiv")


def child(operator, mib, slices):
    import numpy as np
    import mindspore as ms
    from mindspore import Tensor, nn, ops
    from mindspore.ops import functional as F
    from mindspore.ops import operations as P
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    size = mib * 2 ** 20 // 4 // slices * slices
    step = size // slices
    divide = P.Div() if operator == "Div" else P.RealDiv()

    class Quotients(nn.Cell):
        def construct(self, x):
            after, sums = x[0:1], ()
            for s in range(slices):
                part = F.depend(x, after)[s * step:(s + 1) * step]
                sums += (F.reduce_sum(divide(part, part + 2.0)),)
                after = sums[-1]
            return ops.stack(sums)

    x = Tensor(np.random.default_rng(0).random(size, dtype=np.float32))
    cell = Quotients()

    def rss():
        with open("/proc/self/status", encoding="ascii") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024

    base, _ = rss()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")
    cell(x)
    sums = cell(x).asnumpy()
    _, peak = rss()
    print(json.dumps({"operator": operator, "growth": peak - base, "bytes": size * 4, "sums": sums.tobytes().hex()}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=100, help="MiB of float32 divided")
    ap.add_argument("--slices", type=int, default=50)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.mib, a.slices)
        return
    found = {}
    for operator in OPERATORS:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", operator, "--mib", str(a.mib),
                               "--slices", str(a.slices)], stdout=subprocess.PIPE, text=True, check=True,
                              env=dict(os.environ, GLOG_v="3"))
        found[operator] = json.loads(done.stdout.strip().splitlines()[-1])
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _timing import cpu_header
    print(cpu_header())
    print(f"# {a.mib} MiB of float32 in {a.slices} slices, one at a time; peak RSS growth over two calls")
    for operator, r in found.items():
        print(f"{operator:<8}{r['growth'] / 2 ** 20:>9,.0f} MiB {r['growth'] / r['bytes']:>6.1f} x the vector")
    same = found["Div"]["sums"] == found["RealDiv"]["sums"]
    print(f"the same sums bit for bit: {same}")


if __name__ == "__main__":
    main()
