"""LAMB's state in checkpoints: the names it is saved under, and a check of its values.

A checkpoint holds, besides the weights, ``global_step`` (the 0-based step counter), the first moments
``lamb_m.<parameter name>`` and the second moments ``lamb_v.<parameter name>`` (``lamb_m.shard`` /
``lamb_v.shard`` with ``shard_state=True``), all float32: the names of ``mindspore.nn.Lamb``. MindSpore's
``load_param_into_net`` loads whatever the file holds, casting a float16 moment up without a word, so a
damaged or converted checkpoint would reach the step. :func:`check_state` names what is wrong before it
does (docs/api/lamb.md, "State and checkpoints").
"""
import numpy as np

import mindspore.common.dtype as mstype

STEP = "global_step"
FIRST_MOMENT, SECOND_MOMENT = "lamb_m.", "lamb_v."


def _dtype(value):
    """The stored dtype of a Tensor/Parameter (MindSpore's name) or array (NumPy's), lower-case."""
    dtype = getattr(value, "dtype", None)
    if isinstance(dtype, mstype.Type):
        return str(dtype).lower()
    return str(np.asarray(value).dtype)


def _values(value):
    return value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)


def _first_index(mask):
    return tuple(int(i) for i in np.unravel_index(int(np.flatnonzero(mask)[0]), mask.shape))


def _problems(name, value):
    """What is wrong with one entry of the optimizer's state (a list of str)."""
    if name == STEP:
        step = _values(value).reshape(-1)
        if step.size != 1 or not np.issubdtype(step.dtype, np.integer) or step[0] < 0:
            return [f"'{name}' must be one integer >= 0 (the number of steps taken), but it is "
                    f"{step.tolist()} ({_dtype(value)})"]
        return []
    if _dtype(value) != "float32":
        return [f"'{name}' is stored as {_dtype(value)}, but LAMB's moments are float32 (in float16 the second "
                f"moment underflows: the first step after loading would be off)"]
    array = _values(value)
    problems = []
    bad = ~np.isfinite(array)
    if bad.any():
        problems.append(f"'{name}' holds {int(bad.sum())} NaN or Inf value(s), the first at index "
                        f"{_first_index(bad)}")
    if name.startswith(SECOND_MOMENT):
        negative = array < 0
        if negative.any():
            index = _first_index(negative)
            problems.append(f"'{name}' holds {int(negative.sum())} negative value(s) (a second moment is a mean of "
                            f"squares), the first at index {index}: {array[index]}")
    return problems


def check_state(state, source="the optimizer state"):
    """Raise ValueError naming every damaged entry of LAMB's state in `state`.

    Checked: ``global_step`` is one integer >= 0; every ``lamb_m.*`` / ``lamb_v.*`` entry is float32 and
    finite, and the second moments are >= 0. Other entries (the weights, a loss scale) are not looked at.

    Args:
        state (dict): name -> Parameter, Tensor or NumPy array: what ``mindspore.load_checkpoint`` returns
            (check it before ``load_param_into_net``), or an optimizer's own state
            (:meth:`mindspore_lamb.Lamb.check_state`).
        source (str): what `state` is, for the message (e.g. the checkpoint's path).

    Raises:
        ValueError: If an entry is damaged; the message names each one and what is wrong with it.

    Examples:
        >>> import numpy as np
        >>> from mindspore_lamb import check_state
        >>> check_state({"global_step": np.array([3], np.int32), "lamb_v.w": np.ones(2, np.float32)})
    """
    problems = [problem for name, value in state.items()
                if name == STEP or name.startswith((FIRST_MOMENT, SECOND_MOMENT))
                for problem in _problems(name, value)]
    if problems:
        raise ValueError(f"{source} is damaged, so training from it would not continue the run: "
                         + "; ".join(problems) + ".")
