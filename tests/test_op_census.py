"""The operator census of the composite graph (tools/op_census.py, docs/operators.md): every operator and dtype the
graph compiles to has a native kernel in MindSpore's installed GPU and Ascend libraries (or a written reason in
op_census.EXCEPTIONS); and what the census found fixed stays fixed: Ascend's graph without MulNoNan and bit for
bit the same, the sharded path's per-layer sums without float64 or UnsortedSegmentSum, a negative step's
per-step rate read at step 0, bfloat16 refused on GPU."""
import os
import sys

import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor

from mindspore_lamb import Lamb, backends, state
from mindspore_lamb._validation import check_param_dtypes
from mindspore_lamb.backends import composite, sharded

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import op_census  # noqa: E402  (tools/ is not a package)

# every configuration but the sharded one, each a child process of a few seconds; the sharded one (msrun, two
# workers) is test_the_sharded_graph_has_native_kernels_on_both_devices
CHECKED = tuple(name for name in op_census.CONFIGS if name != op_census.SHARDED)


@pytest.fixture(scope="module")
def census():
    graphs = {graph: op_census.census(CHECKED, graph=graph) for graph in ("GPU", "Ascend")}
    return graphs, op_census.kernels({op for found in graphs.values() for ops in found.values() for op in ops})


def test_every_operator_of_the_composite_graph_has_a_native_kernel(census):
    graphs, report = census
    assert all(graphs[graph][name] for graph in graphs for name in CHECKED)      # the IR was read
    assert op_census.problems(graphs, report) == []
    assert "MulNoNan" not in graphs["Ascend"]["nvlamb"]                          # AICPU only there
    assert {"Lerp", "Select", "NanToNum"} <= set(graphs["Ascend"]["nvlamb"])
    assert "MulNoNan" in graphs["GPU"]["nvlamb"] and report["GPU"]["ops"]["MulNoNan"][0] == "native"


@pytest.mark.distributed
def test_the_sharded_graph_has_native_kernels_on_both_devices():
    """The sharded path under msrun with two CPU workers: no float64, no UnsortedSegmentSum, every operator native
    on GPU and Ascend (or an exception with its reason)."""
    graphs = {graph: op_census.census((op_census.SHARDED,), graph=graph) for graph in ("GPU", "Ascend")}
    report = op_census.kernels({op for found in graphs.values() for ops in found.values() for op in ops})
    assert all(graphs[graph][op_census.SHARDED] for graph in graphs)
    assert op_census.problems(graphs, report) == []
    for graph in graphs:
        ops = graphs[graph][op_census.SHARDED]
        assert "UnsortedSegmentSum" not in ops and not any("float64" in dtypes for dtypes in ops.values())


def test_the_census_names_an_operator_without_a_native_kernel():
    """The check itself: MulNoNan (AICPU only on Ascend), float64 and UnsortedSegmentSum are reported."""
    bad = {"extra": {"MulNoNan": {"float32"}, "UnsortedSegmentSum": {"float64", "int32"}}}
    report = op_census.kernels({"MulNoNan", "UnsortedSegmentSum"})
    if "absent" in report["Ascend"]["library"]:
        pytest.skip(report["Ascend"]["library"])
    assert report["Ascend"]["ops"]["MulNoNan"][0] == "aicpu-only"
    lines = op_census.problems({"Ascend": bad}, report)
    assert "extra: MulNoNan has no native Ascend kernel (aicpu-only)" in lines
    assert "extra (Ascend graph): UnsortedSegmentSum takes float64 (AICPU only on Ascend, slow on GPU)" in lines


def test_the_gpu_plugin_has_no_bfloat16_kernel():
    """The reading behind refusing bfloat16 on GPU: the CUDA library exports float16 kernels and no bfloat16 one."""
    report = op_census.kernels(set())
    if "absent" in report["GPU"]["library"]:
        pytest.skip(report["GPU"]["library"])
    types = report["GPU"]["element_types"]
    assert types["float16"] > 0 and types["bfloat16"] == 0
    found = {"bf16": {"Cast": {"bfloat16", "float32"}}}
    assert op_census.problems({"GPU": found}, report) == [
        "bf16 (GPU graph): Cast takes bfloat16 (no bfloat16 CUDA kernel in the GPU plugin)"]


