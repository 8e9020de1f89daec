"""Compile a C++ kernel source into a shared library, cache it per user, and load only what we built.

The cache is held to the standard of the JIT caches users already trust (torch extensions, Triton):

* per user: ``$MINDSPORE_LAMB_CACHE``, else ``$XDG_CACHE_HOME/mindspore_lamb``, else
  ``~/.cache/mindspore_lamb`` (``~`` expanded, a relative path taken from the working directory when the
  library is built); created with mode 0700;
* ``$CXX`` (default ``g++``, one executable looked up on ``PATH``) is the compiler that is run; its resolved
  path and its ``--version`` output are part of the library's name, with the source, the flags, the CPU
  and the environment the compiler reads (``COMPILER_ENVIRONMENT``: ``CPATH`` and the other search
  paths), so a library is never reused for another compiler, source, flags, CPU or search path; its
  output must be a shared library (an ELF header), else :class:`BuildError` names ``CXX``;
* a directory or library that is not owned by the current user, or that group or others can write, is
  never loaded (a library that someone else can replace could run code in our process);
* each library has a manifest (size and SHA-256, written when it was built); a library that does not
  match it (truncated by a full disk or a killed copy, corrupt, or replaced) is rebuilt, never loaded;
  both are checked on the open file, never through a symbolic link.

MindSpore opens the library by its path at the first step, not when the optimizer is built (it takes the
text before the first ``:`` as the file, calls ``realpath`` and ``dlopen``), so the path handed to it must
still lead to the verified file then. It is absolute and fully resolved (no symbolic link, no ``..``, no
``:``), and nobody but the current user and root can change what it leads to: each directory above the
cache is owned by the current user or root, and group and others cannot write it, unless root owns it
and it is sticky (like ``/tmp``), where only the owner of an entry can rename or remove it and the entry
below it is the current user's or root's.

A cache directory that fails these rules, or in which building raises an ``OSError`` (a full disk, a
directory where the library should be), is not used: one warning naming it and the reason, and the
library is built in a private temporary directory (0700, removed at exit) for this process; when even
that fails, :class:`BuildError` (the fused backend is not used). docs/api/lamb.md ("What can go wrong")
lists what each failure does.
"""
import atexit
import contextlib
import errno
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
# the environment the compiler and linker read (header and library search paths, where the compiler finds
# its own programs, the linked library's run path): part of the library's name, so a header planted once
# through CPATH is never reused by a later run without it
COMPILER_ENVIRONMENT = ("CPATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH", "LIBRARY_PATH", "GCC_EXEC_PREFIX",
                        "COMPILER_PATH", "LD_RUN_PATH")
# the first bytes of a shared library: ELF (Linux), Mach-O 64-bit (macOS)
_LIBRARY_MAGIC = (b"\x7fELF", b"\xcf\xfa\xed\xfe")


class BuildError(RuntimeError):
    """The library cannot be built or trusted; the message says why."""


def cache_dir():
    """The configured cache directory, absolute (not created)."""
    configured = os.environ.get("MINDSPORE_LAMB_CACHE")
    if not configured:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        configured = os.path.join(base, "mindspore_lamb")
    return os.path.abspath(os.path.expanduser(configured))


def _open_to_others(path, info, below):
    """Why users other than us and root could change what `path` (a directory, stat `info`) holds, or None.
    `below`: the owner of the entry of it on our path, None for the cache directory itself."""
    me = os.getuid()
    if not stat.S_ISDIR(info.st_mode):
        return f"{path} is not a directory"
    if info.st_uid != me and (below is None or info.st_uid != 0):    # root may own the directories above
        also = "" if below is None else " or root"
        return f"{path} is owned by uid {info.st_uid}, not by the current user (uid {me}){also}"
    writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    sticky_root = below in (me, 0) and info.st_uid == 0 and info.st_mode & stat.S_ISVTX
    if writable and not sticky_root:
        return f"group or others can write {path} (mode {stat.filemode(info.st_mode)})"
    return None


def _usable_dir(path):
    """(resolved `path`, why it cannot hold libraries that MindSpore opens by path, or None); created 0700."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as error:
        return path, f"cannot create it ({error.strerror})"
    real = os.path.realpath(path)
    if ":" in real:
        return real, f"its path {real} has a ':', where MindSpore's kernel loader ends the file name"
    below, current = None, real
    while True:                       # from the cache directory up to /
        try:
            info = os.lstat(current)
        except OSError as error:
            return real, f"cannot stat {current} ({error.strerror})"
        reason = _open_to_others(current, info, below)
        if reason is not None:
            return real, reason
        if current == os.path.dirname(current):
            break
        below, current = info.st_uid, os.path.dirname(current)
    if not os.access(real, os.W_OK | os.X_OK):
        return real, "it is not writable"
    return real, None


def _private_cache():
    """A private (0700) temporary directory for this process, made once and removed at exit."""
    global _private_dir
    if _private_dir is None:
        _private_dir = tempfile.mkdtemp(prefix="mindspore_lamb-")
        atexit.register(shutil.rmtree, _private_dir, True)
    return _private_dir


def _read_private(path):
    """The bytes of `path` when it is a regular file of ours that group and others cannot write (checked
    on the open file, before reading it: a directory is never read; a symbolic link is not followed), else
    None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or \
                info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    finally:
        os.close(fd)


