"""Peers on torch CPU: timm's Lamb vs torch.optim.Adam (fused and foreach) on BERT-base shapes.

Needs torch and timm, NOT installed in the project's venv; use a separate one:
    python -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 timm "numpy<2"
    /tmp/torchvenv/bin/python benchmarks/bench_torch_peers.py [--sets base] [--repeats 10]
Same parameter shapes and interleaving as bench_step.py (its shape builders are reused), one process.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import SETS  # noqa: E402  (pure Python: no MindSpore import at module level)


def _version(dist):
    from importlib.metadata import version
    return version(dist)


def main():
    import importlib.util
    import torch
    # timm's package __init__ imports torchvision (no wheel matches a local torch build): register bare
    # `timm` and `timm.optim` packages so that only timm/optim/lamb.py and its helpers (torch only) load.
    import types
    root = os.path.dirname(importlib.util.find_spec("timm").origin)
    for name, path in (("timm", root), ("timm.optim", os.path.join(root, "optim"))):
        pkg = types.ModuleType(name)
        pkg.__path__ = [path]
        sys.modules[name] = pkg
    import importlib
    timm_lamb = importlib.import_module("timm.optim.lamb")
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="base")
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    print(f"# torch {torch.__version__}, timm {_version('timm')}, {torch.get_num_threads()} threads")
    for set_name in a.sets.split(","):
        g = torch.Generator().manual_seed(0)
        params = []
        for name, shape in SETS[set_name]():
            p = torch.nn.Parameter((torch.rand(shape, generator=g) - 0.5) * 0.04)
            p.grad = (torch.rand(shape, generator=g) - 0.5) * 1e-3
            params.append(p)
        opts = {
            "timm.optim.Lamb": timm_lamb.Lamb(params, lr=1e-7, weight_decay=0.01),
            "torch Adam (fused)": torch.optim.Adam(params, lr=1e-7, fused=True),
            "torch Adam (foreach)": torch.optim.Adam(params, lr=1e-7, foreach=True),
            "torch AdamW (fused)": torch.optim.AdamW(params, lr=1e-7, weight_decay=0.01, fused=True),
        }
        kinds = list(opts)
        for k in kinds:
            opts[k].step()
            opts[k].step()
        times = {k: [] for k in kinds}
        for r in range(a.repeats):
            for k in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                t0 = time.perf_counter()
                opts[k].step()
                times[k].append(time.perf_counter() - t0)
        ref = statistics.median(times["torch Adam (fused)"])
        n = sum(p.numel() for p in params)
        print(f"\n== set {set_name}: {len(params)} tensors, {n / 1e6:.1f}M parameters")
        for k in kinds:
            med = statistics.median(times[k])
            print(f"{k:<24}{med * 1e3:>9.1f} ms  min {min(times[k]) * 1e3:>8.1f}  x torch fused Adam {med / ref:.2f}")


if __name__ == "__main__":
    main()
