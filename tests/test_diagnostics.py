"""TrustRatioMonitor: records, files and plot, on a loss-scaled, clipped run through Model.train."""
import csv
import json
import re
import sys

import mindspore as ms
import mindspore.dataset as ds
import numpy as np
import pytest
from mindspore import nn

from mindspore_lamb import Lamb, LossScaleTrainStep, TrustRatioMonitor, bert_param_groups

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Block(nn.Cell):
    def __init__(self):
        super().__init__()
        self.dense = nn.Dense(4, 6)
        self.layernorm = nn.LayerNorm((6,))
        self.head = nn.Dense(6, 2)

    def construct(self, x):
        return self.head(self.layernorm(self.dense(x)))


class Snapshot(ms.train.Callback):
    """After the monitor: what the optimizer's own readers say at every step (an independent read)."""

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        self.by_step = {}

    def on_train_step_end(self, run_context):
        step = run_context.original_args().cur_step_num
        w_norms = {p.name: float(np.linalg.norm(p.asnumpy().astype(np.float64))) for p in self.opt.parameters}
        self.by_step[step] = (self.opt.trust_ratios(), self.opt.layer_norms(), self.opt.global_grad_norm,
                              w_norms)


def train(rng, every, path, epochs=2):
    net = Block()
    for p in net.trainable_params():
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.5))
    opt = Lamb(bert_param_groups(net, 0.01), learning_rate=0.05)
    cell = LossScaleTrainStep(nn.WithLossCell(net, nn.MSELoss()), opt, init_scale=2.0 ** 10, max_grad_norm=0.5)
    x = rng.standard_normal((24, 4)).astype(np.float32)
    x[13, 0] = np.nan                           # batch 4 of 6 overflows: a skipped step in each epoch
    t = rng.standard_normal((24, 2)).astype(np.float32)
    data = ds.NumpySlicesDataset({"x": x, "t": t}, shuffle=False).batch(4)
    monitor = TrustRatioMonitor(opt, every=every, path=path)
    snap = Snapshot(opt)
    ms.train.Model(cell).train(epochs, data, callbacks=[monitor, snap], dataset_sink_mode=False)
    return net, opt, cell, monitor, snap


def test_records_match_the_optimizer(mode, rng, tmp_path):
    path = tmp_path / "trust.csv"
    net, opt, cell, monitor, snap = train(rng, every=2, path=path)
    names = [p.name for p in opt.parameters]
    steps = sorted({r["step"] for r in monitor.records})
    assert steps == [2, 4, 6, 8, 10, 12]                    # 2 epochs x 6 batches, every 2nd step
    assert len(monitor.records) == len(steps) * len(names)
    assert opt.global_step.asnumpy().item() == 10           # two steps skipped (NaN batch)
    assert cell.get_loss_scale() == 2.0 ** 8
    for step in steps:
        rows = [r for r in monitor.records if r["step"] == step]
        ratios, norms, grad_norm, _ = snap.by_step[step]
        assert [r["name"] for r in rows] == names
        for row in rows:
            assert row["trust_ratio"] == ratios[row["name"]]
            assert (row["trust_ratio"], row["w_norm"], row["u_norm"]) == norms[row["name"]]
            assert row["grad_norm"] == grad_norm
    # steps 4 and 10 are skipped (NaN batch): their records repeat the previous update, global_step lags
    assert {r["global_step"] for r in monitor.records if r["step"] == 4} == {3}
    assert {r["global_step"] for r in monitor.records if r["step"] == 10} == {8}
    for row in (r for r in monitor.records if r["step"] == 10):
        np.testing.assert_allclose(row["w_norm"], snap.by_step[8][3][row["name"]], rtol=1e-5)
    # independent check of the numbers: ||w|| recorded at step s is the norm of the weights after step s-1,
    # and q = ||w|| / ||u|| for layer-adapted parameters with both norms > 0
    for step in (6, 12):
        for row in (r for r in monitor.records if r["step"] == step):
            np.testing.assert_allclose(row["w_norm"], snap.by_step[step - 1][3][row["name"]], rtol=1e-5)
            np.testing.assert_allclose(row["trust_ratio"], row["w_norm"] / row["u_norm"], rtol=1e-5)
    # saved at train end; CSV reads back to the same records
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(monitor.records)
    for got, want in zip(rows, monitor.records):
        assert got["name"] == want["name"] and int(got["step"]) == want["step"]
        assert int(got["global_step"]) == want["global_step"]
        for key in ("trust_ratio", "w_norm", "u_norm", "grad_norm"):
            assert float(got[key]) == pytest.approx(want[key], rel=1e-12)