def _is_library(data):
    return data[:4] in _LIBRARY_MAGIC


def _verified(lib):
    """True when `lib` and its manifest are ours, private, and the library matches the manifest."""
    data, manifest = _read_private(lib), _read_private(lib + _MANIFEST_SUFFIX)
    if data is None or manifest is None:
        return False
    try:
        record = json.loads(manifest)
        return _is_library(data) and len(data) == record["size"] and \
            hashlib.sha256(data).hexdigest() == record["sha256"]
    except (ValueError, KeyError, TypeError):
        return False


def _compile(cxx, setting, flags, src, directory, lib):
    """Compile into a temporary file, write its manifest, then move both into place atomically. Temporary
    files never outlive a failure."""
    temporary = []
    try:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
        temporary.append(tmp)
        proc = subprocess.run([cxx, *flags, src, "-o", tmp], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise BuildError(f"compiling {os.path.basename(src)} with {setting} failed: "
                             f"{proc.stderr.strip()[-1500:]}")
        os.chmod(tmp, 0o700)
        with open(tmp, "rb") as handle:
            data = handle.read()
        if not _is_library(data):
            raise BuildError(f"the compiler CXX={setting!r} ({cxx}) succeeded but wrote no shared library (the "
                             f"{len(data)}-byte output has no ELF header): set CXX to a C++ compiler such as "
                             f"g++ or clang++")
        record = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "flags": flags}
        fd, tmp_manifest = tempfile.mkstemp(suffix=_MANIFEST_SUFFIX, dir=directory)
        temporary.append(tmp_manifest)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        os.replace(tmp, lib)          # concurrent processes never load a half-written library
        os.replace(tmp_manifest, lib + _MANIFEST_SUFFIX)
    finally:
        for path in temporary:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _compiler_identity(cxx):
    """The compiler's resolved path and its ``--version`` output."""
    try:
        proc = subprocess.run([cxx, "--version"], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BuildError(f"the C++ compiler {cxx} cannot be run ({error})") from error
    return os.path.realpath(cxx).encode() + b"\0" + proc.stdout


def _build_in(directory, name, cxx, setting, flags, src):
    lib = os.path.join(directory, name)
    if os.path.isdir(lib) and not os.path.islink(lib):      # named by its path (reading it names a descriptor)
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), lib)
    if not _verified(lib):
        _compile(cxx, setting, flags, src, directory, lib)
        if not _verified(lib):
            raise BuildError(f"the library built at {lib} does not verify (was it replaced while building?)")
    return lib


def library_name(src, source, flags, key_extra, cxx):
    """The library's file name: a hash of everything that goes into it (the source, the flags, `key_extra`,
    the compiler and its version, the environment it reads)."""
    environment = "\0".join(f"{var}={os.environ.get(var)!r}" for var in COMPILER_ENVIRONMENT).encode()
    key = hashlib.sha256(b"\0".join([source, "\0".join(flags).encode(), key_extra, _compiler_identity(cxx),
                                     environment]))
    return f"{os.path.splitext(os.path.basename(src))[0]}_{key.hexdigest()[:16]}.so"


def build(src, flags, key_extra=b""):
    """Path of a verified shared library compiled from `src` with `flags` (built if needed): absolute,
    resolved, and in a directory that only the current user and root can change (see the module's doc).

    Raises BuildError (with the reason) when no compiler is found, the compile fails, or no directory can
    hold the library."""
    setting = os.environ.get("CXX", "g++")
    cxx = shutil.which(setting)
    if cxx is None:
        raise BuildError(f"no C++ compiler found ({setting!r} is not on PATH)")
    try:
        with open(src, "rb") as handle:
            source = handle.read()
    except OSError as error:
        raise BuildError(f"the kernel source {src} is missing from the installed package ({error.strerror})") \
            from error
    name = library_name(src, source, flags, key_extra, cxx)

    directory = cache_dir()
    real, reason = _usable_dir(directory)
    if reason is None:
        try:
            return _build_in(real, name, cxx, setting, flags, src)
        except OSError as error:
            reason = f"building in it failed: {error}"
    warnings.warn(f"mindspore_lamb: the kernel cache {directory} is not used ({reason}); building in a "
                  f"private temporary directory instead (set MINDSPORE_LAMB_CACHE to a directory of yours "
                  f"to keep the build).", RuntimeWarning, stacklevel=3)
    try:
        real, reason = _usable_dir(_private_cache())
        if reason is None:
            return _build_in(real, name, cxx, setting, flags, src)
    except OSError as error:
        reason = str(error)
    raise BuildError(f"neither the kernel cache {directory} nor a private temporary directory can hold the "
                     f"library ({reason})")
