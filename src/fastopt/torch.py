"""``torch.optim`` drop-ins that run fastopt over one flat buffer.

    opt = fastopt.torch.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    loss.backward(); opt.step(); opt.zero_grad()

At construction every parameter is re-homed into one flat tensor: its
``.data`` becomes a view of an aligned segment of that tensor, and its
``.grad`` a view of the same segment of a flat gradient tensor. Autograd
accumulates into an existing ``.grad`` in place, so after ``backward()`` the
flat gradient is already filled, with no copy, and a step is one fused
functional call per parameter group on host NumPy views (CPU) or
``__cuda_array_interface__`` arrays (CUDA) of those tensors, through
fastopt's dispatch.

The classes subclass ``torch.optim.Optimizer``: ``param_groups`` are torch's
(``lr_scheduler`` edits ``group["lr"]`` and the next step reads it),
``state[p]`` holds views of the flat state, ``state_dict()`` is one
``torch.optim.<X>.load_state_dict`` accepts, and ``load_state_dict`` accepts a
``torch.optim.<X>`` state dict. Differences from torch, all consequences of
one buffer: every parameter is stepped every step (a parameter with no
gradient reads a zero gradient, where torch would skip it; parameters that do
not require grad are refused, for that reason); one step count per group; all parameters share one dtype and device; create the optimizer after
moving the model (``model.to(...)`` afterwards leaves the flat buffer; the next
step raises); groups cannot be added after construction.

This module imports torch; ``import fastopt`` does not import it.
"""
from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch

from .algorithm import Algorithm, one_class_per_rule
from .finite import all_finite
from .flat import layout
from .checks import flag
from .rules import RULES

__all__ = ["Optimizer"]

#: torch options that choose torch's own implementation: accepted, kept in the
#: groups (so state dicts round-trip) and ignored, since fastopt is the implementation.
IGNORED_TORCH_OPTIONS = ("foreach", "fused")


_FROZEN = ("parameter {i} does not require grad ({when}): torch.optim skips it, but fastopt.torch "
           "updates every parameter it holds in one call (weight decay and momentum would move it); pass "
           "only trainable parameters, e.g. [p for p in model.parameters() if p.requires_grad]")


def _array(t: torch.Tensor) -> Any:
    """The array fastopt's functional API takes for a flat tensor (shares its memory)."""
    return t.numpy() if t.device.type == "cpu" else t  # CUDA tensors export __cuda_array_interface__


def _tensor(a: Any) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(a)


