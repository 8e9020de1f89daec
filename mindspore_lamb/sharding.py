"""Checkpoints of ``Lamb(shard_state=True)``: merge the workers' shards, cut a full checkpoint for N workers.

With ``shard_state=True`` each of N workers saves its own checkpoint (``ModelCheckpoint`` or
``ms.save_checkpoint`` on every rank): full weights, ``lamb_m.shard`` / ``lamb_v.shard`` holding that
worker's piece of the moments, ``lamb_shard_names`` and ``lamb_shard_rank`` ([rank, world]). Then:

* :func:`merge` (or ``python -m mindspore_lamb.sharding merge OUT.ckpt RANK0.ckpt RANK1.ckpt ...``,
  the files in any order) checks that the checkpoints are all the workers' of one step (by
  ``lamb_shard_rank``, ``global_step`` and the weights) and writes an ordinary checkpoint, with full
  moments, that a non-sharded ``Lamb`` (or ``mindspore.nn.Lamb``) loads as it is;
* :func:`cut` turns such a full checkpoint into what one worker of a sharded run with any number of
  workers loads: ``ms.load_param_into_net(train_cell, cut(ms.load_checkpoint(path), optimizer))``.

With ``optim_bits=8`` the pieces are ``lamb_m8.shard``, ``lamb_m8_scale.shard``, ``lamb_v8.shard`` and
``lamb_v8_scale.shard`` (cut on block boundaries: backends/sharded_blocks.py), and the tensors below
``min_8bit_size`` keep ``lamb_m.<name>`` / ``lamb_v.<name>`` whole on every worker: :func:`merge` gives the
unsharded 8-bit checkpoint, :func:`cut` the workers' pieces.

Both are lossless, bit for bit (tests/test_sharding.py, tests/test_optim_bits_sharded.py); training resumed from them on another number
of workers matches the uninterrupted run within float32 rounding (docs/distributed.md, "Resharding on
resume"; tests/test_reshard.py).
"""
import argparse
import os
import sys
from typing import Dict, Mapping, Sequence, Union

import numpy as np

from mindspore import Parameter, Tensor
from mindspore.nn import Cell

from ._files import CheckpointError, load
from .backends import sharded_blocks
from .backends.contract import dtype_name
from .backends.sharded import NAMES_PARAMETER, RANK_PARAMETER, names_record, piece, piece_length, shard_record
from .state import SLOTS, SLOTS_8BIT


def _array(value):
    return value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)


def _names(state):
    return bytes(_array(state[NAMES_PARAMETER]).astype(np.uint8)).decode().split("\n")


def slot_prefixes(state, name):
    """The prefixes of the LAMB state slots that `state` holds for parameter `name` (or ``"shard"``): ``lamb_m``,
    ``lamb_v``, ... of every ``lamb_<role>.<name>`` entry, in the order of `state`."""
    return tuple(key[:-len(name) - 1] for key in state
                 if key.startswith("lamb_") and key.endswith("." + name) and "." not in key[:-len(name) - 1])


def _weight_key(state, name):
    """The key of parameter `name` in `state`: the name itself, or the shortest key that ends in ".<name>"
    (a train cell built after the optimizer prefixes the network's parameter names, e.g. "network.";
    longer ones are other state about it, e.g. "accum_grad.network.<name>")."""
    if name in state:
        return name
    slots = {f"{prefix}.{name}" for prefix in slot_prefixes(state, name)}
    found = sorted((key for key in state if key.endswith("." + name) and key not in slots), key=len)
    if not found or (len(found) > 1 and len(found[0]) == len(found[1])):
        raise ValueError(f"For 'sharding', the parameter '{name}' of '{NAMES_PARAMETER}' is not in the state "
                         f"(keys ending with it: {found}).")
    return found[0]


def _load(shards):
    """[(label, state)]: state dicts as they are, paths loaded with their CRC checked (label: the path)."""
    out = []
    for index, shard in enumerate(shards):
        if isinstance(shard, (str, os.PathLike)):
            try:
                out.append((os.fspath(shard), load(os.fspath(shard))))
            except CheckpointError as err:
                raise ValueError(f"For 'sharding.merge', {err}.") from None
        else:
            out.append((f"shards[{index}]", shard))
    return out


