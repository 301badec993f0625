"""The NumPy reference backend: the executable specification.

Plain NumPy, written to be read next to docs/design.md and ``torch.optim``'s
single-tensor code, not to be fast (it makes several passes and allocates
temporaries). Every fast backend is tested against this file, so it shares no
code with them: only the precomputed scalars from ``fastopt.rules``.

Each kernel takes ``(param, grad, *state, s)`` where the state buffers come
in the rule's ``state`` order (``None`` for an unused optional buffer) and
``s`` is the rule's scalars tuple. Scalars are cast to the buffer dtype first,
so float32 buffers are updated in float32 arithmetic, as PyTorch does.
"""
from __future__ import annotations

import numpy as np

from .. import denormals, rules
from .. import formats as _formats
from . import run_each

name = "numpy"
device = "cpu"


def _grad(param, grad, s):
    """The gradient the rule sees: sign-flipped for maximize, plus L2 decay."""
    g = grad * s.grad_sign
    if s.weight_decay != 0:
        g = g + s.weight_decay * param
    return g


def _lerp(a, b, weight, from_end):
    """torch's lerp(a, b, w): ``a + w*(b - a)`` for w < 0.5, else ``b - (b - a)*(1 - w)``,
    written ``base + weight*(b - a)`` (rules.py gives weight = w or w - 1)."""
    return (b if from_end else a) + weight * (b - a)


def sgd(param, grad, momentum_buffer, s: rules.SGDScalars):
    g = _grad(param, grad, s)
    if momentum_buffer is not None:
        buf = momentum_buffer
        if s.first_step:
            buf[...] = g
        else:
            buf[...] = s.momentum * buf + s.one_minus_dampening * g
        g = g + s.momentum * buf if s.nesterov else buf
    param -= s.lr * g


def adagrad(param, grad, state_sum, s: rules.AdagradScalars):
    g = _grad(param, grad, s)
    state_sum += g * g
    param -= s.clr * (g / (np.sqrt(state_sum) + s.eps))


def rmsprop(param, grad, square_avg, momentum_buffer, grad_avg, s: rules.RMSpropScalars):
    g = _grad(param, grad, s)
    square_avg[...] = s.alpha * square_avg + s.one_minus_alpha * (g * g)
    if s.centered:
        grad_avg[...] = _lerp(grad_avg, g, s.grad_avg_weight, s.grad_avg_from_end)
        avg = np.sqrt(square_avg - grad_avg * grad_avg) + s.eps
    else:
        avg = np.sqrt(square_avg) + s.eps
    if s.use_momentum:
        momentum_buffer[...] = s.momentum * momentum_buffer + g / avg
        param -= s.lr * momentum_buffer
    else:
        param -= s.lr * (g / avg)


def adadelta(param, grad, square_avg, acc_delta, s: rules.AdadeltaScalars):
    g = _grad(param, grad, s)
    square_avg[...] = s.rho * square_avg + s.one_minus_rho * (g * g)
    delta = np.sqrt(acc_delta + s.eps) / np.sqrt(square_avg + s.eps) * g
    acc_delta[...] = s.rho * acc_delta + s.one_minus_rho * (delta * delta)
    param -= s.lr * delta


def adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s: rules.AdamScalars):
    if s.param_decay != 1:  # AdamW: decoupled decay, before the gradient is read
        param *= s.param_decay
    g = _grad(param, grad, s)
    exp_avg[...] = _lerp(exp_avg, g, s.exp_avg_weight, s.exp_avg_from_end)  # torch's lerp(m, g, 1-b1)
    exp_avg_sq[...] = s.beta2 * exp_avg_sq + s.one_minus_beta2 * (g * g)
    v = exp_avg_sq
    if s.amsgrad:
        np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)  # propagates NaN
        v = max_exp_avg_sq
    denom = np.sqrt(v) / s.bias_correction2_sqrt + s.eps
    param -= s.step_size * (exp_avg / denom)


def ademamix(param, grad, exp_avg_fast, exp_avg_slow, exp_avg_sq, s: rules.AdEMAMixScalars):
    param *= s.param_decay  # decoupled decay (exactly 1 without it)
    g = grad * s.grad_sign
    exp_avg_fast[...] = s.beta1 * exp_avg_fast + s.one_minus_beta1 * g
    exp_avg_slow[...] = s.beta3 * exp_avg_slow + s.one_minus_beta3 * g
    exp_avg_sq[...] = s.beta2 * exp_avg_sq + s.one_minus_beta2 * (g * g)
    denom = np.sqrt(exp_avg_sq) / s.bias_correction2_sqrt + s.eps
    param -= s.lr * ((exp_avg_fast / s.bias_correction1 + s.alpha * exp_avg_slow) / denom)


