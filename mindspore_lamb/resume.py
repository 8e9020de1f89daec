"""Checkpoints that survive ``kill -9`` at any moment, and ``Model.train`` resumed exactly where they were taken.

* :class:`StepCheckpoint` (a ``Model.train`` callback) saves the whole train cell every `every` steps as
  ``<prefix>-<step>.ckpt``: written under another name, with a CRC and the step inside, flushed to disk,
  then renamed, so a reader only ever sees complete files; older checkpoints are deleted only after that,
  keeping the newest `keep`. Like :class:`GlobalStep`, which processes that save nothing use, it numbers
  ``Model``'s steps globally across resumes (``cur_step_num``).
* :func:`resume` loads the newest checkpoint that loads, passes its CRC and holds every parameter of the
  cell, and moves the dataset to the step after it (``Dataset.set_init_step``); under ``msrun`` with one
  checkpoint directory per worker, the newest step every worker has.

The recipe (seeds, masks, dropout, msrun) and what it guarantees: docs/resume.md.
"""
import os
import re
from typing import Dict, Optional, Sequence, Tuple

import mindspore as ms
from mindspore.train import Callback

from .state import check_state

STEP = "resume_step"          # checkpoint entry: the Model.train steps (data batches) done


def checkpoints(directory: str, prefix: str) -> Dict[int, str]:
    """{step: path} of the `<prefix>-<step>.ckpt` files of `directory` (none if it does not exist)."""
    pattern = re.compile(re.escape(prefix) + r"-(\d+)\.ckpt$")
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return {int(m.group(1)): os.path.join(directory, name) for name in names for m in [pattern.match(name)] if m}


def _fsync(path):
    """Flush a file's data (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(cell: ms.nn.Cell, directory: str, prefix: str, step: int, keep: int = 2) -> str:
    """Write `cell`'s parameters and `step` to `directory/<prefix>-<step>.ckpt` atomically; keep the newest
    `keep` checkpoints. Returns the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{prefix}-{step}.ckpt")
    partial = os.path.join(directory, f".{prefix}-{step}.partial.ckpt")   # never matches checkpoints()
    ms.save_checkpoint(cell, partial, crc_check=True, append_dict={STEP: int(step)})
    _fsync(partial)
    os.replace(partial, path)
    _fsync(directory)                      # the rename itself survives a crash of the machine
    found = checkpoints(directory, prefix)
    stale = [found[old] for old in sorted(found)[:-keep]]
    stale += [os.path.join(directory, name) for name in os.listdir(directory)   # left by a killed save
              if name.startswith(f".{prefix}-") and ".partial." in name]
    for old in stale:
        os.remove(old)
    return path


def _saved_parameters(cell):
    """The parameters `ms.save_checkpoint(cell)` writes: it skips those flagged pipeline-shared (Lamb's
    diagnostics, runtime state that checkpoints neither save nor expect)."""
    return [p for p in cell.get_parameters() if not p.param_info.is_pipeline_shared_param]


def _verified(path, step, cell):
    """The parameter dict of checkpoint `path` of `step`, or the reason it cannot be resumed from (a str)."""
    try:
        params = ms.load_checkpoint(path, crc_check=True)
    except (ValueError, RuntimeError, OSError) as err:
        return f"does not load ({str(err).splitlines()[0]})"
    saved_step = params.get(STEP)
    if saved_step is None or int(saved_step.asnumpy()) != step:
        return f"has no '{STEP}' entry equal to {step} (not written by mindspore_lamb.resume.save)"
    missing = [p.name for p in _saved_parameters(cell) if p.name not in params or params[p.name].shape != p.shape]
    if missing:
        return f"lacks (or has another shape for) {len(missing)} parameters of the cell, e.g. {missing[:3]}"
    try:
        check_state(params, "it")          # LAMB's state: global_step >= 0, finite moments, v >= 0
    except ValueError as err:
        return str(err)
    return params