def test_the_validate_ir_is_read_with_dtypes(tmp_path):
    ir = tmp_path / "21_validate_0001.ir"
    ir.write_text("  %0(CNode_1) = PrimFunc_Cast(%para1_w, I64(43))\n"
                  "      : (<Tensor[Float16], (3)>, <Int64, NoShape>) -> (<Tensor[Float32], (3)>)\n"
                  "  %1(CNode_2) = Load(%para1_w, UMonad[U])\n"
                  "      : (<Ref[Tensor[Float16]], (3)>, <UMonad, NoShape>) -> (<Tensor[Float16], (3)>)\n"
                  "  %2(CNode_3) = MulNoNan(%0, %0)\n"
                  "      : (<Tensor[Float32], (3)>, <Tensor[Float32], (3)>) -> (<Tensor[Float32], (3)>)\n")
    assert op_census.parse_validate_ir(str(ir)) == {"Cast": {"float16", "float32"}, "MulNoNan": {"float32"}}


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_sharded_slices_cover_each_parameter_once(world):
    """The sharded path sums each parameter's squares over static slices of a worker's piece: over all workers
    the slices of parameter i have exactly its elements."""
    sizes = [5, 3, 0, 7, 2, 1]
    covered = [0] * len(sizes)
    for rank in range(world):
        slices = sharded.local_slices(sizes, rank, world)
        indices = [i for i, _, _ in slices]
        assert indices == list(range(indices[0], indices[0] + len(indices))) if indices else True  # a run
        for i, a, b in slices:
            assert 0 <= a <= b <= sharded.piece_length(sum(sizes), world)
            covered[i] += b - a
    assert covered == sizes


def test_negative_step_reads_a_rate_sequence_at_step_0(mode, path):
    """A damaged checkpoint's negative global_step: the per-step rate sequence is read at index 0 (a Gather at
    -1 is an error on GPU), the step is invalid and skipped, and the weights are left as they were."""
    weight = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    params = [Parameter(Tensor(weight), name="w")]
    opt = Lamb(params, [0.1, 0.2, 0.3], weight_decay=0.01, backend=path)
    opt.global_step.set_data(Tensor(np.array([-1], np.int32)))
    assert float(opt.get_lr().asnumpy()) == pytest.approx(0.1)
    opt((Tensor(np.ones((3, 4), np.float32)),))
    assert opt.invalid_steps == 1 and int(opt.global_step.asnumpy()[0]) == -1
    np.testing.assert_array_equal(params[0].asnumpy(), weight)
    opt.global_step.set_data(Tensor(np.array([2], np.int32)))
    assert float(opt.get_lr().asnumpy()) == pytest.approx(0.3)


def test_bfloat16_is_refused_on_gpu_with_the_reason():
    """No bfloat16 CUDA kernel in the GPU plugin (test_the_gpu_plugin_has_no_bfloat16_kernel): bfloat16 parameters
    and a bfloat16 first moment are refused on GPU, naming the parameter or the state, and allowed on Ascend."""
    w = Parameter(Tensor(np.ones((2, 2), np.float32), ms.bfloat16), name="w16")
    with pytest.raises(TypeError, match=r"'w16' is bfloat16, which MindSpore 2.10's GPU plugin has no kernel for "
                                        r".*use float16 or float32 on GPU, bfloat16 on Ascend"):
        check_param_dtypes([w], "GPU")
    check_param_dtypes([w], "Ascend")
    slots = state.declare({"m": ms.bfloat16})
    with pytest.raises(TypeError, match=r"no backend can run .* on GPU .*composite: MindSpore 2.10's GPU plugin "
                                        r"has no bfloat16 kernel .*first moments are bfloat16"):
        backends.select(None, slots, device_target="GPU")
    assert backends.select(None, slots, device_target="Ascend") is backends.composite.CompositeBackend


@pytest.mark.parametrize("kwargs", [{}, {"max_grad_norm": 1.0, "weight_decay_mode": "decoupled_outside"},
                                    {"mu_dtype": "float16", "trust_ratio_clip": (0.1, 5.0)}])
def test_the_ascend_graph_gives_the_same_results_bit_for_bit(mode, monkeypatch, kwargs):
    """Ascend's graph selects where the others use MulNoNan (composite.SELECT_SKIP): run here, it gives the same
    weights and moments bit for bit, through a step with a NaN gradient (skipped) and a layer whose first
    moment holds a NaN (held, its weights unchanged)."""
    def run(masked):
        monkeypatch.setattr(composite, "SELECT_SKIP", ("Ascend", "CPU") if masked else ("Ascend",))
        rng = np.random.default_rng(3)
        params = [Parameter(Tensor(rng.standard_normal(s).astype(np.float32)), name=f"p{i}")
                  for i, s in enumerate(((5, 7), (7,), (2, 3, 4)))]
        opt = Lamb(params, [0.01, 0.02, 0.03, 0.02, 0.01], weight_decay=0.01, backend="composite", **kwargs)
        assert opt.backend.masked is masked
        for i in range(5):
            grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
            if i == 1:
                grads[0][2, 3] = np.nan
            if i == 3:
                m = opt.moments1[2].asnumpy().copy()
                m[1, 1, 1] = np.nan
                opt.moments1[2].set_data(Tensor(m))
            opt(tuple(Tensor(g) for g in grads))
        return [x.asnumpy() for x in (*opt.params, *opt.moments1, *opt.moments2)]

    for want, got in zip(run(False), run(True)):
        assert want.dtype == got.dtype and want.tobytes() == got.tobytes()
