"""One step of fastopt.torch, as kernel calls: the tensors' arrays, records and plans.

A step of :class:`fastopt.torch.Optimizer` is one :class:`Call` per group
(and dtype, device, step count): the arrays of the parameters, gradients and
state buffers, the hyperparameters, and where to count the step. Making it is
the adapter's whole cost, so it is made once and then *replayed*:

* a :class:`Record` keeps what a parameter needs (its array, its state's
  arrays) from step to step while it holds;
* a :class:`Plan` keeps a whole group's call, and replays it while the group
  is unchanged, checked with ``map`` over C callables; on the C and Numba
  backends a replayed call runs from a pointer table, so a gradient costs its
  address, not an array. A mixed-format call (bfloat16/float16 tensors, a
  master copy, 8-bit state: :mod:`.precision`) replays as a :class:`MixedPlan`,
  with arrays (an 8-bit buffer as a ``fastopt.formats.Int8State`` over the
  memory of its codes and absmax tensors).

Anything a plan cannot vouch for goes back to the general path in
:mod:`fastopt.torch`, which checks each parameter and names what is wrong.
"""
from __future__ import annotations

import operator
from itertools import compress, repeat
from typing import Any, Iterable, Mapping, NamedTuple, Optional

import numpy as np
import torch

from ..algorithm import Algorithm
from ..buffers import _extension, disjoint_table
from ..formats import codes_of
from ..functional import PreparedMixed, _run_table, check_call
from ..rule import _cacheable
from .precision import bfloat16_array

try:  # FSDP2's parameters; torch builds without distributed have none
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()

__all__ = ["Call", "Record", "Plan", "MixedPlan", "run", "view", "grad_view", "pointer", "local", "PLAIN"]

PLAIN = (torch.Tensor, torch.nn.Parameter)  # (an exact type test is 4x cheaper than isinstance on DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The memory a kernel writes: a DTensor's local shard, else the tensor itself."""
    return t.to_local() if type(t) not in PLAIN and isinstance(t, DTensor) else t


def view(t: torch.Tensor) -> Any:
    """The array the functional API takes for a tensor (sharing its memory)."""
    t = local(t)
    if t.requires_grad:
        t = t.detach()
    if t.is_cuda:
        return t  # CUDA tensors export __cuda_array_interface__
    return bfloat16_array(t) if t.dtype is torch.bfloat16 else t.numpy()


def grad_view(g: torch.Tensor) -> Any:
    """``view`` of a gradient, taking the short way for the usual one (a plain CPU tensor)."""
    if type(g) is torch.Tensor:
        try:
            return g.numpy()
        except (TypeError, RuntimeError):  # a CUDA tensor, or one that requires grad
            pass
    return view(g)


def pointer(t: torch.Tensor) -> int:
    return local(t).data_ptr()


class Record:
    """What a step needs of one parameter, kept for the next step while it still holds.

    ``Tensor.numpy()`` costs ~2 us and checking a state buffer's dtype and
    device ~1 us: kept from step to step, a parameter costs a few lookups. The
    record holds while the parameter's memory is the same (``model.to(...)``
    gives the same Parameter new memory), ``state[p]`` is the same dict, and it
    holds the same tensors (replacing an entry takes effect). Gradients are not
    kept: with ``zero_grad(set_to_none=True)`` each step has new ones, and
    holding the old ones would keep their memory alive.
    """

    __slots__ = ("param", "pointer", "needs", "state", "tensors", "param_view", "views", "step", "carry", "key",
                 "formats", "master")

    def holds(self, p: torch.Tensor, needs: Mapping[str, str], state: Any) -> bool:
        if self.param is not p or self.state is not state or self.pointer != pointer(p) or (
                self.needs is not needs and self.needs != needs):
            return False
        for k, t in self.tensors:
            if state.get(k) is not t:
                return False
        return True


class Call(NamedTuple):
    """One kernel call of a step, checked and ready: nothing is written until it runs."""

    core: Algorithm
    hyper: dict  # the group's hyperparameters, with "step" (after this step) and any carried value
    params: list  # arrays
    grads: list
    state: list  # one list of arrays per state buffer of the rule, None where unused
    steps: list  # the 0-d arrays of the members' step counts (empty for torch.optim.SGD)
    counts: list  # each member's step count after this call
    carry: list  # the 0-d arrays of the members' carried values
    table: Any = None  # the pointer table, when the call runs from one (fastopt.functional._run_table)
    step: Any = None  # the members' step count after this call (None: the rule counts none)
    values: Any = None  # the functional update's hyperparameters in its order, if already made from hyper
    masters: Any = None  # the arrays of the members' float32 master copies, if they keep them
    seed: Any = None  # the rounding seed of a mixed-format call (None: a plain float32/float64 call)
    prepared: Any = None  # the checked update that runs it (fastopt.functional.PreparedMixed), if any


