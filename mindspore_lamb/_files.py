"""Checkpoint files and directories, handled so that a mistake is named and nothing is lost.

* :func:`load`: ``mindspore.load_checkpoint`` with its CRC checked, and a message that says what is wrong
  (missing, a directory, empty, damaged, not a checkpoint, owned by another user) instead of MindSpore's
  "May not have permission to read it" for all of them.
* :func:`lock`: one writer per checkpoint directory and prefix: a second run writing the same files would
  delete the first's checkpoints when it keeps only the newest ones.
* :func:`check_directory` and :func:`check_prefix`: a checkpoint directory that is a file or a dangling link,
  and a prefix that is a path, are refused before anything is trained.

docs/resume.md ("Two runs, other users, changed settings") says what each refusal protects.
"""
import datetime
import fcntl
import json
import os
import socket

import mindspore as ms


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names it and says why (`reason`, without the path)."""

    def __init__(self, path, reason):
        super().__init__(f"the checkpoint {path} {reason}")
        self.path, self.reason = path, reason


def _owner_problem(info):
    """Why a file with stat `info` is not ours to trust, or None."""
    me = os.getuid()
    if info.st_uid == me:
        return None
    try:
        import pwd
        who = f"uid {info.st_uid} ({pwd.getpwuid(info.st_uid).pw_name})"
    except (ImportError, KeyError):
        who = f"uid {info.st_uid}"
    return (f"is owned by {who}, not by the current user (uid {me}): in a directory others can write "
            f"(a shared or sticky one like /tmp), anyone can put a checkpoint there")


def load(path: str, allow_foreign: bool = False) -> dict:
    """``mindspore.load_checkpoint(path, crc_check=True)``, with the reason in the message when it fails.

    Raises :class:`CheckpointError` (a ValueError) when `path` does not exist, is not a regular file, is empty,
    is owned by another user (unless `allow_foreign`), fails its CRC32 (a checkpoint saved with
    ``crc_check=True``; one saved without a CRC cannot be checked), cannot be parsed, or changes while it
    is read."""
    path = os.fspath(path)
    try:
        before = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(path, "does not exist") from None
    except OSError as err:
        raise CheckpointError(path, f"cannot be read ({err.strerror})") from None
    if not os.path.isfile(path):
        kind = "a directory" if os.path.isdir(path) else "not a regular file"
        raise CheckpointError(path, f"is {kind}, not a checkpoint file")
    if before.st_size == 0:
        raise CheckpointError(path, "is empty (0 bytes): a write that never finished, or a full disk")
    reason = None if allow_foreign else _owner_problem(before)
    if reason:
        raise CheckpointError(path, f"{reason}; it is not loaded unless you trust it (allow_foreign)")
    if not os.access(path, os.R_OK):
        raise CheckpointError(path, "cannot be read (permission denied)")
    try:
        params = ms.load_checkpoint(path, crc_check=True)
    except (ValueError, RuntimeError, TypeError) as err:
        try:                                    # parses without the check: the CRC is what failed
            ms.load_checkpoint(path, crc_check=False)
        except (ValueError, RuntimeError, TypeError):
            raise CheckpointError(path, f"is not a MindSpore checkpoint, or is damaged beyond parsing "
                                        f"({str(err).splitlines()[0]})") from None
        raise CheckpointError(path, "is damaged: its CRC32 does not match its contents (a flipped bit, or a "
                                    "torn copy)") from None
    after = os.stat(path)
    if (after.st_ino, after.st_dev, after.st_mtime_ns, after.st_size) != \
            (before.st_ino, before.st_dev, before.st_mtime_ns, before.st_size):
        raise CheckpointError(path, "changed while it was read")
    return params


def check_prefix(owner: str, prefix: str) -> None:
    """A checkpoint prefix is a file name's start: not empty, no path separator, not hidden."""
    if not isinstance(prefix, str) or not prefix or os.sep in prefix or (os.altsep and os.altsep in prefix) \
            or prefix.startswith(".") or "\n" in prefix or "\0" in prefix:
        raise ValueError(f"For '{owner}', the argument 'prefix' must be the start of a file name (not empty, no "
                         f"'{os.sep}', not starting with '.'), but got {prefix!r}; put directories in "
                         f"'directory'.")


def check_directory(owner: str, directory: str) -> None:
    """A checkpoint directory is a directory, or a path where one can be made (not a file, not a dangling
    symbolic link)."""
    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
        raise ValueError(f"For '{owner}', the argument 'directory' must be a path, but got {directory!r}.")
    directory = os.fspath(directory)
    if os.path.islink(directory) and not os.path.exists(directory):
        raise ValueError(f"For '{owner}', the checkpoint directory {directory} is a symbolic link to "
                         f"{os.readlink(directory)}, which does not exist: create it, or remove the link.")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"For '{owner}', the checkpoint directory {directory} exists and is not a directory: "
                         f"give another 'directory', or move the file away.")


_LOCKS = {}        # (real directory, prefix) -> open lock file: held until release() or the process's end


def _lock_path(directory, prefix):
    return os.path.join(directory, f".{prefix}.lock")


def lock(directory: str, prefix: str, owner: str = "StepCheckpoint") -> None:
    """Make this process the one writer of `directory`'s ``<prefix>-<step>.ckpt`` files, or raise RuntimeError
    naming the process that is (its pid, host and start, from the lock file).

    A POSIX record lock (``lockf``) on ``<directory>/.<prefix>.lock``: the system releases it when the process
    ends, however it ends (``kill -9`` included), and child processes do not inherit it. Within one process
    it is taken once (a second call is a no-op). On a network file system it is as reliable as that system's
    locks (NFSv4: yes)."""
    check_prefix(owner, prefix)
    check_directory(owner, directory)
    os.makedirs(directory, exist_ok=True)
    key = (os.path.realpath(directory), prefix)
    if key in _LOCKS:
        return
    path = _lock_path(directory, prefix)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            who = f"process {holder['pid']} on {holder['host']}, since {holder['since']}"
        except (ValueError, KeyError, TypeError, OSError):
            who = "another process"
        os.close(fd)
        raise RuntimeError(f"For '{owner}', {who} is writing the checkpoints {prefix}-<step>.ckpt in "
                           f"{directory} (it holds {path}): a second writer would delete its checkpoints. Stop "
                           f"that run, or give this one another directory or prefix.") from None
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _LOCKS[key] = fd


def release(directory: str, prefix: str) -> None:
    """Give up the lock :func:`lock` took (nothing if this process does not hold it)."""
    fd = _LOCKS.pop((os.path.realpath(directory), prefix), None)
    if fd is not None:
        os.close(fd)               # closing the file releases the record lock
