"""Checkpoints that survive ``kill -9`` at any moment, and ``Model.train`` resumed exactly where they were taken.

* :class:`StepCheckpoint` (a ``Model.train`` callback) saves the whole train cell every `every` steps as
  ``<prefix>-<step>.ckpt``: written under another name, with a CRC and the step inside, flushed to disk,
  then renamed, so a reader only ever sees complete files; older checkpoints are deleted only after that,
  keeping the newest `keep`. Like :class:`GlobalStep`, which processes that save nothing use, it numbers
  ``Model``'s steps globally across resumes (``cur_step_num``).
* :func:`resume` loads the newest checkpoint that loads, passes its CRC, belongs to this directory's run and
  holds every parameter of the cell, and moves the dataset to the step after it (``Dataset.set_init_step``);
  under ``msrun`` with one checkpoint directory per worker, the newest step every worker has.
* One writer per directory and prefix (a lock), checkpoints tied to the run that wrote them (``<prefix>.run.json``),
  other users' files refused, and the run's settings compared on resume: :func:`resume`'s arguments.

The recipe (seeds, masks, dropout, msrun) and what it guarantees: docs/resume.md.
"""
import json
import os
import re
import uuid
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

import mindspore as ms
from mindspore.nn.optim.optimizer import Optimizer
from mindspore.train import Callback

from ._files import CheckpointError, check_directory, check_prefix, load, lock, release
from .backends.sharded import RANK_PARAMETER
from . import state
from .state import Slots, check_slots

# public here, where users look for them (and where the API pages document them)
for _public in (CheckpointError, load, lock, release):
    _public.__module__ = __name__

STEP = "resume_step"          # checkpoint entry: the Model.train steps (data batches) done
RUN = "resume_run"            # checkpoint entry (UTF-8 bytes): the id of the run that wrote it (<prefix>.run.json)
CONFIG = "resume_config"      # checkpoint entry (UTF-8 bytes): JSON {"settings": {...}, "hyperparameters": {...}}


def _bytes_entry(text):
    """A text as a checkpoint entry: a uint8 Tensor (every entry stays a Parameter for whoever loads the file)."""
    return ms.Tensor(np.frombuffer(text.encode(), np.uint8).copy())


def _text(value):
    """The text of a :func:`_bytes_entry` (None: absent)."""
    return None if value is None else bytes(value.asnumpy().astype(np.uint8)).decode()


def checkpoints(directory: str, prefix: str) -> Dict[int, str]:
    """{step: path} of the `<prefix>-<step>.ckpt` files of `directory` (none if it does not exist; ValueError if
    it is a file or a dangling symbolic link, or `prefix` is not a file name's start)."""
    check_prefix("checkpoints", prefix)
    check_directory("checkpoints", directory)
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


def _run_file(directory, prefix):
    return os.path.join(directory, f"{prefix}.run.json")


def run_id(directory: str, prefix: str) -> Optional[str]:
    """The id of the run that writes `directory`'s checkpoints (its ``<prefix>.run.json``), or None when there is
    none (a fresh directory, or one written before runs had ids). ValueError when the file is another user's or
    unreadable: a checkpoint directory whose run cannot be told is not resumed from."""
    path = _run_file(directory, prefix)
    if not os.path.exists(path):
        return None
    info = os.stat(path)
    if info.st_uid != os.getuid():
        raise ValueError(f"{path} is owned by uid {info.st_uid}, not by the current user (uid {os.getuid()}): "
                         f"the run of {directory} cannot be trusted")
    try:
        with open(path) as f:
            return str(json.load(f)["run"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} does not hold a run id ({err}): remove it to resume this directory's "
                         f"checkpoints as those of an unknown run") from None


def _start_run(directory, prefix):
    """A new run id for `directory`, written to its ``<prefix>.run.json`` (atomically); returns it."""
    run = uuid.uuid4().hex
    path, partial = _run_file(directory, prefix), os.path.join(directory, f".{prefix}.run.partial")
    with open(partial, "w") as f:
        json.dump({"run": run}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return run


def _workers():
    """The number of processes of this run: the communication group's size under msrun, else 1."""
    from mindspore.communication.management import GlobalComm
    if not GlobalComm.INITED:
        return 1
    from mindspore.communication import get_group_size
    return get_group_size()


def _config(settings, hyperparameters):
    """The run's configuration as stored in its checkpoints (JSON, `workers` added to the settings)."""
    for name, value in (("settings", settings), ("hyperparameters", hyperparameters)):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"For 'resume', the argument '{name}' must be a dict of JSON values, but got "
                            f"{type(value).__name__}.")
    try:
        return json.loads(json.dumps({"settings": {"workers": _workers(), **(settings or {})},
                                      "hyperparameters": dict(hyperparameters or {})}, sort_keys=True))
    except TypeError as err:
        raise TypeError(f"For 'resume', 'settings' and 'hyperparameters' must hold JSON values (numbers, "
                        f"strings, lists, dicts): {err}") from None


