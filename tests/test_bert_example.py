"""The BERT pretraining example (model_zoo_examples/bert): masking unit test and a CI smoke run."""
import json
import math
import os
import sys

import numpy as np
import pytest
import yaml

from mindspore_lamb import resume as resumable

BERT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_zoo_examples", "bert")
sys.path.insert(0, BERT_DIR)

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
VOCAB = 1000


def _rows(rng, n_rows, seq_len=64):
    """Rows shaped like the cache's: [CLS] a [SEP] b [SEP] then padding, ordinary ids in [5, VOCAB)."""
    rows = []
    for _ in range(n_rows):
        n_real = int(rng.integers(8, seq_len + 1))
        ids = rng.integers(5, VOCAB, n_real).astype(np.int32)
        ids[0], ids[-1] = CLS, SEP
        ids[int(rng.integers(1, n_real - 1))] = SEP
        rows.append(np.concatenate([ids, np.zeros(seq_len - n_real, np.int32)]))
    return rows


def test_masking_proportions_and_labels(rng):
    from pretrain_data import Masker
    max_pred = 20
    masker = Masker(VOCAB, [PAD, CLS, SEP, MASK, UNK], MASK, max_pred, mask_prob=0.15, seed=7)
    chosen = to_mask = unchanged = randomized = 0
    expected_chosen = candidates = 0
    for row_id, row in enumerate(_rows(rng, 3000)):
        ids, positions, labels, weights = masker(row.copy(), np.int64(row_id))
        # independent count of the maskable tokens and of the expected number of predictions
        n_candidates = int(sum(1 for t in row if t not in (PAD, CLS, SEP, MASK, UNK)))
        n = min(max_pred, max(1, int(round(0.15 * n_candidates))))
        assert weights.dtype == np.float32 and positions.shape == labels.shape == (max_pred,)
        assert weights.tolist() == [1.0] * n + [0.0] * (max_pred - n)
        real = positions[:n]
        assert len(set(real.tolist())) == n and all(row[p] not in (PAD, CLS, SEP) for p in real)
        assert (labels[:n] == row[real]).all()               # labels are the original tokens
        assert (positions[n:] == 0).all() and (labels[n:] == 0).all()
        untouched = np.setdiff1d(np.arange(len(row)), real)
        assert (ids[untouched] == row[untouched]).all()      # nothing changes outside the masked positions
        expected_chosen += n
        candidates += n_candidates
        chosen += n
        to_mask += int((ids[real] == MASK).sum())
        unchanged += int((ids[real] == row[real]).sum())
        randomized += int(((ids[real] != MASK) & (ids[real] != row[real])).sum())
        assert all(5 <= t < VOCAB for t in ids[real] if t != MASK)  # random tokens are ordinary tokens
    assert chosen == expected_chosen and chosen > 10000
    assert abs(chosen / candidates - 0.15) < 0.005  # 15% of the maskable tokens are predicted
    assert abs(to_mask / chosen - 0.8) < 0.015
    assert abs(unchanged / chosen - 0.1) < 0.01   # 10% kept (+ ~0.1% random draws of the same token)
    assert abs(randomized / chosen - 0.1) < 0.01


def test_fixed_masks_depend_only_on_row_id(rng):
    from pretrain_data import Masker
    row = _rows(rng, 1)[0]
    a = Masker(VOCAB, [PAD, CLS, SEP], MASK, 20, seed=3, fixed=True)
    b = Masker(VOCAB, [PAD, CLS, SEP], MASK, 20, seed=3, fixed=True)
    for x, y in zip(a(row.copy(), np.int64(5)), b(row.copy(), np.int64(5))):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a(row.copy(), np.int64(5))[1], a(row.copy(), np.int64(6))[1])


def test_pairs_fit_and_label_random_next(rng):
    from pretrain_data import create_pairs
    docs = [[list(rng.integers(5, VOCAB, int(rng.integers(3, 30)))) for _ in range(12)] for _ in range(10)]
    pairs = list(create_pairs(docs, 64, rng))
    assert pairs and all(a and b and len(a) + len(b) <= 61 for a, b, _ in pairs)
    assert 0.3 < np.mean([r for _, _, r in pairs]) < 0.8


def test_pairs_with_long_sentences_are_half_true_next(rng):
    """A sentence that fills the length budget on its own still gets its true next sentence half the time
    (without that, short sequences made almost every pair "random next")."""
    from pretrain_data import create_pairs
    docs = [[list(rng.integers(5, VOCAB, 40)) for _ in range(20)] for _ in range(40)]
    pairs = list(create_pairs(docs, 32, rng))
    assert pairs and all(len(a) + len(b) <= 29 for a, b, _ in pairs)
    assert 0.4 < np.mean([r for _, _, r in pairs]) < 0.6   # before: every pair was "random next"