def adamax(param, grad, exp_avg, exp_inf, s: rules.AdamaxScalars):
    g = _grad(param, grad, s)
    exp_avg[...] = _lerp(exp_avg, g, s.exp_avg_weight, s.exp_avg_from_end)
    np.maximum(s.beta2 * exp_inf, np.abs(g) + s.eps, out=exp_inf)
    param -= s.clr * (exp_avg / exp_inf)


def nadam(param, grad, exp_avg, exp_avg_sq, s: rules.NAdamScalars):
    if s.param_decay != 1:
        param *= s.param_decay
    g = _grad(param, grad, s)
    exp_avg[...] = _lerp(exp_avg, g, s.exp_avg_weight, s.exp_avg_from_end)
    exp_avg_sq[...] = s.beta2 * exp_avg_sq + s.one_minus_beta2 * (g * g)
    denom = np.sqrt(exp_avg_sq / s.bias_correction2) + s.eps
    param -= s.grad_coef * (g / denom)
    param -= s.exp_avg_coef * (exp_avg / denom)


def radam(param, grad, exp_avg, exp_avg_sq, s: rules.RAdamScalars):
    if s.param_decay != 1:
        param *= s.param_decay
    g = _grad(param, grad, s)
    exp_avg[...] = _lerp(exp_avg, g, s.exp_avg_weight, s.exp_avg_from_end)
    exp_avg_sq[...] = s.beta2 * exp_avg_sq + s.one_minus_beta2 * (g * g)
    if s.rectified:  # rho_t > 5: the adaptive, rectified step
        param -= s.step_size * (exp_avg * (s.bias_correction2_sqrt / (np.sqrt(exp_avg_sq) + s.eps)))
    else:  # too few steps for a tractable variance: momentum SGD with bias correction
        param -= s.step_size * exp_avg


def asgd(param, grad, ax, s: rules.ASGDScalars):
    g = _grad(param, grad, s)
    param *= s.param_decay
    param -= s.eta * g
    if s.copy_average:  # mu == 1, during the first t0 steps: torch copies
        ax[...] = param
    else:
        ax += (param - ax) * s.mu


def lion(param, grad, exp_avg, s: rules.LionScalars):
    g = grad * s.grad_sign
    # np.sign: sign(+-0) = +0 like torch.sign, but sign(NaN) = NaN (torch.sign
    # gives 0, which would freeze the parameter silently): the NaN propagates.
    update = np.sign(s.beta1 * exp_avg + s.one_minus_beta1 * g)
    param *= s.param_decay
    param -= s.lr * update
    exp_avg[...] = s.beta2 * exp_avg + s.one_minus_beta2 * g


def rprop(param, grad, prev, step_size, s: rules.RpropScalars):
    g = grad * s.grad_sign
    prod = g * prev
    # torch: sign(g*prev) mapped to etaplus / etaminus / 1, then clamped; a NaN
    # product (torch.sign: 0) propagates here, as in every rule.
    factor = np.where(prod > 0, s.etaplus, np.where(prod < 0, s.etaminus, np.where(np.isnan(prod), prod, 1)))
    step_size[...] = np.minimum(np.maximum(step_size * factor, s.step_size_min), s.step_size_max)
    g = np.where(prod < 0, s.zero, g)
    param -= np.sign(g) * step_size  # np.sign(NaN) = NaN
    prev[...] = g


# ---- two-pass rules (fastopt.trust): with s.measure on, the kernel returns the
# update u and writes nothing (pass 1); else it is pass 2, with the tensor's
# trust ratio already in the scalars.

def _lamb_update(param, grad, exp_avg, exp_avg_sq, s: rules.LAMBScalars):
    """(u, new exp_avg, new exp_avg_sq) of LAMB, nothing written: apex's
    LAMBStage1Functor (multi_tensor_lamb.cu) on whole arrays."""
    g = _grad(param, grad, s)  # L2 (adam_w_mode=False) on the clipped gradient
    m = s.beta1 * exp_avg + s.beta3 * g
    v = s.beta2 * exp_avg_sq + s.one_minus_beta2 * (g * g)
    u = (m * s.inv_bias_correction1) / (np.sqrt(v * s.inv_bias_correction2) + s.eps)  # (apex divides by bc)
    if s.decay != 0:  # adam_w_mode=True: decoupled decay, inside the update
        u = u + s.decay * param
    return u, m, v


