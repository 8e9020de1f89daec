"""LAMB's state, declared once: its slots (what each is called in checkpoints, the dtype it is stored in), and
a check of its values.

A checkpoint holds, besides the weights, ``global_step`` (the 0-based step counter) and one entry per slot and
parameter: the first moments ``lamb_m.<parameter name>`` and the second moments ``lamb_v.<parameter name>``
(``lamb_m.shard`` / ``lamb_v.shard`` with ``shard_state=True``): the names of ``mindspore.nn.Lamb``. The second
moments are float32; the first moments are stored in the optimizer's ``mu_dtype`` (float32 unless asked).
MindSpore's ``load_param_into_net`` loads whatever the file holds, casting a moment to the optimizer's dtype
without a word, so a damaged or converted checkpoint would reach the step. :func:`check_state` names what is
wrong before it does (docs/api/lamb.md, "State and checkpoints").

With ``optim_bits=8`` the moments of each large parameter are stored in 8 bits instead (docs/memory.md): int8
codes ``lamb_m8.<name>`` and uint8 codes ``lamb_v8.<name>``, one per element, flat and padded to whole blocks of
:data:`BLOCK` elements, with one float32 scale per block, ``lamb_m8_scale.<name>`` and ``lamb_v8_scale.<name>``.

The slots are declared once, in :data:`SLOTS` and :data:`SLOTS_8BIT`; each optimizer takes its own slot set from
them (:func:`declare`, a :class:`Slots`) and hands it to its backend, which allocates the state from it and holds
it by role (docs/architecture.md, "Adding a state slot"). An elementwise slot holds one value per element of
each parameter, so it is laid out like the parameter and sharded with it, by elements (backends/sharded.py); a
slot of codes or of block scales is laid out by blocks (:meth:`Slot.shape`).
"""
from typing import Mapping, NamedTuple

import numpy as np

import mindspore.common.dtype as mstype

STEP = "global_step"
STEP_MAX = 2 ** 31 - 1        # the step counter is an int32 Parameter: a larger step would wrap to a negative one
# the dtypes a first moment may be stored in (Lamb's mu_dtype), the default (float32) first
MU_DTYPES = (mstype.float32, mstype.float16, mstype.bfloat16)
BLOCK = 256                   # elements of a block of the 8-bit state, each with its own float32 scale


class Slot(NamedTuple):
    """One elementwise state tensor of the LAMB rule.

    role: the rule's name for it (``m``, ``v``), by which every consumer reads it; the order of an optimizer's
        :class:`Slots` is the order in which the fused kernel receives them;
    prefix: its checkpoint names, ``<prefix>.<parameter name>`` (shaped like the parameter) or
        ``<prefix>.shard`` (this worker's piece, with ``shard_state=True``);
    title: what it is, in messages;
    dtype: the dtype it is stored in (:func:`declare` sets an optimizer's); the math is float32 whatever it is:
        read as float32, rounded to nearest when stored;
    dtypes: the dtypes it may be stored in (and be found in a checkpoint);
    nonnegative: why a negative value is damage, or "" when it is not;
    layout: ``"elementwise"`` (laid out like the parameter), ``"codes"`` (one 8-bit code per element, flat,
        padded to whole blocks of :data:`BLOCK`) or ``"scales"`` (one float32 per block).
    """
    role: str
    prefix: str
    title: str
    dtype: mstype.Type
    dtypes: tuple
    nonnegative: str = ""
    layout: str = "elementwise"

    def name(self, parameter_name):
        """The checkpoint name of this slot for `parameter_name` (or ``"shard"``)."""
        return f"{self.prefix}.{parameter_name}"

    def shape(self, param_shape):
        """The shape of this slot for a parameter of shape `param_shape`."""
        blocks = -(-int(np.prod(param_shape, dtype=np.int64)) // BLOCK)
        return {"elementwise": tuple(param_shape), "codes": (blocks * BLOCK,), "scales": (blocks,)}[self.layout]


SLOTS = (Slot("m", "lamb_m", "first moments", mstype.float32, MU_DTYPES),
         Slot("v", "lamb_v", "second moments", mstype.float32, (mstype.float32,), "a second moment is a mean of squares"))
# optim_bits=8: each moment as 8-bit codes and a float32 scale per block (docs/memory.md, "The 8-bit format")
_LARGEST = "a block scale is the largest magnitude in its block"
SLOTS_8BIT = (Slot("m", "lamb_m8", "8-bit first moments", mstype.int8, (mstype.int8,), layout="codes"),
              Slot("m_scale", "lamb_m8_scale", "first moments' block scales", mstype.float32, (mstype.float32,),
                   _LARGEST, "scales"),
              Slot("v", "lamb_v8", "8-bit second moments", mstype.uint8, (mstype.uint8,), layout="codes"),
              Slot("v_scale", "lamb_v8_scale", "second moments' block scales", mstype.float32, (mstype.float32,),
                   _LARGEST, "scales"))


class Slots(tuple):
    """The slot set of one optimizer (:func:`declare`): its :class:`Slot` s, each read by its role."""

    @property
    def roles(self):
        """The roles, in order (``("m", "v")``)."""
        return tuple(slot.role for slot in self)

    def of(self, role):
        """The slot of `role`."""
        return self[self.roles.index(role)]

    @property
    def quantized(self):
        """Whether the moments are 8-bit codes with block scales (:data:`SLOTS_8BIT`)."""
        return any(slot.layout == "codes" for slot in self)

    def layout(self):
        """(roles, stored dtype names): the static description of the slots that a graph reads them by (the
        composite rule takes a parameter's slots as one tuple in this order, ``composite.moments_and_update``)."""
        return self.roles, tuple(str(slot.dtype).lower() for slot in self)


def held(slots):
    """The slots whose entries an optimizer with `slots` holds: an 8-bit slot set keeps the float32 moments of its
    small tensors (``lamb_m.<name>``, ``lamb_v.<name>``) too."""
    return Slots(tuple(slots) + SLOTS) if slots.quantized else slots


def declare(dtypes, slots=None):
    """The slot set of one optimizer (:class:`Slots`): `slots` (default :data:`SLOTS`) with the stored dtype of
    each role in `dtypes` ({role: dtype}, one of that slot's `dtypes`, checked by the option that chose it;
    None: the options leave that slot out)."""
    return Slots(slot._replace(dtype=dtypes.get(slot.role, slot.dtype)) for slot in (slots or SLOTS)
                 if dtypes.get(slot.role, slot.dtype) is not None)


def _dtype(value):
    """The stored dtype of a Tensor/Parameter (MindSpore's name) or array (NumPy's), lower-case."""
    dtype = getattr(value, "dtype", None)
    if isinstance(dtype, mstype.Type):
        return str(dtype).lower()
    return str(np.asarray(value).dtype)


def _values(value):
    """float32 or wider values (NumPy has no bfloat16 arithmetic)."""
    array = value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)
    return array.astype(np.float32) if array.dtype.itemsize < 4 and array.dtype.kind not in "iub" else array


