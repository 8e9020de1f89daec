"""WordPiece vocabulary (trained offline with HuggingFace `tokenizers`) and tokenisation of sentences.

The vocabulary is a plain BERT `vocab.txt` (one token per line, id = line number), so a user vocab
(e.g. Google's `uncased_L-12_H-768_A-12/vocab.txt`) works the same way, and so does
`mindspore.dataset.text.BertTokenizer`.
"""
import os

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_vocab(documents, vocab_size, out_dir, lowercase=True, min_frequency=2):
    """Train a WordPiece vocab on the sentences of `documents`; returns the path of `vocab.txt`."""
    from tokenizers import BertWordPieceTokenizer

    from progress import bars_enabled
    tokenizer = BertWordPieceTokenizer(lowercase=lowercase, strip_accents=lowercase)
    sentences = (s for doc in documents for s in doc)
    tokenizer.train_from_iterator(sentences, vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, show_progress=bars_enabled())
    os.makedirs(out_dir, exist_ok=True)
    return tokenizer.save_model(out_dir)[0]


def load_vocab(path):
    """The vocab file as a list of tokens (index = id); checks the BERT special tokens are there."""
    with open(path, encoding="utf-8") as f:
        tokens = [line.rstrip("\n") for line in f]
    missing = [t for t in SPECIAL_TOKENS if t not in tokens]
    if missing:
        raise ValueError(f"vocab {path} lacks the special tokens {missing}")
    return tokens


class WordPiece:
    """Sentence -> WordPiece ids with a given `vocab.txt` (fast Rust tokenizer from `tokenizers`)."""

    def __init__(self, vocab_path, lowercase=True):
        from tokenizers import BertWordPieceTokenizer
        self.tokens = load_vocab(vocab_path)
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self._tok = BertWordPieceTokenizer(vocab_path, lowercase=lowercase, strip_accents=lowercase)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (self.ids[t] for t in SPECIAL_TOKENS)
        self.special_ids = sorted(self.ids[t] for t in SPECIAL_TOKENS)

    def __len__(self):
        return len(self.tokens)

    def encode_documents(self, documents):
        """Documents of sentences -> documents of id lists (no special tokens)."""
        flat = [s for doc in documents for s in doc]
        encoded = [e.ids for e in self._tok.encode_batch(flat, add_special_tokens=False)]
        out, i = [], 0
        for doc in documents:
            out.append([ids for ids in encoded[i:i + len(doc)] if ids])
            i += len(doc)
        return [doc for doc in out if doc]

    def decode(self, ids):
        return " ".join(self.tokens[i] for i in ids).replace(" ##", "")
