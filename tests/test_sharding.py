"""Sharded LAMB state without workers: how the elements are cut, and merge / cut of checkpoints (any
number of workers, layers cut between workers), lossless both ways; merge takes the workers' checkpoints
in any order and refuses any set that is not all the workers' of one step. The training itself is tested
under msrun in tests/test_distributed.py and tests/test_reshard.py."""
import numpy as np
import pytest

import mindspore as ms

from mindspore_lamb import sharding
from mindspore_lamb.backends.sharded import RANK_PARAMETER, piece, piece_length

SHAPES = {"embedding": (7, 5), "dense.weight": (4, 3), "dense.bias": (3,), "norm.gamma": (3,)}


def _full_state(rng):
    state = {}
    for name, shape in SHAPES.items():
        state[name] = rng.standard_normal(shape).astype(np.float32)
        state["lamb_m." + name] = rng.standard_normal(shape).astype(np.float32)
        state["lamb_v." + name] = rng.random(shape).astype(np.float32)
    state["global_step"] = np.array([5], np.int32)
    return state


def _shards(full, world, names=tuple(SHAPES)):
    """What each of `world` workers saves, as {name: array} dicts."""
    return [{k: np.copy(sharding._array(v)) for k, v in sharding.cut_for(full, list(names), rank, world).items()}
            for rank in range(world)]


def _assert_merged_is(merged, full):
    assert sorted(merged) == sorted(full)           # no lamb_shard_*: a non-sharded Lamb loads it as it is
    for name, value in full.items():
        np.testing.assert_array_equal(merged[name].asnumpy(), value, err_msg=name)


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
    assert [shard[RANK_PARAMETER].asnumpy().tolist() for shard in shards] == [[rank, world] for rank in range(world)]
    merged = sharding.merge(shards)
    _assert_merged_is(merged, full)
    # 2 -> `other` workers: each new worker's piece is exactly its part of the full moments
    again = sharding.merge([sharding.cut_for({k: v.asnumpy() for k, v in merged.items()}, names, rank, other)
                            for rank in range(other)])
    for name, value in full.items():
        np.testing.assert_array_equal(again[name].asnumpy(), value, err_msg=name)


@pytest.mark.parametrize("world", [2, 3])
def test_merge_takes_the_workers_in_any_order(world, rng):
    full = _full_state(rng)
    _assert_merged_is(sharding.merge(_shards(full, world)[::-1]), full)


def test_merge_refuses_a_duplicate_or_missing_worker(rng):
    full = _full_state(rng)
    rank0, rank1 = _shards(full, 2)
    with pytest.raises(ValueError, match=r"ranks 0 to 1 once each, but got \['shards\[0\]: rank 0', "
                                         r"'shards\[1\]: rank 0'\]"):
        sharding.merge([rank0, rank0])
    with pytest.raises(ValueError, match=r"run of 2 workers, but \['shards\[0\]: rank 0 of 3', "
                                         r"'shards\[1\]: rank 1 of 3'\]"):
        sharding.merge(_shards(full, 3)[:2])
    with pytest.raises(ValueError, match=r"'shards\[1\]' has no 'lamb_shard_names'"):
        sharding.merge([rank0, full])


def test_merge_refuses_workers_of_different_steps_or_runs(rng):
    full = _full_state(rng)
    later = dict(full, **{name: full[name] + 0.01 for name in SHAPES}, global_step=np.array([7], np.int32))
    with pytest.raises(ValueError, match=r"same step, but their 'global_step' is \{'shards\[0\]': \[5\], "
                                         r"'shards\[1\]': \[7\]\}"):
        sharding.merge([_shards(full, 2)[0], _shards(later, 2)[1]])
    # the same step of another run: the weights differ
    other = dict(full, **{"dense.bias": full["dense.bias"] + 0.5})
    with pytest.raises(ValueError, match=r"'dense.bias' differs between 'shards\[0\]' and 'shards\[1\]' "
                                         r"\(max abs difference 0.5"):
        sharding.merge([_shards(full, 2)[0], _shards(other, 2)[1]])
    # the same parameters listed in another order: the pieces would not fit together
    reordered = _shards(full, 2, names=tuple(reversed(SHAPES)))[1]
    with pytest.raises(ValueError, match="must list the same parameters.*the same names, in another order"):
        sharding.merge([_shards(full, 2)[0], reordered])