def newest(cell: ms.nn.Cell, directory: str, prefix: str,
           peers: Sequence[str] = ()) -> Tuple[int, Optional[dict]]:
    """(step, parameter dict) of the newest checkpoint of `directory` that verifies for `cell` and whose step
    also verifies in every directory of `peers` (the other workers' own checkpoints); (0, None) when the
    directory holds no checkpoint. Raises RuntimeError, with each file's reason, when checkpoints exist but
    none verifies: starting afresh would silently discard them."""
    found = checkpoints(directory, prefix)
    others = [checkpoints(peer, prefix) for peer in peers]
    reasons = []
    for step in sorted(found, reverse=True):
        params = _verified(found[step], step, cell)
        if isinstance(params, str):
            reasons.append(f"{found[step]} {params}")
            continue
        lacking = [peer for peer, files in zip(peers, others)
                   if step not in files or isinstance(_verified(files[step], step, cell), str)]
        if lacking:
            reasons.append(f"{found[step]}: no verified step-{step} checkpoint in {lacking}")
            continue
        for reason in reasons:
            print(f"resume: skipped {reason}", flush=True)
        return step, params
    if found:
        raise RuntimeError(f"No checkpoint of '{directory}' can be resumed from:\n  " + "\n  ".join(reasons))
    return 0, None


def resume(cell: ms.nn.Cell, directory: str, prefix: str, dataset: Optional[ms.dataset.Dataset] = None,
           peers: Sequence[str] = ()) -> int:
    """Load the newest verified checkpoint (see :func:`newest`) into `cell` and start `dataset` at the step
    after it; returns that step (0: no checkpoint, nothing loaded). Pass ``initial_epoch=step //
    dataset.get_dataset_size()`` to ``Model.train``, and ``initial_step=step`` to :class:`StepCheckpoint` or
    :class:`GlobalStep`."""
    step, params = newest(cell, directory, prefix, peers)
    if params is None:
        return 0
    not_loaded, _ = ms.load_param_into_net(cell, params, strict_load=True)
    if not_loaded:
        raise RuntimeError(f"resume: {len(not_loaded)} parameters of the cell were not loaded: {not_loaded[:3]}")
    if dataset is not None and step:
        dataset.set_init_step(step)
    return step


def _check_int(owner, name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"For '{owner}', the argument '{name}' must be an int >= {low}, but got {value!r}.")


class GlobalStep(Callback):
    """Number ``Model.train``'s steps (``cur_step_num``) from `initial_step`, the step :func:`resume` returned,
    so that every callback (loss logs, monitors, checkpoints) sees the step numbers of an uninterrupted run.
    Every process of a resumed run needs it (:class:`StepCheckpoint` is one); it acts on ``on_train_begin``.

    Args:
        initial_step (int): the step training resumes after (0: a fresh run).
    """

    def __init__(self, initial_step: int = 0) -> None:
        super().__init__()
        _check_int(type(self).__name__, "initial_step", initial_step, 0)
        self.initial_step = initial_step

    def on_train_begin(self, run_context):
        run_context.original_args().cur_step_num = self.initial_step


class StepCheckpoint(GlobalStep):
    """Save the train cell with :func:`save` every `every` steps of ``Model.train`` and at its end; numbers the
    steps globally as :class:`GlobalStep`.

    Args:
        directory (str): where the checkpoints go.
        prefix (str): file names are ``<prefix>-<step>.ckpt``.
        every (int): steps between checkpoints, >= 1.
        keep (int): checkpoints kept, >= 2 (the one being written never replaces the last complete one).
        initial_step (int): the step training resumes after (0: a fresh run).
    """

    def __init__(self, directory: str, prefix: str, every: int, keep: int = 2, initial_step: int = 0) -> None:
        super().__init__(initial_step)
        _check_int("StepCheckpoint", "every", every, 1)
        _check_int("StepCheckpoint", "keep", keep, 2)
        self.directory, self.prefix, self.every, self.keep = directory, prefix, every, keep
        self.saved_step = initial_step

    def on_train_step_end(self, run_context):
        cb = run_context.original_args()
        if cb.cur_step_num % self.every == 0:
            self._save(cb)

    def on_train_end(self, run_context):
        self._save(run_context.original_args())

    def _save(self, cb):
        if cb.cur_step_num != self.saved_step:
            save(cb.train_network, self.directory, self.prefix, cb.cur_step_num, self.keep)
            self.saved_step = cb.cur_step_num
