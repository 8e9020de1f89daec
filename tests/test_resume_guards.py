"""Checkpoints and resume refuse what would lose or mix up a run, with a message that says what to do:
a second writer, other users' files, another run's checkpoints, changed settings, damaged files (CRC), a
checkpoint directory that is a file or a dangling link, a prefix that is a path, sharded state in a
non-sharded optimizer, 8-bit state in a float32 one and the reverse; and what they accept, they say (a changed
learning rate) or load (float32 moments into ``mu_dtype="float16"``). docs/resume.md, "Two runs, other users,
changed settings"."""
import os
import subprocess
import sys

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn

from mindspore_lamb import Lamb, check_state, resume as R
from mindspore_lamb import sharding
from nets import loss_fn, make_net

PREFIX = "model"


def _cell(lr=0.01, **kwargs):
    net = make_net(0)
    return nn.TrainOneStepCell(nn.WithLossCell(net, loss_fn()), Lamb(net.trainable_params(), lr, **kwargs))


def _step(cell, seed=0):
    rng = np.random.default_rng(seed)
    cell(Tensor(rng.standard_normal((4, 8)).astype(np.float32)), Tensor(np.array([0, 1, 2, 0], np.int32)))


def _run(directory, steps=(5, 10), cell=None, **kwargs):
    """A run's checkpoints: a fresh StepCheckpoint's run id, saved at `steps`; the lock released."""
    cell = cell or _cell()
    writer = R.StepCheckpoint(str(directory), PREFIX, every=5, **kwargs)
    for step in steps:
        _step(cell, step)
        R.save(cell, str(directory), PREFIX, step, run=writer.run, config=writer.config)
    R.release(str(directory), PREFIX)
    return cell


def _flip_bit(path, cell):
    """One bit of a weight's value flipped (the file still parses; only its CRC tells)."""
    data = bytearray(open(path, "rb").read())
    at = bytes(data).index(cell.network.trainable_params()[0].asnumpy().tobytes()[:16])
    data[at + 3] ^= 0x10
    open(path, "wb").write(bytes(data))
    assert ms.load_checkpoint(path, crc_check=False)


LOCK_HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[3])
from mindspore_lamb._files import lock
lock(sys.argv[1], sys.argv[2])
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_and_the_first_keeps_its_checkpoints(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path), PREFIX, root],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=rf"process {holder.pid} on .* is writing the checkpoints "
                                               rf"{PREFIX}-<step>.ckpt"):
            R.StepCheckpoint(str(tmp_path), PREFIX, every=5)
        with pytest.raises(RuntimeError, match="a second writer would delete its checkpoints"):
            R.save(_cell(), str(tmp_path), PREFIX, 5)
        assert R.checkpoints(str(tmp_path), PREFIX) == {}
    finally:
        holder.kill()
        holder.wait()
    # the system releases the lock of a killed process: the next run writes
    writer = R.StepCheckpoint(str(tmp_path), PREFIX, every=5)
    R.release(str(tmp_path), PREFIX)
    assert writer.run == R.run_id(str(tmp_path), PREFIX)


def test_a_fresh_run_refuses_a_directory_with_an_earlier_runs_checkpoints(tmp_path, capsys):
    _run(tmp_path, steps=(50, 60))
    with pytest.raises(RuntimeError, match=r"already holds checkpoints .*steps \[50, 60\].* overwrite=True"):
        R.StepCheckpoint(str(tmp_path), PREFIX, every=5)
    R.release(str(tmp_path), PREFIX)
    assert sorted(R.checkpoints(str(tmp_path), PREFIX)) == [50, 60]
    R.StepCheckpoint(str(tmp_path), PREFIX, every=5, overwrite=True)
    R.release(str(tmp_path), PREFIX)
    assert R.checkpoints(str(tmp_path), PREFIX) == {}
    assert "deleted 2 checkpoints of an earlier run" in capsys.readouterr().out


def test_cleanup_keeps_the_checkpoints_up_to_the_step_saved(tmp_path):
    """A checkpoint of a higher step (left by a run that went further, skipped on resume) does not make the
    cleanup delete the one just written."""
    cell = _cell()
    for step in (100, 300):
        R.save(cell, str(tmp_path), PREFIX, step)
    R.save(cell, str(tmp_path), PREFIX, 150, keep=2)
    R.save(cell, str(tmp_path), PREFIX, 200, keep=2)
    R.release(str(tmp_path), PREFIX)
    assert sorted(R.checkpoints(str(tmp_path), PREFIX)) == [150, 200, 300]


def test_another_runs_checkpoint_is_skipped_unless_allowed(tmp_path, capsys):
    own, other = tmp_path / "own", tmp_path / "other"
    _run(own, steps=(5, 10))
    _run(other, steps=(20,))
    os.replace(other / f"{PREFIX}-20.ckpt", own / f"{PREFIX}-20.ckpt")
    cell = _cell()
    assert R.resume(cell, str(own), PREFIX) == 10
    assert f"skipped {own / f'{PREFIX}-20.ckpt'} was written by another run" in capsys.readouterr().out
    assert R.resume(_cell(), str(own), PREFIX, allow_foreign=True) == 20