def save(cell: ms.nn.Cell, directory: str, prefix: str, step: int, keep: int = 2, run: Optional[str] = None,
         config: Optional[dict] = None) -> str:
    """Write `cell`'s parameters and `step` to `directory/<prefix>-<step>.ckpt` atomically; keep the newest
    `keep` checkpoints up to `step` (newer ones, of a run that went further, are left alone). Takes the
    directory's writer lock (:func:`lock`). `run` and `config` (see :class:`StepCheckpoint`) are stored in
    the checkpoint. Returns the path."""
    lock(directory, prefix, "save")
    path = os.path.join(directory, f"{prefix}-{step}.ckpt")
    partial = os.path.join(directory, f".{prefix}-{step}.partial.ckpt")   # never matches checkpoints()
    extra = {STEP: int(step)}
    if run is not None:
        extra[RUN] = _bytes_entry(run)
    if config is not None:
        extra[CONFIG] = _bytes_entry(json.dumps(config, sort_keys=True))
    ms.save_checkpoint(cell, partial, crc_check=True, append_dict=extra)
    _fsync(partial)
    os.replace(partial, path)
    _fsync(directory)                      # the rename itself survives a crash of the machine
    found = checkpoints(directory, prefix)
    older = sorted(s for s in found if s <= step)
    stale = [found[old] for old in older[:-keep]]
    stale += [os.path.join(directory, name) for name in os.listdir(directory)   # left by a killed save
              if name.startswith(f".{prefix}-") and ".partial." in name]
    for old in stale:
        os.remove(old)
    return path


def _saved_parameters(cell):
    """The parameters `ms.save_checkpoint(cell)` writes: it skips those flagged pipeline-shared (Lamb's
    diagnostics, runtime state that checkpoints neither save nor expect)."""
    return [p for p in cell.get_parameters() if not p.param_info.is_pipeline_shared_param]


def _cell_slots(cell):
    """The state slots of the LAMB optimizers in `cell` (each backend's ``state.Slots``, by prefix), or the
    declared ones when it holds none."""
    found = {slot.prefix: slot for _, sub in cell.cells_and_names() if isinstance(getattr(sub, "slots", None), Slots)
             for slot in state.held(sub.slots)}
    return tuple(found.values()) or state.SLOTS


def _sharding_mismatch(params, cell):
    """Why `params` (sharded, or not) does not fit `cell`'s optimizer (not sharded, or sharded), or None."""
    slots = _cell_slots(cell)
    shards = {slot.name("shard") for slot in state.SLOTS + state.SLOTS_8BIT}   # either format's pieces
    names = {p.name for p in _saved_parameters(cell)}
    if shards & set(params) and not shards & names:
        rank, world = (int(x) for x in params[RANK_PARAMETER].asnumpy().reshape(-1)) \
            if RANK_PARAMETER in params else ("?", "?")
        return (f"holds one worker's piece of sharded LAMB state (rank {rank} of {world}, written by "
                f"Lamb(shard_state=True)), and this optimizer keeps full moments: merge the {world} workers' "
                f"checkpoints into one (python -m mindspore_lamb.sharding merge OUT.ckpt RANK0.ckpt ...) and load "
                f"that, or resume under msrun with {world} workers and shard_state=True")
    if shards & names and not shards & set(params) and any(
            name.startswith(tuple(slot.prefix + "." for slot in slots)) for name in params):
        return ("holds full LAMB moments, and this optimizer is sharded (shard_state=True): cut them for this "
                "worker with ms.load_param_into_net(cell, mindspore_lamb.sharding.cut(state, optimizer))")
    return None


