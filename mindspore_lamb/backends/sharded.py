"""The sharded backend: each of N data-parallel workers keeps the moments of 1/N of the elements.

The parameters, flattened and concatenated in update order (E elements), are cut into N contiguous
pieces of L = ceil(E / N) elements (by elements, not by tensors: a layer may be cut between workers).
Each step, every worker (the gradients arrive all-reduced, identical everywhere):

1. updates the moments of its piece and computes the update u there, with the fused CPU kernel's first pass,
   or with the composite rule (``composite.new_moments``, then ``composite.update`` from the moments as
   stored) bucket by bucket for the moments and parameter slice by parameter slice for u;
2. sums ||w||^2 and ||u||^2 of each parameter over its piece (float32 ReduceSums over the slices of the piece
   that each parameter covers, known when the backend is built), and ONE all-reduce of that (n, 2) array gives
   every worker the norms of whole layers, so the trust ratios are exact;
3. applies w = decay_factor w - lr q u (decay_factor = 1 - lr lambda, or 1) to its piece bucket by bucket: bucket
   k (the piece's elements [k B, (k + 1) B), B = Lamb's ``shard_bucket_size``, the same offsets on every worker)
   is made, all-gathered and written into the parameters before bucket k + 1 is made, so its buffers are those
   of one bucket, not of the model. The fused kernels run the buckets in a loop of the graph (one set of
   buffers for all: MindSpore 2.10 on CPU keeps a collective's buffers for the whole step) and write each
   gathered bucket in place (``LambShardWrite``); the composite graph makes u of each bucket again from the
   moments as stored and assigns each parameter once its last part is gathered. Each bucket of the composite
   graph reads its inputs after the previous one is written, so that its element-wise temporaries are those
   of one bucket.

Every worker issues the same collectives, of the same shapes, in the same order.
The state is one Parameter of L elements per slot of the optimizer's ``state.Slots``, in the slot's dtype,
held by role: ``lamb_m.shard`` and ``lamb_v.shard``; ``lamb_shard_names`` (the parameter names, UTF-8) and
``lamb_shard_rank`` (int32 [rank, world]: which piece a checkpoint holds) let ``mindspore_lamb.sharding``
merge the workers' checkpoints into a full one, checking that they fit together, and cut a full one for
another number of workers.

With ``optim_bits=8`` (the fused kernels only) the pieces are cut from the padded layout of the 8-bit tensors'
codes on block boundaries (``sharded_blocks.py``), so each worker computes the unsharded step's scales and
codes for its blocks; the tensors below ``min_8bit_size`` are updated whole on every worker; the per-layer
sums stay float64, all-gathered as bits and added in rank order (``LambShardTotal``), and the buckets are whole
blocks.
docs/distributed.md has the figures.
"""
import numpy as np

import mindspore as ms
import mindspore.common.dtype as mstype
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from mindspore.ops import composite as C
from mindspore.ops import functional as F
from mindspore.ops import operations as P

from .._ops import assign, broadcast_to, cast
from . import composite, fused_cpu, sharded_blocks
from .composite import new_moments, new_weight, rates, read_moment, rescale, stored, trust_ratio, update
from .contract import INDEX, SlotState, per_parameter, terms, to_float32
from ..state import BLOCK

_PROCEED, _OUTSIDE = INDEX["proceed"], INDEX["decay_outside"]
NAMES_PARAMETER = "lamb_shard_names"
RANK_PARAMETER = "lamb_shard_rank"
# elements of each worker's piece per all-gather (Lamb's shard_bucket_size; docs/distributed.md)
DEFAULT_BUCKET = 2 ** 22


