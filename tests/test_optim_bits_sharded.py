"""Lamb(optim_bits=8, shard_state=True): each worker keeps its piece of the 8-bit state (docs/memory.md).

Under msrun (tests/helpers/shard8_worker.py, two CPU workers, the fused kernels), the sharded 8-bit step is held
bit for bit to the unsharded 8-bit step on the same gradients, step by step: weights, codes, block scales and
the float32 moments of the small tensors, with the default bucket and with buckets of two blocks; the workers'
checkpoints merge into the unsharded checkpoint, and the unsharded one cuts into theirs, bit for bit.
In one process (no msrun; the worker's rank given): the pieces' layout, merge and cut for 1 to 5 workers, the
refusals.
"""
import os

import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor

import shard8_worker as W
from msrun_launch import run_two_workers
from mindspore_lamb import Lamb, check_state, sharding, state
from mindspore_lamb.backends import sharded
from mindspore_lamb.resume import STEP, _verified

HELPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers")
LAUNCH_TIMEOUT = 300
EIGHT_BIT = [state.SLOTS_8BIT[k].prefix for k in range(4)]       # lamb_m8, lamb_m8_scale, lamb_v8, lamb_v8_scale


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("msrun_sharded_8bit"))
    os.environ["MINDSPORE_LAMB_FUSED"] = "1"                       # inherited by msrun
    try:
        run_two_workers(out_dir, [os.path.join(HELPERS, "shard8_worker.py"), out_dir], LAUNCH_TIMEOUT)
    finally:
        os.environ.pop("MINDSPORE_LAMB_FUSED", None)
    return out_dir


def _at(record, label, step):
    prefix = f"{label}.{step}."
    return {key[len(prefix):]: value for key, value in record.items() if key.startswith(prefix)}


def _piece_of(full, rank, size):
    """Worker `rank`'s piece of `size` entries of the concatenated unsharded entries, zero-padded."""
    out = np.zeros(size, full.dtype)
    part = full[rank * size:(rank + 1) * size]
    out[:part.size] = part
    return out


def _check_bit_identical(ranks, config):
    """Every step (one of them with a NaN gradient, skipped): the sharded workers' weights equal the unsharded
    optimizer's, their pieces of the codes and scales equal the unsharded codes and scales cut at the same
    blocks, and the small tensors' float32 moments are the same, bit for bit."""
    eight_bit = [name for name, shape in W.SHAPES if np.prod(shape) >= W.min_size(config)]
    floats = [name for name, _ in W.SHAPES if name not in eight_bit]
    for step in range(W.STEPS):
        for rank, record in enumerate(ranks):
            plain = _at(record, "plain", step)
            for label in ("sharded", "bucketed"):
                ours, where = _at(record, label, step), f"{config}, {label}, rank {rank}, step {step}"
                for name, _ in W.SHAPES:
                    np.testing.assert_array_equal(ours[name], plain[name], err_msg=f"{where}: {name}")
                for name in floats:
                    for prefix in ("lamb_m", "lamb_v"):
                        np.testing.assert_array_equal(ours[f"{prefix}.{name}"], plain[f"{prefix}.{name}"],
                                                      err_msg=f"{where}: {prefix}.{name}")
                for prefix in EIGHT_BIT:
                    piece = ours[f"{prefix}.shard"]
                    full = np.concatenate([plain[f"{prefix}.{name}"] for name in eight_bit] + [piece[:0]])
                    assert piece.dtype == full.dtype
                    np.testing.assert_array_equal(piece, _piece_of(full, rank, piece.size),
                                                  err_msg=f"{where}: {prefix}.shard")


@pytest.mark.distributed
@pytest.mark.parametrize("config", sorted(W.CONFIGS))
def test_sharded_8bit_is_bit_identical_to_unsharded(launched, config):
    """_check_bit_identical, two workers; and not vacuous (below)."""
    ranks = [dict(np.load(os.path.join(launched, f"{config}_rank{r}.npz"))) for r in range(2)]
    _check_bit_identical(ranks, config)
    if config == "small":                                           # no 8-bit tensor: a piece of one empty block
        assert not _at(ranks[0], "sharded", W.STEPS - 1)["lamb_m8_scale.shard"].any()
        return
    # not vacuous: 13 blocks, 7 a worker, b.weight (blocks 6 to 9) cut between them; the weights move, except at
    # the NaN step; there the moments move (all but the NaN element's), except with max_grad_norm ("general"),
    # whose G is known before the update: the whole step is skipped
    last = _at(ranks[1], "sharded", W.STEPS - 1)
    assert last["lamb_m8.shard"].size == 7 * state.BLOCK and last["lamb_m8_scale.shard"].size == 7
    assert last["lamb_m8_scale.shard"][:6].all() and not last["lamb_m8_scale.shard"][6:].any()   # 6 of 7 real
    before, at_nan = _at(ranks[0], "plain", W.NAN_STEP - 1), _at(ranks[0], "plain", W.NAN_STEP)
    for name, _ in W.SHAPES:
        np.testing.assert_array_equal(at_nan[name], before[name])
        assert not np.array_equal(last[name], before[name])
    moved = not np.array_equal(at_nan["lamb_m8.b.weight"], before["lamb_m8.b.weight"])
    assert moved == ("max_grad_norm" not in W.CONFIGS[config])


