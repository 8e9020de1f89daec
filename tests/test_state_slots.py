"""docs/architecture.md, "Adding a state slot", step 1, followed: one more elementwise Slot appended to
``state.SLOTS`` (an AMSGrad-like running maximum that the rule does not read yet, so it is carried unchanged).

Without touching any other file, every consumer follows: each backend allocates it (``lamb_x.<param>``, and
``lamb_x.shard`` sharded), checkpoints name it, ``check_state`` checks it, ``sharding.merge``/``cut`` carry
it, and the update of w, m and v is bit for bit that of a Lamb without it, on the fused kernel and the
composite graph.
"""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor

from mindspore_lamb import Lamb, check_state, sharding, state
from mindspore_lamb.backends import sharded

SHAPES = {"w": (3, 5), "b": (5,), "c": (2, 2, 3)}
EXTRA = state.Slot("x", "lamb_x", "running maxima", ms.float32, (ms.float32,), "a maximum of squares")


@pytest.fixture
def extra_slot(monkeypatch):
    """SLOTS with EXTRA appended: the recipe's step 1."""
    monkeypatch.setattr(state, "SLOTS", state.SLOTS + (EXTRA,))


def _params(rng_seed=7):
    rng = np.random.default_rng(rng_seed)
    return [Parameter(Tensor(rng.standard_normal(shape).astype(np.float32)), name=name)
            for name, shape in SHAPES.items()]


def _run(backend, steps=3):
    """(optimizer, the values of w, m, v after `steps` steps of the same gradients)."""
    params = _params()
    opt = Lamb(params, learning_rate=0.05, weight_decay=0.01, backend=backend)
    rng = np.random.default_rng(11)
    for _ in range(steps):
        opt(tuple(Tensor(rng.standard_normal(p.shape).astype(np.float32)) for p in params))
    values = [x.asnumpy().copy() for x in (*params, *opt.moments1, *opt.moments2)]
    return opt, values


def test_an_appended_slot_is_carried_by_every_backend(extra_slot, path):
    opt_extra = Lamb(_params(), learning_rate=0.05, weight_decay=0.01, backend=path)
    assert opt_extra.backend.name == path
    assert opt_extra.backend.slots.roles == ("m", "v", "x")
    # allocated, shaped like each parameter, named <prefix>.<param> in the checkpoints
    extra = opt_extra.backend.state.x
    assert [p.name for p in extra] == [f"lamb_x.{name}" for name in SHAPES]
    assert [tuple(p.shape) for p in extra] == list(SHAPES.values())
    names = {p.name for p in opt_extra.get_parameters()}
    assert {f"lamb_x.{name}" for name in SHAPES} <= names
    # carried unchanged; the update of w, m, v bit for bit that of a Lamb without it
    held = [np.full(shape, 0.25 * (i + 1), np.float32) for i, shape in enumerate(SHAPES.values())]
    for p, value in zip(extra, held):
        p.set_data(Tensor(value))
    params = [p for p in opt_extra.params]
    rng = np.random.default_rng(11)
    for _ in range(3):
        opt_extra(tuple(Tensor(rng.standard_normal(p.shape).astype(np.float32)) for p in params))
    got = [x.asnumpy() for x in (*params, *opt_extra.moments1, *opt_extra.moments2)]
    for p, value in zip(extra, held):
        np.testing.assert_array_equal(p.asnumpy(), value)
    # check_state checks it (by its Slot: finite, >= 0)
    opt_extra.check_state()
    bad = held[1].copy()
    bad[2] = -1.0
    extra[1].set_data(Tensor(bad))
    with pytest.raises(ValueError, match=r"'lamb_x\.b' holds 1 negative value"):
        opt_extra.check_state()
    with pytest.raises(ValueError, match=r"'lamb_x\.b'"):
        check_state({p.name: p for p in extra})
    # the reference: the same run without the slot
    state.SLOTS = state.SLOTS[:2]
    _, want = _run(path)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_merge_and_cut_carry_an_appended_slot(extra_slot):
    rng = np.random.default_rng(3)
    names = list(SHAPES)
    full = {"global_step": np.array([4], np.int32)}
    for name, shape in SHAPES.items():
        full[name] = rng.standard_normal(shape).astype(np.float32)
        for slot in state.SLOTS:
            full[slot.name(name)] = np.abs(rng.standard_normal(shape)).astype(np.float32)
    shards = [sharding.cut_for(full, names, rank, 3) for rank in range(3)]
    assert all("lamb_x.shard" in shard and "lamb_x.w" not in shard for shard in shards)
    merged = sharding.merge([{k: sharding._array(v) for k, v in shard.items()} for shard in shards])
    for name in names:
        for slot in state.SLOTS:
            np.testing.assert_array_equal(merged[slot.name(name)].asnumpy(), full[slot.name(name)])


def test_the_sharded_state_holds_an_appended_slot(extra_slot):
    params = _params()
    sharded_state = sharded.shard_state(params, state.declare({}), 2)
    length = sharded.piece_length(sum(int(np.prod(s)) for s in SHAPES.values()), 2)
    assert [p.name for p in sharded_state.x] == ["lamb_x.shard"]
    assert [p.name for p in sharded_state.flat()] == ["lamb_m.shard", "lamb_v.shard", "lamb_x.shard"]
    assert sharded_state.x[0].shape == (length,)


def test_options_choose_each_slots_dtype_and_may_leave_one_out(extra_slot):
    slots = state.declare({"m": ms.float16, "x": None})
    assert slots.roles == ("m", "v")
    assert slots.of("m").dtype == ms.float16 and slots.layout() == (("m", "v"), ("float16", "float32"))
