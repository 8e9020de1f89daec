"""Tokens per second of the BERT example's train step (Lamb, GRAPH_MODE) against the batch size.

Builds the train cell exactly as `model_zoo_examples/bert/train.py` does (BERT groups, warm-up + decay
schedule, LossScaleTrainStep with clipping) for each batch size, compiles it, runs a few warm-up
steps, then times `--steps` steps on one random batch of that size (real-looking masks: as many
predictions per row as the config's `max_predictions_per_seq`).

    python benchmarks/bench_bert_batch.py --config tiny --batches 16,32,64,128,256
    python benchmarks/bench_bert_batch.py --config tiny --seq 128 --vocab 4000 --set data.max_predictions_per_seq=20
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "model_zoo_examples", "bert"))
os.environ.setdefault("GLOG_v", "3")

import mindspore as ms  # noqa: E402

from _timing import cpu_header, wait  # noqa: E402
from model import BertConfig, BertPreTraining, BertPretrainLoss  # noqa: E402
from train import build_optimizer, build_train_cell, load_config  # noqa: E402


def _batch(n_pred, batch, seq, vocab, rng):
    return (ms.Tensor(rng.integers(5, vocab, (batch, seq)).astype(np.int32)),
            ms.Tensor(np.ones((batch, seq), np.int32)),
            ms.Tensor(np.zeros((batch, seq), np.int32)),
            ms.Tensor(rng.integers(0, 2, (batch,)).astype(np.int32)),
            ms.Tensor(np.sort(rng.integers(1, seq, (batch, n_pred)), axis=1).astype(np.int32)),
            ms.Tensor(rng.integers(5, vocab, (batch, n_pred)).astype(np.int32)),
            ms.Tensor(np.ones((batch, n_pred), np.float32)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", help="a config of the example (tiny/base/large or a YAML path)")
    ap.add_argument("--batches", default="16,32,64,128,256")
    ap.add_argument("--seq", type=int, help="sequence length (default: the config's)")
    ap.add_argument("--vocab", type=int, help="vocabulary size (default: the config's)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per batch size")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    a = ap.parse_args()

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    cfg = load_config(argparse.Namespace(config=a.config, epochs=None, batch_size=None, accumulation_steps=None,
                                         max_documents=None, set=a.set))
    seq = a.seq or cfg["data"]["max_seq_length"]
    vocab = a.vocab or cfg["data"]["vocab_size"]
    n_pred = cfg["data"]["max_predictions_per_seq"]
    cfg["model"]["max_position_embeddings"] = max(cfg["model"]["max_position_embeddings"], seq)
    tcfg = dict(cfg["train"], accumulation_steps=1)
    m = cfg["model"]
    print(cpu_header())
    print(f"# BERT {os.path.basename(a.config)}: hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
          f"intermediate {m['intermediate_size']}, vocab {vocab}, seq {seq}, {n_pred} predictions/row; "
          f"Lamb train step (clip, loss scale), GRAPH_MODE; {a.steps} timed steps per batch")
    print("| batch | tokens/step | median s/step | tokens/s | sequences/s |")
    print("|---:|---:|---:|---:|---:|")
    for batch_size in (int(b) for b in a.batches.split(",")):
        ms.set_seed(0)
        net = BertPreTraining(BertConfig.from_dict({**m, "vocab_size": vocab}))
        cell = build_train_cell(BertPretrainLoss(net), build_optimizer(net, tcfg, 10_000), tcfg)
        batch = _batch(n_pred, batch_size, seq, vocab, np.random.default_rng(0))
        for _ in range(a.warmup):
            cell(*batch)
        wait()
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            cell(*batch)
            wait()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        print(f"| {batch_size} | {batch_size * seq} | {med:.3f} | {batch_size * seq / med:,.0f} | "
              f"{batch_size / med:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