@pytest.mark.slow
@pytest.mark.distributed
def test_sharded_8bit_three_workers_is_bit_identical_to_unsharded(tmp_path, monkeypatch):
    """Three workers: 13 blocks cut 5 / 5 / 3 (the last piece padded), b.weight and c.weight cut between workers."""
    monkeypatch.setenv("MINDSPORE_LAMB_FUSED", "1")
    run_two_workers(str(tmp_path), [os.path.join(HELPERS, "shard8_worker.py"), str(tmp_path)], LAUNCH_TIMEOUT,
                    workers=3)
    for config in W.CONFIGS:
        _check_bit_identical([dict(np.load(str(tmp_path / f"{config}_rank{r}.npz"))) for r in range(3)], config)


@pytest.mark.distributed
def test_sharded_8bit_checkpoints_merge_into_the_unsharded_one(launched, tmp_path):
    """The two workers' checkpoints merge (the command) into the unsharded optimizer's checkpoint, every entry
    bit for bit, its unused scales of the float32 tensors included; cut gives each worker's back."""
    merged_path = str(tmp_path / "merged.ckpt")
    sharding.main(["merge", merged_path] + [os.path.join(launched, f"sharded_rank{r}.ckpt") for r in (1, 0)])
    merged, plain = ms.load_checkpoint(merged_path), ms.load_checkpoint(os.path.join(launched, "plain_rank0.ckpt"))
    assert sorted(merged) == sorted(plain)
    for name, value in plain.items():
        assert merged[name].dtype == value.dtype, name
        np.testing.assert_array_equal(merged[name].asnumpy(), value.asnumpy(), err_msg=name)
    names = [name for name, _ in W.SHAPES]
    for rank in range(2):
        saved = ms.load_checkpoint(os.path.join(launched, f"sharded_rank{rank}.ckpt"))
        cut = sharding.cut_for(plain, names, rank, 2)
        assert sorted(cut) == sorted(saved)
        for name, value in saved.items():
            np.testing.assert_array_equal(sharding._array(cut[name]), value.asnumpy(), err_msg=name)
            assert sharding._array(cut[name]).dtype == value.asnumpy().dtype, name


# ---- in one process: the worker's rank given, no collective runs ----

SHAPES = [("emb", (50, 41)), ("bias", (41,)), ("w1", (3, 300)), ("w2", (256,)), ("w3", (17, 31)), ("g", (7,))]
MIN_SIZE = 256


def _params():
    rng = np.random.default_rng(3)
    return [Parameter(Tensor(rng.normal(size=shape).astype(np.float32)), name=name) for name, shape in SHAPES]


@pytest.fixture
def as_worker(monkeypatch):
    """Build sharded optimizers as worker `rank` of `world` (set the returned dict's entries)."""
    group = {"rank": 0, "world": 2}
    monkeypatch.setattr(sharded, "data_parallel_group", lambda _: (group["rank"], group["world"]))
    return group