def _first_index(mask):
    return tuple(int(i) for i in np.unravel_index(int(np.flatnonzero(mask)[0]), mask.shape))


def _problems(name, slot, value):
    """What is wrong with one entry of the optimizer's state (a list of str); `slot` None: the step counter."""
    if slot is None:
        step = _values(value).reshape(-1)
        if step.size != 1 or not np.issubdtype(step.dtype, np.integer) or not 0 <= step[0] <= STEP_MAX:
            return [f"'{name}' must be one integer from 0 to {STEP_MAX} (the number of steps taken, held in "
                    f"int32), but it is {step.tolist()} ({_dtype(value)})"]
        return []
    allowed = [str(dtype).lower() for dtype in slot.dtypes]
    if _dtype(value) not in allowed:
        why = (" (in float16 they underflow: the first step after loading would be off)"
               if slot.layout == "elementwise" and "float16" not in allowed else "")
        return [f"'{name}' is stored as {_dtype(value)}, but LAMB's {slot.title} are {' or '.join(allowed)}{why}"]
    array = _values(value)
    problems = []
    bad = ~np.isfinite(array)
    if bad.any():
        problems.append(f"'{name}' holds {int(bad.sum())} NaN or Inf value(s), the first at index "
                        f"{_first_index(bad)}")
    if slot.nonnegative:
        negative = array < 0
        if negative.any():
            index = _first_index(negative)
            problems.append(f"'{name}' holds {int(negative.sum())} negative value(s) ({slot.nonnegative}), the first "
                            f"at index {index}: {array[index]}")
    return problems


def _slot_of(name, slots):
    return next((slot for slot in slots if name.startswith(slot.prefix + ".")), None)


def check_state(state: Mapping[str, object], source: str = "the optimizer state") -> None:
    """Raise ValueError naming every damaged entry of LAMB's state in `state`.

    Checked: ``global_step`` is one integer from 0 to 2**31 - 1 (it is held in int32); every ``lamb_m.*`` /
    ``lamb_v.*`` entry is finite and stored in a dtype LAMB stores it in (``lamb_v.*``: float32; ``lamb_m.*``:
    float32, float16 or bfloat16, see `mu_dtype`), and the second moments are >= 0; the 8-bit state
    (``optim_bits=8``): codes ``lamb_m8.*`` int8 and ``lamb_v8.*`` uint8, block scales ``lamb_m8_scale.*`` /
    ``lamb_v8_scale.*`` float32, finite and >= 0. Other entries (the weights, a loss scale) are not looked at.

    Args:
        state (dict): name -> Parameter, Tensor or NumPy array: what ``mindspore.load_checkpoint`` returns
            (check it before ``load_param_into_net``), or an optimizer's own state
            (:meth:`mindspore_lamb.Lamb.check_state`).
        source (str): what `state` is, for the message (e.g. the checkpoint's path).

    Raises:
        TypeError: If `state` is not a dict (a Mapping).
        ValueError: If an entry is damaged; the message names each one and what is wrong with it.

    Examples:
        >>> import numpy as np
        >>> from mindspore_lamb import check_state
        >>> check_state({"global_step": np.array([3], np.int32), "lamb_v.w": np.ones(2, np.float32)})
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"For 'check_state', the argument 'state' must be a dict of name -> Parameter, Tensor or "
                        f"array (what mindspore.load_checkpoint returns), but got {type(state).__name__}.")
    check_slots(state, source, SLOTS + SLOTS_8BIT)


def check_slots(state, source, slots):
    """:func:`check_state` of the entries of `slots` (an optimizer's :class:`Slots`) and ``global_step``."""
    problems = [problem for name, value in state.items()
                if name == STEP or _slot_of(name, slots) is not None
                for problem in _problems(name, _slot_of(name, slots), value)]
    if problems:
        raise ValueError(f"{source} is damaged, so training from it would not continue the run: "
                         + "; ".join(problems) + ".")