def test_json_and_plot(rng, tmp_path):
    _, opt, _, monitor, _ = train(rng, every=1, path=None, epochs=1)
    assert not list(tmp_path.iterdir())                    # no path: nothing written at train end
    out = monitor.save(tmp_path / "sub" / "trust.json")
    with open(out, encoding="utf-8") as handle:
        assert json.load(handle) == monitor.records
    png = tmp_path / "trust.png"
    monitor.plot(png)
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000
    png_top = tmp_path / "top.png"
    monitor.plot(str(png_top), top_k=2)
    assert png_top.read_bytes()[:8] == PNG_MAGIC


def test_top_k_picks_the_extreme_layers():
    opt = Lamb(Block().trainable_params(), learning_rate=0.1)
    monitor = TrustRatioMonitor(opt)
    monitor.records = [{"step": 1, "name": n, "trust_ratio": q} for n, q in
                       [("a", 1.0), ("b", 50.0), ("c", 0.001), ("d", 2.0)]]
    assert list(monitor.series()) == ["a", "b", "c", "d"]
    drawn = []

    class Axes:   # stands in for matplotlib to see which layers are drawn
        def plot(self, steps, ratios, **kwargs):
            drawn.append(kwargs["label"])

    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    original = Figure.add_subplot
    try:
        Figure.add_subplot = lambda self, *a, **k: _Recorder(original(self, *a, **k), Axes())
        monitor.plot("/dev/null", top_k=2)
    finally:
        Figure.add_subplot = original
    assert drawn == ["c", "b"]          # |log 0.001| = 6.9 > |log 50| = 3.9 > |log 2| > |log 1|


class _Recorder:
    def __init__(self, real, spy):
        self.real, self.spy = real, spy

    def plot(self, *args, **kwargs):
        self.spy.plot(*args, **kwargs)
        return self.real.plot(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_record_in_a_custom_loop(mode, rng):
    net = Block()
    opt = Lamb(net.trainable_params(), learning_rate=0.1)
    grads = tuple(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32)) for p in net.trainable_params())
    opt(grads)
    monitor = TrustRatioMonitor(opt, every=1)
    monitor.record(7)
    assert {r["step"] for r in monitor.records} == {7} and {r["global_step"] for r in monitor.records} == {1}
    assert {r["name"]: r["trust_ratio"] for r in monitor.records} == opt.trust_ratios()
    want_g = np.sqrt(sum(np.sum(g.asnumpy().astype(np.float64) ** 2) for g in grads))
    assert monitor.records[0]["grad_norm"] == pytest.approx(want_g, rel=1e-5)


@pytest.mark.parametrize("exact_skip", [False, True])
@pytest.mark.parametrize("loss_scale", [1.0, 8.0])
def test_global_grad_norm(mode, path, exact_skip, loss_scale, rng):
    """G of the unscaled gradients, from the fused kernel's first pass (default) or from the pre-pass
    (exact_skip), or from the composite graph: all equal NumPy's."""
    net = Block()
    opt = Lamb(net.trainable_params(), learning_rate=0.1, loss_scale=loss_scale, exact_skip=exact_skip,
               backend=path)
    assert opt.backend.name == path
    grads = tuple(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32)) for p in net.trainable_params())
    opt(grads)
    want_g = np.sqrt(sum(np.sum(g.asnumpy().astype(np.float64) ** 2) for g in grads)) / loss_scale
    assert opt.global_grad_norm == pytest.approx(want_g, rel=1e-6)


