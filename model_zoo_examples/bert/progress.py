"""Progress bars with ETA (`tqdm`) for data preparation and training, quiet when not on a terminal.

* `ProgressBar` is a MindSpore `Callback`: one bar over all training steps of `Model.train` (resumed
  runs start at the steps already done), with the current loss and learning rate.
* `progress(iterable, ...)` wraps a data-preparation loop in a bar.
* Bars go to stderr and are shown only when stderr is a terminal, so logs, CI and tests see exactly
  the plain log lines (`LossMonitor`, `TimeMonitor`, prints). While a bar is shown,
  `bar_friendly_stdout()` routes `print` through `tqdm.write`, so those lines appear above the bar
  instead of being spliced into it.
"""
import contextlib
import sys

from mindspore.train import Callback

try:
    from tqdm import tqdm
except ImportError:  # tqdm is in the `bert` extra; without it there are no bars, everything else works
    tqdm = None


def bars_enabled(stream=None):
    """Bars only on an interactive terminal (never in logs, CI or pytest's captured output)."""
    stream = sys.stderr if stream is None else stream
    return tqdm is not None and hasattr(stream, "isatty") and stream.isatty()


class _BarWriter:
    """stdout while bars are shown on the same terminal: each complete line is written with the bars
    (on stderr) cleared first and redrawn after, so that log lines never get spliced into a bar."""

    def __init__(self, stream):
        self.stream, self.buffer = stream, ""

    def write(self, text):
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def _line(self, line):
        with tqdm.external_write_mode(file=sys.stderr):  # clears the bars drawn on stderr
            self.stream.write(line + "\n")
            self.stream.flush()

    def flush(self):
        if self.buffer:
            self._line(self.buffer)
            self.buffer = ""
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def bar_friendly_stdout():
    """Within the block, if bars are shown and stdout is the same kind of terminal, `print` clears them first.

    When stdout goes to a file or a pipe (a log), it is left alone: the bars stay on the terminal and the
    log gets the plain lines."""
    stdout = sys.stdout
    if not bars_enabled() or isinstance(stdout, _BarWriter) or not (hasattr(stdout, "isatty") and stdout.isatty()):
        yield
        return
    sys.stdout = _BarWriter(stdout)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = stdout


def progress(iterable=None, total=None, desc=None, unit="it", **kwargs):
    """`tqdm(iterable)` on a terminal, the iterable itself (or a no-op bar) elsewhere."""
    if not bars_enabled():
        return iterable if iterable is not None else _NoBar()
    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, **kwargs)


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s="", refresh=True):
        pass

    def close(self):
        pass


def _host_lr(schedule, step):
    """The learning rate of `WarmupPolynomialDecayLR` at optimizer step `step`, computed on the host."""
    peak, end = schedule.learning_rate, schedule.end_learning_rate
    if schedule.use_warmup and step < schedule.warmup_steps:
        return peak * step / schedule.warmup_steps
    progress_ = min(step, schedule.decay_steps) / schedule.decay_steps
    return (peak - end) * (1.0 - progress_) ** schedule.power + end


class ProgressBar(Callback):
    """A bar over the `total_steps` steps of `Model.train`, with ETA, loss and learning rate.

    Args:
        total_steps (int): steps of the whole run (all epochs, including those done before a resume).
        initial_steps (int): steps already done (``--resume``).
        schedule: a `WarmupPolynomialDecayLR` (or None): shows the learning rate of the current step.
        accumulation_steps (int): micro-batches per optimizer step (the schedule counts optimizer steps).
        every (int): refresh the postfix every `every` steps (reading the loss synchronises the device).
        disable (bool): default: no bar unless stderr is a terminal.
    """

    def __init__(self, total_steps, initial_steps=0, schedule=None, accumulation_steps=1, every=10, disable=None):
        super().__init__()
        self.total, self.initial = total_steps, initial_steps
        self.schedule, self.accumulation = schedule, max(int(accumulation_steps), 1)
        self.every = max(int(every), 1)
        self.disable = (not bars_enabled()) if disable is None else disable
        self.bar, self.done = None, initial_steps

    def on_train_begin(self, run_context):
        if self.disable:
            return
        self.bar = tqdm(total=self.total, initial=self.initial, desc="train", unit="step",
                        dynamic_ncols=True, smoothing=0.05)

    def on_train_step_end(self, run_context):
        if self.bar is None:
            return
        self.done += 1
        self.bar.update(1)
        if self.done % self.every == 0 or self.done == self.total:
            cb = run_context.original_args()
            out = cb.net_outputs
            loss = out[0] if isinstance(out, (tuple, list)) else out
            postfix = f"loss {float(loss.asnumpy().reshape(-1)[0]):.4f}"
            if self.schedule is not None:
                postfix += f", lr {_host_lr(self.schedule, (self.done - 1) // self.accumulation):.3g}"
            self.bar.set_postfix_str(postfix, refresh=False)

    def on_train_end(self, run_context):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