def piece_length(total, world):
    """L: the elements of each worker's piece (the last one is padded)."""
    return -(-total // world)


def piece(sizes, rank, world):
    """(positions, valid, owner) of worker `rank`'s piece, as NumPy arrays of L elements: the global flat
    position of each element (clamped to the last one for padding), 1.0 for real elements and 0.0 for
    padding, and the index of each element's parameter (len(sizes) for padding)."""
    total = sum(sizes)
    positions = rank * piece_length(total, world) + np.arange(piece_length(total, world))
    valid = positions < total
    clamped = np.minimum(positions, total - 1)
    owner = np.searchsorted(np.cumsum(sizes), clamped, side="right")
    return clamped.astype(np.int32), valid.astype(np.float32), np.where(valid, owner, len(sizes)).astype(np.int32)


def local_slices(sizes, rank, world):
    """((i, a, b), ...): the run of parameters i from the first to the last whose elements lie in worker `rank`'s
    piece, each with the slice [a, b) of the piece it covers (empty for a parameter of no elements)."""
    width = piece_length(sum(sizes), world)
    start, end = rank * width, min((rank + 1) * width, sum(sizes))
    offsets = np.cumsum([0] + list(sizes))
    inside = [i for i in range(len(sizes)) if max(offsets[i], start) < min(offsets[i + 1], end)]
    if not inside:
        return ()
    def local(x):                                                   # a flat position, in the piece
        return int(min(max(x, start), end) - start)
    return tuple((i, local(offsets[i]), local(offsets[i + 1])) for i in range(inside[0], inside[-1] + 1))


def buckets(width, bucket):
    """((lo, hi), ...): the piece's buckets of `bucket` elements (the last one shorter), the same on every worker."""
    return tuple((lo, min(lo + bucket, width)) for lo in range(0, width, bucket))


def within(slices, lo, hi):
    """((i, a, b), ...): `slices` (of local_slices) cut to the piece's range [lo, hi), relative to lo (the
    empty ones left out)."""
    cut = ((i, max(a, lo) - lo, min(b, hi) - lo) for i, a, b in slices)
    return tuple((i, a, b) for i, a, b in cut if b > a)


def write_plan(sizes, world, width, spans):
    """How the all-gathered buckets go into the parameters (the composite graph): for each bucket, (cuts,
    writes). Bucket (lo, hi) gathers worker r's elements [lo, hi) of its piece at [r B, (r + 1) B) (B = hi - lo):
    flat positions r L + lo + j. `cuts`: the slices (s, e) of that gathered bucket that belong to parameters,
    numbered in order over all buckets; `writes`: (i, (part, ...)) for each parameter i whose last part is in
    that bucket, its parts (numbers of cuts) in flat order."""
    offsets = np.cumsum([0] + list(sizes))
    parts = {i: [] for i in range(len(sizes))}              # i: [(flat start, cut number)]
    last = {}
    plan, number = [], 0
    for k, (lo, hi) in enumerate(spans):
        size, cuts = hi - lo, []
        for r in range(world):
            first = r * width + lo                            # worker r's part: flat [first, first + size)
            for i in range(len(sizes)):
                a, b = max(first, offsets[i]), min(first + size, offsets[i + 1])
                if a < b:
                    cuts.append((int(r * size + a - first), int(r * size + b - first)))
                    parts[i].append((int(a), number))
                    last[i] = k
                    number += 1
        plan.append((tuple(cuts), []))
    for i in sorted(last):
        plan[last[i]][1].append((i, tuple(n for _, n in sorted(parts[i]))))
    return tuple((cuts, tuple(writes)) for cuts, writes in plan)


def data_parallel_group(parallel_optimizer):
    """(rank, world size) of this data-parallel worker; a clear error where sharding cannot run."""
    if parallel_optimizer:
        raise ValueError("For 'Lamb', the argument 'shard_state' cannot be True under MindSpore's parallel "
                         "optimizer, which shards the state itself.")
    mode = ms.get_auto_parallel_context("parallel_mode")
    if mode not in (ms.ParallelMode.DATA_PARALLEL, "data_parallel"):
        raise ValueError(f"For 'Lamb', the argument 'shard_state' needs data-parallel mode (msrun workers, "
                         f"mindspore.communication.init(), set_auto_parallel_context(parallel_mode="
                         f"ParallelMode.DATA_PARALLEL)), but the parallel mode is {mode!r}.")
    from mindspore.communication import get_group_size, get_rank
    return get_rank(), get_group_size()


def shard_state(params, slots, world):
    """This worker's zero state (a contract.SlotState): one Parameter of L elements per slot (``lamb_m.shard``,
    ...), in the slot's dtype."""
    length = piece_length(sum(int(np.prod(p.shape)) for p in params), world)
    return SlotState(slots, [ParameterTuple([Parameter(Tensor(np.zeros(length, np.float32), slot.dtype),
                                                       name=slot.name("shard"))]) for slot in slots])


def names_record(names):
    """lamb_shard_names: the parameter names, in update order, UTF-8 (one per line)."""
    encoded = np.frombuffer("\n".join(names).encode(), np.uint8).copy()
    return Parameter(Tensor(encoded), name=NAMES_PARAMETER, requires_grad=False)


def shard_record(rank, world):
    """lamb_shard_rank, int32 [rank, world]: saved with the moments, so that a checkpoint says whose piece
    it holds (``sharding.merge`` orders and checks the workers' checkpoints by it)."""
    return Parameter(Tensor(np.array([rank, world], np.int32)), name=RANK_PARAMETER, requires_grad=False)


class ShardedBackend(nn.Cell):
    """The update contract (contract.py) with sharded state: `state` holds this worker's piece of each slot;
    `shard_names` and `shard_rank` record the parameters and which piece it is, in the checkpoints. `kernels`
    is the backend whose operators run the piece (backends.create chose it): the fused CPU kernels, or the
    composite rule. `bucket`: the elements of each worker's piece per all-gather (the last bucket shorter)."""

    name = "sharded"

    def __init__(self, params, slots, *, decay_flags, adapt_flags, owned_flags, constants, kernels, rank, world,
                 bucket=DEFAULT_BUCKET, eight_bit=None):
        super().__init__()
        if not all(owned_flags):
            raise ValueError("The sharded backend does its own sharding: it does not run under MindSpore's "
                             "parallel optimizer.")
        sizes = [int(np.prod(p.shape)) for p in params]
        self.n = len(params)
        self.rank, self.world = rank, world
        self.slots = slots
        # the fused CPU kernels run the piece on CPU with float32 parameters; else the composite rule
        self.fused = kernels is fused_cpu.FusedCpuBackend
        self.quantized = slots.quantized                     # the 8-bit state: pieces cut on block boundaries
        if self.quantized:
            if not self.fused:
                raise ValueError(f"For 'Lamb', the argument 'optim_bits' is 8 with shard_state=True, which runs "
                                 f"on the fused CPU kernels only, but this Lamb takes the {kernels.name} backend "
                                 f"(docs/memory.md): use optim_bits=32 or shard_state=False there.")
            self.state = sharded_blocks.block_state(params, slots, eight_bit, world)
        else:
            self.state = shard_state(params, slots, world)   # by role (contract.SlotState)
        self.state_params = self.state.flat()                # one piece per slot, in the order of `slots`
        self.layout = slots.layout()
        self.shard_names = names_record([p.name for p in params])
        self.shapes = tuple(tuple(p.shape) for p in params)
        self.offsets = tuple(int(x) for x in np.cumsum([0] + sizes))
        self.shard_rank = shard_record(rank, world)
        total, width = sum(sizes), piece_length(sum(sizes), world)
        start, end = min(rank * width, total), min((rank + 1) * width, total)
        if self.quantized:
            # the padded layout of the 8-bit tensors' codes, cut on block boundaries (sharded_blocks.py), and the
            # buckets whole blocks; the float32 tensors, whole on every worker, are updated in place
            width = sharded_blocks.piece_blocks(sizes, eight_bit, world) * BLOCK
            start, end = sharded_blocks.piece_bounds(sizes, eight_bit, rank, world)
            bucket = -(-bucket // BLOCK) * BLOCK
            self.kinds = Tensor(np.array(eight_bit, np.int32))
            # each slot's piece comes first (sharded_blocks.block_state), then m's and v's float32 tensors
            self.piece_params = ParameterTuple(self.state[role][0] for role in slots.roles)
            self.whole_params = ParameterTuple(p for role in ("m", "v") for p in self.state[role][1:])
        # the piece's buckets: each is all-gathered and written into the parameters before the next is made
        self.buckets = buckets(width, bucket)
        self.SumOfSquares = kernels.SumOfSquares            # the chosen kernels' sum (also the loss-scale cell's)
        self.grad_sq_cell = kernels.SumOfSquares()
        # the slices [a, b) of the piece that parameters first .. first + len - 1 cover (the others: 0)
        self.slices = local_slices(sizes, rank, world)
        if self.fused:
            library = fused_cpu.library_path(slots=slots)
            n = self.n
            # 8-bit: float64 sums as int32 bits, all-gathered and added by LambShardTotal, then rounded once
            sums_shape, sums_dtype = ((n, 4), mstype.int32) if self.quantized else ((n, 2), mstype.float32)
            self.shard_sums = ops.Custom(library + ":LambShardSums", out_shape=lambda *shapes: sums_shape,
                                         out_dtype=lambda *types: sums_dtype, func_type="aot")
            self.shard_sums.add_prim_attr("side_effect_mem", True)   # m, v in place
            size = self.buckets[0][1]                                # every bucket this long (the last padded)
            self.shard_apply = ops.Custom(library + ":LambShardApplyBucket", out_shape=lambda *shapes: (size,),
                                          out_dtype=lambda *types: mstype.float32, func_type="aot")
            self.shard_write = ops.Custom(library + ":LambShardWrite", out_shape=lambda *shapes: (1,),
                                          out_dtype=lambda *types: mstype.float32, func_type="aot")
            self.shard_write.add_prim_attr("side_effect_mem", True)  # the parameters in place
            # the kernels' bounds: this worker's piece [start, end) of the flat parameters; bucket k (lo = k size,
            # in the piece) is [start, end, lo] = [start, end, 0] + lo [0, 0, 1], and it is gathered into the
            # parameters by [L, lo, world] = [L, 0, world] + lo [0, 1, 0]
            self.bounds = Tensor(np.array([start, end] + [rank] * self.quantized, np.int32))
            self.bucket_bounds = Tensor(np.array([start, end, 0], np.int32))
            self.write_layout = Tensor(np.array([width, 0, world], np.int32))
            self.at_bounds = Tensor(np.array([0, 0, 1], np.int32))
            self.at_layout = Tensor(np.array([0, 1, 0], np.int32))
            self.bucket_size = Tensor(size, mstype.int32)
            self.n_buckets = Tensor(len(self.buckets), mstype.int32)
            self.bucket0 = Tensor(0, mstype.int32)
            self.hyper_map = C.HyperMap()
            if self.quantized:
                self.shard_total = ops.Custom(library + ":LambShardTotal", out_shape=lambda *shapes: (n, 2),
                                              out_dtype=lambda *types: mstype.float32, func_type="aot")
                self.shard_whole = ops.Custom(library + ":LambShardApplyWhole", out_shape=lambda *shapes: (1,),
                                              out_dtype=lambda *types: mstype.float32, func_type="aot")
                self.shard_whole.add_prim_attr("side_effect_mem", True)   # the float32 tensors in place
        else:
            # the piece in the composite graph, bucket by bucket (or parameter by parameter): static slices of the
            # flattened parameters (gradients) and of the state, each parameter's scalars broadcast over its
            # slice, and the padding (the last worker's) a constant tail
            self.pad = width - (end - start)
            self.bucket_slices = tuple(within(self.slices, lo, hi) for lo, hi in self.buckets)
            self.bucket_pads = tuple(max(0, hi - max(lo, end - start)) for lo, hi in self.buckets)
            # (i, a, b): the elements [a, b) of flattened parameter i in each bucket, and in each of self.slices
            self.bucket_parts = tuple(tuple((i, start + lo + a - self.offsets[i], start + lo + b - self.offsets[i])
                                            for i, a, b in slices)
                                      for (lo, _), slices in zip(self.buckets, self.bucket_slices))
            self.slice_parts = tuple((i, start + a - self.offsets[i], start + b - self.offsets[i])
                                     for i, a, b in self.slices)
            self.zeros = Tensor(np.zeros(max(self.pad, 1), np.float32))
            self.ones_pad = Tensor(np.ones(max(self.pad, 1), np.float32))
            self.first = self.slices[0][0] if self.slices else 0
            self.before = Tensor(np.zeros((self.first, 2), np.float32)) if self.first else None
            rest = self.n - self.first - len(self.slices)
            self.after = Tensor(np.zeros((rest, 2), np.float32)) if rest else None
            self.zeros2 = Tensor(np.zeros(2, np.float32))
            # the gathered buckets into the parameters: each parameter assigned once its last part is gathered
            self.plan = write_plan(sizes, world, width, self.buckets)
        self.present_terms = terms(constants)   # the composite rule leaves out the terms of neutral constants
        self.masked = ms.get_context("device_target") in composite.SELECT_SKIP   # selects instead of MulNoNan
        self.decay_mask = Tensor(np.array(decay_flags, np.float32))
        self.adapt = Tensor(np.array(adapt_flags, np.bool_))
        self.ones = Tensor(np.ones(self.n, np.float32))
        self.all_reduce = P.AllReduce()
        self.all_gather = P.AllGather()
        self.reduce_sum = P.ReduceSum(keep_dims=False)
        self.isfinite = P.IsFinite()
        self.concat = P.Concat()
        self.stack = P.Stack(axis=1)
        self.stack0 = P.Stack()

    def _piece(self, tensors, parts, pad, after):
        """A part of this worker's piece of `tensors` flattened and concatenated, in float32: the slices `parts`
        ((i, a, b): elements [a, b) of flattened tensor i), then `pad` elements of padding (zeros); read after
        `after`."""
        cut = ()
        for i, a, b in parts:
            cut += (cast(F.reshape(F.depend(tensors[i], after), (-1,))[a:b], mstype.float32),)
        if pad:
            cut += (self.zeros[:pad],)
        return cut[0] if len(cut) == 1 else self.concat(cut)

    def _state(self, lo, hi, after):
        """The slots' elements [lo, hi) of the piece (a tuple, in the order of `slots`), read after `after`."""
        return tuple(F.depend(slot, after)[lo:hi] for slot in self.state_params)

    def _stored(self, role, value):
        """Float32 moment `value` rounded to the dtype of slot `role`."""
        roles, dtypes = self.layout
        return stored(value, dtypes[roles.index(role)])

    def _spread(self, per_param, slices, pad, fill):
        """Each element's value of the float32 (n,) `per_param` over the piece's `slices` ((i, a, b), contiguous),
        then `pad` elements of `fill` (a float32 Tensor of at least `pad` elements)."""
        parts = ()
        for i, a, b in slices:
            parts += (broadcast_to(per_param[i:i + 1], (b - a,)),)
        if pad:
            parts += (fill[:pad],)
        return parts[0] if len(parts) == 1 else self.concat(parts)

    def _piece_sums(self, sums):
        """float32 (n, 2): `sums`, the (2,) sums of each of self.slices, with 0 for the parameters outside the
        piece."""
        parts = ()
        if self.before is not None:
            parts += (self.before,)
        if self.slices:
            parts += (self.stack0(sums),)
        if self.after is not None:
            parts += (self.after,)
        return parts[0] if len(parts) == 1 else self.concat(parts)

    def _write(self, k, gathered, cut, params):
        """The parameters whose last part is in gathered bucket k assigned (`cut`: the parts cut from the buckets
        so far, extended by this one's); returns (cut, the assigns)."""
        cuts, writes = self.plan[k]
        for s, e in cuts:
            cut += (gathered[s:e],)
        done = ()
        for i, numbers in writes:
            if len(numbers) == 1:
                full = cut[numbers[0]]
            else:
                full = self.concat(tuple(cut[j] for j in numbers))
            done += (assign(params[i], cast(F.reshape(full, self.shapes[i]), F.dtype(params[i]))),)
        return cut, done

    def _moments(self, state, size):
        """(v, m) as float32 from the slots' elements `state` (of `_state`), `size` of them."""
        return (read_moment(state, self.layout, "v", (size,)), read_moment(state, self.layout, "m", (size,)))

    def _composite_sums(self, scalars, rescaled, step_rates, wd_vec, params, gradients):
        """Step 1 on the composite rule: the new moments of the piece, one moment at a time (m does not depend on
        v), bucket by bucket, each assigned to its slot once its buckets are made; then, parameter slice by
        parameter slice, u' from the moments as stored and the sums of ||w||^2 and ||u'||^2 there (one ReduceSum
        over each slice: the same sums whatever the buckets). Each bucket or slice reads its inputs after the
        previous one is made, so that the element-wise temporaries are those of one bucket (one slice), not of
        the piece. Returns (the (n, 2) sums, the assignments)."""
        roles = self.layout[0]
        state_done = ()
        after = step_rates[2]
        for role in ("v", "m"):                      # one moment at a time: its buckets, then one assignment
            values = ()
            for k in range(len(self.buckets)):
                lo, hi = self.buckets[k]
                pad = self.bucket_pads[k]
                wd = self._spread(F.depend(wd_vec, after), self.bucket_slices[k], pad, self.zeros)
                # G is known first here, so a skipped step changes nothing (the composite rule)
                v, m = new_moments(scalars, self.present_terms, step_rates, wd,
                                   self._piece(params, self.bucket_parts[k], pad, after),
                                   self._state(lo, hi, after), self.layout,
                                   self._piece(gradients, self.bucket_parts[k], pad, after))
                values += (self._stored(role, v if role == "v" else m),)
                after = values[-1]
            after = assign(self.state_params[roles.index(role)], values[0] if len(values) == 1 else self.concat(values))
            state_done += (after,)
        sums = ()
        after = state_done
        for (i, a, b), (_, pa, pb) in zip(self.slices, self.slice_parts):
            if b == a:
                sums += (self.zeros2,)
                continue
            w = self._piece(params, ((i, pa, pb),), 0, after)
            v, m = self._moments(self._state(a, b, after), b - a)
            u = update(scalars, self.present_terms, rescaled, F.depend(wd_vec, after)[i:i + 1], w, v, m)
            sums += (self.reduce_sum(self.stack((F.square(w), F.square(u))), 0),)
            after = sums[-1]
        return self._piece_sums(sums), state_done

    def construct(self, scalars, lr, weight_decay, params, gradients, grad_sq):
        if grad_sq is None:
            grad_sq = self.grad_sq_cell(gradients)          # the full gradients: the same on every worker
        applied = F.logical_and(scalars[_PROCEED], self.isfinite(grad_sq))
        lr_vec = per_parameter(lr, self.ones)
        wd_vec = per_parameter(weight_decay, self.ones) * self.decay_mask

        # 1. this worker's piece: moments, update u (= c u' on the composite rule), per-parameter partial sums of
        # ||w||^2 and ||u||^2
        c, state_done = None, ()
        if self.fused:
            packed = self.stack0(self.hyper_map(to_float32, scalars))
            if self.quantized:
                sums = self.shard_sums(packed, lr_vec, wd_vec, self.bounds, self.kinds, *params, *self.piece_params,
                                       *self.whole_params, *gradients)
            else:
                sums = self.shard_sums(packed, lr_vec, wd_vec, self.bounds, *params, *self.state_params, *gradients)
        else:
            rescaled = rescale(scalars, self.present_terms)  # u = c u'
            c = rescaled[0]
            sums, state_done = self._composite_sums(scalars, rescaled, rates(scalars, applied, self.masked), wd_vec,
                                                    params, gradients)
        # 2. one all-reduce (8-bit: an all-gather of the float64 sums): the norms of whole layers on every worker
        sums = self.shard_total(self.all_gather(sums)) if self.quantized else self.all_reduce(sums)
        decay_factor = 1.0 - lr_vec * wd_vec * scalars[_OUTSIDE]
        w_norm = F.sqrt(sums[:, 0]) * decay_factor
        u_norm = F.sqrt(sums[:, 1])
        if c is not None:
            u_norm, lr_vec = u_norm * c, lr_vec * c         # ||u|| = c ||u'||, lr q u = (lr c) q u'
        lr_q, reported_q, decay_factor = trust_ratio(scalars, self.present_terms, applied, lr_vec, w_norm, u_norm,
                                                     decay_factor, self.adapt)
        # 3. bucket by bucket: this worker's new piece there, one all-gather, written into the parameters before
        # the next bucket is made
        done = ()
        if self.fused:
            k = self.bucket0
            while k < self.n_buckets:
                lo = k * self.bucket_size
                at, layout = self.bucket_bounds + lo * self.at_bounds, self.write_layout + lo * self.at_layout
                if self.quantized:
                    bucket = self.shard_apply(packed, lr_q, decay_factor, wd_vec, at, self.kinds, *params,
                                              *self.piece_params)
                    written = self.shard_write(self.all_gather(bucket), layout, self.kinds, *params)
                else:
                    bucket = self.shard_apply(packed, lr_q, decay_factor, wd_vec, at, *params, *self.state_params)
                    written = self.shard_write(self.all_gather(bucket), layout, *params)
                k = F.depend(k + 1, written)
            done += (k,)
            if self.quantized:
                done += (self.shard_whole(packed, lr_q, decay_factor, wd_vec, self.kinds, *params,
                                          *self.whole_params),)
        else:
            cut = ()
            for k in range(len(self.buckets)):
                lo, hi = self.buckets[k]
                slices, pad = self.bucket_slices[k], self.bucket_pads[k]
                after = (state_done, done, cut)              # one bucket's buffers at a time
                # u' of the bucket again, from the moments as stored
                w = self._piece(params, self.bucket_parts[k], pad, after)
                v, m = self._moments(self._state(lo, hi, after), hi - lo)
                u = update(scalars, self.present_terms, rescaled,
                           self._spread(F.depend(wd_vec, after), slices, pad, self.zeros), w, v, m)
                factor = self._spread(F.depend(decay_factor, after), slices, pad, self.ones_pad) \
                    if self.present_terms[_OUTSIDE] else None
                lr_q_b = self._spread(F.depend(lr_q, after), slices, pad, self.zeros)
                bucket = new_weight(factor, w, lr_q_b, u, self.masked)
                cut, written = self._write(k, self.all_gather(bucket), cut, params)
                done += written
        layer_stats = F.depend(self.stack((reported_q, w_norm, u_norm)), done)
        return layer_stats, grad_sq, applied