def _bits_mismatch(params, cell):
    """Why the moments of `params` are stored otherwise than `cell`'s optimizer stores them (8-bit or float:
    ``optim_bits``, ``min_8bit_size``), or None."""
    # the first moment's prefix in each format: lamb_m (float) and lamb_m8 (8-bit codes)
    kind_of = {state.SLOTS[0].prefix: "float", state.SLOTS_8BIT[0].prefix: "8-bit"}
    kinds = {}
    for source, names in (("checkpoint", params), ("cell", [p.name for p in _saved_parameters(cell)])):
        for name in names:
            prefix, _, parameter = name.partition(".")
            if prefix in kind_of:
                kinds.setdefault(parameter, {})[source] = kind_of[prefix]
    differ = sorted(name for name, kind in kinds.items() if len(set(kind.values())) == 2 and len(kind) == 2)
    if not differ:
        return None
    kind = kinds[differ[0]]
    if "shard" in differ:                                # both sharded (shard_state=True)
        kind = kinds["shard"]
        return (f"stores this worker's piece of the moments in {kind['checkpoint']} state, and this optimizer keeps "
                f"its piece in {kind['cell']} state: resume with the optim_bits and min_8bit_size the checkpoint "
                f"was written with (docs/memory.md)")
    return (f"stores the moments of {len(differ)} parameters in {kind['checkpoint']} state (e.g. '{differ[0]}'), and "
            f"this optimizer keeps them in {kind['cell']} state: resume with the optim_bits and min_8bit_size the "
            f"checkpoint was written with (docs/memory.md)")


def _slot_dtypes(cell):
    """{checkpoint name: the dtypes its slot may be stored in} of the cell's LAMB state."""
    return {p.name: slot.dtypes for p in _saved_parameters(cell) for slot in _cell_slots(cell)
            if p.name.startswith(slot.prefix + ".")}


def _fit_dtypes(params, cell):
    """`params` with each moment cast to the dtype `cell` stores it in (a float32 first moment into
    ``mu_dtype="float16"``, say), or the reason it cannot be: checked for every entry before any is loaded."""
    slots = _slot_dtypes(cell)
    for p in _saved_parameters(cell):
        value = params[p.name]
        if value.dtype == p.dtype:
            continue
        if p.name not in slots or value.dtype not in slots[p.name] or p.dtype not in slots[p.name]:
            return f"stores '{p.name}' as {value.dtype}, and the cell holds it as {p.dtype}"
        if p.dtype == ms.float16 and np.abs(ms.ops.cast(value, ms.float32).asnumpy()).max(initial=0.0) > 65504.0:
            return f"holds values of '{p.name}' beyond float16's range (65504), and the cell stores it as float16"
        params[p.name] = ms.Parameter(ms.ops.cast(value, p.dtype), name=p.name)
    return params


def _verified(path, step, cell, run=None, allow_foreign=False):
    """The parameter dict of checkpoint `path` of `step` (its moments cast to the cell's dtypes), or the reason
    it cannot be resumed from (a str). `run`: the id of the directory's run (None: not known)."""
    try:
        params = load(path, allow_foreign)
    except CheckpointError as err:
        return f"does not load: {err.reason}"
    saved_step = params.get(STEP)
    if saved_step is None or saved_step.size != 1 or int(saved_step.asnumpy()) != step:
        return f"has no '{STEP}' entry equal to {step} (not written by mindspore_lamb.resume.save)"
    saved_run = _text(params.get(RUN))
    if run is not None and saved_run is not None and saved_run != run and not allow_foreign:
        return (f"was written by another run (run id {saved_run}; this directory's run is {run}, see its "
                f"run.json): pass allow_foreign=True to resume from it all the same")
    mismatch = _sharding_mismatch(params, cell) or _bits_mismatch(params, cell)
    if mismatch:
        return mismatch
    missing = [p.name for p in _saved_parameters(cell) if p.name not in params or params[p.name].shape != p.shape]
    if missing:
        return f"lacks (or has another shape for) {len(missing)} parameters of the cell, e.g. {missing[:3]}"
    try:
        check_slots(params, "it", _cell_slots(cell))     # LAMB's state: global_step >= 0, finite moments, v >= 0
    except ValueError as err:
        return str(err)
    return _fit_dtypes(params, cell)


