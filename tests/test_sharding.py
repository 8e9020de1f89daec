"""Sharded LAMB state without workers: how the elements are cut, and merge / cut of checkpoints (any
number of workers, layers cut between workers), lossless both ways. The training itself is tested under
msrun in tests/test_distributed.py."""
import numpy as np
import pytest

from mindspore_lamb import sharding
from mindspore_lamb.backends.sharded import piece, piece_length

SHAPES = {"embedding": (7, 5), "dense.weight": (4, 3), "dense.bias": (3,), "norm.gamma": (3,)}


def _full_state(rng):
    state = {}
    for name, shape in SHAPES.items():
        state[name] = rng.standard_normal(shape).astype(np.float32)
        state["lamb_m." + name] = rng.standard_normal(shape).astype(np.float32)
        state["lamb_v." + name] = rng.random(shape).astype(np.float32)
    state["global_step"] = np.array([5], np.int32)
    return state


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_pieces_cover_every_element_once_balanced_by_elements(world):
    sizes = [int(np.prod(s)) for s in SHAPES.values()]
    total = sum(sizes)
    seen = []
    for rank in range(world):
        positions, valid, owner = piece(sizes, rank, world)
        assert len(positions) == piece_length(total, world)
        seen += positions[valid > 0].tolist()
        assert (owner[valid == 0] == len(sizes)).all()
    assert seen == list(range(total))                 # in order, each once: pieces differ by < 1 piece


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("other", [1, 2, 3, 5])
def test_merge_then_cut_for_another_worker_count_is_lossless(world, other, rng):
    full = _full_state(rng)
    names = list(SHAPES)
    shards = [sharding.cut_for(full, names, rank, world) for rank in range(world)]
    merged = sharding.merge(shards)
    for name, value in full.items():
        np.testing.assert_array_equal(merged[name].asnumpy(), value, err_msg=name)
    # 2 -> `other` workers: each new worker's piece is exactly its part of the full moments
    again = sharding.merge([sharding.cut_for({k: v.asnumpy() for k, v in merged.items()}, names, rank, other)
                            for rank in range(other)])
    for name, value in full.items():
        np.testing.assert_array_equal(again[name].asnumpy(), value, err_msg=name)


def test_merge_refuses_a_missing_worker(rng):
    full = _full_state(rng)
    shards = [sharding.cut_for(full, list(SHAPES), rank, 3) for rank in range(3)]
    with pytest.raises(ValueError, match="in rank order"):
        sharding.merge(shards[:2])
    with pytest.raises(ValueError, match="lamb_shard_names"):
        sharding.merge([full])