def lamb(param, grad, exp_avg, exp_avg_sq, s: rules.LAMBScalars):
    u, m, v = _lamb_update(param, grad, exp_avg, exp_avg_sq, s)
    if s.measure:
        return u
    exp_avg[...] = m
    exp_avg_sq[...] = v
    param -= s.step_size * u  # apex's LAMBStage2Functor, the ratio folded into step_size
    return None


def lars(param, grad, momentum_buffer, s: rules.LARSScalars):
    u = _grad(param, grad, s)  # vicreg's dp = g + wd*p
    if s.measure:
        return u
    scaled = s.trust_ratio * u  # dp*q
    if s.use_momentum:
        momentum_buffer[...] = s.momentum * momentum_buffer + scaled  # mu = momentum*mu + dp*q
        scaled = momentum_buffer
    param -= s.lr * scaled
    return None


# ---- matrix rules (fastopt.muon runs the matrix part between the two passes) ----

def muon(param, grad, momentum_buffer, s: rules.MuonScalars):
    if s.orthogonalized:  # the apply pass: grad holds the orthogonalized update O
        param *= s.param_decay
        param -= s.lr * grad
        return
    momentum_buffer[...] = _lerp(momentum_buffer, grad, s.buf_weight, s.buf_from_end)
    # the momentum pass: param receives the update to orthogonalize
    param[...] = _lerp(grad, momentum_buffer, s.update_weight, s.update_from_end) if s.nesterov else momentum_buffer


# ---- schedule-free rules (fastopt.schedulefree keeps the schedule) ----

def adamw_schedulefree(param, grad, z, exp_avg_sq, s: rules.AdamWScheduleFreeScalars):
    if s.swap:  # the train/eval switch: grad holds z
        param[...] = _lerp(param, grad, s.swap_weight, s.swap_from_end)
        return
    exp_avg_sq[...] = s.beta2 * exp_avg_sq + s.one_minus_beta2 * (grad * grad)
    normalized = grad / (np.sqrt(exp_avg_sq / s.bias_correction2) + s.eps)
    if s.weight_decay != 0:
        normalized = normalized + s.weight_decay * param
    param[...] = _lerp(param, z, s.ckp1_weight, s.ckp1_from_end) + s.y_coef * normalized
    z -= s.lr * normalized


def sgd_schedulefree(param, grad, z, s: rules.SGDScheduleFreeScalars):
    if s.swap:
        param[...] = _lerp(param, grad, s.swap_weight, s.swap_from_end)
        return
    g = grad + s.weight_decay * param if s.weight_decay != 0 else grad
    param[...] = _lerp(param, z, s.ckp1_weight, s.ckp1_from_end) + s.y_coef * g
    z -= s.lr * g


_KERNELS = {k: globals()[k] for k in rules.KERNEL_SCALARS}


def run(kernel: str, param, grad, state, scalars, stream=None) -> None:
    """Apply one update in place. ``state`` is the rule-ordered tuple of buffers."""
    dtype = param.dtype.type
    cast = type(scalars)(*(dtype(x) if isinstance(x, float) else x for x in scalars))
    with np.errstate(all="ignore"):  # NaN/Inf propagate silently, as in torch
        _KERNELS[kernel](param, grad, *state, cast)
        if denormals.get_flush_denormal():
            for buf in (param, *state):
                if buf is not None:
                    _flush_subnormal(buf)


def _flush_subnormal(buf) -> None:
    """Store subnormal values as zeros of their sign (fastopt.set_flush_denormal):
    ``x * tiny`` is such a zero for a subnormal ``x``."""
    tiny = np.finfo(buf.dtype).tiny
    small = ~(np.abs(buf) >= tiny)  # NaN too: NaN * tiny is NaN
    buf[small] *= tiny


def run_list(kernel: str, params, grads, states, scalars, stream=None, table=None) -> None:
    """The update over lists of tensors: the same update of each, in order."""
    run_each(run, kernel, params, grads, states, scalars)


# ---- the sum of squares behind a gradient norm --------------------------------

#: The reduction's order (csrc/src/norm.c): blocks of BLOCK elements, LANES lanes each.
NORM_BLOCK, NORM_LANES = 4096, 8


def sumsq_list(arrays, each=None) -> float:
    """The sum of squares of every element of ``arrays``, in double, in the one
    order every backend uses: per tensor, per block of 4096 elements, element i
    added to lane i mod 8 (in index order: a reduction over the rows of an
    (m, 8) array adds row after row), the lanes combined by a fixed tree, the
    block sums added in order. (The zeros padding the last row add nothing.)"""
    total = 0.0
    for t, a in enumerate(arrays):
        x = a.reshape(-1)
        mine = 0.0
        for lo in range(0, x.size, NORM_BLOCK):
            block = x[lo:lo + NORM_BLOCK].astype(np.float64)
            block = np.concatenate([block, np.zeros(-block.size % NORM_LANES)]).reshape(-1, NORM_LANES)
            acc = np.add.reduce(block * block, axis=0)
            b = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
            total += b
            mine += b
        if each is not None:
            each[t] = mine  # (each array's blocks added in order, as the total adds all of them)
    return float(total)