def test_phase2_overrides(tmp_path):
    import train
    base = train.load_config(train.parse_args(["--config", "tiny"]))
    phase2 = train.load_config(train.parse_args(["--config", "tiny", "--phase", "2", "--set", "train.epochs=3"]))
    assert "phase2" not in base and "phase2" not in phase2
    assert (base["data"]["max_seq_length"], phase2["data"]["max_seq_length"]) == (32, 64)
    assert phase2["train"]["epochs"] == 3 and phase2["model"] == base["model"]
    assert phase2["model"]["max_position_embeddings"] >= phase2["data"]["max_seq_length"]
    one_phase = tmp_path / "one_phase.yaml"
    one_phase.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(open(train.parse_args([]).config)).items()
                                         if k != "phase2"}))
    with pytest.raises(SystemExit, match="no `phase2:` section"):
        train.load_config(train.parse_args(["--config", str(one_phase), "--phase", "2"]))


def test_checkpoint_settings_are_checked():
    """train.checkpoint_every defaults to one checkpoint per epoch; keep_checkpoint_max < 2 is refused (the
    checkpoint being written must not replace the last complete one), as is a checkpoint_every below 1."""
    import train
    assert train.checkpoint_every({"keep_checkpoint_max": 2}, 469) == 469
    assert train.checkpoint_every({"checkpoint_every": 100, "keep_checkpoint_max": 3}, 469) == 100
    with pytest.raises(SystemExit, match=r"train.keep_checkpoint_max: must be an int >= 2, got 1"):
        train.checkpoint_every({"keep_checkpoint_max": 1}, 469)
    with pytest.raises(SystemExit, match=r"train.checkpoint_every: must be an int >= 1, got -5"):
        train.checkpoint_every({"checkpoint_every": -5, "keep_checkpoint_max": 2}, 469)


