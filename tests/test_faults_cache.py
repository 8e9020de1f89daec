"""Fault injection on the fused kernel's cache: MindSpore opens the library by path at the first step, not
when Lamb is built, so the path handed to it must still lead to the library that was verified then
(docs/api/lamb.md, "What can go wrong"). "Another user" is simulated with files owned by uid 65534 (the
tests run as root, as the rest of the kernel-cache tests do)."""
import errno
import json
import os
import shutil
import subprocess
import types
import warnings

import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor

from mindspore_lamb import Lamb, backends
from mindspore_lamb.backends import _build, fused_cpu

NOBODY = 65534
MARK_ENV = "MINDSPORE_LAMB_TEST_FOREIGN_MARK"
# Loaded, the foreign library leaves a file at $MINDSPORE_LAMB_TEST_FOREIGN_MARK; it also holds our kernel,
# so a step through it looks normal: the mark is the only sign that it ran.
MARK_SOURCE = r"""
#include <cstdio>
#include <cstdlib>
__attribute__((constructor)) static void leave_mark() {
  if (const char *path = std::getenv("MINDSPORE_LAMB_TEST_FOREIGN_MARK")) {
    if (FILE *mark = std::fopen(path, "w")) std::fclose(mark);
  }
}
"""


@pytest.fixture(scope="module")
def foreign_library(tmp_path_factory):
    """Another user's library, with our kernel's entry points and a constructor that leaves a mark."""
    directory = tmp_path_factory.mktemp("foreign")
    (directory / "mark.cc").write_text(MARK_SOURCE)
    lib = directory / "foreign.so"
    subprocess.run(["g++", *fused_cpu.FLAGS, fused_cpu.SRC, str(directory / "mark.cc"), "-o", str(lib)],
                   check=True, capture_output=True)
    return lib


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No library, private directory or warning left from an earlier test; the fused path is required."""
    monkeypatch.setattr(fused_cpu, "_libraries", {})
    monkeypatch.setattr(_build, "_private_dir", None)
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setenv("MINDSPORE_LAMB_FUSED", "require")
    monkeypatch.setenv(MARK_ENV, str(tmp_path / "foreign-library-was-loaded"))
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    return tmp_path / "foreign-library-was-loaded"


def _params():
    rng = np.random.default_rng(0)
    return [Parameter(Tensor(rng.standard_normal((4, 6)).astype(np.float32)), name="fc.weight"),
            Parameter(Tensor(rng.standard_normal((6,)).astype(np.float32)), name="fc.bias")]


def _plant(foreign_library, path):
    """Put the foreign library at `path`, owned by the other user (as are the directories made for it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(foreign_library, path)
    for item in (path, path.parent):
        os.chown(item, NOBODY, NOBODY)


def _first_step(opt, mark, what):
    """The first step (MindSpore compiles the graph and opens the kernel library by its path) trains, and
    loads nothing but the verified library: the foreign one left no mark, even if the step failed."""
    params = list(opt.params)
    before = params[0].asnumpy().copy()
    try:
        opt(tuple(Tensor(np.full(p.shape, 0.5, np.float32)) for p in params))
    finally:
        assert not mark.exists(), f"the first step loaded {what}"
    assert not np.array_equal(params[0].asnumpy(), before)


def _lamb():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = Lamb(_params(), learning_rate=0.1)
    assert opt.fused
    return opt, [str(w.message) for w in caught]


# ---- the path MindSpore opens at the first step is the verified one ----

def test_symlink_retargeted_after_lamb_does_not_redirect_the_kernel(fresh, foreign_library, tmp_path,
                                                                     monkeypatch):
    shared = tmp_path / "shared"              # like /tmp: world-writable and sticky, owned by root
    shared.mkdir()
    os.chmod(shared, 0o1777)
    ours = shared / "ours"
    ours.mkdir(mode=0o700)
    link = shared / "link"                    # the other user's link, through which the cache is reached
    link.symlink_to(ours)
    os.lchown(link, NOBODY, NOBODY)
    monkeypatch.setenv("MINDSPORE_LAMB_CACHE", str(link / "cache"))
    opt, messages = _lamb()
    assert messages == []                     # a sticky root directory above a directory of ours is fine
    name = os.path.basename(fused_cpu.library_path())
    theirs = shared / "theirs"
    _plant(foreign_library, theirs / "cache" / name)
    os.chown(theirs, NOBODY, NOBODY)
    link.unlink()                             # retargeted between Lamb() and the first step
    link.symlink_to(theirs)
    os.lchown(link, NOBODY, NOBODY)
    _first_step(opt, fresh, "the other user's library")
    assert fused_cpu.library_path() == str(ours.resolve() / "cache" / name)


@pytest.mark.parametrize("parent_problem", ["world writable, not sticky", "owned by another user"])
def test_cache_directory_swapped_for_a_link_after_lamb_is_not_followed(fresh, foreign_library, tmp_path,
                                                                       monkeypatch, parent_problem):
    parent = tmp_path / "parent"
    parent.mkdir()
    if parent_problem == "owned by another user":
        os.chown(parent, NOBODY, NOBODY)
    else:
        os.chmod(parent, 0o777)
    cache = parent / "cache"
    monkeypatch.setenv("MINDSPORE_LAMB_CACHE", str(cache))
    opt, messages = _lamb()
    name = os.path.basename(fused_cpu.library_path())
    cache.rename(parent / "moved")             # renamed, and replaced by a link to the other user's files
    _plant(foreign_library, parent / "theirs" / name)
    cache.symlink_to(parent / "theirs")
    _first_step(opt, fresh, "the other user's library")
    assert not fused_cpu.library_path().startswith(str(parent))
    assert [m for m in messages if "kernel cache" in m and str(parent) in m], messages


def test_relative_cache_then_chdir_still_opens_the_verified_library(fresh, foreign_library, tmp_path,
                                                                    monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)
    monkeypatch.setenv("MINDSPORE_LAMB_CACHE", "relative-cache")
    opt, _ = _lamb()
    name = os.path.basename(fused_cpu.library_path())
    _plant(foreign_library, second / "relative-cache" / name)
    monkeypatch.chdir(second)                  # before the first step
    _first_step(opt, fresh, "a library from the new working directory")
    assert fused_cpu.library_path() == str((first / "relative-cache").resolve() / name)


def test_colon_in_the_cache_path_never_reaches_the_kernel_loader(fresh, foreign_library, tmp_path, monkeypatch):
    cache = tmp_path / "a:b"
    monkeypatch.setenv("MINDSPORE_LAMB_CACHE", str(cache))
    _plant(foreign_library, tmp_path / "a")    # MindSpore's loader takes the text before the first ':'
    opt, messages = _lamb()
    _first_step(opt, fresh, "the file named by the text before the ':'")
    assert ":" not in fused_cpu.library_path()
    assert [m for m in messages if str(cache) in m and "':'" in m], messages


# ---- what goes into the cache key ----

@pytest.fixture
def cache(fresh, tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("MINDSPORE_LAMB_CACHE", str(directory))
    return directory


def _build_kernel():
    return _build.build(fused_cpu.SRC, fused_cpu.FLAGS, b"test")


def test_the_compiler_is_part_of_the_cache_key(cache, tmp_path, monkeypatch):
    default = _build_kernel()
    built = os.stat(default).st_mtime_ns
    wrapper = tmp_path / "bin" / "c++"
    wrapper.parent.mkdir()
    wrapper.write_text('#!/bin/sh\nexec g++ "$@"\n')
    os.chmod(wrapper, 0o755)
    monkeypatch.setenv("CXX", str(wrapper))
    other = _build_kernel()
    assert other != default                    # another compiler: another library
    wrapper.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "c++ 99.0" && exit 0\nexec g++ "$@"\n')
    upgraded = _build_kernel()                 # the same path, another version: another library
    assert upgraded not in (default, other)
    monkeypatch.delenv("CXX")
    assert _build_kernel() == default and os.stat(default).st_mtime_ns == built     # the default's is reused


def test_tilde_in_the_cache_path_is_the_home_directory(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MINDSPORE_LAMB_CACHE", "~/lamb-cache")
    monkeypatch.chdir(tmp_path)
    lib = _build_kernel()
    assert lib.startswith(str(tmp_path / "home" / "lamb-cache") + os.sep)
    assert not (tmp_path / "~").exists()


# ---- an OSError while building: a warning and a private directory, never a raw OSError ----

def _library_name(tmp_path, monkeypatch):
    """The name of the kernel's library, learnt by building it elsewhere; then it is forgotten."""
    monkeypatch.setenv("MINDSPORE_LAMB_CACHE", str(tmp_path / "elsewhere"))
    name = os.path.basename(fused_cpu.library_path())
    monkeypatch.setattr(fused_cpu, "_libraries", {})
    return name


def test_directory_at_the_library_name_falls_back_to_a_private_directory(cache, tmp_path, monkeypatch):
    name = _library_name(tmp_path, monkeypatch)
    monkeypatch.setenv("MINDSPORE_LAMB_CACHE", str(cache))
    (cache / name).mkdir(parents=True)
    with pytest.warns(RuntimeWarning, match="kernel cache") as record:
        lib = fused_cpu.library_path()
    assert len(record) == 1 and str(cache) in str(record[0].message)
    assert f"Is a directory: '{cache / name}'" in str(record[0].message)
    assert not lib.startswith(str(cache)) and _build._verified(lib)
    assert sorted(os.listdir(cache)) == [name]                  # no temporary file left behind


def test_full_disk_while_building_falls_back_to_a_private_directory(cache, monkeypatch):
    def full_disk(record, handle):             # the disk fills up while the manifest is written
        monkeypatch.setattr(_build, "json", json)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(_build, "json", types.SimpleNamespace(dump=full_disk, load=json.load, loads=json.loads))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = Lamb(_params(), learning_rate=0.1)
    assert opt.fused
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and str(cache) in messages[0] and "No space left on device" in messages[0]
    assert not fused_cpu.library_path().startswith(str(cache))
    assert os.listdir(cache) == []                               # no temporary file left behind


def test_no_directory_can_hold_the_library_takes_the_composite_backend(cache, tmp_path, monkeypatch):
    name = _library_name(tmp_path, monkeypatch)
    monkeypatch.setenv("MINDSPORE_LAMB_CACHE", str(cache))
    monkeypatch.setenv("MINDSPORE_LAMB_FUSED", "1")
    private = tmp_path / "private"
    for directory in (cache, private):
        (directory / name).mkdir(parents=True)
        os.chmod(directory, 0o700)
    monkeypatch.setattr(_build, "_private_dir", str(private))
    with pytest.warns(RuntimeWarning) as record:
        opt = Lamb(_params(), learning_rate=0.1)
    assert not opt.fused
    messages = " ".join(str(w.message) for w in record)
    assert str(cache) in messages and "composite" in messages
    assert sorted(os.listdir(cache)) == [name] and sorted(os.listdir(private)) == [name]


# ---- MINDSPORE_LAMB_FUSED ----

@pytest.mark.parametrize("setting,fused", [("0", False), ("false", False), ("Off", False), ("no", False),
                                           ("1", True), ("TRUE", True), ("on", True), ("yes", True)])
def test_fused_setting_accepts_the_usual_spellings(fresh, monkeypatch, setting, fused):
    monkeypatch.setenv("MINDSPORE_LAMB_FUSED", setting)
    assert Lamb(_params(), learning_rate=0.1).fused is fused


def test_unknown_fused_setting_is_an_error_naming_the_variable_and_the_value(fresh, monkeypatch):
    monkeypatch.setenv("MINDSPORE_LAMB_FUSED", "maybe")
    with pytest.raises(ValueError, match="MINDSPORE_LAMB_FUSED.*'maybe'"):
        Lamb(_params(), learning_rate=0.1)


# ---- the compiler's environment and output ----

@pytest.mark.parametrize("variable", ["CPATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH", "LIBRARY_PATH",
                                      "GCC_EXEC_PREFIX", "COMPILER_PATH", "LD_RUN_PATH"])
def test_the_compilers_search_paths_are_part_of_the_cache_key(monkeypatch, tmp_path, variable):
    """Each setting of a variable the compiler or linker reads (unset, empty, a path) names another library."""
    def name():
        return _build.library_name(fused_cpu.SRC, b"source", fused_cpu.FLAGS, b"test", shutil.which("g++"))
    monkeypatch.delenv(variable, raising=False)
    names = [name()]
    for value in ("", str(tmp_path / "planted")):
        monkeypatch.setenv(variable, value)
        names.append(name())
    monkeypatch.delenv(variable)
    assert len(set(names)) == 3 and name() == names[0]


def test_a_header_planted_through_cpath_is_not_reused_without_it(cache, tmp_path, monkeypatch):
    """A library built while CPATH led to a planted header is not the one a clean run loads."""
    monkeypatch.delenv("CPATH", raising=False)
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "cfloat").write_text("#include_next <cfloat>\n#define LAMB_PLANTED 1\n")   # compiles, but is not ours
    monkeypatch.setenv("CPATH", str(planted))
    with_cpath = _build_kernel()
    monkeypatch.delenv("CPATH")
    clean = _build_kernel()
    assert clean != with_cpath and _build._verified(clean)


def test_a_compiler_that_writes_no_library_is_named(cache, tmp_path, monkeypatch):
    """CXX=/bin/true succeeds and writes nothing: an error naming CXX, not a 0-byte library; nothing is left
    in the cache, and the fused backend's warning (the composite graph) quotes it."""
    monkeypatch.setenv("CXX", "/bin/true")
    with pytest.raises(_build.BuildError, match=r"CXX='/bin/true'.*no shared library.*0-byte.*g\+\+"):
        _build_kernel()
    assert os.listdir(cache) == []
    monkeypatch.setenv("MINDSPORE_LAMB_FUSED", "1")
    with pytest.warns(RuntimeWarning, match=r"CXX='/bin/true'"):
        assert not Lamb(_params(), learning_rate=0.1).fused


def test_a_verified_library_that_is_not_a_shared_object_is_rebuilt(cache):
    """A library and manifest that match but hold no ELF image (built by a non-compiler earlier) are rebuilt."""
    lib = _build_kernel()
    with open(lib, "wb"):
        pass
    with open(lib + ".json", "w", encoding="utf-8") as handle:
        json.dump({"size": 0, "sha256": _build.hashlib.sha256(b"").hexdigest()}, handle)
    assert not _build._verified(lib)
    assert _build_kernel() == lib and os.path.getsize(lib) > 0 and _build._verified(lib)