def _unsharded_state(steps=2):
    """A full 8-bit checkpoint's state (the optimizer's, after `steps` steps on the fused kernels)."""
    params = _params()
    opt = Lamb(params, 0.01, weight_decay=0.01, optim_bits=8, min_8bit_size=MIN_SIZE)
    rng = np.random.default_rng(4)
    for _ in range(steps):
        opt(tuple(Tensor(rng.normal(size=p.shape).astype(np.float32)) for p in params))
    return {p.name: p.asnumpy().copy() for p in (*params, opt.global_step, *opt.backend.state)}


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_8bit_merge_of_cut_gives_the_state_back(world):
    """cut for each of `world` workers, then merge: the unsharded 8-bit state, bit for bit, dtypes included;
    every piece is whole blocks, ceil(K / world) of them (K = 9 + 4 + 1 + 3 blocks of the 8-bit tensors)."""
    full = _unsharded_state()
    names = [name for name, _ in SHAPES]
    pieces = [sharding.cut_for(full, names, rank, world) for rank in range(world)]
    blocks = -(-17 // world)
    for piece in pieces:
        assert piece["lamb_m8.shard"].asnumpy().size == blocks * state.BLOCK
        assert piece["lamb_v8_scale.shard"].asnumpy().size == blocks
        assert "lamb_m8.emb" not in piece and "lamb_m8_scale.bias" not in piece and "lamb_m.bias" in piece
    merged = sharding.merge([{k: sharding._array(v) for k, v in piece.items()} for piece in reversed(pieces)])
    assert sorted(merged) == sorted(full)
    for name, value in full.items():
        got = merged[name].asnumpy()
        assert got.dtype == value.dtype, name
        np.testing.assert_array_equal(got, value, err_msg=name)


def test_8bit_merge_refuses_float_moments_that_differ():
    full = _unsharded_state(steps=1)
    names = [name for name, _ in SHAPES]
    pieces = [{k: sharding._array(v) for k, v in sharding.cut_for(full, names, rank, 2).items()} for rank in range(2)]
    pieces[1]["lamb_v.bias"] = pieces[1]["lamb_v.bias"] * 2
    with pytest.raises(ValueError, match=r"'lamb_v.bias' differs between 'shards\[0\]' and 'shards\[1\]'"):
        sharding.merge(pieces)


def test_check_state_names_a_damaged_8bit_piece():
    full = _unsharded_state(steps=1)
    piece = {k: sharding._array(v) for k, v in sharding.cut_for(full, [name for name, _ in SHAPES], 1, 2).items()}
    check_state(piece)
    piece["lamb_v8_scale.shard"] = piece["lamb_v8_scale.shard"].copy()
    piece["lamb_v8_scale.shard"][2] = -1.0
    piece["lamb_m8.shard"] = piece["lamb_m8.shard"].astype(np.float32)
    with pytest.raises(ValueError, match=r"'lamb_m8.shard' is stored as float32, but LAMB's 8-bit first moments are "
                                         r"int8.*'lamb_v8_scale.shard' holds 1 negative value"):
        check_state(piece)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_8bit_state_is_the_workers_piece(as_worker, world):
    """Each worker holds ceil(K / N) blocks of codes and scales, about 2/N bytes a parameter of the 8-bit tensors,
    and the small tensors' float32 moments whole; cut(state, optimizer) loads into it with nothing left out."""
    full = _unsharded_state()
    for rank in range(world):
        as_worker.update(rank=rank, world=world)
        params = _params()
        opt = Lamb(params, 0.01, weight_decay=0.01, optim_bits=8, min_8bit_size=MIN_SIZE, shard_state=True)
        held = {p.name: p for p in opt.backend.state}
        blocks = -(-17 // world)
        assert sorted(held) == sorted(["lamb_m8.shard", "lamb_m8_scale.shard", "lamb_v8.shard",
                                       "lamb_v8_scale.shard", "lamb_m.bias", "lamb_v.bias", "lamb_m.g", "lamb_v.g"])
        assert held["lamb_m8.shard"].shape == (blocks * state.BLOCK,) and held["lamb_m8.shard"].dtype == ms.int8
        assert held["lamb_v8.shard"].dtype == ms.uint8 and held["lamb_m8_scale.shard"].shape == (blocks,)
        bytes_held = sum(p.asnumpy().nbytes for name, p in held.items() if name.endswith(".shard"))
        eight_bit = sum(int(np.prod(shape)) for _, shape in SHAPES if np.prod(shape) >= MIN_SIZE)
        assert bytes_held == blocks * (2 * state.BLOCK + 8) and bytes_held < (2.1 / world + 0.6) * eight_bit
        cut = sharding.cut({name: Parameter(Tensor(value), name=name) for name, value in full.items()}, opt)
        not_loaded, _ = ms.load_param_into_net(opt, cut)
        assert not [name for name in not_loaded if name.startswith("lamb_")]
        for name, p in held.items():
            np.testing.assert_array_equal(p.asnumpy(), sharding._array(cut[name]))
        opt.check_state()


def test_sharded_8bit_refusals(as_worker, tmp_path):
    """The composite graph does not run sharded 8-bit state (a clear error); a sharded float checkpoint does not
    load into a sharded 8-bit optimizer, nor the reverse (the resume guard names both formats)."""
    with pytest.raises(ValueError, match=r"'optim_bits' is 8 with shard_state=True.*fused CPU kernels only.*"
                                         r"composite"):
        Lamb(_params(), 0.01, optim_bits=8, min_8bit_size=MIN_SIZE, shard_state=True, backend="composite")
    eight = Lamb(_params(), 0.01, optim_bits=8, min_8bit_size=MIN_SIZE, shard_state=True)
    floats = Lamb(_params(), 0.01, shard_state=True)
    full = _unsharded_state(steps=1)
    with pytest.raises(ValueError, match=r"'state' holds 8-bit moments, but the optimizer keeps float state "
                                         r"\(optim_bits=32\)"):
        sharding.cut(full, floats)
    plain = {p.name: p.asnumpy() for p in (*Lamb(_params(), 0.01).backend.state,)}
    with pytest.raises(ValueError, match=r"'state' holds float moments, but the optimizer keeps 8-bit state"):
        sharding.cut(plain, eight)
    for saved, loading, words in ((floats, eight, ("float state", "8-bit state")),
                                  (eight, floats, ("8-bit state", "float state"))):
        path = str(tmp_path / "w.ckpt")
        ms.save_checkpoint([*saved.params, saved.global_step, *saved.backend.state, saved.backend.shard_names,
                            saved.backend.shard_rank], path, crc_check=True, append_dict={STEP: 0})
        reason = _verified(path, 0, loading)
        assert isinstance(reason, str) and f"this worker's piece of the moments in {words[0]}" in reason \
            and words[1] in reason, reason