_GRAD, _DTYPE = operator.attrgetter("grad"), operator.attrgetter("dtype")
_FORM = operator.attrgetter("layout", "dtype", "shape")
_VALUE = operator.itemgetter(())  # of a 0-d array


def _same(a: Iterable[Any], b: Iterable[Any]) -> bool:
    return all(map(operator.is_, a, b))


class Plan:
    """A group's last step, replayed while nothing it was made from has changed.

    The usual step of a group is the last one again: the same parameters in the
    same memory, the same state entries, one dtype, one step count, gradients on
    the same parameters. That is checked here with ``map`` over C callables
    (about 1 us per parameter, where the general path takes ~10 us), and only the
    gradients' arrays are new. Anything else (a parameter without a gradient that
    had one, an edited state entry, a moved model, differing step counts) makes
    :meth:`replay` return None and the step take the general path, which makes
    a new plan.
    """

    __slots__ = ("params", "has_grad", "members", "pointers", "sizes", "dtype", "needs", "states", "tensors",
                 "call", "table", "hyper", "values", "shapes", "grad_forms", "grad_pointers")

    def __init__(self, group: Mapping[str, Any], has_grad: list, call: Call, records: list[Record]) -> None:
        params = group["params"]
        self.params, self.has_grad, self.call = list(params), has_grad, call
        self.hyper = _Snapshot.of(group)
        self.values = call.core.values_of(group) if not call.carry else None  # (see replay)
        self.members = [rec.param for rec in records]
        self.pointers = [rec.pointer for rec in records]
        self.sizes = [p.numel() for p in self.members]
        self.dtype = records[0].param.dtype
        self.needs = records[0].needs
        self.states = [rec.state for rec in records]
        self.tensors = [(k, [t for _, t in (rec.tensors[n] for rec in records)]) for n, (k, _) in
                        enumerate(records[0].tensors)]
        # The pointer table in the kernel's order, less the gradients' row (kernel-order
        # rows of unused state buffers stay 0: they are not read).
        self.table = np.zeros((3 + len(call.state), len(records)), dtype=np.int64)
        self.table[0] = self.pointers
        for k, arrays in enumerate(call.state):
            if arrays is not None:  # (an 8-bit buffer's row: its codes' addresses; a MixedPlan uses no table)
                self.table[2 + k] = [codes_of(a).__array_interface__["data"][0] for a in arrays]
        self.table[-1] = self.sizes
        self.shapes = [p.shape for p in self.members]
        self.grad_forms = [(torch.strided, self.dtype, shape) for shape in self.shapes]  # what each gradient must be
        self.grad_pointers: Optional[list] = None  # the gradients' row of the table, when proved disjoint

    def _tensors(self, params: list, state: Mapping) -> Optional[tuple[list, list]]:
        """(the gradients of the members, their data addresses), when every tensor is as
        planned: the members have gradients (and only they), of type torch.Tensor, strided,
        of the members' dtype and shape, contiguous; the members contiguous, of their dtype,
        at their addresses; their state entries the same dicts holding the same tensors.
        In one compiled pass (``fastopt._tables.replay_tensors``, ~0.5 us per tensor and
        ~0.3 us a call), or in Python, a ``map`` per check, without the extension."""
        tables = _extension()
        if tables:
            return tables.replay_tensors(params, self.has_grad, torch.Tensor, torch.strided, self.dtype, self.shapes,
                                         self.members, self.pointers, state, self.states, self.tensors)
        grads = list(map(_GRAD, params))
        if list(map(operator.is_not, grads, repeat(None))) != self.has_grad:
            return None
        if len(grads) != len(self.members):
            grads = list(compress(grads, self.has_grad))
        members, dtype = self.members, self.dtype
        # (layout, dtype and shape in one pass: g.data = ... can change any of them)
        if not (_same(map(type, grads), repeat(torch.Tensor)) and list(map(_FORM, grads)) == self.grad_forms
                and _same(map(_DTYPE, members), repeat(dtype))
                and all(map(torch.Tensor.is_contiguous, grads)) and all(map(torch.Tensor.is_contiguous, members))
                and list(map(torch.Tensor.data_ptr, members)) == self.pointers):
            return None
        states = list(map(state.get, members))
        if not _same(states, self.states):
            return None
        for key, tensors in self.tensors:
            if not _same(map(dict.get, states, repeat(key)), tensors):
                return None
        return grads, list(map(torch.Tensor.data_ptr, grads))

    def knows(self, group: Mapping[str, Any]) -> bool:
        """Whether ``group``'s hyperparameters are those it had when the plan was made
        (equal values of the same types; immutable ones only), so already checked."""
        return self.hyper is not None and self.hyper.holds(group)

    def replay(self, group: Mapping[str, Any], core: Algorithm, state: Mapping, tables: bool,
               known: bool = False) -> Optional[Call]:
        """The group's call for this step, or None when the plan no longer holds. With
        ``tables``, the call runs from a pointer table (the gradients' addresses, where
        an array per gradient would cost ~1 us each, and ~2 us more to check).
        ``known``: :meth:`knows` said the hyperparameters have not changed."""
        params = group["params"]
        if (core is not self.call.core or len(params) != len(self.params) or not _same(params, self.params)
                or not known and core.needs(group) != self.needs):
            return None
        found = self._tensors(params, state)
        if found is None:
            return None
        grads, grad_pointers = found
        call = self.call
        hyper, step = group, None
        if call.steps:
            counts = list(map(_VALUE, call.steps))
            if counts.count(counts[0]) != len(counts):
                return None
            step = int(counts[0]) + 1
        elif call.core.rule.takes_step:  # torch.optim.SGD: every member has its buffers, so it has stepped
            step = 2
        if call.carry:
            values = list(map(_VALUE, call.carry))
            if values.count(values[0]) != len(values):
                return None
            name = call.core.rule.carry[0]
            hyper = {**group, name: float(values[0])}
            call.core.check_step(group, {name: hyper[name]}, "the state of the group's parameters")
        counts = [step or 0] * len(self.members)
        # Hyperparameters unchanged since the plan was made: the same values tuple each
        # step, which the rule's cache then recognises by identity.
        values = self.values if known and hyper is group else None
        # (Calls made positionally: NamedTuple._replace costs ~2 us.)
        if tables:
            # The table is the plan's own (its call runs before the plan replays again),
            # and only its gradients' row changes: the same addresses as last time (the
            # allocator often hands them back) are the same table, already proved.
            table = self.table
            if grad_pointers != self.grad_pointers:
                self.grad_pointers = None
                table[1] = grad_pointers
                if not disjoint_table(table, self.call.params[0].itemsize):
                    return None  # (the general path names the overlap)
                self.grad_pointers = grad_pointers
            return Call(call.core, hyper, call.params, grads, call.state, call.steps, counts, call.carry, table, step,
                        values)
        try:
            arrays = list(map(self.array, grads))
        except (TypeError, RuntimeError):  # a gradient that requires grad, say
            return None
        return Call(call.core, hyper, call.params, arrays, call.state, call.steps, counts, call.carry, None, step,
                    values, call.masters, call.seed, self.prepare(arrays, grad_pointers, hyper, values, step))

    def prepare(self, arrays: list, grad_pointers: list, hyper: Mapping[str, Any], values: Any,
                step: Any) -> Optional[PreparedMixed]:
        """The call's prepared update: none for a plain Plan's call, which runs through
        the functional update."""
        return None

    #: a gradient's array (the members' dtype has a ``Tensor.numpy()``)
    array = staticmethod(torch.Tensor.numpy)


