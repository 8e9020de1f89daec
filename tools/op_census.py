"""Operator census of Lamb's composite graph (the path GPUs and Ascend devices take), read on a CPU.

For each configuration of ``CONFIGS`` a child process builds ``Lamb(..., backend="composite")``, runs one step in
GRAPH_MODE with ``MS_DEV_SAVE_GRAPHS=1`` and reads the ``*validate*.ir`` file MindSpore writes (the graph after the
frontend, before any backend has touched it): every operator with the dtypes of its tensor inputs and outputs.
Beside each operator it says what MindSpore's installed GPU and Ascend libraries hold for it, read from the files
(``kernels()``), not from memory:

* GPU (``lib/plugin/libmindspore_gpu.so.*``, ``lib/plugin/gpu/libcuda_ops.so.*``): whether the plugin names the
  operator (its kernel registration), and which element types the CUDA library's exported kernels are built for
  (``__half``: float16; ``__nv_bfloat16``: bfloat16).
* Ascend (``lib/plugin/libmindspore_ops_ascend.so``, ``config/op_info.config``): an ACLNN kernel (the ``aclnn*``
  function the operator maps to, ``ACLNN``, or a kernel class ``<Op>Ascend`` of MindSpore's Ascend kernels)
  against an AICPU registration only (``op_info.config``, with its dtypes). ACLNN dtypes and CANN's AI Core
  operator library live in CANN, which the wheel does not carry: not read.

A library that is absent is reported as absent. docs/operators.md holds the table; tests/test_op_census.py fails
when an operator or dtype without a native kernel on either device enters the graph (``EXCEPTIONS``: each with
its reason).

Run:  python tools/op_census.py [--configs default,groups] [--markdown] [--json FILE]
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

import mindspore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = os.path.dirname(os.path.abspath(mindspore.__file__))
PLUGIN = os.path.join(SITE, "lib", "plugin")

# name: (Lamb keyword arguments, parameter dtype); built over two parameters (a matrix and a bias)
CONFIGS = {
    "default": ({"weight_decay": 0.01}, "float32"),
    "groups+schedule": ({"groups": True, "learning_rate": "sequence"}, "float32"),
    "nvlamb": ({"weight_decay": 0.01, "max_grad_norm": 1.0}, "float32"),
    "loss_scale+exact_skip": ({"weight_decay": 0.01, "loss_scale": 1024.0, "exact_skip": True}, "float32"),
    "mu_dtype=float16": ({"weight_decay": 0.01, "mu_dtype": "float16"}, "float32"),
    "float16_params": ({"weight_decay": 0.01}, "float16"),
    "optim_bits=8": ({"weight_decay": 0.01, "optim_bits": 8, "min_8bit_size": 10}, "float32"),
    "sharded_2_workers": ({"weight_decay": 0.01, "shard_state": True}, "float32"),
}
SHARDED = "sharded_2_workers"
# IR nodes that are graph plumbing, not kernels
PLUMBING = {"Load", "UpdateState", "Depend", "MakeTuple", "TupleGetItem", "Return", "Partial", "Switch"}
# communication operators: NCCL on GPU, HCCL on Ascend (not kernels of the plugins read here)
COLLECTIVES = {"AllReduce", "AllGather", "Broadcast"}
# MindSpore operator -> the ACLNN functions it runs as on Ascend (default: aclnn<Op>); each checked in the library
ACLNN = {"Select": ("SWhere",), "Assign": ("InplaceCopy",), "AssignSub": ("InplaceSub",),
         "AssignAdd": ("InplaceAdd",), "Gather": ("GatherV2", "IndexSelect"), "Greater": ("GtTensor",),
         "GreaterEqual": ("GeTensor",), "LessScalar": ("LtScalar",), "ReduceAll": ("All",), "AddN": ("Add",),
         "Concat": ("Cat",), "RealDiv": ("Div",), "Unstack": ("SplitWithSize", "SplitTensor"),
         "FillV2": ("InplaceFillScalar",), "OnesLike": ("InplaceOne",), "ZerosLike": ("InplaceZero",),
         "NotEqual": ("NeScalar",), "Equal": ("EqScalar",), "BroadcastTo": ("Expand",)}
# operators that may be in the graph without a native kernel on a device, and why
EXCEPTIONS = {
    ("Ascend", "Reshape"): "a nop node in MindSpore's backends: only the shape changes, no kernel is launched "
                           "(its AICPU entry is not used)",
    ("Ascend", "StridedSlice"): "the sharded path (the all-gathered weights cut per parameter, the piece's "
                                "squares per parameter) and the 8-bit state of a tensor whose size is not a "
                                "multiple of 256 (its last block's padding cut off), contiguous slices of stride "
                                "1; the wheel holds no ACLNN "
                                "function for it and an AICPU registration, and MindSpore's Ascend backend takes "
                                "other ops from CANN's AI Core library (AclKernelMod), which the wheel does not "
                                "carry: benchmarks/ascend_check.sh reports where it runs",
}
DTYPES = {"Float32": "float32", "Float16": "float16", "BFloat16": "bfloat16", "Float64": "float64",
          "Bool": "bool", "Int32": "int32", "Int64": "int64"}
_NODE = re.compile(r"^\s+%\d+\(\S+\) = (\w+)\(")
_TENSOR = re.compile(r"Tensor\[(\w+)\]")


def parse_validate_ir(path):
    """{operator: set of dtype names} of the kernel nodes of a ``*validate*.ir`` file (inputs and outputs)."""
    lines = open(path, encoding="utf-8").read().splitlines()
    found = {}
    for line, after in zip(lines, lines[1:]):
        node = _NODE.match(line)
        if not node or not after.lstrip().startswith(":"):
            continue
        op = node.group(1)
        op = op[len("PrimFunc_"):] if op.startswith("PrimFunc_") else op
        if op in PLUMBING or not op[:1].isupper():
            continue
        found.setdefault(op, set()).update(DTYPES.get(t, t.lower()) for t in _TENSOR.findall(after))
    return found


def _child(name, out):
    """Build and run one configuration, in this (child) process, with the graphs saved to `out`."""
    import numpy as np
    import mindspore as ms
    from mindspore import Parameter, Tensor
    from mindspore_lamb import Lamb, WarmupPolynomialDecayLR
    from mindspore_lamb.backends import composite
    device = os.environ.get("LAMB_CENSUS_DEVICE", "CPU")
    ms.set_context(mode=ms.GRAPH_MODE, device_target=device)
    if os.environ.get("LAMB_CENSUS_GRAPH") == "Ascend":          # the graph Ascend gets, wherever it runs
        composite.SELECT_SKIP = composite.SELECT_SKIP + (device,)
    kwargs, dtype = CONFIGS[name]
    kwargs = dict(kwargs)
    if kwargs.get("shard_state"):
        from mindspore.communication import init
        init()
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    params = [Parameter(Tensor(np.full((3, 5), 0.5, dtype)), name="fc.weight"),
              Parameter(Tensor(np.full((5,), 0.5, dtype)), name="fc.bias")]
    lr = 0.01
    if kwargs.pop("learning_rate", None) == "sequence":
        lr = [0.01, 0.02, 0.03]
    if kwargs.pop("groups", False):
        params = [{"params": params[:1], "weight_decay": 0.01,
                   "lr": WarmupPolynomialDecayLR(0.01, 0.0, warmup_steps=2, decay_steps=10)},
                  {"params": params[1:], "weight_decay": 0.0}]
    opt = Lamb(params, lr, backend="composite", **kwargs)
    opt(tuple(Tensor(np.full(p.shape, 0.25, dtype)) for p in opt.params))


def census(names=None, device="CPU", graph="GPU"):
    """{configuration: {operator: set of dtypes}} of the composite graph that `graph` (a device: "GPU" or
    "Ascend", which selects where the others use MulNoNan, composite.SELECT_SKIP) gets, each configuration
    compiled and run one step in a child process on `device` (the graph read is written before any backend
    touches it, so a CPU reads the graph of either)."""
    result = {}
    for name in names or CONFIGS:
        with tempfile.TemporaryDirectory(prefix="lamb_census_") as out:
            # msrun starts each worker as `python <script>` from PATH: this interpreter's first
            env = dict(os.environ, MS_DEV_SAVE_GRAPHS="1", MS_DEV_SAVE_GRAPHS_PATH=out, GLOG_v="3",
                       LAMB_CENSUS_DEVICE=device, LAMB_CENSUS_GRAPH=graph,
                       PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
                       PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
            command = [sys.executable, os.path.abspath(__file__), "--child", name]
            if name == SHARDED:
                command = _msrun(command, out)
            done = subprocess.run(command, env=env, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=600, check=False)
            if done.returncode:
                logs = [open(path, errors="replace").read()[-3000:]
                        for path in sorted(glob.glob(os.path.join(out, "msrun_log", "worker_*.log")))]
                raise RuntimeError(f"op_census: {name!r} failed:\n" + "\n".join([done.stdout[-3000:], *logs]))
            irs = sorted(glob.glob(os.path.join(out, "**", "*validate*.ir"), recursive=True))
            if not irs:
                raise RuntimeError(f"op_census: no *validate*.ir written for {name!r} (MS_DEV_SAVE_GRAPHS)")
            ops = {}
            for path in irs:
                for op, dtypes in parse_validate_ir(path).items():
                    ops.setdefault(op, set()).update(dtypes)
            result[name] = ops
    return result


def _msrun(command, out):
    """`command` under msrun with two local CPU workers (a free local port; logs in `out`)."""
    import socket
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [msrun if os.access(msrun, os.X_OK) else "msrun", "--worker_num=2", "--local_worker_num=2",
            "--master_addr=127.0.0.1", f"--master_port={port}", "--join=True", "--cluster_time_out=60",
            f"--log_dir={os.path.join(out, 'msrun_log')}", *command[1:]]


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _count(path, needles):
    """How many times each of `needles` (bytes) occurs in the file at `path`, read in chunks."""
    counts = dict.fromkeys(needles, 0)
    tail = b""
    longest = max(len(n) for n in needles)
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 24)
            if not chunk:
                break
            block = tail + chunk
            for n in needles:
                counts[n] += block.count(n) - tail.count(n)
            tail = block[-(longest - 1):]
    return counts


def kernels(ops):
    """What the installed libraries hold for each operator of `ops`: {"GPU": {...}, "Ascend": {...}}, each with
    ``library`` (the files read, or a line saying they are absent) and, per operator, a verdict
    (``native`` / ``aicpu-only`` / ``none`` / ``collective``) with the evidence."""
    gpu_libs = sorted(glob.glob(os.path.join(PLUGIN, "libmindspore_gpu.so.*")))
    cuda_libs = sorted(glob.glob(os.path.join(PLUGIN, "gpu", "libcuda_ops.so*")))
    report = {"GPU": {"ops": {}}, "Ascend": {"ops": {}}}
    if not gpu_libs or not cuda_libs:
        report["GPU"]["library"] = "absent: no lib/plugin/libmindspore_gpu.so.* or gpu/libcuda_ops.so* in " + SITE
    else:
        plugin = _read(gpu_libs[-1])
        counts = _count(cuda_libs[-1], (b"6__half", b"bfloat16"))
        report["GPU"]["library"] = f"{os.path.relpath(gpu_libs[-1], SITE)}, {os.path.relpath(cuda_libs[-1], SITE)}"
        report["GPU"]["element_types"] = {"float16": counts[b"6__half"], "bfloat16": counts[b"bfloat16"]}
        for op in ops:
            if op in COLLECTIVES:
                report["GPU"]["ops"][op] = ("collective", "NCCL")
            elif b"\0" + op.encode() + b"\0" in plugin or f"kPrim{op}E".encode() in plugin:
                report["GPU"]["ops"][op] = ("native", "named in the GPU plugin")
            elif op.encode() + b"\0" in plugin:     # the linker shares a name's bytes with a longer one's tail
                report["GPU"]["ops"][op] = ("native", "named in the GPU plugin, as the tail of a longer name")
            else:
                report["GPU"]["ops"][op] = ("none", "not named in the GPU plugin")
    ops_lib = os.path.join(PLUGIN, "libmindspore_ops_ascend.so")
    config = os.path.join(SITE, "config", "op_info.config")
    aicpu = {}
    if os.path.exists(config):
        for line in open(config, encoding="utf-8"):
            entry = json.loads(line)
            if entry.get("imply_type") == "AiCPU":
                aicpu[entry["op_name"]] = sorted({d[0] for row in entry["dtype_format"] for d in row})
    if not os.path.exists(ops_lib):
        report["Ascend"]["library"] = f"absent: no lib/plugin/libmindspore_ops_ascend.so in {SITE}"
    else:
        library = _read(ops_lib)
        report["Ascend"]["library"] = "lib/plugin/libmindspore_ops_ascend.so, config/op_info.config"
        for op in ops:
            names = [f"aclnn{n}" for n in ACLNN.get(op, (op,))]
            found = [n for n in names if n.encode() + b"\0" in library]
            # a kernel class <Op>Ascend of MindSpore's Ascend kernels (its type name: N9mindspore6kernel...E)
            boost = re.search(rb"N9mindspore6kernel\d+[a-z_0-9]+" + f"{len(op) + 6}{op}AscendE".encode(), library)
            if op in COLLECTIVES:
                report["Ascend"]["ops"][op] = ("collective", "HCCL")
            elif found or boost:
                report["Ascend"]["ops"][op] = ("native", ", ".join(found) or f"kernel {op}Ascend")
            elif op in aicpu:
                report["Ascend"]["ops"][op] = ("aicpu-only", "AICPU " + "/".join(aicpu[op]))
            else:
                report["Ascend"]["ops"][op] = ("none", "no ACLNN, no AICPU entry")
    return report


def problems(graphs, report):
    """Lines naming each operator or dtype of `graphs` ({device: {config: {op: dtypes}}}, the census of each
    device's graph) without a native kernel on that device, less ``EXCEPTIONS``."""
    lines = []
    for device, found in graphs.items():
        for config, ops in found.items():
            for op, dtypes in sorted(ops.items()):
                verdict = report[device]["ops"].get(op, ("native", ""))[0]
                if verdict not in ("native", "collective") and (device, op) not in EXCEPTIONS:
                    lines.append(f"{config}: {op} has no native {device} kernel ({verdict})")
                lines += _dtype_problems(f"{config} ({device} graph)", op, dtypes, report)
    return lines


def _dtype_problems(where, op, dtypes, report):
    lines = []
    if "float64" in dtypes:
        lines.append(f"{where}: {op} takes float64 (AICPU only on Ascend, slow on GPU)")
    if "bfloat16" in dtypes and report["GPU"].get("element_types", {}).get("bfloat16") == 0:
        lines.append(f"{where}: {op} takes bfloat16 (no bfloat16 CUDA kernel in the GPU plugin)")
    return lines


def markdown(graphs, report):
    """The table of docs/operators.md: each operator of either device's graph, with what each device holds."""
    configs = list(dict.fromkeys(c for found in graphs.values() for c in found))
    ops = sorted({op for found in graphs.values() for ops in found.values() for op in ops})
    rows = ["| operator | dtypes | configurations | GPU | Ascend |", "|---|---|---|---|---|"]
    for op in ops:
        dtypes = sorted({d for found in graphs.values() for f in found.values() for d in f.get(op, ())})
        where = [c for c in configs if any(op in found.get(c, {}) for found in graphs.values())]
        cells = []
        for device in ("GPU", "Ascend"):
            if device in graphs and not any(op in f for f in graphs[device].values()):
                cells.append("not in its graph")
            else:
                verdict, evidence = report[device]["ops"][op]
                excepted = "; an exception, below" if (device, op) in EXCEPTIONS else ""
                cells.append(f"{verdict} ({evidence}{excepted})")
        rows.append(f"| {op} | {', '.join(dtypes)} | {'all' if where == configs else ', '.join(where)} | "
                    f"{cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", help="comma list of " + ", ".join(CONFIGS) + " (default all)")
    ap.add_argument("--markdown", action="store_true", help="print the docs table")
    ap.add_argument("--device", default="CPU", choices=("CPU", "GPU", "Ascend"),
                    help="run each configuration's step there (default CPU; benchmarks/gpu_check.sh: GPU)")
    ap.add_argument("--graphs", help="GPU, Ascend or GPU,Ascend (default): whose graph to read (Ascend's selects "
                                     "where the others use MulNoNan)")
    ap.add_argument("--json", help="also write the census to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, os.environ["MS_DEV_SAVE_GRAPHS_PATH"])
        return 0
    names = args.configs.split(",") if args.configs else None
    graphs = {graph: census(names, args.device, graph) for graph in (args.graphs or "GPU,Ascend").split(",")}
    report = kernels({op for found in graphs.values() for ops in found.values() for op in ops})
    for device in ("GPU", "Ascend"):
        print(f"# {device}: {report[device]['library']}")
    if "element_types" in report["GPU"]:
        print(f"# GPU CUDA kernels by element type: {report['GPU']['element_types']}")
    print(markdown(graphs, report) if args.markdown else
          "\n".join(f"{c} ({graph} graph): " + ", ".join(f"{op}[{'/'.join(sorted(d))}]"
                                                         for op, d in sorted(ops.items()))
                    for graph, found in graphs.items() for c, ops in found.items()))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"census": {g: {c: {op: sorted(d) for op, d in ops.items()} for c, ops in found.items()}
                                  for g, found in graphs.items()}, "kernels": report}, f, indent=1)
    lines = problems(graphs, report)
    print("\n".join(["# without a native kernel:"] + lines) if lines else "# every operator has a native kernel")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