def test_readers_are_nan_before_the_first_applied_step(mode, path, rng):
    """0.0 would read as "no update": before any applied step (and after a skipped one) the trust ratios, the
    norms and G are NaN, and no parameter is called non-finite; the first applied step fills them in."""
    net = Block()
    opt = Lamb(net.trainable_params(), learning_rate=0.1, backend=path)
    shapes = [p.shape for p in net.trainable_params()]
    nan_grads = tuple(ms.Tensor(np.full(shape, np.nan, np.float32)) for shape in shapes)
    for step in range(2):
        assert np.isnan(list(opt.trust_ratios().values())).all()
        assert np.isnan(list(opt.layer_norms().values())).all()
        assert np.isnan(opt.global_grad_norm) and opt.nonfinite_parameters() == []
        opt(nan_grads)                              # skipped: still nothing applied
    assert opt.skipped_steps == 2
    opt(tuple(ms.Tensor(rng.standard_normal(shape).astype(np.float32)) for shape in shapes))
    assert np.isfinite(list(opt.layer_norms().values())).all() and np.isfinite(opt.global_grad_norm)
    assert opt.nonfinite_parameters() == []


def test_missing_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    opt = Lamb(Block().trainable_params(), learning_rate=0.1)
    monitor = TrustRatioMonitor(opt)
    monitor.record(1)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)    # `import matplotlib...` now raises ImportError
    with pytest.raises(ImportError, match="needs matplotlib.*pip install matplotlib"):
        monitor.plot(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(optimizer=nn.Dense(2, 2)), TypeError, ["'optimizer'", "Dense"]),
    (dict(every=0), ValueError, ["'every'", "0"]),
    (dict(every=2.0), TypeError, ["'every'", "2.0"]),
    (dict(path="trust.txt"), ValueError, ["'path'", "trust.txt"]),
    (dict(path=3), TypeError, ["'path'", "3"]),
])
def test_bad_arguments(kwargs, exc, words):
    args = dict(optimizer=Lamb(nn.Dense(2, 2).trainable_params(), 0.1))
    args.update(kwargs)
    with pytest.raises(exc) as info:
        TrustRatioMonitor(**args)
    for word in words:
        assert word in str(info.value)


def test_bad_save_and_plot_arguments(tmp_path):
    monitor = TrustRatioMonitor(Lamb(nn.Dense(2, 2).trainable_params(), 0.1))
    with pytest.raises(ValueError, match="nothing to plot"):
        monitor.plot(tmp_path / "x.png")
    with pytest.raises(ValueError, match="'path'.*x.yaml"):
        monitor.save(tmp_path / "x.yaml")
    monitor.record(1)
    with pytest.raises(ValueError, match="'top_k'.*0"):
        monitor.plot(tmp_path / "x.png", top_k=0)
    with pytest.raises(TypeError, match="'top_k'.*'2'"):
        monitor.plot(tmp_path / "x.png", top_k="2")


def test_skipped_steps_are_reported_once_at_the_end(rng):
    """Model.train on a NaN loss at every step: every step is skipped, and the monitor says so once, with the
    counts; a run with some skipped steps says how many of how many."""
    ms.set_context(mode=ms.GRAPH_MODE)
    for nan_rows, words in ((slice(None), r"every step of this run \(6\) was skipped.*skipped 6 step"),
                            (slice(13, 14), r"1 of the 6 steps of this run were skipped.*0 invalid.*1 with a NaN")):
        net = Block()
        opt = Lamb(net.trainable_params(), learning_rate=0.05)
        x = rng.standard_normal((24, 4)).astype(np.float32)
        x[nan_rows, 0] = np.nan
        data = ds.NumpySlicesDataset({"x": x, "t": np.zeros((24, 2), np.float32)}, shuffle=False).batch(4)
        monitor = TrustRatioMonitor(opt, every=100)
        with pytest.warns(RuntimeWarning) as caught:
            ms.train.Model(net, nn.MSELoss(), opt).train(1, data, callbacks=[monitor], dataset_sink_mode=False)
        messages = [str(w.message) for w in caught if "TrustRatioMonitor" in str(w.message)]
        assert len(messages) == 1, messages
        assert re.search(words, messages[0]), messages[0]
