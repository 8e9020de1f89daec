"""Per-layer LAMB diagnostics: a Model.train callback recording trust ratios and norms."""
import csv
import json
import math
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

from mindspore.nn import Cell
from mindspore.train import Callback

from ._validation import describe

_NAME = "TrustRatioMonitor"
FIELDS = ("step", "global_step", "name", "trust_ratio", "w_norm", "u_norm", "grad_norm")
_SUFFIXES = (".csv", ".json")


def _check_path(name, path):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"For '{_NAME}', the argument '{name}' must be a str or os.PathLike, "
                        f"but got {describe(path)}.")
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"For '{_NAME}', the argument '{name}' must end in .csv or .json, but got {path!r}.")
    return os.fspath(path), suffix


def _check_writable(name, path):
    """Create `path`'s directory and open the file for appending, now: a path that cannot be written (under a
    file, in /proc, a directory of that name, no permission) fails here, not after the whole training run.
    A file this check creates is removed again."""
    existed = os.path.lexists(path)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as error:
        raise ValueError(f"For '{_NAME}', the argument '{name}' must be a file that can be written, but "
                         f"{path!r} cannot: {error.strerror or error}.") from error
    if not existed:
        os.remove(path)


class TrustRatioMonitor(Callback):
    r"""Record LAMB's per-layer trust ratios and norms during ``Model.train``, save them, plot them.

    :class:`mindspore_lamb.Lamb` writes, inside its graph, the trust ratio :math:`q`, :math:`\|w\|`
    (before the step) and :math:`\|u\|` of every parameter into ``optimizer.layer_stats``, and the global
    gradient norm :math:`G` into ``optimizer.last_grad_norm``. Every `every` training steps (when
    ``cur_step_num % every == 0``) this callback reads them on the host, after the step and outside
    it: one read of ``layer_stats`` plus two scalars (``last_grad_norm``, ``global_step``), so the
    training step itself never synchronises with the host.

    Each recorded step adds one dict per parameter to ``records``, with keys ``step`` (``Model``'s
    ``cur_step_num``, 1-based, counting every call), ``global_step`` (the optimizer's step counter after
    the step: the number of applied updates, so it lags ``step`` after overflow-skipped steps),
    ``name``, ``trust_ratio``, ``w_norm``, ``u_norm`` and ``grad_norm`` (the same :math:`G` on every
    row of a step). The stats are those of the last *applied* update: after a skipped step (NaN/Inf
    gradients) they repeat the previous one, which ``global_step`` shows; before the first applied update
    they are NaN.

    It checks the optimizer's state before the first step (:meth:`mindspore_lamb.Lamb.check_state`), warns
    and stops training when a layer's norms are NaN or Inf or steps were invalid, and at the end of training
    warns once, with the counts, if the optimizer skipped steps (every step skipped: nothing was trained).

    In a custom loop, call :meth:`record` yourself after a step.

    Args:
        optimizer (Cell): a :class:`mindspore_lamb.Lamb` (anything with ``layer_stats``,
            ``last_grad_norm``, ``global_step`` and ``param_names``).
        every (int): record every `every` steps, >= 1. Default: ``10``.
        path (Union[str, os.PathLike, None]): if given, :meth:`save` to it at the end of training;
            ``.csv`` or ``.json``. Default: ``None``.

    Inputs:
        Not called directly: ``Model.train`` calls ``on_train_step_end`` and ``on_train_end``.

    Outputs:
        ``records``, list[dict], as above.

    Raises:
        TypeError: If `optimizer` has no ``layer_stats``/``param_names`` (is not a Lamb).
        TypeError: If `every` is not an int, or `path` is neither None, str nor os.PathLike.
        ValueError: If `every` is < 1, or `path` does not end in ``.csv`` or ``.json``.

    Supported Platforms:
        ``CPU`` (tested). ``GPU`` ``Ascend``: the composite backend, made of primitive operators for them, has not
        yet run on either device.

    Examples:
        >>> from mindspore import nn, train
        >>> from mindspore_lamb import Lamb, TrustRatioMonitor
        >>> net = nn.Dense(4, 2)
        >>> opt = Lamb(net.trainable_params(), learning_rate=1e-3)
        >>> monitor = TrustRatioMonitor(opt, every=10, path="trust.csv")
        >>> model = train.Model(net, nn.MSELoss(), opt)
        >>> # model.train(1, dataset, callbacks=[monitor]); then monitor.plot("trust.png")
    """

    def __init__(self, optimizer: Cell, every: int = 10, path: Union[str, os.PathLike, None] = None) -> None:
        super().__init__()
        for attr in ("layer_stats", "last_grad_norm", "global_step", "param_names"):
            if not hasattr(optimizer, attr):
                raise TypeError(f"For '{_NAME}', the argument 'optimizer' must be a mindspore_lamb.Lamb "
                                f"(it has no '{attr}'), but got {describe(optimizer)}.")
        if isinstance(every, bool) or not isinstance(every, int):
            raise TypeError(f"For '{_NAME}', the argument 'every' must be int, but got {describe(every)}.")
        if every < 1:
            raise ValueError(f"For '{_NAME}', the argument 'every' must be >= 1, but got {every}.")
        if path is not None:
            _check_writable("path", _check_path("path", path)[0])
        self.optimizer = optimizer
        self.every = every
        self.path = path
        self.records = []
        self._invalid = 0          # the optimizer's invalid_steps when last looked at
        self._at_begin = (0, 0)    # the optimizer's skipped_steps and invalid_steps when training began
        self._first_step = 0       # Model's cur_step_num when training began

    # ---- recording ----

    def record(self, step: int) -> None:
        """Read the last step's stats (one host read of ``layer_stats``) and append them under `step`."""
        opt = self.optimizer
        stats = opt.layer_stats.asnumpy().copy()   # asnumpy shares memory on CPU: copy
        grad_norm = float(opt.last_grad_norm.asnumpy())
        global_step = int(opt.global_step.asnumpy().reshape(-1)[0])
        for name, (trust, w_norm, u_norm) in zip(opt.param_names, stats.tolist()):
            self.records.append({"step": int(step), "global_step": global_step, "name": name,
                                 "trust_ratio": trust, "w_norm": w_norm, "u_norm": u_norm,
                                 "grad_norm": grad_norm})

    def on_train_begin(self, run_context):
        """The optimizer's state is checked once, before the first step (a damaged checkpoint: ValueError)."""
        check = getattr(self.optimizer, "check_state", None)
        if check is not None:
            check()
        self._invalid = self._invalid_steps()
        self._at_begin = (getattr(self.optimizer, "skipped_steps", 0), self._invalid)
        self._first_step = run_context.original_args().cur_step_num

    def _invalid_steps(self):
        return getattr(self.optimizer, "invalid_steps", 0)

    def _warn_skipped(self, run_context):
        """One warning at the end of training when the optimizer skipped steps: how many, of how many."""
        skipped = getattr(self.optimizer, "skipped_steps", 0) - self._at_begin[0]
        if skipped <= 0:
            return
        invalid = self._invalid_steps() - self._at_begin[1]
        calls = run_context.original_args().cur_step_num - self._first_step
        whole = (f"every step of this run ({calls}) was skipped: nothing was trained (is the loss NaN? "
                 f"Lamb.check_state() and nonfinite_parameters() name damaged state)"
                 if skipped >= calls else
                 f"{skipped} of the {calls} steps of this run were skipped, the weights left as they were "
                 f"(with dynamic loss scaling a few skips while the scale settles are expected)")
        warnings.warn(f"{_NAME}: {whole}. The optimizer skipped {skipped} step(s) in this run: {invalid} "
                      f"invalid (a learning-rate or weight-decay Cell's value), {skipped - invalid} with a NaN or "
                      f"Inf gradient or a loss-scale overflow (Lamb.skipped_steps, Lamb.invalid_steps).",
                      RuntimeWarning, stacklevel=2)

    def on_train_step_end(self, run_context):
        step = run_context.original_args().cur_step_num
        if step % self.every == 0:
            self.record(step)
            # before the first applied step every stat is NaN (and so is G): nothing is damaged yet
            bad = sorted({row["name"] for row in self.records[-len(self.optimizer.param_names):]
                          if math.isfinite(row["grad_norm"])
                          and not (math.isfinite(row["w_norm"]) and math.isfinite(row["u_norm"]))})
            if bad:
                warnings.warn(f"{_NAME}: step {step}: parameter(s) {bad} or their moments hold NaN or Inf values "
                              f"(their trust ratio reads NaN; Lamb leaves them as they are; the optimizer's "
                              f"check_state() names damaged moments); training is stopped.",
                              RuntimeWarning, stacklevel=2)
                run_context.request_stop()
            invalid = self._invalid_steps()
            if invalid > self._invalid:
                warnings.warn(f"{_NAME}: step {step}: {invalid - self._invalid} step(s) were skipped as invalid: a "
                              f"learning-rate or weight-decay Cell returned NaN, Inf or a negative value (or "
                              f"learning rate * weight decay > 1 with the decay outside the trust ratio) at "
                              f"global_step {self.records[-1]['global_step']}, which does not advance while its "
                              f"steps are skipped; training is stopped.", RuntimeWarning, stacklevel=2)
                self._invalid = invalid
                run_context.request_stop()

    def on_train_end(self, run_context):
        """Warn once if the optimizer skipped steps during training (with the counts); save to `path`."""
        self._warn_skipped(run_context)
        if self.path is not None:
            self.save(self.path)

    # ---- output ----

    def save(self, path: Union[str, os.PathLike]) -> str:
        """Write ``records`` to `path`: CSV (header ``step,global_step,name,trust_ratio,w_norm,u_norm,
        grad_norm``, one row per parameter and recorded step) or JSON (a list of those dicts), by suffix.

        Raises:
            TypeError: If `path` is neither str nor os.PathLike.
            ValueError: If `path` does not end in ``.csv`` or ``.json``.
        """
        path, suffix = _check_path("path", path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as handle:
            if suffix == ".csv":
                writer = csv.DictWriter(handle, fieldnames=FIELDS)
                writer.writeheader()
                writer.writerows(self.records)
            else:
                json.dump(self.records, handle, indent=1)
        return path

    def series(self) -> Dict[str, Tuple[List[int], List[float]]]:
        """dict: parameter name -> (list of steps, list of trust ratios), in recording order."""
        out = {}
        for row in self.records:
            steps, ratios = out.setdefault(row["name"], ([], []))
            steps.append(row["step"])
            ratios.append(row["trust_ratio"])
        return out

    def plot(self, png_path: Union[str, os.PathLike], top_k: Optional[int] = None,
             names: Optional[Sequence[str]] = None) -> str:
        """Save a PNG of the trust ratio of each layer over the recorded steps (log y axis).

        Needs matplotlib (``pip install matplotlib``, or the ``plot`` extra); it is imported here, not
        at module import, and drawn with the Agg canvas, so no display and no global backend change.

        Args:
            png_path (Union[str, os.PathLike]): the file to write.
            top_k (int): plot only the `top_k` layers whose trust ratio strays farthest from 1
                (largest :math:`\\max |\\log q|` over the records, i.e. where LAMB departs most from
                Adam); None plots every layer. Default: ``None``.
            names (Iterable[str]): plot only these parameters (e.g. ``optimizer.layer_adapted_names()``,
                leaving out those whose q is 1 by construction); None: all. Default: ``None``.

        Raises:
            ImportError: If matplotlib is not installed.
            TypeError: If `top_k` is not None or an int.
            ValueError: If `top_k` < 1, or nothing has been recorded yet.
        """
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
            raise TypeError(f"For '{_NAME}.plot', the argument 'top_k' must be None or int, "
                            f"but got {describe(top_k)}.")
        if top_k is not None and top_k < 1:
            raise ValueError(f"For '{_NAME}.plot', the argument 'top_k' must be >= 1, but got {top_k}.")
        if not self.records:
            raise ValueError(f"For '{_NAME}.plot', there is nothing to plot: no step has been recorded yet.")
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as error:
            raise ImportError(f"'{_NAME}.plot' needs matplotlib, which is not installed: "
                              f"pip install matplotlib (or mindspore_lamb[plot]).") from error

        series = self.series()
        if names is not None:
            wanted = set(names)
            series = {name: values for name, values in series.items() if name in wanted}
            if not series:
                raise ValueError(f"For '{_NAME}.plot', none of the parameters in 'names' has been recorded.")
        names = list(series)
        if top_k is not None:
            def spread(name):
                return max((abs(math.log(q)) if q > 0 else math.inf for q in series[name][1] if not math.isnan(q)),
                           default=0.0)
            names = sorted(names, key=spread, reverse=True)[:top_k]
        outside = len(names) > 8                 # a long legend goes beside the axes, not over the curves
        fig = Figure(figsize=(13 if outside else 8, 5))
        FigureCanvasAgg(fig)
        axes = fig.add_subplot(1, 1, 1)
        for name in names:
            steps, ratios = series[name]
            axes.plot(steps, ratios, marker=".", label=name)
        if all(q > 0 for name in names for q in series[name][1] if not math.isnan(q)):
            axes.set_yscale("log")
        axes.set_xlabel("step")
        axes.set_ylabel("trust ratio  ||w|| / ||u||")
        axes.set_title("LAMB trust ratio per layer")
        axes.grid(True, alpha=0.3)
        if outside:
            axes.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                        ncol=1 + len(names) // 30)
        else:
            axes.legend(fontsize="small", loc="best")
        fig.savefig(os.fspath(png_path), format="png", bbox_inches="tight")
        return os.fspath(png_path)