@pytest.fixture(scope="module")
def smoke_config(tmp_path_factory):
    with open(os.path.join(BERT_DIR, "configs", "tiny.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["model"].update(hidden_size=32, intermediate_size=64, max_position_embeddings=64)
    cfg["data"].update(vocab_size=600, max_seq_length=64, max_predictions_per_seq=10, eval_every=5)
    cfg["train"].update(batch_size=8, eval_batch_size=16, log_every=1, trust_ratio_every=1,
                        accumulation_steps=2)
    path = tmp_path_factory.mktemp("cfg") / "smoke.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_smoke_train_checkpoint_resume(smoke_config, tmp_path, capsys):
    import train
    out = str(tmp_path / "run")
    common = ["--config", smoke_config, "--output_dir", out, "--max_documents", "40",
              "--max_steps_per_epoch", "4", "--device_target", "CPU"]
    first = train.main(common + ["--epochs", "1"])
    log = capsys.readouterr().out
    assert "wrote MindRecord cache" in log
    losses = [json.loads(line)["loss"] for line in open(os.path.join(out, "loss.jsonl"))]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    ckpt, step = train.latest_checkpoint(os.path.join(out, "checkpoints"))
    assert ckpt and step == 4
    for key in ("mlm_accuracy", "nsp_accuracy", "mlm_baseline"):
        assert 0.0 <= first["after"][key] <= 1.0
    assert os.path.isfile(os.path.join(out, "loss.png"))

    second = train.main(common + ["--epochs", "2", "--resume"])
    log = capsys.readouterr().out
    assert "reusing MindRecord cache" in log and "resumed from" in log
    # the resumed run starts from the trained weights and trains only the missing epoch
    assert second["before"]["mlm_accuracy"] == pytest.approx(first["after"]["mlm_accuracy"])
    assert second["steps"] == 4
    records = [json.loads(line) for line in open(os.path.join(out, "loss.jsonl"))]
    assert len(records) == 8 and all(math.isfinite(r["loss"]) for r in records)
    assert train.latest_checkpoint(os.path.join(out, "checkpoints"))[1] == 8
    assert 0.5 <= second["nsp_majority"] <= 1.0
    # refused before anything is trained or deleted: a fresh run over these checkpoints, a changed batch size
    with pytest.raises(SystemExit, match=r"already holds checkpoints .*steps \[4, 8\].*--resume.*--overwrite"):
        train.main(common + ["--epochs", "2"])
    with pytest.raises(SystemExit, match=r"batch_size: 8 in the checkpoint, 4 now"):
        train.main(common + ["--epochs", "2", "--resume", "--batch_size", "4"])
    assert sorted(resumable.checkpoints(os.path.join(out, "checkpoints"), "bert")) == [4, 8]

    # a second phase: the weights (not the optimizer state) and the vocab of the run directory, same data
    phase2 = str(tmp_path / "phase2")
    third = train.main(common[:2] + ["--output_dir", phase2, "--init_checkpoint", out] + common[4:] + ["--epochs", "1"])
    log = capsys.readouterr().out
    assert f"initialised the weights from {train.latest_checkpoint(os.path.join(out, 'checkpoints'))[0]}" in log
    assert third["vocab"] == second["vocab"]
    assert third["before"]["mlm_accuracy"] == pytest.approx(second["after"]["mlm_accuracy"])
    assert third["steps"] == 4
    with pytest.raises(SystemExit, match="no such file"):
        train.main(common[:2] + ["--output_dir", phase2, "--init_checkpoint", str(tmp_path / "nowhere")] + common[4:])
    # a bit flipped in a weight: the CRC tells (without it the run would train from a damaged embedding)
    ckpt = train.latest_checkpoint(os.path.join(out, "checkpoints"))[0]
    data = bytearray(open(ckpt, "rb").read())
    weight = next(v for k, v in resumable.load(ckpt).items() if k.startswith("network."))
    data[bytes(data).index(weight.asnumpy().tobytes()[:16]) + 3] ^= 0x40
    flipped = tmp_path / "flipped.ckpt"
    flipped.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="CRC32 does not match"):
        train.main(common[:2] + ["--output_dir", str(tmp_path / "p3"), "--init_checkpoint", str(flipped),
                                 "--vocab", third["vocab"]] + common[4:])


def test_smoke_train_8bit_state(smoke_config, tmp_path):
    """--set train.optim_bits=8: the checkpoint holds the 8-bit codes and block scales of the large tensors
    (float32 moments for the rest), and a resume with another optim_bits is refused like a changed batch size."""
    import train
    out = str(tmp_path / "run")
    common = ["--config", smoke_config, "--output_dir", out, "--max_documents", "40",
              "--max_steps_per_epoch", "4", "--device_target", "CPU", "--epochs", "1"]
    result = train.main(common + ["--set", "train.optim_bits=8"])
    assert result["config"]["train"]["optim_bits"] == 8 and math.isfinite(result["after"]["mlm_accuracy"])
    state = resumable.load(train.latest_checkpoint(os.path.join(out, "checkpoints"))[0])
    size = {k[len("network."):]: v.size for k, v in state.items() if k.startswith("network.")}
    eight = {k[len("lamb_m8."):] for k in state if k.startswith("lamb_m8.")}
    full = {k[len("lamb_m."):] for k in state if k.startswith("lamb_m.")}
    assert eight and full and not eight & full
    assert eight == {name for name in eight | full if size[name] >= 4096}
    assert all(f"{slot}.{name}" in state for name in eight for slot in ("lamb_v8", "lamb_m8_scale", "lamb_v8_scale"))
    assert state["lamb_m8." + min(eight)].asnumpy().dtype == np.int8
    refused = rf"stores the moments of {len(eight)} parameters in 8-bit state .*with the optim_bits"
    with pytest.raises(SystemExit, match=refused):
        train.main(common + ["--resume"])
    # a min_8bit_size that leaves the layout as it is is still a setting of the run
    with pytest.raises(SystemExit, match=r"min_8bit_size: 4096 in the checkpoint, 8192 now"):
        train.main(common + ["--resume", "--set", "train.optim_bits=8", "--set", "train.min_8bit_size=8192"])


@pytest.mark.distributed
@pytest.mark.parametrize("sharded", [False, True], ids=["replicated_state", "shard_state"])
def test_distributed_two_workers(smoke_config, tmp_path, sharded):
    """`train.py --distributed` under msrun: rank 0 builds the data cache while rank 1 waits, both train on
    their shard with averaged gradients, and both evaluate the same weights; rank 0 alone writes files
    (with --shard_state, each worker also writes its checkpoint, and the two merge into a full one)."""
    import glob
    import train
    from msrun_launch import run_two_workers
    out = str(tmp_path / "run")
    run_two_workers(str(tmp_path), [os.path.join(BERT_DIR, "train.py"), "--distributed", "--config", smoke_config,
                                    "--output_dir", out, "--max_documents", "40", "--max_steps_per_epoch", "4",
                                    "--device_target", "CPU", "--epochs", "1"] + (["--shard_state"] if sharded else []),
                    timeout=300)
    assert train.latest_checkpoint(os.path.join(out, "checkpoints"))[1] == 4
    if sharded:
        import mindspore as ms
        from mindspore_lamb import sharding
        paths = [train.latest_checkpoint(os.path.join(out, "checkpoints", *sub))[0] for sub in ((), ("rank1",))]
        merged = sharding.merge(ms.load_checkpoint(path) for path in paths)
        moments = [name for name in merged if name.startswith("lamb_m.")]
        # the train cell prefixes the network's names ("network."), the optimizer's moments keep them
        assert moments and all(merged[m].shape == merged["network." + m[len("lamb_m."):]].shape for m in moments)
    assert len(open(os.path.join(out, "loss.jsonl")).readlines()) == 4
    after = []
    for log in sorted(glob.glob(str(tmp_path / "msrun_log_port*" / "worker_*.log"))):
        after += [line for line in open(log, errors="replace") if line.startswith("[eval after training]")]
    assert len(after) == 2 and after[0] == after[1], after


def test_batch_study_quick(tmp_path):
    """`batch_study.py --quick`: every (optimizer, batch size) gets its grid (extended past the edge where its best
    rate is), the pick by dev accuracy, a second seed at the picked rate and the same number of training
    sequences; a rerun trains nothing new."""
    import batch_study
    out = str(tmp_path / "study")
    rows = batch_study.main(["--quick", "--output_dir", out])
    assert [(r["optimizer"], r["batch_size"]) for r in rows] == [(o, b) for o in ("lamb", "adamw") for b in (8, 32)]
    runs = [json.loads(line) for line in open(os.path.join(out, "runs.jsonl"))]
    for r in rows:
        grid = [x for x in runs if (x["optimizer"], x["batch_size"], x["seed"]) == (r["optimizer"], r["batch_size"], 0)]
        rates = sorted(x["lr"] for x in grid)
        c = batch_study.centre(r["optimizer"], r["batch_size"])
        original = [x for x in grid if x["lr"] == pytest.approx(c) or x["lr"] == pytest.approx(3 * c)]
        edge = batch_study.best(original)["lr"]          # a 2-point grid's best is always on an edge,
        beyond = edge / 3 if edge == pytest.approx(c) else edge * 3  # so one more rate is tried beyond it,
        flat = original[0]["dev_mlm"] == original[1]["dev_mlm"]      # unless both rates did equally well
        assert len(original) == 2 and rates == pytest.approx(sorted([c, 3 * c] + ([] if flat else [beyond])))
        assert r["lr"] == batch_study.best(grid)["lr"]
        assert batch_study.best([dict(lr=3.0, dev_mlm=0.5), dict(lr=1.0, dev_mlm=0.5)])["lr"] == 1.0  # ties
        assert r["seeds"] == 2 and r["steps"] * r["batch_size"] == 256
        assert 0.0 <= r["test_mlm"] <= 1.0 and math.isfinite(r["final_loss"])
    loss_lines = {x["name"]: len(open(os.path.join(out, "runs", x["name"], "loss.jsonl")).readlines()) for x in runs}
    assert all(n == 256 // int(name.split("_b")[1].split("_")[0]) for name, n in loss_lines.items())
    assert os.path.isfile(os.path.join(out, "batch_study.png"))
    assert "| lamb | 32 |" in open(os.path.join(out, "table.md")).read()
    assert batch_study.main(["--quick", "--output_dir", out]) == rows
    assert batch_study.main(["--quick", "--output_dir", out, "--report"]) == rows
    assert len(open(os.path.join(out, "runs.jsonl")).readlines()) == len(runs)


def test_progress_bar_only_on_a_terminal(capsys):
    """The tqdm training bar: ETA, loss and the schedule's rate on a terminal; nothing at all in logs or CI."""
    from types import SimpleNamespace

    import mindspore as ms
    import progress
    from mindspore_lamb.schedules import WarmupPolynomialDecayLR
    schedule = WarmupPolynomialDecayLR(0.01, 0.0, warmup_steps=2, decay_steps=10, power=1.0)
    context = SimpleNamespace(original_args=lambda: SimpleNamespace(net_outputs=ms.Tensor([2.5], ms.float32)))

    def run(bar):
        bar.on_train_begin(context)
        for _ in range(4):
            bar.on_train_step_end(context)
        bar.on_train_end(context)
        return capsys.readouterr()

    assert not progress.bars_enabled()                 # pytest captures stderr: not a terminal
    quiet = run(progress.ProgressBar(8, schedule=schedule, every=2))
    assert quiet.err == "" and quiet.out == ""
    shown = run(progress.ProgressBar(8, initial_steps=2, schedule=schedule, every=2, disable=False)).err
    assert "train" in shown and "6/8" in shown and "<" in shown          # steps done incl. resumed ones; ETA
    lr = float(schedule(ms.Tensor(5, ms.int32)).asnumpy())               # the 6th step's rate, from the schedule
    assert "loss 2.5000" in shown and f"lr {lr:.3g}" in shown and lr not in (0.0, 0.01)
