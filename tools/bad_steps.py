"""Which loss scales keep a run with skipped bad steps bit-identical to a clean run (docs/distributed.md,
"Bad steps on one worker").

    python tools/bad_steps.py                          # 300 steps: the default scale and the counter-examples
    python tools/bad_steps.py --steps 1000 --settings 2:65536 3:65536

For each setting ``scale_factor:init_scale[:min_scale]``, trains the LossScaleTrainStep + Lamb of
tests/helpers/bad_steps_worker.py in one process twice: on every batch with a NaN or Inf injected at the steps of
``bad_steps`` (2 %, at least 6; in an input element or a gradient element), and on the same batches without those
steps. Prints one row per setting: the range of scales each run went through, and whether the weights, LAMB
moments, global_step and diagnostics are bit-identical (else the largest relative difference, and the first
step of the clean run whose loss differs). The msrun version (two workers, the injections on one) is
tests/test_bad_steps.py.
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "helpers"))
import bad_steps_worker as W  # noqa: E402

# power-of-two factor (also from a scale that is not a power of two); other factors; scales so small that the
# scaled gradients underflow
DEFAULT_SETTINGS = ["2:65536", "2:1000", "3:65536", "2.5:65536", "2:1e-33:1.2e-38"]


def parse_setting(text):
    """'factor:init[:min]' -> LossScaleTrainStep keyword arguments."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise SystemExit(f"bad_steps: --settings takes scale_factor:init_scale[:min_scale], got {text!r}")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise SystemExit(f"bad_steps: --settings takes numbers (scale_factor:init_scale[:min_scale]), got {text!r}")
    return dict(zip(("scale_factor", "init_scale", "min_scale"), values))


def compare(steps, scale):
    """One row: (scales of the injected run, scales of the clean run, verdict)."""
    batches, plan = W.shard(steps, W.POISONED_RANK, 2), W.bad_steps(steps)
    injected = W.state(*W.run_injected(batches, plan, W.POISONED_RANK, **scale))
    clean = W.state(*W.run_clean(batches, plan, **scale))
    names = [n for n in clean if not n.startswith("log.") and n not in W.SKIP_STATE]
    differ = {n: float(np.max(np.abs(injected[n].astype(np.float64) - clean[n]) / (np.abs(clean[n]) + 1e-30)))
              for n in names if not np.array_equal(injected[n], clean[n])}
    good = np.array([i not in plan for i in range(steps)])
    losses = np.nonzero(injected["log.loss"][good] != clean["log.loss"])[0]
    verdict = "bit-identical" if not differ and losses.size == 0 else (
        f"differ: {len(differ)} of {len(names)} arrays, max relative {max(differ.values(), default=0.0):.2g}, "
        f"loss from clean step {losses[0] if losses.size else '-'}")
    return _span(injected["log.scale"]), _span(clean["log.scale"]), verdict


def _span(scales):
    return f"{scales.min():.3g}..{scales.max():.3g}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="steps of the injected run (default 300)")
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS,
                        help="scale_factor:init_scale[:min_scale] (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.steps < 10:
        raise SystemExit(f"bad_steps: --steps must be >= 10, got {args.steps}")
    settings = [(text, parse_setting(text)) for text in args.settings]
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    plan = W.bad_steps(args.steps)
    print(f"{args.steps} steps, {len(plan)} bad (rank {W.POISONED_RANK}'s batches, one process): {plan}")
    print("| scale_factor:init_scale[:min_scale] | injected run's scales | clean run's scales | result |")
    print("|---|---|---|---|")
    for text, scale in settings:
        print("| " + " | ".join((text,) + compare(args.steps, scale)) + " |", flush=True)


if __name__ == "__main__":
    main()
