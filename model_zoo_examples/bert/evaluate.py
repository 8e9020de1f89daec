"""Held-out evaluation (MLM / NSP accuracy as `nn.Metric`s for `Model.eval`) and the loss curve."""
import json
import os

import numpy as np
from mindspore import nn
from mindspore.train import Callback


class _Accuracy(nn.Metric):
    def clear(self):
        self.correct, self.total = 0.0, 0.0

    def eval(self):
        return self.correct / max(self.total, 1.0)


class MLMAccuracy(_Accuracy):
    """Fraction of masked tokens predicted exactly (padding predictions have weight 0)."""

    def update(self, mlm_pred, mlm_ids, mlm_weights, nsp_pred, nsp_label):
        w = self._convert_data(mlm_weights)
        self.correct += float(((self._convert_data(mlm_pred) == self._convert_data(mlm_ids)) * w).sum())
        self.total += float(w.sum())


class ConstantMLMAccuracy(_Accuracy):
    """The most-frequent-token baseline: always predict `token_id`."""

    def __init__(self, token_id):
        super().__init__()
        self.token_id = token_id
        self.clear()

    def update(self, mlm_pred, mlm_ids, mlm_weights, nsp_pred, nsp_label):
        w = self._convert_data(mlm_weights)
        self.correct += float(((self._convert_data(mlm_ids) == self.token_id) * w).sum())
        self.total += float(w.sum())


class NSPAccuracy(_Accuracy):
    def update(self, mlm_pred, mlm_ids, mlm_weights, nsp_pred, nsp_label):
        pred, label = self._convert_data(nsp_pred), self._convert_data(nsp_label).reshape(-1)
        self.correct += float((pred == label).sum())
        self.total += float(label.size)


def metrics(most_frequent_id):
    return {"mlm_accuracy": MLMAccuracy(), "nsp_accuracy": NSPAccuracy(),
            "mlm_baseline": ConstantMLMAccuracy(most_frequent_id)}


class LossRecorder(Callback):
    """Keeps (global step, loss) of every training step in `.records`; appends them to a JSON-lines file.
    The step is Model's `cur_step_num`: global across resumes with mindspore_lamb.resume's callbacks."""

    def __init__(self, path=None):
        super().__init__()
        self.records, self.path = [], path

    def on_train_step_end(self, run_context):
        cb = run_context.original_args()
        out = cb.net_outputs
        loss = out[0] if isinstance(out, (tuple, list)) else out
        record = {"step": int(cb.cur_step_num), "loss": float(np.asarray(loss.asnumpy()).reshape(-1)[0])}
        self.records.append(record)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_loss_log(path):
    """The records of a loss log, up to a line torn by a kill (which ends it)."""
    records = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    break
    return records


def keep_loss_log(path, step):
    """Cut the loss log to its records up to global `step` (all of them go when `step` is 0): a run resumed
    from the checkpoint of `step` logs the later steps again."""
    kept = [r for r in read_loss_log(path) if r["step"] <= step]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)


def plot_loss(records, png_path, title="BERT pretraining loss (MLM + NSP)"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = np.array([r["step"] for r in records])
    loss = np.array([r["loss"] for r in records])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, lw=0.6, alpha=0.5, label="per step")
    if len(loss) >= 20:
        k = max(len(loss) // 50, 5)
        ax.plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid"), lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path
