"""Real data sets installed offline (nothing is downloaded at run time).

* ``letter``: UCI Letter Recognition, 20,000 x 16 integer features, 26 classes, from Debian's
  ``r-cran-mlbench`` (``apt-get install r-cran-mlbench``), read with PyPI ``rdata``. Large enough for
  batches of 8192. Split as in UCI: the first 16,000 rows train (of which the last 2,000 validate),
  the last 4,000 test.
* ``digits``: scikit-learn's ``load_digits`` (1,797 8x8 images, 10 classes), shipped inside the
  PyPI wheel. Too small for large batches (about 1,100 training rows); used by the quick smoke test.

Features are standardized with the training split's mean and standard deviation.
"""
import os

import numpy as np

MLBENCH_DIRS = ("/usr/lib/R/site-library/mlbench", "/usr/local/lib/R/site-library/mlbench",
                "/usr/lib/R/library/mlbench")
LETTER_HELP = ("UCI LetterRecognition comes from Debian's r-cran-mlbench and is read with PyPI rdata:\n"
               "    apt-get update && apt-get install -y r-cran-mlbench\n"
               "    pip install -e \".[large-batch]\"   (rdata, pandas<3, scikit-learn)\n"
               "(or pass --data_file /path/to/LetterRecognition.rda, or use --data digits)")


def _letter_file(path=None):
    if path:
        return path
    for d in MLBENCH_DIRS:
        f = os.path.join(d, "data", "LetterRecognition.rda")
        if os.path.exists(f):
            return f
    raise SystemExit("LetterRecognition.rda not found.\n" + LETTER_HELP)


def load_letter(path=None):
    """Return (x, y) for all 20,000 rows, in the file's order."""
    f = _letter_file(path)
    try:
        import rdata
    except ImportError:
        raise SystemExit("PyPI package rdata is missing.\n" + LETTER_HELP) from None
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown encoding. Assumed ASCII."
        df = rdata.read_rda(f)["LetterRecognition"]
    x = df.drop(columns="lettr").to_numpy(np.float32)
    y = df["lettr"].cat.codes.to_numpy(np.int32)
    return x, y


def load_digits():
    try:
        from sklearn.datasets import load_digits as sk_load
    except ImportError:
        raise SystemExit("scikit-learn is missing: pip install scikit-learn") from None
    d = sk_load()
    return d.data.astype(np.float32), d.target.astype(np.int32)


def splits(name, path=None):
    """Return {"train": (x, y), "val": (x, y), "test": (x, y)}, standardized, and the class count."""
    if name == "letter":
        x, y = load_letter(path)
        idx = {"train": np.arange(0, 14000), "val": np.arange(14000, 16000), "test": np.arange(16000, 20000)}
    elif name == "digits":
        x, y = load_digits()
        perm = np.random.default_rng(0).permutation(len(y))  # fixed split, independent of the seeds
        n_test = n_val = len(y) // 5
        idx = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
    else:
        raise ValueError(f"unknown data set {name!r}")
    mean = x[idx["train"]].mean(0)
    std = x[idx["train"]].std(0) + 1e-6
    x = (x - mean) / std
    return {k: (x[i], y[i]) for k, i in idx.items()}, int(y.max()) + 1