def _in_rank_order(shards, trust_order):
    """`shards` ([(label, state)]) sorted by their recorded rank, after checking that the records name
    ranks 0..N-1 of a world of N once each; without records, as given if `trust_order`."""
    world = len(shards)
    records = [tuple(int(x) for x in _array(state[RANK_PARAMETER]).reshape(-1)) if RANK_PARAMETER in state
               else None for _, state in shards]
    unrecorded = [label for (label, _), record in zip(shards, records) if record is None]
    if unrecorded and not trust_order:
        raise ValueError(f"For 'sharding.merge', {unrecorded} hold no '{RANK_PARAMETER}' (saved before Lamb "
                         f"recorded each worker's rank), so their order cannot be checked. If all the workers' "
                         f"checkpoints are given in rank order, pass trust_order=True (command line: merge "
                         f"--ranks-in-order ...).")
    # trusted order: a checkpoint without a record is the rank of its place
    records = [record or (index, world) for index, record in enumerate(records)]
    wrong_world = [f"{label}: rank {r} of {w}" for (label, _), (r, w) in zip(shards, records) if w != world]
    if wrong_world:
        raise ValueError(f"For 'sharding.merge', {world} checkpoints were given, so each must be from a run of "
                         f"{world} workers, but {wrong_world}: are all the workers' checkpoints there?")
    ranks = [rank for rank, _ in records]
    if sorted(ranks) != list(range(world)):
        got = [f"{label}: rank {rank}" for (label, _), rank in zip(shards, ranks)]
        raise ValueError(f"For 'sharding.merge', the checkpoints must hold ranks 0 to {world - 1} once each, but "
                         f"got {got}.")
    return [shard for _, shard in sorted(zip(ranks, shards), key=lambda pair: pair[0])]


def _check_same_run_and_step(shards, names):
    """The workers' checkpoints are of one run and one step: the same parameter names, global_step and
    weights (data parallel: every worker holds the same weights after each step)."""
    (first, state0), others = shards[0], shards[1:]
    for label, state in others:
        if _names(state) != names:
            differ = sorted(set(_names(state)) ^ set(names)) or "the same names, in another order"
            raise ValueError(f"For 'sharding.merge', every worker's checkpoint must list the same parameters, "
                             f"but '{first}' ({len(names)}) and '{label}' ({len(_names(state))}) differ: {differ}.")
    steps = {label: _array(state["global_step"]).reshape(-1).tolist() if "global_step" in state else None
             for label, state in shards}
    if len({str(step) for step in steps.values()}) > 1:
        raise ValueError(f"For 'sharding.merge', the workers' checkpoints must be of the same step, but their "
                         f"'global_step' is {steps}.")
    for name in names:
        weight = _array(state0[_weight_key(state0, name)])
        for label, state in others:
            other = _array(state[_weight_key(state, name)])
            if other.shape != weight.shape or not np.array_equal(other, weight, equal_nan=True):
                gap = (np.abs(other.astype(np.float64) - weight.astype(np.float64)).max()
                       if other.shape == weight.shape else f"shapes {weight.shape} and {other.shape}")
                raise ValueError(f"For 'sharding.merge', the weights must be identical on every worker (data "
                                 f"parallel), but '{name}' differs between '{first}' and '{label}' (max abs "
                                 f"difference {gap}): checkpoints of different runs or steps?")


