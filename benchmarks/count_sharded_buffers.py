"""The output buffers of Lamb's compiled graph under msrun, plain and shard_state=True, in parameter sizes.

    python benchmarks/count_sharded_buffers.py                    # 4 msrun jobs, 2 CPU workers, small BERT shapes
    python benchmarks/count_sharded_buffers.py --configs sharded-composite --list

benchmarks/count_intermediates.py counts the parameter-sized outputs of the one-process composite graph; this
is its census for the sharded graph, which needs msrun (init() and the data-parallel group). Each
configuration runs in its own msrun job with two CPU workers; rank 0 builds Lamb over BERT-shaped parameters
(1 encoder layer, hidden 64, FFN 256, vocabulary 1000: E elements in 23 tensors, small enough to compile
quickly), calls it once with ``save_graphs`` on, and reads the kernel graphs MindSpore dumps
(``graph_build_*.ir``). Every kernel whose output is a Tensor is counted with its output bytes, by operator;
loads, assigns, reshapes, depends and tuple plumbing own no buffer and are left out, as in
count_intermediates.py. The bytes are given as multiples of the parameters' float32 bytes (4 E), which is
what they are for the element-wise work: at BERT-base shapes (E = 109.5M) one unit is 417.7 MiB. Outputs of
one to a few elements per tensor (norms, trust ratios) are a fixed cost and show up as ~0.00 units.
"""
import argparse
import collections
import json
import os
import re
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("GLOG_v", "3")

CONFIGS = ("plain-fused", "sharded-fused", "plain-composite", "sharded-composite")
PLUMBING = {"Load", "Depend", "UpdateState", "MakeTuple", "TupleGetItem", "Assign", "Return", "Reshape"}
_NODE = re.compile(r"\s+%\d+\((\S+)\) = (\w+)\(")
_TENSOR = re.compile(r"<Tensor\[(\w+)\], \(([\d, ]*)\)>")
_BYTES = {"Float32": 4, "Int32": 4, "Float16": 2, "BFloat16": 2, "Bool": 1, "Int64": 8, "Float64": 8, "UInt8": 1}


def shapes():
    from bench_step import bert_shapes
    return bert_shapes(1, 64, 256, vocab=1000, positions=64)


def census(ir_path):
    """[(op, node name, [(dtype, shape)])] of the kernels in `ir_path` with Tensor outputs."""
    lines = open(ir_path, encoding="utf-8").read().splitlines()
    found = []
    for line, after in zip(lines, lines[1:]):
        node = _NODE.match(line)
        if not node or "->" not in after:
            continue
        op = node.group(2).replace("PrimFunc_", "")
        if op in PLUMBING:
            continue
        outs = [(dtype, tuple(int(x) for x in dims.split(",") if x.strip()))
                for dtype, dims in _TENSOR.findall(after.split("->", 1)[1])]
        if outs:
            found.append((op, node.group(1), outs))
    return found


def worker(out_dir, config):
    import mindspore as ms
    from mindspore.communication import get_rank, init
    import bench_step
    from mindspore_lamb import Lamb
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    rank = get_rank()
    folder = os.path.join(out_dir, f"{config}-ir{rank}")
    ms.set_context(save_graphs=True, save_graphs_path=folder)
    bench_step.SETS["census"] = shapes
    params, grads = bench_step.build("census")
    sharded, backend = config.split("-")
    opt = Lamb(params, learning_rate=1e-7, weight_decay=0.01, shard_state=sharded == "sharded",
               backend="fused_cpu" if backend == "fused" else "composite")
    opt(grads)
    if rank:
        return
    builds = []
    for root, _, files in os.walk(folder):
        builds += [os.path.join(root, f) for f in files if f.startswith("graph_build_") and f.endswith(".ir")]
    kernels = [k for path in sorted(builds) for k in census(path)]
    result = {"config": config, "n_elems": sum(p.size for p in params), "n_params": len(params),
              "param_shapes": [list(p.shape) for p in params], "kernels": kernels}
    with open(os.path.join(out_dir, f"{config}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kind(shape, elems, param_shapes):
    """What an output of `shape` is, by size: the whole flat parameters, a worker's piece, ..."""
    n = 1
    for d in shape:
        n *= d
    piece = -(-elems // 2)
    if n == elems:
        return "all elements (E)"
    if n == piece:
        return "the piece (E/2)"
    if n == 2 * piece:
        return "two per piece element (L, 2)"
    if list(shape) in param_shapes:
        return "one parameter's shape"
    return "other"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--list", action="store_true", help="also list each operator's outputs by kind")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        worker(*a.child)
        return
    out_dir = tempfile.mkdtemp(prefix="count_sharded_buffers-")
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    print("# kernel outputs of Lamb's compiled graph (rank 0 of 2 msrun CPU workers), bytes in units of the "
          "parameters' float32 bytes (4 E)")
    for config in a.configs.split(","):
        msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
        cmd = [msrun, "--worker_num=2", "--local_worker_num=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "--join=True", "--cluster_time_out=120",
               f"--log_dir={out_dir}/logs-{config}", os.path.abspath(__file__), "--child", out_dir, config]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        with open(os.path.join(out_dir, f"{config}.json"), encoding="utf-8") as handle:
            r = json.load(handle)
        unit = 4 * r["n_elems"]
        by_op = collections.defaultdict(lambda: [0, 0])
        by_kind = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0]))
        for op, _, outs in r["kernels"]:
            for dtype, shape in outs:
                size = _BYTES.get(dtype, 4)
                for d in shape:
                    size *= d
                by_op[op][0] += 1
                by_op[op][1] += size
                by_kind[op][kind(shape, r["n_elems"], r["param_shapes"])][0] += 1
                by_kind[op][kind(shape, r["n_elems"], r["param_shapes"])][1] += size
        total = sum(b for _, b in by_op.values())
        print(f"{config}: E = {r['n_elems']} in {r['n_params']} tensors; {len(r['kernels'])} kernels, "
              f"outputs {total / unit:.2f} units")
        for op, (count, size) in sorted(by_op.items(), key=lambda x: -x[1][1]):
            if size / unit >= 0.005:
                print(f"    {op:<20}{count:>5} outputs {size / unit:>7.2f}")
                if a.list:
                    for name, (c, s) in sorted(by_kind[op].items(), key=lambda x: -x[1][1]):
                        print(f"        {name:<32}{c:>5} {s / unit:>7.2f}")
        rest = sum(s for c, s in by_op.values() if s / unit < 0.005)
        print(f"    {'(the others)':<20}{'':>5}         {rest / unit:>7.2f}")


if __name__ == "__main__":
    main()
