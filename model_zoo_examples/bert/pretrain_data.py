"""Pretraining rows: NSP sentence pairs -> MindRecord cache -> MindDataset with MLM masking.

* `create_pairs` follows Google's `create_pretraining_data.py`: sentences of a document are packed
  into chunks of up to `max_seq_length - 3` tokens, split at a random sentence boundary into A and B;
  half of the time B is replaced by text from another document (label 1 = "random next").
* The pairs (not yet masked) are written once to MindRecord files, which later runs reuse.
* `Masker` masks 15% of the tokens (80% [MASK], 10% random token, 10% unchanged) inside the
  `mindspore.dataset` pipeline: fresh masks every epoch for training (dynamic masking), fixed masks
  for evaluation. Either way a row's masks are drawn from (seed, row id[, epoch]) alone, with no state
  carried from one row to the next, so a resumed run that restarts the pipeline at its step
  (`Dataset.set_init_step`) sees the masks of an uninterrupted one (docs/resume.md).
"""
import hashlib
import json
import os

import numpy as np

COLUMNS = ["input_ids", "input_mask", "segment_ids", "next_sentence_label",
           "masked_lm_positions", "masked_lm_ids", "masked_lm_weights"]
SCHEMA = {"input_ids": {"type": "int32", "shape": [-1]},
          "input_mask": {"type": "int32", "shape": [-1]},
          "segment_ids": {"type": "int32", "shape": [-1]},
          "next_sentence_label": {"type": "int32"},
          "row_id": {"type": "int64"}}