class MixedPlan(Plan):
    """The plan of a mixed-format call: replayed as a :class:`Plan` is, with arrays,
    since the pointer-table calls take float32 or float64 buffers only."""

    __slots__ = ("array", "prepared")

    def __init__(self, group: Mapping[str, Any], has_grad: list, call: Call, records: list[Record]) -> None:
        super().__init__(group, has_grad, call, records)
        self.array = bfloat16_array if self.dtype is torch.bfloat16 else torch.Tensor.numpy
        # The update with everything but the gradients checked (fastopt.functional.PreparedMixed),
        # made at the first replay: the full checks of a mixed call cost ~10 us per tensor.
        self.prepared: Any = None

    def replay(self, group: Mapping[str, Any], core: Algorithm, state: Mapping, tables: bool,
               known: bool = False) -> Optional[Call]:
        call = super().replay(group, core, state, False, known)
        return call if call is None or call.prepared is not None or self.prepared is None else None

    def prepare(self, arrays: list, grad_pointers: list, hyper: Mapping[str, Any], values: Any,
                step: Any) -> Optional[PreparedMixed]:
        """The plan's prepared update when it takes the gradients (made at the first
        replay, with every check of the call: they raise here, before any call of the
        step runs), else None: then the call runs through the functional update, or
        the step takes the general path."""
        core = self.call.core
        if core.passed:  # (an option outside the hyperparameter tuple: LAMB's, not a mixed rule's)
            return None
        if self.prepared is None:
            self.prepared = PreparedMixed(core.rule, self.call.params, arrays, tuple(self.call.state),
                                          self.call.masters, self.call.seed, None, values or core.values_of(hyper),
                                          step)
        elif not self.prepared.takes(arrays, grad_pointers, step):
            return None
        return self.prepared


