"""Count the parameter-sized intermediates of a composite optimizer's compiled graph, per parameter.

On CPU, MindSpore keeps a buffer for nearly every parameter-sized op output of a composite optimizer
graph, so the step's extra memory (and much of its time) follows the number of such outputs. This script
builds ONE optimizer over ONE float32 parameter of an odd shape (so that no other tensor of the graph has
it), runs one call in GRAPH_MODE with ``save_graphs`` on, reads the kernel graphs MindSpore dumps
(``graph_build_*.ir``; a graph ``if`` puts each branch in a kernel graph of its own) and counts, per kernel
graph, the kernels whose output is a tensor of the parameter's shape: float32 ones (4 bytes an element)
and others (bool masks: 1 byte). Loads, Assigns, Depends and tuple plumbing are not kernels with buffers
of their own and are left out. Each optimizer runs in its own child process (the dump folder is per
process).

Run:  python benchmarks/count_intermediates.py [--opts Lamb-composite,AdamWeightDecay-composite]
             [--lamb '{"weight_decay_mode": "l2"}'] [--no-decay] [--list]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("GLOG_v", "3")

SHAPE = (37, 53)
# nodes of the kernel graph that own no output buffer of their own
PLUMBING = {"Load", "Depend", "UpdateState", "MakeTuple", "TupleGetItem", "Assign", "Return", "Reshape"}
_NODE = re.compile(r"\s+%\d+\(\S+\) = (\w+)\(")
_OUTPUT = re.compile(r"-> \(<Tensor\[(\w+)\], \((\d+(?:, \d+)*)\)>\)\s*$")


def count(ir_path, shape=SHAPE):
    """[(op name, output dtype)] of the kernels in `ir_path` whose output has `shape`, in graph order."""
    lines = open(ir_path, encoding="utf-8").read().splitlines()
    found = []
    for line, after in zip(lines, lines[1:]):
        node = _NODE.match(line)
        out = _OUTPUT.search(after)
        if node and out and tuple(int(x) for x in out.group(2).split(", ")) == tuple(shape):
            op = node.group(1).replace("PrimFunc_", "")
            if op not in PLUMBING:
                found.append((op, out.group(1)))
    return found


def child(kind, lamb_kwargs, decayed, folder):
    import numpy as np
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU", save_graphs=True, save_graphs_path=folder)
    name = "layer.weight" if decayed else "layer.gamma"    # gamma: not decayed by either optimizer
    param = Parameter(Tensor(np.full(SHAPE, 0.5, np.float32)), name=name)
    grads = (Tensor(np.full(SHAPE, 1e-3, np.float32)),)
    if kind == "AdamWeightDecay-composite":
        opt = nn.AdamWeightDecay([param], 1e-3, weight_decay=0.01)
        opt.use_fused_opt = False            # MindSpore's _adam_opt HyperMap graph, not P.AdamWeightDecay
    elif kind == "Lamb-composite":
        from mindspore_lamb import Lamb
        opt = Lamb([param], 1e-3, **dict(dict(weight_decay=0.01), **lamb_kwargs), backend="composite")
    else:
        raise ValueError(f"--opts: unknown optimizer {kind!r} (Lamb-composite, AdamWeightDecay-composite)")
    opt(grads)
    # one file per kernel graph (a graph `if` splits the step into several): graph_build_<graph>_<pass>.ir
    builds = sorted(f for f in os.listdir(folder) if f.startswith("graph_build_") and f.endswith(".ir"))
    return [[name.split("_")[2]] + list(op) for name in builds for op in count(os.path.join(folder, name))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--opts", default="Lamb-composite,AdamWeightDecay-composite")
    ap.add_argument("--lamb", default="{}", help="Lamb keyword arguments, as JSON (weight_decay=0.01 by default)")
    ap.add_argument("--no-decay", action="store_true", help="a parameter neither optimizer decays (a LayerNorm gamma)")
    ap.add_argument("--list", action="store_true", help="also list the ops, in graph order")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, kwargs, folder = a.child
        print(json.dumps(child(kind, json.loads(kwargs), not a.no_decay, folder)))
        return
    print(f"# one float32 parameter {SHAPE}, {'not ' if a.no_decay else ''}decayed; Lamb arguments {a.lamb}; "
          f"kernels of the compiled graph (graph_build IR) whose output has the parameter's shape")
    for kind in a.opts.split(","):
        with tempfile.TemporaryDirectory() as folder:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, a.lamb, folder]
            cmd += ["--no-decay"] if a.no_decay else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-3000:])
                raise SystemExit(f"{kind}: the child process failed")
            ops = json.loads(proc.stdout.strip().splitlines()[-1])
        for graph in sorted({g for g, _, _ in ops}, key=int):
            found = [(op, dtype) for g, op, dtype in ops if g == graph]
            f32 = sum(dtype == "Float32" for _, dtype in found)
            other = [f"{op} ({dtype})" for op, dtype in found if dtype != "Float32"]
            print(f"{kind:<28} kernel graph {graph}: {f32:>3} float32 outputs"
                  + (f" + {len(other)} more: {', '.join(other)}" if other else ""))
            if a.list:
                print("    " + " ".join(op for op, _ in found))


if __name__ == "__main__":
    main()
