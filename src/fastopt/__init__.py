"""fastopt: fused, in-place optimizer updates for large flat buffers.

One pass over memory per step, on the CPU (Numba, C/OpenMP) and on NVIDIA GPUs
(Numba CUDA), with a plain NumPy reference as the executable specification.

    import fastopt
    fastopt.adamw_(p, g, m, v, step=t, lr=1e-3, weight_decay=1e-2)

    flat = fastopt.FlatParams(arrays)            # one aligned buffer, views flat.params
    opt = fastopt.AdamW(flat, lr=1e-3)           # stateful; opt.step() reads flat.grad
    opt = fastopt.AdamW(flat, state_dtype="bfloat16")  # or "int8": fewer bytes per step (fastopt.formats)

PyTorch users: ``fastopt.torch.AdamW(model.parameters(), lr=1e-3)`` (imports torch).

See docs/design.md for the design and the update rules, README.md for the results.
"""
from . import backends  # the package, callable: fastopt.backends() reports which backends load here
from .denormals import get_flush_denormal, set_flush_denormal
from .dispatch import BackendInfo
from .finite import all_finite
from .flat import FlatParams
from .formats import Int8State  # 8-bit blockwise state buffers (fastopt.formats)
from .norms import max_abs, max_abs_each, sum_of_squares, sums_of_squares, total_norm
from . import functional, optim
from .functional import *  # noqa: F401,F403  (sgd_ ... lion_: one update function per rule)
from .optim import *  # noqa: F401,F403  (SGD ... Lion: one stateful class per rule, and Optimizer)
from .threads import get_num_threads, set_num_threads
from . import trust
from .trust import lamb_, lars_  # two-pass rules: a trust ratio per tensor
from . import muon
from .muon import muon_  # a matrix rule: elementwise passes around a Newton-Schulz iteration
from . import adafactor, schedulefree
from .adafactor import adafactor_  # factored second moments: reductions, NumPy array operations
from .schedulefree import adamw_schedulefree_, schedulefree_eval_, schedulefree_train_, sgd_schedulefree_

__version__ = "0.1.0"

__all__ = [*functional.__all__, "lamb_", "lars_", "muon_", "adafactor_", "adamw_schedulefree_", "sgd_schedulefree_",
           "schedulefree_eval_", "schedulefree_train_", *optim.__all__,
           "FlatParams", "Int8State", "all_finite", "max_abs", "max_abs_each", "sum_of_squares", "sums_of_squares", "total_norm", "backends", "BackendInfo", "get_num_threads", "set_num_threads",
           "get_flush_denormal", "set_flush_denormal", "__version__"]
