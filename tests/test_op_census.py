"""The operator census of the composite graph (tools/op_census.py, docs/operators.md): every operator and dtype the
graph compiles to has a native kernel in MindSpore's installed GPU and Ascend libraries (or a written reason in
op_census.EXCEPTIONS); and what the census found fixed stays fixed: the skip without MulNoNan, the sharded
path's per-layer sums without float64 or UnsortedSegmentSum, a negative step's per-step rate read at step 0."""
import os
import sys

import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor

from mindspore_lamb import Lamb, backends, state
from mindspore_lamb._validation import check_param_dtypes
from mindspore_lamb.backends import sharded

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import op_census  # noqa: E402  (tools/ is not a package)

# the configurations compiled here (each a child process of a few seconds); `python tools/op_census.py` runs all
CHECKED = ("groups+schedule", "nvlamb", "float16_params")


@pytest.fixture(scope="module")
def census():
    found = op_census.census(CHECKED)
    return found, op_census.kernels({op for ops in found.values() for op in ops})


def test_every_operator_of_the_composite_graph_has_a_native_kernel(census):
    found, report = census
    assert all(found[name] for name in CHECKED)                       # the IR was read
    assert op_census.problems(found, report) == []
    assert {"Lerp", "Select", "Sqrt", "ReduceSum"} <= set(found["nvlamb"])


def test_the_census_names_an_operator_without_a_native_kernel(census):
    """The check itself: MulNoNan (AICPU only on Ascend), float64 and UnsortedSegmentSum are reported."""
    found, _ = census
    bad = {"extra": {"MulNoNan": {"float32"}, "UnsortedSegmentSum": {"float64", "int32"}}}
    report = op_census.kernels({"MulNoNan", "UnsortedSegmentSum"})
    if "absent" in report["Ascend"]["library"]:
        pytest.skip(report["Ascend"]["library"])
    assert report["Ascend"]["ops"]["MulNoNan"][0] == "aicpu-only"
    lines = op_census.problems(bad, report)
    assert "extra: MulNoNan has no native Ascend kernel (aicpu-only)" in lines
    assert any("UnsortedSegmentSum takes float64" in line for line in lines)


def test_the_gpu_plugin_has_no_bfloat16_kernel():
    """The reading behind refusing bfloat16 on GPU: the CUDA library exports float16 kernels and no bfloat16 one."""
    report = op_census.kernels(set())
    if "absent" in report["GPU"]["library"]:
        pytest.skip(report["GPU"]["library"])
    types = report["GPU"]["element_types"]
    assert types["float16"] > 0 and types["bfloat16"] == 0
    found = {"bf16": {"Cast": {"bfloat16", "float32"}}}
    assert op_census.problems(found, report) == ["bf16: Cast takes bfloat16 (no bfloat16 CUDA kernel in the GPU plugin)"]


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