def newest(cell: ms.nn.Cell, directory: str, prefix: str, peers: Sequence[str] = (),
           allow_foreign: bool = False) -> Tuple[int, Optional[dict]]:
    """(step, parameter dict) of the newest checkpoint of `directory` that verifies for `cell` and whose step
    also verifies in every directory of `peers` (the other workers' own checkpoints); (0, None) when the
    directory holds no checkpoint. Raises RuntimeError, with each file's reason, when checkpoints exist but
    none verifies: starting afresh would silently discard them.

    A checkpoint verifies when it loads with its CRC, is owned by the current user, was written by the run
    of its directory (``<prefix>.run.json``; `allow_foreign` lifts these two), holds ``resume_step`` equal to
    its step and every parameter of the cell with its shape, and passes :func:`mindspore_lamb.check_state`."""
    found = checkpoints(directory, prefix)
    if not found:
        return 0, None
    try:
        runs = [run_id(d, prefix) for d in (directory, *peers)]
    except ValueError as err:
        if not allow_foreign:
            raise RuntimeError(f"No checkpoint of '{directory}' can be resumed from: {err} (allow_foreign=True "
                               f"resumes all the same)") from None
        runs = [None] * (1 + len(peers))
    others = [checkpoints(peer, prefix) for peer in peers]
    reasons = []
    for step in sorted(found, reverse=True):
        params = _verified(found[step], step, cell, runs[0], allow_foreign)
        if isinstance(params, str):
            reasons.append(f"{found[step]} {params}")
            continue
        lacking = [peer for peer, files, run in zip(peers, others, runs[1:])
                   if step not in files or isinstance(_verified(files[step], step, cell, run, allow_foreign), str)]
        if lacking:
            reasons.append(f"{found[step]}: no verified step-{step} checkpoint in {lacking}")
            continue
        for reason in reasons:
            print(f"resume: skipped {reason}", flush=True)
        return step, params
    raise RuntimeError(f"No checkpoint of '{directory}' can be resumed from:\n  " + "\n  ".join(reasons))


def _differences(saved, now):
    return {key: (saved[key], now[key]) for key in sorted(set(saved) & set(now)) if saved[key] != now[key]}


def _changed_rates(params, cell):
    """{checkpoint name: (saved, current)} of the learning rates that `cell`'s optimizers hold in Parameters
    (a fixed rate, per-group rates, a per-step sequence) and that differ from the checkpoint's."""
    changed = {}
    for _, sub in cell.cells_and_names():
        if not isinstance(sub, Optimizer):
            continue
        rates = sub.learning_rate
        rates = [rates] if isinstance(rates, ms.Parameter) else list(rates) if isinstance(rates, (list, tuple)) \
            else list(rates.get_parameters()) if isinstance(rates, ms.nn.Cell) else []
        for rate in rates:
            if isinstance(rate, ms.Parameter) and rate.name in params:
                saved, current = params[rate.name].asnumpy(), rate.asnumpy()
                if saved.shape != current.shape or not np.array_equal(saved, current):
                    changed[rate.name] = (saved, current)
    return changed


def _short(array):
    flat = np.asarray(array).reshape(-1)
    return f"{flat[0]:g}" if flat.size == 1 else f"[{', '.join(f'{x:g}' for x in flat[:3])}{', ...' if flat.size > 3 else ''}]"


def _compare_config(path, params, cell, config):
    """Refuse a resume whose settings differ from the checkpoint's (RuntimeError); say which hyper-parameters
    changed, and keep this run's learning rates over the checkpoint's (removed from `params`). Returns the names
    of the rates kept."""
    saved = _text(params.pop(CONFIG, None))
    saved = None if saved is None else json.loads(saved)
    if saved is None:
        print(f"resume: {path} records no settings (written before they were recorded): not compared", flush=True)
    else:
        changed = _differences(saved.get("settings", {}), config["settings"])
        if changed:
            listed = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, (old, new) in changed.items())
            raise RuntimeError(
                f"{path} was written by a run with other settings ({listed}). A checkpoint's step counts that "
                f"run's batches on its number of workers, so its data position and global batch do not carry over: "
                f"resume with the checkpoint's settings, or start a new run from its weights (the BERT example: "
                f"--init_checkpoint).")
        for key, (old, new) in _differences(saved.get("hyperparameters", {}), config["hyperparameters"]).items():
            print(f"resume: {key} is {new!r} in this run and {old!r} in {path}: training continues with {new!r}",
                  flush=True)
    changed = _changed_rates(params, cell)
    for name, (old, new) in changed.items():
        print(f"resume: the learning rate '{name}' is {_short(new)} in this run and {_short(old)} in {path}: "
              f"training continues with {_short(new)}", flush=True)
        params[name] = ms.Parameter(ms.Tensor(new), name=name)