@pytest.mark.skipif(os.getuid() != 0, reason="giving a file to another user needs root")
def test_another_users_checkpoint_is_refused_unless_allowed(tmp_path, capsys):
    _run(tmp_path, steps=(5, 10))
    os.chown(tmp_path / f"{PREFIX}-10.ckpt", 12345, 12345)
    assert R.resume(_cell(), str(tmp_path), PREFIX) == 5
    assert "is owned by uid 12345, not by the current user" in capsys.readouterr().out
    assert R.resume(_cell(), str(tmp_path), PREFIX, allow_foreign=True) == 10
    with pytest.raises(R.CheckpointError, match="owned by uid 12345"):
        R.load(str(tmp_path / f"{PREFIX}-10.ckpt"))


def test_changed_settings_are_refused_naming_each(tmp_path, monkeypatch):
    _run(tmp_path, settings={"batch_size": 128, "seed": 1})
    cell = _cell()
    before = [p.asnumpy().copy() for p in cell.network.trainable_params()]
    with pytest.raises(RuntimeError, match=r"batch_size: 128 in the checkpoint, 64 now.*--init_checkpoint"):
        R.resume(cell, str(tmp_path), PREFIX, settings={"batch_size": 64, "seed": 1})
    monkeypatch.setattr(R, "_workers", lambda: 2)        # the same checkpoint resumed by 2 msrun workers
    with pytest.raises(RuntimeError, match=r"workers: 1 in the checkpoint, 2 now"):
        R.resume(cell, str(tmp_path), PREFIX, settings={"batch_size": 128, "seed": 1})
    for param, old in zip(cell.network.trainable_params(), before):    # nothing was loaded
        np.testing.assert_array_equal(param.asnumpy(), old)


def test_changed_hyperparameters_are_said_and_this_runs_learning_rate_kept(tmp_path, capsys):
    saved = _run(tmp_path, hyperparameters={"epochs": 3})
    cell = _cell(lr=0.02)
    assert R.resume(cell, str(tmp_path), PREFIX, hyperparameters={"epochs": 5}) == 10
    out = capsys.readouterr().out
    assert "epochs is 5 in this run and 3 in" in out
    assert "the learning rate 'learning_rate' is 0.02 in this run and 0.01 in" in out
    assert cell.optimizer.learning_rate.asnumpy() == pytest.approx(0.02)
    kept = list(cell.network.trainable_params()) + list(cell.optimizer.moments1) + list(cell.optimizer.moments2)
    for got, want in zip(kept, list(saved.network.trainable_params()) + list(saved.optimizer.moments1) +
                         list(saved.optimizer.moments2)):
        np.testing.assert_array_equal(got.asnumpy(), want.asnumpy(), err_msg=got.name)


def test_damaged_files_are_named_for_what_they_are(tmp_path):
    cell = _cell()
    path = R.save(cell, str(tmp_path), PREFIX, 5)
    R.release(str(tmp_path), PREFIX)
    _flip_bit(path, cell)
    with pytest.raises(R.CheckpointError, match="CRC32 does not match"):
        R.load(path)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(R.CheckpointError, match=r"is empty \(0 bytes\)"):
        R.load(str(empty))
    with pytest.raises(R.CheckpointError, match="is a directory, not a checkpoint file"):
        R.load(str(tmp_path))
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(R.CheckpointError, match="is not a MindSpore checkpoint"):
        R.load(str(junk))


def test_sharding_merge_checks_crcs(tmp_path, capsys):
    cell = _cell()
    path = R.save(cell, str(tmp_path), PREFIX, 5)
    R.release(str(tmp_path), PREFIX)
    _flip_bit(path, cell)
    with pytest.raises(SystemExit) as exit_info:
        sharding.main(["merge", str(tmp_path / "out.ckpt"), path, path])
    assert exit_info.value.code == 2
    assert "CRC32 does not match" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is a directory"):
        sharding.merge([str(tmp_path), path])


@pytest.mark.parametrize("kind", ["file", "dangling link"])
def test_a_checkpoint_directory_that_is_not_one_is_refused_up_front(tmp_path, kind):
    target = tmp_path / "ckpt"
    if kind == "file":
        target.write_text("x")
    else:
        os.symlink(tmp_path / "missing", target)
    for call in (lambda: R.StepCheckpoint(str(target), PREFIX, every=5), lambda: R.resume(_cell(), str(target), PREFIX)):
        with pytest.raises(ValueError, match="is a symbolic link to .*missing, which does not exist" if kind != "file"
                           else "exists and is not a directory"):
            call()