class GroupPlan:
    """The plan of a group stepped in several calls (8-bit state for its large
    parameters, float32 state for those under ``min_8bit_size``): a plan per call,
    each over its own parameters, replayed together or not at all. The group's
    parameters must be the same objects, and those without a gradient then still
    without one (a parameter that gains one changes the calls)."""

    __slots__ = ("params", "idle", "plans")

    def __init__(self, group: Mapping[str, Any], has_grad: list, plans: list[Plan]) -> None:
        self.params = list(group["params"])
        self.idle = [p for p, has in zip(self.params, has_grad) if not has]
        self.plans = plans

    def knows(self, group: Mapping[str, Any]) -> bool:
        return self.plans[0].knows(group)

    def replay(self, group: Mapping[str, Any], core: Algorithm, state: Mapping, tables: bool,
               known: bool = False) -> Optional[list[Call]]:
        """The group's calls for this step, or None when any plan no longer holds."""
        params = group["params"]
        if len(params) != len(self.params) or not _same(params, self.params) \
                or any(p.grad is not None for p in self.idle):
            return None
        calls = []
        for plan in self.plans:
            call = plan.replay({**group, "params": plan.params}, core, state, tables, known)
            if call is None:
                return None
            calls.append(call)
        return calls


class _Snapshot:
    """A group's hyperparameters as they were: how many keys, and the values and
    types of all but ``params``. Only for immutable values (a tensor ``lr`` filled in
    place by a scheduler would look unchanged)."""

    __slots__ = ("size", "get", "values", "types")

    @classmethod
    def of(cls, group: Mapping[str, Any]) -> "Optional[_Snapshot]":
        names = [k for k in group if k != "params"]
        if not names:
            return None
        snap = cls()
        snap.size, snap.get = len(group), operator.itemgetter(*names, "params")  # (params last: cut off below)
        snap.values = snap.get(group)[:-1]
        snap.types = tuple(map(type, snap.values))
        return snap if _cacheable(snap.values) else None

    def holds(self, group: Mapping[str, Any]) -> bool:
        if len(group) != self.size:  # (with every key of the snapshot found below: the same keys)
            return False
        try:
            values = self.get(group)[:-1]
        except KeyError:
            return False
        # The same objects, as a group usually holds from step to step (then of the same
        # types too); else equal values of the same types (True == 1, but lr=True is no lr).
        return _same(values, self.values) or values == self.values and tuple(map(type, values)) == self.types


def checked(call: Call) -> Call:
    """``call`` with every check its update makes done now (raising as the update
    would), so that a step of several calls raises before the first one writes: a
    mixed call gets a prepared update (so it is not checked twice), a plain one has
    its buffers checked. (A two-pass rule's calls check themselves when they run.)"""
    core = call.core
    if core.rule.trust is not None or core.passed or call.prepared is not None:
        return call
    values = call.values or core.values_of(call.hyper)
    if call.seed is not None:
        prepared = PreparedMixed(core.rule, call.params, call.grads, tuple(call.state), call.masters, call.seed,
                                 None, values, call.step)
        return call._replace(prepared=prepared)
    check_call(core.rule, call.params, call.grads, tuple(call.state), values)
    return call


def run(call: Call, grad_multiplier: float = 1.0, grad_norm: Optional[float] = None) -> None:
    """Run one checked kernel call (the gradients multiplied by ``grad_multiplier`` as
    they are read; ``grad_norm``: the global gradient norm, for a rule that clips by
    it), then count the step through the state's own memory (no torch op per
    parameter)."""
    core = call.core
    values = call.values or core.values_of(call.hyper)  # (the functional update's hyperparameters, in its order)
    step = call.step if core.rule.takes_step else None
    if call.prepared is not None:  # (it took these gradients)
        out = call.prepared.run(call.grads, values, call.step, grad_multiplier)
    elif call.table is not None:
        out = _run_table(core.rule, values, step, call.params, tuple(call.state), call.table,
                         grad_multiplier=grad_multiplier)
    else:
        options = {k: call.hyper[k] for k in core.passed}  # (LAMB's max_grad_norm)
        if grad_norm is not None:
            options["grad_norm"] = grad_norm
        if call.seed is not None:  # (stochastic rounding draws its bits by step: Lion's too)
            options.update(master_param=call.masters, rounding_seed=call.seed)
            step = call.step
        out = core.update(call.params, call.grads, *call.state, step=step, grad_multiplier=grad_multiplier,
                          **dict(zip(core.rule.defaults, values)), **options)
    for view, t in zip(call.steps, call.counts):
        view[()] = t
    for view in call.carry:
        view[()] = out


