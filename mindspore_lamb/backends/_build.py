"""Compile a C++ kernel source into a shared library, cache it per user, and load only what we built.

The cache is held to the standard of the JIT caches users already trust (torch extensions, Triton):

* per user: ``$MINDSPORE_LAMB_CACHE``, else ``$XDG_CACHE_HOME/mindspore_lamb``, else
  ``~/.cache/mindspore_lamb``; created with mode 0700;
* a directory or library that is not owned by the current user, or that group or others can write, is
  never loaded (a library that someone else can replace could run code in our process);
* each library has a manifest (size and SHA-256, written when it was built); a library that does not
  match it (truncated by a full disk or a killed copy, corrupt, or replaced) is rebuilt, never loaded;
* an unusable cache directory (not ours, too open, read-only) falls back to a private temporary directory,
  with a warning.

The library's name is keyed by the source, the compiler flags and the CPU, so a cache shared between
machines never hands one CPU a library built for another. docs/api/lamb.md ("What can go wrong") lists
what each failure does.
"""
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import warnings

_MANIFEST_SUFFIX = ".json"
_private_dir = None


class BuildError(RuntimeError):
    """The library cannot be built or trusted; the message says why."""


def cache_dir():
    """The configured cache directory (not created)."""
    configured = os.environ.get("MINDSPORE_LAMB_CACHE")
    if configured:
        return configured
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mindspore_lamb")


def _untrusted(path, want_dir):
    """Why `path` must not be trusted (a str), or None. Symbolic links are followed for directories only."""
    try:
        info = os.stat(path) if want_dir else os.lstat(path)
    except OSError as error:
        return f"cannot stat it ({error.strerror})"
    if want_dir and not stat.S_ISDIR(info.st_mode):
        return "it is not a directory"
    if not want_dir and not stat.S_ISREG(info.st_mode):
        return "it is not a regular file"
    if info.st_uid != os.getuid():
        return f"it is owned by uid {info.st_uid}, not by the current user (uid {os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"group or others can write it (mode {stat.filemode(info.st_mode)})"
    return None


def _usable_dir(path):
    """Create `path` (0700) if needed; return why it cannot hold our libraries, or None."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as error:
        return f"cannot create it ({error.strerror})"
    reason = _untrusted(path, want_dir=True)
    if reason is None and not os.access(path, os.W_OK | os.X_OK):
        reason = "it is not writable"
    return reason


def _private_cache():
    """A private (0700) temporary directory for this process, made once."""
    global _private_dir
    if _private_dir is None:
        _private_dir = tempfile.mkdtemp(prefix="mindspore_lamb-")
    return _private_dir


def _digest(path):
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _verified(lib):
    """True when `lib` and its manifest are ours, private, and the library matches the manifest."""
    manifest = lib + _MANIFEST_SUFFIX
    if _untrusted(lib, want_dir=False) or _untrusted(manifest, want_dir=False):
        return False
    try:
        with open(manifest, encoding="utf-8") as handle:
            record = json.load(handle)
        return os.path.getsize(lib) == record["size"] and _digest(lib) == record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _compile(cxx, flags, src, directory, lib):
    """Compile into a temporary file, write its manifest, then move both into place atomically."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *flags, src, "-o", tmp], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise BuildError(f"compiling {os.path.basename(src)} with {cxx} failed: {proc.stderr.strip()[-1500:]}")
        os.chmod(tmp, 0o700)
        record = {"size": os.path.getsize(tmp), "sha256": _digest(tmp), "flags": flags}
        fd, tmp_manifest = tempfile.mkstemp(suffix=_MANIFEST_SUFFIX, dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        os.replace(tmp_manifest, lib + _MANIFEST_SUFFIX)
        os.replace(tmp, lib)  # concurrent processes never load a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build(src, flags, key_extra=b""):
    """Path of a verified shared library compiled from `src` with `flags` (built if needed).

    Raises BuildError (with the reason) when no compiler is found or the compile fails."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ compiler found ({cxx!r} is not on PATH)")
    try:
        with open(src, "rb") as handle:
            source = handle.read()
    except OSError as error:
        raise BuildError(f"the kernel source {src} is missing from the installed package ({error.strerror})") \
            from error
    key = hashlib.sha256(source + "\0".join(flags).encode() + key_extra).hexdigest()[:16]
    name = f"{os.path.splitext(os.path.basename(src))[0]}_{key}.so"

    directory = cache_dir()
    reason = _usable_dir(directory)
    if reason is not None:
        warnings.warn(f"mindspore_lamb: the kernel cache {directory} is not used ({reason}); building in a "
                      f"private temporary directory instead (set MINDSPORE_LAMB_CACHE to a directory of yours "
                      f"to keep the build).", RuntimeWarning, stacklevel=3)
        directory = _private_cache()
    lib = os.path.join(directory, name)
    if not _verified(lib):
        _compile(cxx, flags, src, directory, lib)
        if not _verified(lib):
            raise BuildError(f"the library built at {lib} does not verify (was it replaced while building?)")
    return lib