def merge(shards: Sequence[Union[str, os.PathLike, Mapping[str, object]]], *,
          trust_order: bool = False) -> Dict[str, Parameter]:
    """One full state dict from the workers' checkpoints: paths, ``ms.load_checkpoint`` results or
    {name: array} dicts, in any order. Each worker's ``lamb_shard_rank`` gives its place; the checkpoints
    must hold ranks 0..N-1 of N workers once each, at the same ``global_step``, with the same parameter
    names and identical weights, else ValueError naming them. Checkpoints without ``lamb_shard_rank``
    (saved before it existed) are refused unless `trust_order` is True: then they are taken in the order
    given, still checked for step, names and weights.

    The result holds ``lamb_m.<name>`` / ``lamb_v.<name>`` of every parameter (each slot the checkpoints
    hold: every ``lamb_<role>.shard`` entry), shaped like it, in the dtype the workers stored it in, from the
    workers' pieces, and everything else from rank 0. Returns {name: Parameter}."""
    shards = _load(shards)
    if not shards:
        raise ValueError("For 'sharding.merge', the argument 'shards' must hold one state dict per worker, "
                         "but got none.")
    for label, state in shards:
        if NAMES_PARAMETER not in state:
            raise ValueError(f"For 'sharding.merge', '{label}' has no '{NAMES_PARAMETER}': it is not a "
                             f"checkpoint of Lamb(shard_state=True).")
    shards = _in_rank_order(shards, trust_order)
    names = _names(shards[0][1])
    _check_same_run_and_step(shards, names)
    prefixes = slot_prefixes(shards[0][1], "shard")
    skip = {NAMES_PARAMETER, RANK_PARAMETER} | {f"{prefix}.shard" for prefix in prefixes}
    merged = {name: Parameter(Tensor(_array(value)), name=name)
              for name, value in shards[0][1].items() if name not in skip}
    shapes = [_array(merged[_weight_key(merged, name)]).shape for name in names]
    sizes = [int(np.prod(shape)) for shape in shapes]
    if SLOTS_8BIT[0].name("shard") in skip:
        return _merge_8bit(shards, merged, names, sizes)
    total, length = sum(sizes), piece_length(sum(sizes), len(shards))
    for prefix in prefixes:
        pieces = [_array(state[f"{prefix}.shard"]).reshape(-1) for _, state in shards]
        if any(piece.size != length for piece in pieces):
            raise ValueError(f"For 'sharding.merge', {len(shards)} workers of {total} elements must each hold "
                             f"{length} moments, but got { {label: p.size for (label, _), p in zip(shards, pieces)} }"
                             f": are all the workers' checkpoints there?")
        flat = np.concatenate(pieces)[:total]
        for name, shape, start, size in zip(names, shapes, np.cumsum([0] + sizes), sizes):
            merged[f"{prefix}.{name}"] = Parameter(Tensor(flat[start:start + size].reshape(shape).copy()),
                                                   name=f"{prefix}.{name}")
    return merged


def _merge_8bit(shards, merged, names, sizes):
    """merge() of the 8-bit state (optim_bits=8, backends/sharded_blocks.py): each slot's pieces into the codes or
    scales of every 8-bit tensor (``lamb_m8.<name>``, ...); the float32 tensors' moments, whole on every worker,
    checked to be the same there, with the unused scale (one 0) the unsharded state holds for them."""
    floats = [slot.name(name) for name in names for slot in SLOTS if slot.name(name) in merged]
    (first, state0), others = shards[0], shards[1:]
    for key in floats:
        for label, state in others:
            if key not in state or not np.array_equal(_array(state[key]), _array(state0[key]), equal_nan=True):
                raise ValueError(f"For 'sharding.merge', every worker keeps the float32 moments of the tensors below "
                                 f"min_8bit_size whole, identical, but '{key}' differs between '{first}' and "
                                 f"'{label}': checkpoints of different runs or steps?")
    eight_bit = [SLOTS[0].name(name) not in merged for name in names]
    kept = [size if flag else 0 for size, flag in zip(sizes, eight_bit)]
    blocks = sharded_blocks.piece_blocks(sizes, eight_bit, len(shards))
    for slot in SLOTS_8BIT:
        pieces = [_array(state[slot.name("shard")]).reshape(-1) for _, state in shards]
        length = blocks * (sharded_blocks.BLOCK if slot.layout == "codes" else 1)
        if any(p.size != length for p in pieces):
            raise ValueError(f"For 'sharding.merge', {len(shards)} workers must each hold {length} entries of "
                             f"'{slot.name('shard')}', but got { {label: p.size for (label, _), p in zip(shards, pieces)} }"
                             f": are all the workers' checkpoints there?")
        entries = sharded_blocks.merge_pieces(pieces, kept, slot.layout)
        for name, flag, values in zip(names, eight_bit, entries):
            if not flag and slot.layout == "scales":
                values = np.zeros(1, np.float32)            # the scale a float32 tensor holds unused
            if values is not None:
                merged[slot.name(name)] = Parameter(Tensor(values), name=slot.name(name))
    return merged


