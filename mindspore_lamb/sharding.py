"""Checkpoints of ``Lamb(shard_state=True)``: merge the workers' shards, cut a full checkpoint for N workers.

With ``shard_state=True`` each of N workers saves its own checkpoint (``ModelCheckpoint`` or
``ms.save_checkpoint`` on every rank): full weights, ``lamb_m.shard`` / ``lamb_v.shard`` holding that
worker's piece of the moments, and ``lamb_shard_names``. Then:

* :func:`merge` (or ``python -m mindspore_lamb.sharding merge OUT.ckpt RANK0.ckpt RANK1.ckpt ...``,
  the files in rank order) writes an ordinary checkpoint, with full moments, that a non-sharded ``Lamb``
  (or ``mindspore.nn.Lamb``) loads as it is;
* :func:`cut` turns such a full checkpoint into what one worker of a sharded run with any number of
  workers loads: ``ms.load_param_into_net(train_cell, cut(ms.load_checkpoint(path), optimizer))``.

Both directions continue training bit-identically to an uninterrupted run (tests/test_sharding.py,
tests/test_distributed.py).
"""
import argparse

import numpy as np

from mindspore import Parameter, Tensor

from .backends.sharded import NAMES_PARAMETER, piece, piece_length

PREFIXES = ("lamb_m.", "lamb_v.")


def _array(value):
    return value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)


def _names(state):
    if NAMES_PARAMETER not in state:
        raise ValueError(f"For 'sharding', the state dict has no '{NAMES_PARAMETER}': it is not from "
                         f"Lamb(shard_state=True).")
    return bytes(_array(state[NAMES_PARAMETER]).astype(np.uint8)).decode().split("\n")


def _weight_key(state, name):
    """The key of parameter `name` in `state`: the name itself, or the shortest key that ends in ".<name>"
    (a train cell built after the optimizer prefixes the network's parameter names, e.g. "network.";
    longer ones are other state about it, e.g. "accum_grad.network.<name>")."""
    if name in state:
        return name
    found = sorted((key for key in state if key.endswith("." + name) and not key.startswith(PREFIXES)), key=len)
    if not found or (len(found) > 1 and len(found[0]) == len(found[1])):
        raise ValueError(f"For 'sharding.merge', the parameter '{name}' is not in the first worker's state "
                         f"(keys ending with it: {found}).")
    return found[0]


def merge(shards):
    """One full state dict from the workers' state dicts (``ms.load_checkpoint`` results, or
    {name: array} dicts), given in rank order: ``lamb_m.<name>`` / ``lamb_v.<name>`` of every parameter,
    shaped like it, from the workers' pieces; everything else from rank 0 (identical on every worker in
    data-parallel training). Returns {name: Parameter}."""
    shards = list(shards)
    if not shards:
        raise ValueError("For 'sharding.merge', the argument 'shards' must hold one state dict per worker, "
                         "but got none.")
    names = _names(shards[0])
    skip = {NAMES_PARAMETER} | {prefix + "shard" for prefix in PREFIXES}
    merged = {name: Parameter(Tensor(_array(value)), name=name)
              for name, value in shards[0].items() if name not in skip}
    shapes = [_array(merged[_weight_key(merged, name)]).shape for name in names]
    sizes = [int(np.prod(shape)) for shape in shapes]
    total, length = sum(sizes), piece_length(sum(sizes), len(shards))
    for prefix in PREFIXES:
        pieces = [_array(shard[prefix + "shard"]).reshape(-1) for shard in shards]
        if any(piece.size != length for piece in pieces):
            raise ValueError(f"For 'sharding.merge', {len(shards)} workers of {total} elements must each hold "
                             f"{length} moments, but got {[piece.size for piece in pieces]}: are all workers' "
                             f"checkpoints there, in rank order?")
        flat = np.concatenate(pieces)[:total]
        for name, shape, start, size in zip(names, shapes, np.cumsum([0] + sizes), sizes):
            merged[prefix + name] = Parameter(Tensor(flat[start:start + size].reshape(shape).astype(np.float32)),
                                              name=prefix + name)
    return merged


def cut(state, optimizer):
    """`state` (a full state dict: ``ms.load_checkpoint`` of a merged or non-sharded checkpoint) with the
    moments cut to the piece that `optimizer` (this worker's ``Lamb(shard_state=True)``) keeps. Returns a
    new dict; load it with ``ms.load_param_into_net``."""
    if not getattr(optimizer, "shard_state", False):
        return dict(state)
    return cut_for(state, optimizer.param_names, optimizer.rank, optimizer.world)


def cut_for(state, names, rank, world):
    """`state` with ``lamb_m.<name>`` / ``lamb_v.<name>`` of `names` (the optimizer's parameter order)
    replaced by worker `rank`'s piece of `world` (``lamb_m.shard`` / ``lamb_v.shard``), and the names."""
    out = {name: value for name, value in state.items() if not name.startswith(PREFIXES)}
    sizes = [_array(state[PREFIXES[0] + name]).size for name in names]
    positions, valid, _ = piece(sizes, rank, world)
    for prefix in PREFIXES:
        flat = np.concatenate([_array(state[prefix + name]).reshape(-1) for name in names])
        values = np.where(valid > 0, flat[positions], 0.0).astype(np.float32)
        out[prefix + "shard"] = Parameter(Tensor(values), name=prefix + "shard")
    encoded = np.frombuffer("\n".join(names).encode(), np.uint8).copy()
    out[NAMES_PARAMETER] = Parameter(Tensor(encoded), name=NAMES_PARAMETER, requires_grad=False)
    return out


def main(argv=None):
    import mindspore as ms
    parser = argparse.ArgumentParser(prog="python -m mindspore_lamb.sharding", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    merge_cmd = sub.add_parser("merge", help="merge the workers' checkpoints (in rank order) into one")
    merge_cmd.add_argument("out")
    merge_cmd.add_argument("shards", nargs="+")
    args = parser.parse_args(argv)
    merged = merge(ms.load_checkpoint(path) for path in args.shards)
    ms.save_checkpoint(list(merged.values()), args.out)
    print(f"merged {len(args.shards)} worker checkpoints into {args.out}")


if __name__ == "__main__":
    main()


__all__ = ["merge", "cut"]