def _scalar_dtype() -> torch.dtype:
    # torch.optim keeps per-parameter scalars (step, mu_product) in this dtype.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class Optimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that steps a fastopt rule over one flat buffer.

    One subclass per rule of :mod:`fastopt.rules`, made at import (see the end
    of this module). Constructed as the matching ``torch.optim`` class:
    ``(params, lr, **hyper)``, where ``params`` is an iterable of tensors or of
    group dicts.
    """

    core: ClassVar[Algorithm]
    #: torch options fastopt does not take (``foreach``, ``capturable``...), with torch's defaults.
    torch_options: ClassVar[dict[str, Any]]
    #: whether torch's state has a ``step`` (``torch.optim.SGD`` keeps none).
    saves_step: ClassVar[bool]

    def __init_subclass__(cls, rule: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if rule is None:
            return
        core = cls.core = Algorithm(RULES[rule])
        theirs = getattr(torch.optim, core.name, None)
        cls.saves_step = RULES[rule].saves_step
        cls.torch_options = {}
        if theirs is not None:  # read torch's signature, so a newer torch's options are known
            for name, p in inspect.signature(theirs.__init__).parameters.items():
                if name not in ("self", "params") and name not in core.hyper_defaults():
                    cls.torch_options[name] = p.default
        like = f"Drop-in for ``torch.optim.{core.name}``" if theirs else "A ``torch.optim.Optimizer``"
        cls.__doc__ = (f"{like} running fastopt's fused update over one flat buffer "
                       f"(see :mod:`fastopt.torch`).\n\n{core.describe()}")

    def __init__(self, params: Iterable[Any], lr: float | None = None, *, skip_nonfinite: bool = False,
                 **hyper: Any) -> None:
        # skip_nonfinite: drop a step whose gradient holds NaN/Inf (counted in
        # skipped_steps, flagged by last_step_skipped); default: propagate as torch does.
        self.skip_nonfinite = flag("skip_nonfinite", skip_nonfinite)
        self.skipped_steps, self.last_step_skipped = 0, False
        if lr is not None:
            hyper["lr"] = lr
        options = {k: hyper.pop(k) for k in list(hyper) if k in self.torch_options}
        defaults = {**self.core.merge_hyper(self.core.hyper_defaults(), hyper, type(self).__name__),
                    **self.torch_options, **options}
        self._check_group(defaults, type(self).__name__)
        self._flat: torch.Tensor | None = None
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            self._check_group(group, f"param_groups[{i}]")
        self._rehome()

    def _check_group(self, group: Mapping[str, Any], where: str) -> None:
        self.core.check_hyper(group)
        for name, default in self.torch_options.items():
            if name not in IGNORED_TORCH_OPTIONS and group.get(name, default) != default:
                raise ValueError(f"{where}: {name}={group[name]!r} is not supported by "
                                 f"fastopt.torch.{type(self).__name__} (only {name}={default!r})")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._flat is not None:
            raise NotImplementedError(
                f"fastopt.torch.{type(self).__name__} packs every parameter into one buffer when it is "
                "constructed; pass all parameter groups to the constructor instead")
        super().add_param_group(param_group)

    # ---- one flat buffer ------------------------------------------------------

    def _rehome(self) -> None:
        """Move every parameter's data and grad into views of two flat tensors."""
        params = [p for g in self.param_groups for p in g["params"]]
        if not params:
            raise ValueError("the optimizer got an empty parameter list")
        first = params[0]
        for i, p in enumerate(params):
            if not p.requires_grad:
                raise ValueError(_FROZEN.format(i=i, when="given to the optimizer"))
            if p.dtype != first.dtype or p.device != first.device:
                raise TypeError(f"fastopt.torch keeps all parameters in one buffer, so they need one dtype and "
                                f"device: parameter {i} is {p.dtype} on {p.device}, parameter 0 is "
                                f"{first.dtype} on {first.device}")
        if first.dtype not in (torch.float32, torch.float64) or first.device.type not in ("cpu", "cuda"):
            raise TypeError(f"fastopt.torch needs float32 or float64 parameters on cpu or cuda, "
                            f"got {first.dtype} on {first.device}")
        offsets, size = layout([p.numel() for p in params], first.element_size())
        self._flat = torch.zeros(size, dtype=first.dtype, device=first.device)
        self._flat_grad = torch.zeros_like(self._flat)
        self._where: dict[torch.Tensor, tuple[int, int]] = {}  # param -> (offset, numel)
        self._views = []
        with torch.no_grad():
            for p, o in zip(params, offsets):
                n = p.numel()
                view, gview = self._flat[o:o + n].view_as(p), self._flat_grad[o:o + n].view_as(p)
                view.copy_(p)
                if p.grad is not None:
                    gview.copy_(p.grad)
                p.data, p.grad = view, gview
                self._where[p] = (o, n)
                self._views.append((p, view.data_ptr(), gview))
        self._segments = []
        for g in self.param_groups:
            spans = [self._where[p] for p in g["params"]]
            self._segments.append(slice(spans[0][0], spans[-1][0] + spans[-1][1]) if spans else slice(0, 0))
        self._arrays = (_array(self._flat), _array(self._flat_grad))
        self._group_state = [self.core.fresh_state() for _ in self.param_groups]
        self._scalars: list[dict[str, torch.Tensor]] = [{} for _ in self.param_groups]

    def _reattach(self) -> None:
        """Check that parameters still live in the flat buffer; bring stray gradients back into it.

        A gradient that is None (``p.grad = None``) becomes zero; one that was
        replaced by another tensor is copied into the flat gradient, and the
        view re-attached, so the next backward accumulates in place again.
        """
        for i, (p, ptr, gview) in enumerate(self._views):
            if not p.requires_grad:
                raise RuntimeError(_FROZEN.format(i=i, when="frozen after the optimizer was made"))
            if p.data_ptr() != ptr:
                raise RuntimeError(
                    f"parameter {i} no longer lives in fastopt's flat buffer (was the model moved or cast, e.g. "
                    f"model.to(...), after the optimizer was made?); create the optimizer after moving the model")
            g = p.grad
            if g is not gview:
                with torch.no_grad():
                    gview.zero_() if g is None else gview.copy_(g)
                p.grad = gview

    def _new(self, n: int) -> Callable[[float], Any]:
        return lambda value: _array(torch.full((n,), value, dtype=self._flat.dtype, device=self._flat.device))

    def _expose(self, i: int) -> None:
        """Make ``self.state[p]`` show group ``i``'s state: views of its flat buffers, shared scalars."""
        gstate, lo = self._group_state[i], self._segments[i].start
        buffers = {key: _tensor(gstate[name]) for name, key in self.core.state_keys().items() if name in gstate}
        self._scalars[i] = {}
        if buffers or gstate["step"]:
            names = (["step"] if self.saves_step else []) + list(self.core.carry)
            self._scalars[i] = {k: torch.tensor(float(gstate[k]), dtype=_scalar_dtype()) for k in names}
        for p in self.param_groups[i]["params"]:
            o, n = self._where[p]
            self.state[p] = {**self._scalars[i],
                             **{key: t[o - lo:o - lo + n].view_as(p) for key, t in buffers.items()}}
            if not self.state[p]:
                del self.state[p]

    # ---- the torch.optim interface ----------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every group (re-evaluating the loss first when ``closure`` is given)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._reattach()
        for i, group in enumerate(self.param_groups):
            self._check_group(group, f"param_groups[{i}]")  # all groups, before any is written
        param, grad = self._arrays
        self.last_step_skipped = self.skip_nonfinite and not all(
            all_finite(grad[seg]) for seg in self._segments)
        if self.last_step_skipped:
            self.skipped_steps += 1
            return loss
        for i, (group, seg, gstate) in enumerate(zip(self.param_groups, self._segments, self._group_state)):
            if seg.stop == seg.start:
                continue
            allocated = len(gstate)
            self.core.step_group(group, param[seg], grad[seg], gstate, self._new(seg.stop - seg.start))
            if len(gstate) != allocated or gstate["step"] == 1:  # new buffers, or a first step
                self._expose(i)
            for k, t in self._scalars[i].items():
                t.fill_(gstate[k])
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero every gradient in place: one fill of the flat gradient buffer.

        ``set_to_none`` is accepted and ignored. Setting ``.grad`` to None would
        make the next backward allocate fresh gradients outside the flat buffer
        (which the step would then have to copy back), and would save no memory:
        the flat gradient lives as long as the optimizer. Zeroing it is a single
        memset. So a parameter that gets no gradient reads as zero, not None.
        """
        self._flat_grad.zero_()
        self._reattach()

    def state_dict(self) -> dict[str, Any]:
        """A copy of the state in ``torch.optim.<X>``'s format (per-parameter tensors, ``step``
        as a tensor), loadable by the matching ``torch.optim`` class."""
        state: dict[int, dict[str, Any]] = {}
        groups, index = [], 0
        for group in self.param_groups:
            ids = list(range(index, index + len(group["params"])))
            index += len(ids)
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
            for pid, p in zip(ids, group["params"]):
                if p in self.state:
                    state[pid] = {k: t.clone() for k, t in self.state[p].items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict of this class or of the matching ``torch.optim`` class.

        Checked in full before anything changes: the number of groups and of
        parameters per group, each group's hyperparameters, each parameter's
        state keys, shapes and step; parameters of one group must share one
        step count (fastopt steps a group at once). Floating-point state is cast
        to the parameters' dtype, as torch does. Errors name the key and leave
        the optimizer unchanged.
        """
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"state_dict is missing {key!r}")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict['param_groups'] has {len(saved_groups)} groups, "
                             f"this optimizer has {len(self.param_groups)}")
        id_map: dict[Any, torch.Tensor] = {}
        new_groups = []
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"state_dict['param_groups'][{i}]"
            if len(saved.get("params", ())) != len(group["params"]):
                raise ValueError(f"{where} has {len(saved.get('params', ()))} parameters, "
                                 f"the optimizer's group has {len(group['params'])}")
            id_map.update(zip(saved["params"], group["params"]))
            new = {**self.torch_options, **{k: v for k, v in saved.items() if k != "params"}}
            self.core.check_hyper(new, where)
            self._check_group(new, where)
            new_groups.append(new)
        unknown = [k for k in saved_state if k not in id_map]
        if unknown:
            raise ValueError(f"state_dict['state'] has an entry {unknown[0]!r} for no parameter")
        by_param = {id_map[k]: (k, v) for k, v in saved_state.items()}
        loaded = []
        keys = self.core.state_keys()
        for i, (group, new) in enumerate(zip(self.param_groups, new_groups)):
            scalars, entries = None, []
            for p in group["params"]:
                k, entry = by_param.get(p, (None, {}))
                where = f"state_dict['state'][{k!r}]" if k is not None else f"the state of parameter {p.shape}"
                buffers = {name: _check_tensor(entry[key], p, f"{where}[{key!r}]")
                           for name, key in keys.items() if key in entry}
                s = self.core.check_entry(entry, buffers, new, where, step_optional=not self.saves_step)
                if scalars is not None and s != scalars:
                    raise ValueError(f"{where} has state {s} but an earlier parameter of group {i} has {scalars}; "
                                     "fastopt steps a group at once, so its parameters need one step count")
                scalars = s
                entries.append((p, buffers))
            loaded.append((scalars or self.core.fresh_state(), entries))
        # Everything checked: apply.
        for group, new in zip(self.param_groups, new_groups):
            params = group["params"]
            group.clear()
            group.update(new, params=params)
        self.state = defaultdict(dict)
        for i, (scalars, entries) in enumerate(loaded):
            seg, gstate = self._segments[i], dict(scalars)
            for name in {name for _, buffers in entries for name in buffers}:
                gstate[name] = self._new(seg.stop - seg.start)(0.0)
                flat = _tensor(gstate[name])
                with torch.no_grad():
                    for p, buffers in entries:
                        o, n = self._where[p]
                        if name in buffers:
                            flat[o - seg.start:o - seg.start + n].copy_(buffers[name].reshape(-1))
            self._group_state[i] = gstate
            self._expose(i)


def _check_tensor(value: Any, p: torch.Tensor, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where} must be a tensor, got {type(value).__name__}")
    if value.shape != p.shape:
        raise ValueError(f"{where} has shape {tuple(value.shape)}, expected {tuple(p.shape)} (the parameter's)")
    if not value.is_floating_point():
        raise TypeError(f"{where} has dtype {value.dtype}, expected a floating-point dtype")
    return value


# ---- the algorithms: one class per rule of the table -------------------------------

_CLASSES = one_class_per_rule(Optimizer, __name__)
__all__ += list(_CLASSES)
globals().update(_CLASSES)