def cut(state: Mapping[str, object], optimizer: Cell) -> Dict[str, object]:
    """`state` (a full state dict: ``ms.load_checkpoint`` of a merged or non-sharded checkpoint) with the
    moments cut to the piece that `optimizer` (this worker's ``Lamb(shard_state=True)``) keeps. Returns a
    new dict; load it with ``ms.load_param_into_net``."""
    if not getattr(optimizer, "shard_state", False):
        return dict(state)
    names = optimizer.param_names
    holds = "8-bit" if any(SLOTS_8BIT[1].name(name) in state for name in names) else "float"
    keeps = "8-bit" if optimizer.backend.slots.quantized else "float"
    if holds != keeps:            # the other format's pieces would not load, and the state would stay zero
        raise ValueError(f"For 'sharding.cut', the argument 'state' holds {holds} moments, but the optimizer keeps "
                         f"{keeps} state (optim_bits={optimizer.optim_bits}): cut a checkpoint of the same "
                         f"optim_bits (docs/memory.md).")
    return cut_for(state, names, optimizer.backend.rank, optimizer.backend.world)


def cut_for(state, names, rank, world):
    """`state` with ``lamb_m.<name>`` / ``lamb_v.<name>`` of `names` (the optimizer's parameter order; each slot
    `state` holds) replaced by worker `rank`'s piece of `world` (``lamb_m.shard`` / ``lamb_v.shard``, in the
    dtype `state` holds them in), the names and ``lamb_shard_rank``."""
    if any(SLOTS_8BIT[1].name(name) in state for name in names):      # every tensor of 8-bit state has a scale
        return _cut_8bit(state, names, rank, world)
    prefixes = slot_prefixes(state, names[0])
    slot_entries = {f"{prefix}.{name}" for prefix in prefixes for name in names}
    out = {name: value for name, value in state.items() if name not in slot_entries}
    if not prefixes:
        raise ValueError(f"For 'sharding.cut', the argument 'state' must hold LAMB's moments of every parameter, but "
                         f"it has none of '{names[0]}' (no 'lamb_m.{names[0]}').")
    sizes = [_array(state[f"{prefixes[0]}.{name}"]).size for name in names]
    positions, valid, _ = piece(sizes, rank, world)
    for prefix in prefixes:
        values = np.concatenate([_array(state[f"{prefix}.{name}"]).reshape(-1) for name in names])[positions]
        values[valid == 0] = 0                                  # the padding
        out[f"{prefix}.shard"] = Parameter(Tensor(values), name=f"{prefix}.shard")
    out[NAMES_PARAMETER] = names_record(names)
    out[RANK_PARAMETER] = shard_record(rank, world)
    return out


def _cut_8bit(state, names, rank, world):
    """cut_for() of the 8-bit state: worker `rank`'s piece of the codes and scales of the 8-bit tensors (those with
    ``lamb_m8.<name>``), cut on block boundaries (backends/sharded_blocks.py); the float32 tensors' moments whole,
    their unused scales left out."""
    eight_bit = [name for name in names if SLOTS_8BIT[0].name(name) in state]
    out = {key: value for key, value in state.items()
           if key not in {slot.name(name) for slot in SLOTS_8BIT for name in names}}
    for slot in SLOTS_8BIT:
        values = sharded_blocks.cut_piece([_array(state[slot.name(name)]) for name in eight_bit], slot.layout,
                                          rank, world, np.dtype(dtype_name(slot.dtype)))
        out[slot.name("shard")] = Parameter(Tensor(values), name=slot.name("shard"))
    out[NAMES_PARAMETER] = names_record(names)
    out[RANK_PARAMETER] = shard_record(rank, world)
    return out


def main(argv=None):
    import mindspore as ms
    parser = argparse.ArgumentParser(prog="python -m mindspore_lamb.sharding", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    merge_cmd = sub.add_parser("merge", help="merge the workers' checkpoints (any order) into one")
    merge_cmd.add_argument("out")
    merge_cmd.add_argument("shards", nargs="+")
    merge_cmd.add_argument("--ranks-in-order", action="store_true",
                           help="checkpoints saved without lamb_shard_rank: take them as given, rank 0 first")
    args = parser.parse_args(argv)
    try:
        merged = merge(args.shards, trust_order=args.ranks_in_order)
    except ValueError as err:           # nothing is written
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    # ms.save_checkpoint adds .ckpt to a name without it: say the path it writes
    out = args.out if args.out.endswith(".ckpt") else args.out + ".ckpt"
    ms.save_checkpoint(list(merged.values()), out)
    print(f"merged {len(args.shards)} worker checkpoints into {out}")


if __name__ == "__main__":
    main()


__all__ = ["merge", "cut"]