def test_merge_of_checkpoints_saved_without_the_rank_needs_trust_order(rng):
    full = _full_state(rng)
    old = [{k: v for k, v in shard.items() if k != RANK_PARAMETER} for shard in _shards(full, 2)]
    with pytest.raises(ValueError, match=r"\['shards\[0\]', 'shards\[1\]'\] hold no 'lamb_shard_rank'.*"
                                         r"trust_order=True .*--ranks-in-order"):
        sharding.merge(old)
    _assert_merged_is(sharding.merge(old, trust_order=True), full)
    later = dict(full, global_step=np.array([6], np.int32))
    old[1]["global_step"] = later["global_step"]
    with pytest.raises(ValueError, match="same step"):          # still checked
        sharding.merge(old, trust_order=True)


def _save(state, path):
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(sharding._array(v))} for k, v in state.items()], str(path))
    return str(path)


def test_merge_command_line_any_order_and_refusals(rng, tmp_path, capsys):
    full = _full_state(rng)
    rank0, rank1 = (_save(shard, tmp_path / f"rank{r}.ckpt") for r, shard in enumerate(_shards(full, 2)))
    sharding.main(["merge", str(tmp_path / "merged.ckpt"), rank1, rank0])
    _assert_merged_is(ms.load_checkpoint(str(tmp_path / "merged.ckpt")), full)
    sharding.main(["merge", str(tmp_path / "bare"), rank0, rank1])     # MindSpore adds .ckpt: the path printed
    assert capsys.readouterr().out.strip().endswith(f"into {tmp_path / 'bare.ckpt'}")
    _assert_merged_is(ms.load_checkpoint(str(tmp_path / "bare.ckpt")), full)
    with pytest.raises(SystemExit) as exit_info:
        sharding.main(["merge", str(tmp_path / "twice.ckpt"), rank0, rank0])
    assert exit_info.value.code != 0 and not (tmp_path / "twice.ckpt").exists()
    assert f"['{rank0}: rank 0', '{rank0}: rank 0']" in capsys.readouterr().err
    old = [_save({k: v for k, v in shard.items() if k != RANK_PARAMETER}, tmp_path / f"old{r}.ckpt")
           for r, shard in enumerate(_shards(full, 2))]
    with pytest.raises(SystemExit):
        sharding.main(["merge", str(tmp_path / "old.ckpt")] + old)
    assert "--ranks-in-order" in capsys.readouterr().err and not (tmp_path / "old.ckpt").exists()
    sharding.main(["merge", str(tmp_path / "old.ckpt"), "--ranks-in-order"] + old)
    _assert_merged_is(ms.load_checkpoint(str(tmp_path / "old.ckpt")), full)


@pytest.mark.parametrize("mu_dtype", [ms.float16, ms.bfloat16])
def test_merge_and_cut_keep_a_16_bit_first_moment(mu_dtype, rng):
    """Lamb(mu_dtype=...): the pieces of lamb_m stay in the stored dtype through cut and merge, bit for bit."""
    full = _full_state(rng)
    for name in SHAPES:
        full["lamb_m." + name] = ms.Tensor(full["lamb_m." + name], mu_dtype).asnumpy()
    shards = [sharding.cut_for(full, list(SHAPES), rank, 3) for rank in range(3)]
    assert all(shard["lamb_m.shard"].dtype == mu_dtype and shard["lamb_v.shard"].dtype == ms.float32
               for shard in shards)
    merged = sharding.merge(shards)
    for name in SHAPES:
        assert merged["lamb_m." + name].dtype == mu_dtype
        np.testing.assert_array_equal(merged["lamb_m." + name].asnumpy().view(np.uint16),
                                      full["lamb_m." + name].view(np.uint16))
