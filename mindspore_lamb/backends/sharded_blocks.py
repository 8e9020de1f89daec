"""The pieces of the sharded 8-bit state (``Lamb(optim_bits=8, shard_state=True)``).

The codes of the 8-bit tensors, each padded to whole blocks of ``state.BLOCK`` elements as in the unsharded
format (``lamb_m8.<name>``: ``state.Slot.shape``) and concatenated in update order, make the padded layout
of Q elements, K = Q / BLOCK blocks. It is cut into N pieces of ``ceil(K / N)`` blocks (at least one; the
last piece padded), on block boundaries: no block straddles two workers, so each worker's piece holds the
codes of its elements and the scales of its blocks, ``lamb_m8.shard``, ``lamb_m8_scale.shard``,
``lamb_v8.shard``, ``lamb_v8_scale.shard``, and its step computes the very scales and codes of the unsharded
step. The tensors below ``min_8bit_size`` elements keep float32 moments whole on every worker, under their
unsharded names (``lamb_m.<name>``, ``lamb_v.<name>``), updated redundantly: they are tiny.
"""
import numpy as np

from mindspore import Parameter, ParameterTuple, Tensor

from ..state import BLOCK, SLOTS
from .contract import SlotState, dtype_name


def padded_sizes(sizes, eight_bit):
    """Each tensor's extent in the padded layout: its codes, whole blocks (0 for a float32 tensor)."""
    return [-(-size // BLOCK) * BLOCK if flag else 0 for size, flag in zip(sizes, eight_bit)]


def piece_blocks(sizes, eight_bit, world):
    """The blocks of each worker's piece: ceil(K / world), at least 1."""
    return max(1, -(-sum(padded_sizes(sizes, eight_bit)) // BLOCK // world))


def piece_bounds(sizes, eight_bit, rank, world):
    """(start, end): worker `rank`'s range of the padded layout (block multiples; end clipped to Q)."""
    width, total = piece_blocks(sizes, eight_bit, world) * BLOCK, sum(padded_sizes(sizes, eight_bit))
    return min(rank * width, total), min((rank + 1) * width, total)


def block_state(params, slots, eight_bit, world):
    """This worker's zero state (a contract.SlotState of the 8-bit `slots`): per slot, the piece (``<prefix>.shard``:
    codes of ``piece_blocks`` blocks, or one scale a block) first, then for ``m`` and ``v`` the float32 moments of
    the tensors that are not `eight_bit`, whole (``lamb_m.<name>``, ``lamb_v.<name>``)."""
    sizes = [int(np.prod(p.shape)) for p in params]
    blocks = piece_blocks(sizes, eight_bit, world)
    floats = {slot.role: slot for slot in SLOTS}
    tuples = []
    for slot in slots:
        length = blocks * BLOCK if slot.layout == "codes" else blocks
        zeros = np.zeros(length, np.dtype(dtype_name(slot.dtype)))         # in the slot's dtype: no float32 copy
        entries = [Parameter(Tensor(zeros), name=slot.name("shard"))]
        if slot.role in floats:
            entries += [Parameter(Tensor(np.zeros(p.shape, np.float32)), name=floats[slot.role].name(p.name))
                        for p, flag in zip(params, eight_bit) if not flag]
        tuples.append(ParameterTuple(entries))
    return SlotState(slots, tuples)


def merge_pieces(pieces, sizes, layout):
    """The unsharded entries of one 8-bit slot from the workers' pieces (in rank order): per tensor of `sizes`
    (0: a float32 tensor, None in the result), its codes (`layout` ``"codes"``) or block scales."""
    unit = BLOCK if layout == "codes" else 1
    flat = np.concatenate([np.asarray(p).reshape(-1) for p in pieces])
    out, start = [], 0
    for size in sizes:
        extent = -(-size // BLOCK) * unit
        out.append(flat[start:start + extent].copy() if size else None)
        start += extent
    return out


def cut_piece(entries, layout, rank, world, dtype):
    """Worker `rank`'s piece of one 8-bit slot from the unsharded `entries` (codes or scales of each 8-bit
    tensor, in update order; NumPy `dtype`), zero-padded."""
    unit = BLOCK if layout == "codes" else 1
    flat = np.concatenate([np.asarray(e, dtype).reshape(-1) for e in entries]) if entries else np.zeros(0, dtype)
    blocks = max(1, -(-flat.size // unit // world))
    piece = np.zeros(blocks * unit, flat.dtype)
    part = flat[rank * blocks * unit:(rank + 1) * blocks * unit]
    piece[:part.size] = part
    return piece