@pytest.mark.parametrize("prefix", ["runs/model", "", ".hidden"])
def test_a_prefix_that_is_not_a_file_name_is_refused(tmp_path, prefix):
    with pytest.raises(ValueError, match="the argument 'prefix' must be the start of a file name"):
        R.StepCheckpoint(str(tmp_path), prefix, every=5)


def test_sharded_state_in_a_plain_optimizer_names_sharding_merge(tmp_path, capsys):
    from mindspore_lamb.backends.sharded import RANK_PARAMETER, shard_record
    cell = _cell()
    entries = [{"name": p.name, "data": p} for p in cell.get_parameters() if not p.name.startswith("lamb_")
               and not p.param_info.is_pipeline_shared_param]
    entries += [{"name": "lamb_m.shard", "data": Tensor(np.zeros(100, np.float32))},
                {"name": "lamb_v.shard", "data": Tensor(np.zeros(100, np.float32))},
                {"name": RANK_PARAMETER, "data": shard_record(1, 2)}]
    ms.save_checkpoint(entries, str(tmp_path / f"{PREFIX}-5.ckpt"), crc_check=True, append_dict={R.STEP: 5})
    with pytest.raises(RuntimeError, match=r"rank 1 of 2, written by Lamb\(shard_state=True\).*sharding merge"):
        R.resume(cell, str(tmp_path), PREFIX)


def test_float32_moments_load_into_float16_first_moments(tmp_path):
    saved = _run(tmp_path, steps=(5,))
    cell = _cell(mu_dtype="float16")
    assert R.resume(cell, str(tmp_path), PREFIX) == 5
    for got, want in zip(cell.optimizer.moments1, saved.optimizer.moments1):
        assert got.dtype == ms.float16
        np.testing.assert_array_equal(got.asnumpy(), want.asnumpy().astype(np.float16))


def test_first_moments_beyond_float16_are_refused_before_anything_loads(tmp_path):
    saved = _cell()
    m = saved.optimizer.moments1[0]
    m.set_data(Tensor(np.full(m.shape, 1e6, np.float32)))
    R.save(saved, str(tmp_path), PREFIX, 5)
    R.release(str(tmp_path), PREFIX)
    cell = _cell(mu_dtype="float16")
    for p in cell.network.trainable_params():
        p.set_data(Tensor(np.zeros(p.shape, np.float32)))
    with pytest.raises(RuntimeError, match="beyond float16's range"):
        R.resume(cell, str(tmp_path), PREFIX)
    assert all(not p.asnumpy().any() for p in cell.network.trainable_params())
    assert cell.optimizer.global_step.asnumpy().item() == 0


def test_check_state_bounds_the_step_counter_and_wants_a_dict():
    with pytest.raises(ValueError, match=r"'global_step' must be one integer from 0 to 2147483647"):
        check_state({"global_step": np.array([2 ** 40], np.int64)})
    check_state({"global_step": np.array([2 ** 31 - 1], np.int64)})
    with pytest.raises(TypeError, match="the argument 'state' must be a dict .* but got list"):
        check_state([("global_step", np.array([1], np.int32))])


def test_lock_is_released_at_the_end_of_training(tmp_path):
    """StepCheckpoint holds the lock from its creation to on_train_end: the next run in the same process or
    another one can write."""
    from mindspore.train import Model
    from nets import make_dataset
    cell = _cell()
    writer = R.StepCheckpoint(str(tmp_path), PREFIX, every=4)
    Model(cell).train(1, make_dataset(batch_size=8, n=32), callbacks=[writer], dataset_sink_mode=False)
    assert sorted(R.checkpoints(str(tmp_path), PREFIX)) == [4]
    code = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                           "from mindspore_lamb._files import lock; lock(sys.argv[2], 'model')",
                           os.path.dirname(os.path.dirname(os.path.abspath(__file__))), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert code.returncode == 0, code.stderr[-2000:]


@pytest.mark.parametrize("saved_bits, resumed_bits", [(32, 8), (8, 32)])
def test_moments_in_another_format_are_refused_naming_optim_bits(tmp_path, saved_bits, resumed_bits):
    """A checkpoint of float32 moments into optim_bits=8 (or 8-bit codes into float32): refused before anything
    loads, naming optim_bits; the same format resumes."""
    _run(tmp_path, steps=(5,), cell=_cell(optim_bits=saved_bits, min_8bit_size=16))
    cell = _cell(optim_bits=resumed_bits, min_8bit_size=16)
    before = [p.asnumpy().copy() for p in cell.network.trainable_params()]
    with pytest.raises(RuntimeError, match=r"stores the moments of \d+ parameters in .*optim_bits and min_8bit_size"):
        R.resume(cell, str(tmp_path), PREFIX)
    for p, b in zip(cell.network.trainable_params(), before):
        np.testing.assert_array_equal(p.asnumpy(), b)
    assert R.resume(_cell(optim_bits=saved_bits, min_8bit_size=16), str(tmp_path), PREFIX) == 5