def resume(cell: ms.nn.Cell, directory: str, prefix: str, dataset: Optional[ms.dataset.Dataset] = None,
           peers: Sequence[str] = (), settings: Optional[Mapping] = None,
           hyperparameters: Optional[Mapping] = None, allow_foreign: bool = False) -> int:
    """Load the newest verified checkpoint (see :func:`newest`) into `cell` and start `dataset` at the step
    after it; returns that step (0: no checkpoint, nothing loaded). Pass ``initial_epoch=step //
    dataset.get_dataset_size()`` to ``Model.train``, and ``initial_step=step`` (and the same `settings` and
    `hyperparameters`) to :class:`StepCheckpoint` or :class:`GlobalStep`.

    Before anything is loaded, the run's configuration is compared with the one the checkpoint was written
    with: `settings` (what must not change, e.g. the batch size; the number of workers is added) differing
    raise RuntimeError naming each; `hyperparameters` (what may change, e.g. the learning rate's peak or the
    number of epochs) differing are printed, and this run's values apply. A learning rate that an optimizer
    holds in a Parameter (a fixed rate, per-group rates) and that differs from the checkpoint's is printed
    and kept, not overwritten by the checkpoint's."""
    config = _config(settings, hyperparameters)
    step, params = newest(cell, directory, prefix, peers, allow_foreign)
    if params is None:
        return 0
    path = os.path.join(directory, f"{prefix}-{step}.ckpt")
    _compare_config(path, params, cell, config)
    for name in (STEP, RUN):                  # not Parameters of the cell
        params.pop(name, None)
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

    It is the one writer of `directory`'s ``<prefix>-<step>.ckpt`` files from its creation to the end of
    training (a lock: a second run writing them is refused). A fresh run (`initial_step` 0) starts a new run
    id (``<prefix>.run.json``), which every checkpoint carries, and refuses a directory that already holds
    checkpoints (another run's, which its cleanup would delete) unless `overwrite` is True.

    Args:
        directory (str): where the checkpoints go.
        prefix (str): file names are ``<prefix>-<step>.ckpt`` (a file name's start: no directories).
        every (int): steps between checkpoints, >= 1.
        keep (int): checkpoints kept, >= 2 (the one being written never replaces the last complete one).
        initial_step (int): the step training resumes after (0: a fresh run).
        settings (dict): what must not change on resume (see :func:`resume`), stored in every checkpoint.
        hyperparameters (dict): what may change on resume, stored in every checkpoint.
        overwrite (bool): a fresh run deletes the checkpoints already in `directory` instead of refusing.
    """

    def __init__(self, directory: str, prefix: str, every: int, keep: int = 2, initial_step: int = 0,
                 settings: Optional[Mapping] = None, hyperparameters: Optional[Mapping] = None,
                 overwrite: bool = False) -> None:
        super().__init__(initial_step)
        _check_int("StepCheckpoint", "every", every, 1)
        _check_int("StepCheckpoint", "keep", keep, 2)
        self.directory, self.prefix, self.every, self.keep = directory, prefix, every, keep
        self.config = _config(settings, hyperparameters)
        self.saved_step = initial_step
        lock(directory, prefix)
        self.run = run_id(directory, prefix) if initial_step else None
        if self.run is None:
            self.run = self._start(overwrite)

    def _start(self, overwrite):
        """A new run in the directory: refuse (or, with `overwrite`, delete) checkpoints already there."""
        found = checkpoints(self.directory, self.prefix)
        if found and not self.initial_step:
            if not overwrite:
                raise RuntimeError(
                    f"For 'StepCheckpoint', {self.directory} already holds checkpoints ({self.prefix}-<step>.ckpt, "
                    f"steps {sorted(found)}) of an earlier run, which this fresh run would delete: resume it "
                    f"(resume(); the BERT example: --resume), write elsewhere, or pass overwrite=True (the BERT "
                    f"example: --overwrite) to delete them.")
            for path in found.values():
                os.remove(path)
            print(f"StepCheckpoint: deleted {len(found)} checkpoints of an earlier run in {self.directory}", flush=True)
        return _start_run(self.directory, self.prefix)

    def on_train_begin(self, run_context):
        lock(self.directory, self.prefix)
        super().on_train_begin(run_context)

    def on_train_step_end(self, run_context):
        cb = run_context.original_args()
        if cb.cur_step_num % self.every == 0:
            self._save(cb)

    def on_train_end(self, run_context):
        self._save(run_context.original_args())
        release(self.directory, self.prefix)

    def _save(self, cb):
        if cb.cur_step_num != self.saved_step:
            save(cb.train_network, self.directory, self.prefix, cb.cur_step_num, self.keep, self.run, self.config)
            self.saved_step = cb.cur_step_num