def _truncate_pair(a, b, max_tokens, rng):
    """Trim the longer segment, at a random end, until the pair fits (as in Google's code)."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        del longer[0 if rng.random() < 0.5 else -1]


def create_pairs(documents, max_seq_length, rng, short_seq_prob=0.1, on_document=None):
    """Yield (tokens_a, tokens_b, is_random_next) from documents of sentences given as id lists.

    `on_document` (optional) is called after each document (progress display)."""
    max_tokens = max_seq_length - 3  # [CLS] A [SEP] B [SEP]
    for doc_index, doc in enumerate(documents):
        target = max_tokens if rng.random() >= short_seq_prob else int(rng.integers(2, max_tokens + 1))
        chunk, length, i = [], 0, 0
        while i < len(doc):
            chunk.append(doc[i])
            length += len(doc[i])
            if length >= target and len(chunk) == 1 and i < len(doc) - 1:
                # one sentence fills the target: take the next one too (truncated below), so that the pair
                # can be a true "next sentence" (Google's code makes every such pair random, which at short
                # sequence lengths, where one verse often fills the target, makes most pairs random)
                i += 1
                chunk.append(doc[i])
                length += len(doc[i])
            if i == len(doc) - 1 or length >= target:
                a_end = 1 if len(chunk) < 2 else int(rng.integers(1, len(chunk)))
                tokens_a = [t for s in chunk[:a_end] for t in s]
                is_random = len(documents) > 1 and (len(chunk) == 1 or rng.random() < 0.5)
                if is_random:
                    other = int(rng.integers(len(documents) - 1))
                    other = other + 1 if other >= doc_index else other
                    rdoc = documents[other]
                    tokens_b = []
                    for s in rdoc[int(rng.integers(len(rdoc))):]:
                        tokens_b.extend(s)
                        if len(tokens_b) >= target - len(tokens_a):
                            break
                    i -= len(chunk) - a_end  # the unused sentences start the next chunk
                else:
                    tokens_b = [t for s in chunk[a_end:] for t in s]
                if tokens_a and tokens_b:
                    _truncate_pair(tokens_a, tokens_b, max_tokens, rng)
                    yield tokens_a, tokens_b, is_random
                chunk, length = [], 0
                target = max_tokens if rng.random() >= short_seq_prob else int(rng.integers(2, max_tokens + 1))
            i += 1
        if on_document is not None:
            on_document()


def pair_to_row(tokens_a, tokens_b, is_random, row_id, cls_id, sep_id, max_seq_length):
    ids = [cls_id] + tokens_a + [sep_id] + tokens_b + [sep_id]
    n, pad = len(ids), max_seq_length - len(ids)
    return {"input_ids": np.array(ids + [0] * pad, np.int32),
            "input_mask": np.array([1] * n + [0] * pad, np.int32),
            "segment_ids": np.array([0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1) + [0] * pad, np.int32),
            "next_sentence_label": int(is_random),
            "row_id": row_id}


def write_mindrecord(path, encoded_documents, wordpiece, max_seq_length, dupe_factor, seed, desc="NSP pairs"):
    """Build the NSP rows of `encoded_documents` (dupe_factor passes) into one MindRecord file."""
    from mindspore.mindrecord import FileWriter
    from progress import progress
    for stale in (path, path + ".db"):
        if os.path.exists(stale):
            os.remove(stale)
    rng = np.random.default_rng(seed)
    writer = FileWriter(path, shard_num=1, overwrite=True)
    writer.add_schema(SCHEMA, "bert_pretraining")
    rows, n, n_random = [], 0, 0
    bar = progress(total=len(encoded_documents) * dupe_factor, desc=desc, unit="doc")
    for _ in range(dupe_factor):
        for a, b, is_random in create_pairs(encoded_documents, max_seq_length, rng, on_document=bar.update):
            rows.append(pair_to_row(a, b, is_random, n, wordpiece.cls_id, wordpiece.sep_id, max_seq_length))
            n, n_random = n + 1, n_random + is_random
            if len(rows) == 4096:
                writer.write_raw_data(rows)
                rows = []
    if rows:
        writer.write_raw_data(rows)
    writer.commit()
    bar.close()
    return n, n_random


def fingerprint(*items):
    """Short hash of files (by content) and other values (by repr): the cache key."""
    h = hashlib.sha1()
    for item in items:
        if isinstance(item, str) and os.path.isfile(item):
            with open(item, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(repr(item).encode())
    return h.hexdigest()[:12]


def prepare_data(cache_root, corpus_path, data_cfg, vocab_path=None, log=print):
    """Corpus -> (vocab) -> train/eval MindRecords in cache_root/<fingerprint>/; reused when present.

    The fingerprint covers the corpus file, the user vocab (if any) and `data_cfg`. Without a user
    vocab, a WordPiece vocab of `data_cfg["vocab_size"]` tokens is trained on the training split.
    Returns the cache's info dict (paths, row counts, vocab, most frequent token of the train split).
    """
    from corpus import read_documents, split_documents
    from tokenizer import WordPiece, train_vocab

    cache_dir = os.path.join(cache_root, fingerprint(corpus_path, vocab_path, sorted(data_cfg.items())))
    info_path = os.path.join(cache_dir, "info.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        log(f"reusing MindRecord cache {cache_dir}: {info['train_rows']} train / {info['eval_rows']} eval rows")
        return info
    os.makedirs(cache_dir, exist_ok=True)
    documents = read_documents(corpus_path, data_cfg.get("max_documents"))
    train_docs, eval_docs = split_documents(documents, data_cfg["eval_every"])
    splits = [("train", train_docs, data_cfg["dupe_factor"], data_cfg["seed"])]
    if data_cfg.get("test_split"):   # every other held-out document becomes the test split
        eval_docs, test_docs = eval_docs[0::2], eval_docs[1::2]
        splits.append(("test", test_docs, 1, data_cfg["seed"] + 2))
    splits.append(("eval", eval_docs, 1, data_cfg["seed"] + 1))
    if vocab_path is None:
        vocab_path = train_vocab(train_docs, data_cfg["vocab_size"], cache_dir, data_cfg["lowercase"])
        log(f"trained a WordPiece vocab on {len(train_docs)} documents: {vocab_path}")
    wordpiece = WordPiece(vocab_path, data_cfg["lowercase"])
    info = {"corpus": os.path.abspath(corpus_path), "vocab": os.path.abspath(vocab_path),
            "vocab_size": len(wordpiece), "train_documents": len(train_docs), "eval_documents": len(eval_docs)}
    seq = data_cfg["max_seq_length"]
    for split, docs, dupes, seed in splits:
        encoded = wordpiece.encode_documents(docs)
        path = os.path.join(cache_dir, f"{split}.mindrecord")
        n, n_random = write_mindrecord(path, encoded, wordpiece, seq, dupes, seed, desc=f"NSP pairs ({split})")
        info.update({f"{split}_file": path, f"{split}_rows": n, f"{split}_random_next": n_random})
        if split == "train":
            counts = np.bincount([t for d in encoded for s in d for t in s], minlength=len(wordpiece))
            counts[wordpiece.special_ids] = 0
            info["most_frequent_id"] = int(counts.argmax())
            info["most_frequent_token"] = wordpiece.tokens[info["most_frequent_id"]]
    with open(info_path, "w") as f:  # written last: its presence marks a complete cache
        json.dump(info, f, indent=1)
    log(f"wrote MindRecord cache {cache_dir}: {info['train_rows']} train / {info['eval_rows']} eval rows")
    return info


class Masker:
    """MLM masking of one row: (input_ids, row_id[, epoch]) -> (input_ids, positions, label ids, weights).

    Of the non-special tokens, round(15%) (at least 1, at most `max_predictions`) are chosen; each
    chosen token becomes [MASK] with probability 0.8, a random non-special token with 0.1, and
    stays unchanged with 0.1. Positions/labels are padded with 0 and weight 0 to `max_predictions`.
    The draws depend only on (seed, row_id, epoch) (dynamic masking: new masks every epoch); with
    `fixed=True` only on (seed, row_id): identical in every epoch and run.
    """

    def __init__(self, vocab_size, special_ids, mask_id, max_predictions, mask_prob=0.15, seed=0, fixed=False):
        self.special_ids = np.asarray(special_ids)
        self.random_pool = np.setdiff1d(np.arange(vocab_size), self.special_ids)
        self.mask_id, self.max_predictions, self.mask_prob = mask_id, max_predictions, mask_prob
        self.seed, self.fixed = seed, fixed

    def __call__(self, input_ids, row_id, epoch=0):
        key = [self.seed, int(row_id)] if self.fixed else [self.seed, int(epoch), int(row_id)]
        rng = np.random.default_rng(key)
        ids = np.array(input_ids, np.int32)
        candidates = np.flatnonzero(~np.isin(ids, self.special_ids))
        n = min(self.max_predictions, max(1, int(round(len(candidates) * self.mask_prob))), len(candidates))
        positions = np.sort(rng.choice(candidates, n, replace=False))
        labels = ids[positions].copy()
        action = rng.random(n)
        ids[positions[action < 0.8]] = self.mask_id
        randomized = positions[(action >= 0.8) & (action < 0.9)]
        ids[randomized] = rng.choice(self.random_pool, len(randomized))
        pad = self.max_predictions - n
        return (ids,
                np.pad(positions, (0, pad)).astype(np.int32),
                np.pad(labels, (0, pad)).astype(np.int32),
                np.pad(np.ones(n, np.float32), (0, pad)))

    def batch(self, input_ids, row_ids, batch_info):
        """`Dataset.batch(per_batch_map=...)`: mask each row of a batch with the pipeline's epoch, which
        `set_init_step` restores on resume (a counter kept here would restart at 0)."""
        epoch = batch_info.get_epoch_num()
        rows = [self(ids, row_id, epoch) for ids, row_id in zip(input_ids, row_ids)]
        return tuple(list(column) for column in zip(*rows))


def pretrain_dataset(mindrecord, batch_size, masker, shuffle, num_shards=None, shard_id=None, drop_remainder=True):
    """MindDataset of a cached split, batched and masked by `masker`; columns in `COLUMNS` order."""
    import mindspore.dataset as ds
    data = ds.MindDataset(mindrecord, columns_list=["input_ids", "input_mask", "segment_ids",
                                                    "next_sentence_label", "row_id"],
                          shuffle=shuffle, num_shards=num_shards, shard_id=shard_id)
    data = data.batch(batch_size, drop_remainder=drop_remainder, per_batch_map=masker.batch,
                      input_columns=["input_ids", "row_id"],
                      output_columns=["input_ids", "masked_lm_positions", "masked_lm_ids", "masked_lm_weights"],
                      num_parallel_workers=1, python_multiprocessing=False)
    return data.project(COLUMNS)
