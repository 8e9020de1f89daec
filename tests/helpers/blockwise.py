"""The 8-bit state format, written from its definition (docs/memory.md, "The 8-bit format"), in NumPy.

A moment of N elements is cut into blocks of BLOCK consecutive elements (row-major; the last block padded with
zeros); each block has a float32 scale s, the largest |x| of the block but at least 2^-126 (0 for a block of
zeros), and r = 1 / s (0 when s = 0); each element has an 8-bit code:

* first moment (signed, int8 codes in [-127, 127]): c = sign(x) floor(127 sqrt(|x| r) + 1/2),
  read back as s (d |d|), d = c (1/127);
* second moment (unsigned, uint8 codes in [0, 255]): c = floor(255 sqrt(sqrt(x r)) + 1/2), at least 1 where
  x > 0, read back as s (d^2)^2, d = c (1/255).

Every operation is a float32 one, each rounded once (the order written above; 1/127 and 1/255 are float32).
"""
import numpy as np

BLOCK = 256
F = np.float32


def _blocks(x):
    x = np.asarray(x, F).reshape(-1)
    pad = (-x.size) % BLOCK
    return np.concatenate([x, np.zeros(pad, F)]).reshape(-1, BLOCK)


def _scales(blocks):
    """(s, r[:, None]): each block's scale and its reciprocal."""
    s = np.abs(blocks).max(axis=1).astype(F)
    s = np.where(s > 0, np.maximum(s, F(2.0 ** -126)), s).astype(F)
    with np.errstate(divide="ignore"):
        r = np.where(s > 0, F(1) / np.where(s > 0, s, F(1)), F(0)).astype(F)
    return s, r[:, None]


def quantize_signed(x):
    """(int8 codes, padded to whole blocks; float32 scales) of float32 values `x`."""
    blocks = _blocks(x)
    s, r = _scales(blocks)
    c = np.floor(np.sqrt(np.abs(blocks) * r) * F(127) + F(0.5))
    return (np.sign(blocks) * c).astype(np.int8).reshape(-1), s


def dequantize_signed(codes, scales, count):
    d = np.asarray(codes).astype(F).reshape(-1, BLOCK) * (F(1) / F(127))
    return (np.asarray(scales, F)[:, None] * (d * np.abs(d))).reshape(-1)[:count]


def quantize_unsigned(x):
    """(uint8 codes, padded to whole blocks; float32 scales) of float32 values `x` >= 0."""
    blocks = _blocks(x)
    s, r = _scales(blocks)
    c = np.floor(np.sqrt(np.sqrt(blocks * r)) * F(255) + F(0.5))
    c = np.maximum(c, (blocks > 0).astype(F))          # a positive second moment never reads back as 0
    return c.astype(np.uint8).reshape(-1), s


def dequantize_unsigned(codes, scales, count):
    d = np.asarray(codes).astype(F).reshape(-1, BLOCK) * (F(1) / F(255))
    t = d * d
    return (np.asarray(scales, F)[:, None] * (t * t)).reshape(-1)[:count]


def root_unsigned(codes, scales, count, factor):
    """sqrt(factor v) of the second moment v that `codes`, `scales` hold, as the format reads it back: sqrt(s factor)
    per block, times d^2 (d = c (1/255))."""
    d = np.asarray(codes).astype(F).reshape(-1, BLOCK) * (F(1) / F(255))
    root = np.sqrt(np.asarray(scales, F) * F(factor))
    return (root[:, None] * (d * d)).reshape(-1)[:count]


def stored_signed(x):
    """float64 `x` as the 8-bit first moment stores it (rounded to float32, quantized, read back)."""
    x = np.asarray(x)
    return dequantize_signed(*quantize_signed(x), x.size).reshape(x.shape).astype(np.float64)


def stored_unsigned(x):
    """float64 `x` >= 0 as the 8-bit second moment stores it."""
    x = np.asarray(x)
    return dequantize_unsigned(*quantize_unsigned(x), x.size).reshape(x.shape).astype(np.float64)