def maxabs_list(arrays, each=None) -> float:
    """The largest magnitude of every element of ``arrays``, as a float64 (the inf
    norm): ``np.max(np.abs(a))`` per array (0.0 for an empty one), the largest of
    those (0.0 for no elements; each array's own into ``each`` when given). A
    maximum is exact, so the order is free; a NaN anywhere gives NaN, and every
    NaN returned (in ``each`` too) is ``np.nan`` (bits 0x7ff8000000000000, the
    C library's ``NAN``), whatever the input NaN's sign and payload."""
    total = 0.0
    for t, a in enumerate(arrays):
        mine = float(np.max(np.abs(a))) if a.size else 0.0
        if mine != mine:
            mine = np.nan
        if mine > total or mine != mine:
            total = mine
        if each is not None:
            each[t] = mine
    return total


# ---- pass 1 of the two-pass rules ---------------------------------------------

def measure(kernel: str, param, grad, state, scalars):
    """The update ``u`` a two-pass kernel would apply (``scalars.measure`` on), in
    the buffers' dtype; nothing is written."""
    dtype = param.dtype.type
    cast = type(scalars)(*(dtype(x) if isinstance(x, float) else x for x in scalars))
    with np.errstate(all="ignore"):
        return _KERNELS[kernel](param, grad, *state, cast)


def trust_sums(kernel: str, params, grads, states, scalars, table=None):
    """Pass 1 over lists of tensors: per tensor, ``sum(p*p)`` and ``sum(u*u)`` (float64
    arrays), each in the reduction order of :func:`sumsq_list`. ``scalars``: pass 1's
    (``measure`` on); ``states``: as :func:`run_list` (None: not read)."""
    count = len(params)
    param_sumsq, update_sumsq = np.zeros(count), np.zeros(count)
    for i, (p, g) in enumerate(zip(params, grads)):
        u = measure(kernel, p, g, tuple(None if s is None else s[i] for s in states), scalars)
        param_sumsq[i] = sumsq_list([p])
        update_sumsq[i] = sumsq_list([u])
    return param_sumsq, update_sumsq


# ---- mixed-format calls (fastopt.formats) -------------------------------------

#: The formats run_mixed takes (fastopt.formats' codes): all of them.
mixed_formats = tuple(_formats.FORMAT_NAMES)


def run_mixed(kernel: str, params, grads, states, masters, formats, scalars, key: int) -> None:
    """A mixed-format update over lists of tensors (``fastopt.formats``): per tensor,
    every buffer loaded into float32, the float32 update (:func:`run`, flushing
    included), then each written buffer stored in its format: ``masters[t]`` (when
    given) is the param updated in place and ``params[t]`` its nearest 16-bit value;
    a bfloat16 param without a master and every bfloat16 state buffer are rounded
    stochastically with the call's ``key``; an 8-bit state buffer (``fastopt.formats.Int8State``)
    is dequantized, and quantized again block by block after the update. ``formats``: a ``fastopt.formats.CallFormats``."""
    from .. import formats as fmt

    def loaded(buf, f):
        if f == fmt.INT8:  # (an Int8State: its blocks dequantized)
            return buf.dequantize()
        return fmt.load(buf).copy() if f != fmt.FLOAT32 else buf

    for t, (p, g) in enumerate(zip(params, grads)):
        p32 = masters[t] if masters is not None else loaded(p, formats.param)
        s32 = tuple(None if s is None else loaded(s[t], f) for s, f in zip(states, formats.state))
        run(kernel, p32, fmt.load(g), s32, scalars)
        if formats.param != fmt.FLOAT32:
            bits = None if masters is not None else fmt.rounding_bits(key, t, 0, p.size)
            fmt.store(p, p32, formats.param, bits)
        for k, (s, f) in enumerate(zip(states, formats.state)):
            if s is None or f == fmt.FLOAT32:
                continue
            if f == fmt.INT8:  # each block quantized again, by its new absmax
                codes, absmax = fmt.quantize(s32[k], s[t].signed)
                s[t].codes.reshape(-1)[...] = codes
                s[t].absmax[...] = absmax
            else:
                fmt.store(s[t], s32[k], f, fmt.rounding_bits(key, t, 1 + k, s[t].size))
