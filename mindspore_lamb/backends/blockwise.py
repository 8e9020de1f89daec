"""The 8-bit state in primitive operators: block-wise quantization of a moment (``optim_bits=8``).

A moment of N elements is read as blocks of ``state.BLOCK`` consecutive elements (row-major, the last block
padded with zeros); each block has a float32 scale s, the largest magnitude of the block but at least 2^-126
(so that r = 1 / s is finite), and each element an 8-bit code (docs/memory.md, "The 8-bit format"):

* first moment m, signed, int8 codes in [-127, 127]: c = sign(m) floor(127 sqrt(|m| r) + 1/2), read back as
  s (d |d|) with d = c (1/127);
* second moment v, unsigned, uint8 codes in [0, 255]: c = floor(255 sqrt(sqrt(v r)) + 1/2), at least 1 where
  v > 0 (a positive v never reads back as 0, which would make the update m / eps), read back as s (d^2)^2 with
  d = c (1/255).

Every operation is float32, in this order (the fused CPU kernel does the same ones; 1/127 and 1/255 are float32
constants, and 127 (1/127) = 255 (1/255) = 1 exactly): the codes are a function of the moment, deterministic,
and a moment read back and stored again keeps its codes and scale (the largest element of a block has code
+-127 or 255, which reads back as s exactly). A block of zeros has s = 0, r = 0, codes 0.
"""
import numpy as np

import mindspore.common.dtype as mstype
from mindspore import Tensor
from mindspore.ops import functional as F
from mindspore.ops import operations as P

from .._ops import cast, where
from ..state import BLOCK

_abs = P.Abs()
_sign = P.Sign()
_floor = P.Floor()
_max_per_block = P.ReduceMax(keep_dims=True)
_concat = P.Concat()
_HALF = Tensor(0.5, mstype.float32)
_MIN_SCALE = Tensor(2.0 ** -126, mstype.float32)           # the smallest scale: its reciprocal is finite
# the largest code of each map (int8, signed: 127; uint8, unsigned: 255) and its float32 reciprocal
_LEVELS = {True: 127.0, False: 255.0}
_STEP = {signed: Tensor(np.float32(1.0) / np.float32(levels), mstype.float32) for signed, levels in _LEVELS.items()}


def _count(shape):
    count = 1
    for size in shape:
        count *= size
    return count


def _blocks(x):
    """float32 `x` of any shape as (blocks, BLOCK), zero-padded."""
    count = _count(F.shape(x))
    flat = F.reshape(x, (count,))
    pad = (-count) % BLOCK
    if pad:
        flat = _concat((flat, F.zeros((pad,), mstype.float32)))
    return F.reshape(flat, ((count + pad) // BLOCK, BLOCK))


def quantize(x, signed):
    """(codes, scales) of float32 `x` (signed: the first moment's map, int8; else the second moment's, uint8):
    codes flat, padded to whole blocks; scales float32, one per block."""
    blocks = _blocks(x)
    magnitude = _abs(blocks) if signed else blocks
    largest = _max_per_block(magnitude, 1)                                # the block's largest |x|
    scale = where(largest > 0.0, F.maximum(largest, _MIN_SCALE), largest)   # s (0: a block of zeros)
    inverse = where(scale > 0.0, 1.0 / where(scale > 0.0, scale, F.ones_like(scale)), F.zeros_like(scale))
    root = F.sqrt(magnitude * inverse)                                    # r = 1 / s (0: codes 0)
    if not signed:
        root = F.sqrt(root)                                               # (v / s)^(1/4)
    codes = _floor(root * _LEVELS[signed] + _HALF)
    if signed:
        codes = codes * _sign(blocks)
    else:
        codes = F.maximum(codes, cast(blocks > 0.0, mstype.float32))      # v > 0 never reads back as 0
    dtype = mstype.int8 if signed else mstype.uint8
    return cast(F.reshape(codes, (-1,)), dtype), F.reshape(scale, (-1,))


def dequantize(codes, scale, shape, signed):
    """The float32 moment of `shape` that `codes` and `scale` (:func:`quantize`) hold."""
    d = F.reshape(cast(codes, mstype.float32), (-1, BLOCK)) * _STEP[signed]
    if signed:
        t = d * _abs(d)                                                   # (c / 127) |c / 127|
    else:
        t = d * d
        t = t * t                                                         # ((c / 255)^2)^2
    x = F.reshape(F.reshape(scale, (-1, 1)) * t, (-1,))
    count = _count(shape)
    if count % BLOCK:
        x = x[:count]
    return F.reshape(x, shape)
