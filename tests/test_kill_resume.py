"""Training killed with SIGKILL at any moment and resumed as docs/resume.md says ends bit-identical to an
uninterrupted run: final weights, moments, global_step, loss scale, accumulators, and the per-step loss log.

The training process is tests/helpers/kill_resume_worker.py, driven by tools/kill_resume.py (the harness whose
20-point table docs/resume.md reports); the BERT example is run as a script.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
BERT_DIR = os.path.join(ROOT, "model_zoo_examples", "bert")


def _check(rows):
    for row in rows:
        assert row["identical"], f"kill point {row}: {row['differences']}"


def test_kill_during_checkpoint_write(tmp_path):
    """One process killed while it writes the checkpoint of step 35 resumes from the previous one (step 30) and
    ends identical: the half-written file is never picked, the previous one stays loadable, the dataset
    resumes mid-epoch (step 30 of 16-step epochs) with its shuffle order and per-row noise, and the loss log
    holds each step once."""
    import kill_resume
    reference, wall = kill_resume.reference_run("single", str(tmp_path))
    row = kill_resume.kill_point("single", str(tmp_path), 0, reference, wall, random.Random(0), write_step=35)
    assert row["doing"] == "writing ckpt-35.ckpt", row
    assert row["resumed_from"] == "30", row
    _check([row])


@pytest.mark.slow
def test_kill_at_random_points_single_process(tmp_path):
    import kill_resume
    rows = kill_resume.run_case("single", 8, str(tmp_path), random.Random(1))
    _check(rows)
    assert any(r["resumed_from"] not in ("0", "-") for r in rows)   # some resumed from a checkpoint


@pytest.mark.slow
def test_kill_at_random_points_8bit_state(tmp_path):
    """optim_bits=8: the codes and block scales resume bit for bit too."""
    import kill_resume
    rows = kill_resume.run_case("single_8bit", 4, str(tmp_path), random.Random(3))
    _check(rows)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case", ["msrun", "msrun_shard", "msrun_shard_8bit"])
def test_kill_one_msrun_worker(tmp_path, case):
    """Two msrun workers (replicated or sharded LAMB state, float32 or 8-bit); one is killed, msrun is run again
    with --resume."""
    import kill_resume
    rows = kill_resume.run_case(case, 4, str(tmp_path), random.Random(2), write_every=2)
    _check(rows)


@pytest.mark.slow
def test_resume_skips_a_damaged_checkpoint(tmp_path):
    """A damaged newest checkpoint (truncated: a full disk, a copy cut short) is skipped with a message and the
    previous one used; when none is usable, resume refuses to start afresh and names each file's problem."""
    import kill_resume
    from mindspore_lamb.resume import checkpoints
    out = str(tmp_path / "run")
    os.makedirs(out)
    assert kill_resume.Run("single", out, resume=False).wait()[0] == 0
    reference = kill_resume.final_state(out)
    ckpt_dir = os.path.join(out, "ckpt", "rank0")
    newest = os.path.join(ckpt_dir, f"ckpt-{kill_resume.TOTAL_STEPS}.ckpt")
    data = open(newest, "rb").read()
    os.chmod(newest, 0o600)
    open(newest, "wb").write(data[: len(data) // 2])
    code, output = kill_resume.Run("single", out, resume=True).wait()
    assert code == 0, output
    assert f"resume: skipped {newest} does not load" in output
    assert f"resumed from step {sorted(checkpoints(ckpt_dir, 'ckpt'))[-2]}" in output
    assert kill_resume.differences(kill_resume.final_state(out), reference) == []

    for path in os.listdir(ckpt_dir):
        os.chmod(os.path.join(ckpt_dir, path), 0o600)
        open(os.path.join(ckpt_dir, path), "wb").write(b"\0" * 100)
    code, output = kill_resume.Run("single", out, resume=True).wait()
    assert code != 0 and f"No checkpoint of '{ckpt_dir}' can be resumed from" in output, output


def _bert_config(tmp_path):
    """The tiny config shrunk (as the BERT smoke test), with dropout on, so masks and dropout are both exercised."""
    with open(os.path.join(BERT_DIR, "configs", "tiny.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["model"].update(hidden_size=32, intermediate_size=64, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.1)
    cfg["data"].update(vocab_size=600, max_seq_length=64, max_predictions_per_seq=10, eval_every=5)
    cfg["train"].update(batch_size=8, eval_batch_size=16, log_every=1, trust_ratio_every=1, checkpoint_every=3)
    path = tmp_path / "kill.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _bert(config, out, data_dir, *extra):
    return [sys.executable, os.path.join(BERT_DIR, "train.py"), "--config", config, "--output_dir", out,
            "--data_dir", data_dir, "--max_documents", "40", "--max_steps_per_epoch", "5", "--epochs", "3",
            "--device_target", "CPU", *extra]


@pytest.mark.slow
def test_bert_example_killed_in_its_last_epoch(tmp_path):
    """train.py killed with SIGKILL in epoch 3 (after step 12 of 15), then run again with --resume: the final
    checkpoint equals the uninterrupted run's in every tensor and loss.jsonl numbers each step once."""
    import mindspore as ms
    from mindspore_lamb.resume import RUN
    config, data_dir = _bert_config(tmp_path), str(tmp_path / "data")
    env = dict(os.environ, GLOG_v="3")
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    subprocess.run(_bert(config, full, data_dir), check=True, env=env, stdout=subprocess.DEVNULL)
    proc = subprocess.Popen(_bert(config, killed, data_dir), env=env, stdout=subprocess.DEVNULL)
    log = os.path.join(killed, "loss.jsonl")
    while proc.poll() is None and (not os.path.exists(log) or len(open(log).readlines()) < 12):
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(_bert(config, killed, data_dir, "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step 12" in resumed.stdout

    def final(out):
        return {k: v.asnumpy() for k, v in ms.load_checkpoint(os.path.join(out, "checkpoints", "bert-15.ckpt")).items()}
    want, got = final(full), final(killed)
    assert sorted(got) == sorted(want)
    # the run id differs by design: the uninterrupted run and the killed one are two runs
    assert got.pop(RUN).tobytes() != want.pop(RUN).tobytes()
    differ = [k for k in want if got[k].tobytes() != want[k].tobytes()]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ: {differ[:5]}"
    records = [json.loads(line) for line in open(log)]
    assert [r["step"] for r in records] == list(range(1, 16))
    assert records == [json.loads(line) for line in open(os.path.join(full, "loss.jsonl"))]


def test_resume_skips_a_checkpoint_with_damaged_optimizer_state(tmp_path, capsys):
    """A newest checkpoint that loads and passes its CRC but holds damaged LAMB state (a negative second
    moment, as a hand-edited or converted file may) is skipped, naming the entry; the one before is used."""
    import numpy as np
    import mindspore as ms
    from mindspore import Tensor, nn
    from mindspore_lamb import Lamb
    from mindspore_lamb.resume import newest, save
    from nets import loss_fn, make_net
    net = make_net(0)
    cell = nn.TrainOneStepCell(nn.WithLossCell(net, loss_fn()), Lamb(net.trainable_params(), 0.01))
    save(cell, str(tmp_path), "model", 5)
    v = cell.optimizer.moments2[0]
    damaged = v.asnumpy().copy()
    damaged.flat[3] = -1.0
    v.set_data(Tensor(damaged))
    save(cell, str(tmp_path), "model", 10)
    step, params = newest(cell, str(tmp_path), "model")
    assert step == 5 and np.all(params[v.name].asnumpy() >= 0)
    assert f"{v.name}' holds 1 negative value(s)" in capsys.readouterr().out
    ms.load_param_into_net(cell, params)
    cell.optimizer.check_state()
