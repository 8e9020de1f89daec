"""The optimizer's share of a real training step: the BERT example's train step with Lamb against
nn.AdamWeightDecay, interleaved call by call in one process (GRAPH_MODE, or PYNATIVE_MODE with
--mode pynative: the train cell then runs operator by operator and calls the optimizer's compiled step).

Both train cells are built as the example builds them (BERT parameter groups, the warm-up + decay
schedule, LossScaleTrainStep with clipping at 1.0): they differ only in the optimizer. Each round calls
one step of each (order rotated every round) on the same random batch; the report gives the medians, the
difference per step, and the paired ratio (median over rounds of Lamb's step / AdamWeightDecay's step).

    python benchmarks/bench_train_step.py --config tiny --batch 32
    python benchmarks/bench_train_step.py --config base --batch 4 --seq 128 --repeats 10
    python benchmarks/bench_train_step.py --config base --batch 4 --seq 128 --busy 1   # + 1 spinning process
    python benchmarks/bench_train_step.py --config tiny --batch 32 --mode pynative
"""
import argparse
import multiprocessing
import os
import statistics
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "model_zoo_examples", "bert"))
os.environ.setdefault("GLOG_v", "3")

import mindspore as ms  # noqa: E402
from mindspore import nn  # noqa: E402

from _timing import cpu_header, interleave, wait  # noqa: E402
from model import BertConfig, BertPreTraining, BertPretrainLoss  # noqa: E402
from train import build_optimizer, build_train_cell, load_config  # noqa: E402

from mindspore_lamb import bert_param_groups  # noqa: E402


def _spin(stop):
    """A competing busy process: one core's worth of pure-Python work until told to stop."""
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def _batch(cfg, batch, seq, vocab, rng):
    n_pred = cfg["data"]["max_predictions_per_seq"]
    return (ms.Tensor(rng.integers(5, vocab, (batch, seq)).astype(np.int32)),
            ms.Tensor(np.ones((batch, seq), np.int32)),
            ms.Tensor(np.zeros((batch, seq), np.int32)),
            ms.Tensor(rng.integers(0, 2, (batch,)).astype(np.int32)),
            ms.Tensor(rng.integers(1, seq, (batch, n_pred)).astype(np.int32)),
            ms.Tensor(rng.integers(5, vocab, (batch, n_pred)).astype(np.int32)),
            ms.Tensor(np.ones((batch, n_pred), np.float32)))


def _cell(kind, cfg, vocab, steps):
    ms.set_seed(0)
    net = BertPreTraining(BertConfig.from_dict({**cfg["model"], "vocab_size": vocab}))
    tcfg = cfg["train"]
    if kind == "Lamb":
        opt = build_optimizer(net, tcfg, steps)
    else:
        groups = bert_param_groups(net.trainable_params(), tcfg["weight_decay"])
        opt = nn.AdamWeightDecay(groups, 1e-4, beta1=tcfg["beta1"], beta2=tcfg["beta2"], eps=tcfg["eps"])
    return build_train_cell(BertPretrainLoss(net), opt, dict(tcfg, accumulation_steps=1)), net


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", help="tiny or base (the example's configs)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, help="sequence length (default: the config's)")
    ap.add_argument("--vocab", type=int, help="vocabulary size (default: the config's)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--busy", type=int, default=0, help="competing busy processes during the timing")
    ap.add_argument("--mode", choices=("graph", "pynative"), default="graph", help="MindSpore execution mode")
    a = ap.parse_args()

    ms.set_context(mode=ms.GRAPH_MODE if a.mode == "graph" else ms.PYNATIVE_MODE, device_target="CPU")
    cfg = load_config(argparse.Namespace(config=a.config, epochs=None, batch_size=None, accumulation_steps=None,
                                         max_documents=None, set=[]))
    seq = a.seq or cfg["data"]["max_seq_length"]
    vocab = a.vocab or cfg["data"]["vocab_size"]
    cfg["model"]["max_position_embeddings"] = max(cfg["model"]["max_position_embeddings"], seq)
    cfg["model"]["hidden_dropout_prob"] = cfg["model"]["attention_probs_dropout_prob"] = 0.0
    batch = _batch(cfg, a.batch, seq, vocab, np.random.default_rng(0))
    cells = {}
    for kind in ("Lamb", "AdamWeightDecay"):
        cell, net = _cell(kind, cfg, vocab, 10_000)
        for _ in range(2):                                  # compile, warm up
            cell(*batch)
        wait()
        cells[kind] = cell
    n_params = sum(p.size for p in net.trainable_params())

    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(a.busy)]
    for proc in spinners:
        proc.start()
    try:
        times = interleave({k: (lambda c=c: (c(*batch), wait())) for k, c in cells.items()},
                           a.repeats)
    finally:
        stop.set()
        for proc in spinners:
            proc.join()

    print(cpu_header())
    print(f"# BERT {a.config}: {n_params / 1e6:.1f}M parameters, batch {a.batch} x {seq} tokens, "
          f"{a.repeats} interleaved steps each, {a.busy} competing busy process(es), {a.mode} mode")
    lamb, adamw = (statistics.median(times[k]) * 1e3 for k in ("Lamb", "AdamWeightDecay"))
    paired = statistics.median(x / y for x, y in zip(times["Lamb"], times["AdamWeightDecay"]))
    print(f"train step with Lamb            median {lamb:9.1f} ms  min {min(times['Lamb']) * 1e3:9.1f} ms")
    print(f"train step with AdamWeightDecay median {adamw:9.1f} ms  min {min(times['AdamWeightDecay']) * 1e3:9.1f} ms")
    print(f"difference per step {lamb - adamw:+.1f} ms ({(lamb / adamw - 1) * 100:+.1f} %); paired ratio {paired:.3f}")


if __name__ == "__main__":
    main()
