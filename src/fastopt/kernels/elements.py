"""Per-element update math, written once for the Numba CPU and CUDA backends.

Each function updates *one element*: it takes the parameter value ``p``, the
gradient value ``g``, the rule's state values (in the rule's ``state`` order)
and the rule's scalars tuple ``s`` (``fastopt.rules.<Rule>Scalars``, fields
already cast to the buffer dtype), and returns the new ``(p, *state)``. A state
the call does not use arrives as a dummy value and comes back unchanged.

These are plain Python functions with no Numba import, so importing them costs
nothing and needs no CUDA. Each backend compiles them for its target:
``numba.njit(inline="always")`` on the CPU, ``numba.cuda.jit(device=True)`` on
the GPU; the loop or kernel around them only indexes. Consequences for the
code below:

* They call nothing but ``math.sqrt``, ``math.copysign`` and ``abs`` (a call to another plain
  Python function would not compile).
* No float literals: ``1.0`` is a float64 in Numba and would promote a float32
  loop to float64 (measured: 0.82 vs 0.28 ns/elem). Every constant comes
  precomputed in ``s``.
* The operation order is the NumPy reference's, term for term, so without
  FMA contraction a backend is bitwise equal to the reference.
* Maximum propagates NaN like ``np.maximum``/``torch.maximum``:
  ``a if (a > b or a != a) else b``.
"""
import math


def sgd(p, g, buf, s):
    g = g * s.grad_sign
    if s.weight_decay != 0:
        g = g + s.weight_decay * p
    if s.use_momentum:  # momentum != 0 in double: the buffer is passed exactly then
        # torch starts the buffer from the first gradient, undamped.
        buf = g if s.first_step else s.momentum * buf + s.one_minus_dampening * g
        g = g + s.momentum * buf if s.nesterov else buf
    return p - s.lr * g, buf


def adagrad(p, g, state_sum, s):
    g = g * s.grad_sign
    if s.weight_decay != 0:
        g = g + s.weight_decay * p
    state_sum = state_sum + g * g
    return p - s.clr * (g / (math.sqrt(state_sum) + s.eps)), state_sum


def rmsprop(p, g, square_avg, momentum_buffer, grad_avg, s):
    g = g * s.grad_sign
    if s.weight_decay != 0:
        g = g + s.weight_decay * p
    square_avg = s.alpha * square_avg + s.one_minus_alpha * (g * g)
    if s.centered:
        grad_avg = (g if s.grad_avg_from_end else grad_avg) + s.grad_avg_weight * (g - grad_avg)  # torch's lerp
        avg = math.sqrt(square_avg - grad_avg * grad_avg) + s.eps
    else:
        avg = math.sqrt(square_avg) + s.eps
    if s.use_momentum:
        momentum_buffer = s.momentum * momentum_buffer + g / avg
        p = p - s.lr * momentum_buffer
    else:
        p = p - s.lr * (g / avg)
    return p, square_avg, momentum_buffer, grad_avg


def adadelta(p, g, square_avg, acc_delta, s):
    g = g * s.grad_sign
    if s.weight_decay != 0:
        g = g + s.weight_decay * p
    square_avg = s.rho * square_avg + s.one_minus_rho * (g * g)
    delta = math.sqrt(acc_delta + s.eps) / math.sqrt(square_avg + s.eps) * g
    acc_delta = s.rho * acc_delta + s.one_minus_rho * (delta * delta)
    return p - s.lr * delta, square_avg, acc_delta


def adam(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, s):
    # AdamW's decoupled decay; param_decay is exactly 1 for Adam, and p*1 == p.
    p = p * s.param_decay
    g = g * s.grad_sign
    if s.weight_decay != 0:
        g = g + s.weight_decay * p
    # torch's lerp(m, g, 1-b1) (rules.py: the weight and base switch at 1-b1 = 0.5): one
    # multiply-add fewer than b1*m + (1-b1)*g.
    exp_avg = (g if s.exp_avg_from_end else exp_avg) + s.exp_avg_weight * (g - exp_avg)
    exp_avg_sq = s.beta2 * exp_avg_sq + s.one_minus_beta2 * (g * g)
    v = exp_avg_sq
    if s.amsgrad:
        m = max_exp_avg_sq
        max_exp_avg_sq = m if (m > v or m != m) else v
        v = max_exp_avg_sq
    denom = math.sqrt(v) / s.bias_correction2_sqrt + s.eps
    return p - s.step_size * (exp_avg / denom), exp_avg, exp_avg_sq, max_exp_avg_sq


def ademamix(p, g, exp_avg_fast, exp_avg_slow, exp_avg_sq, s):
    p = p * s.param_decay  # decoupled decay first (exactly 1 without it)
    g = g * s.grad_sign
    exp_avg_fast = s.beta1 * exp_avg_fast + s.one_minus_beta1 * g
    exp_avg_slow = s.beta3 * exp_avg_slow + s.one_minus_beta3 * g
    exp_avg_sq = s.beta2 * exp_avg_sq + s.one_minus_beta2 * (g * g)
    denom = math.sqrt(exp_avg_sq) / s.bias_correction2_sqrt + s.eps
    update = (exp_avg_fast / s.bias_correction1 + s.alpha * exp_avg_slow) / denom
    return p - s.lr * update, exp_avg_fast, exp_avg_slow, exp_avg_sq


def adamax(p, g, exp_avg, exp_inf, s):
    g = g * s.grad_sign
    if s.weight_decay != 0:
        g = g + s.weight_decay * p
    exp_avg = (g if s.exp_avg_from_end else exp_avg) + s.exp_avg_weight * (g - exp_avg)
    a = s.beta2 * exp_inf
    b = abs(g) + s.eps
    exp_inf = a if (a > b or a != a) else b
    return p - s.clr * (exp_avg / exp_inf), exp_avg, exp_inf


def nadam(p, g, exp_avg, exp_avg_sq, s):
    p = p * s.param_decay
    g = g * s.grad_sign
    if s.weight_decay != 0:
        g = g + s.weight_decay * p
    exp_avg = (g if s.exp_avg_from_end else exp_avg) + s.exp_avg_weight * (g - exp_avg)
    exp_avg_sq = s.beta2 * exp_avg_sq + s.one_minus_beta2 * (g * g)
    denom = math.sqrt(exp_avg_sq / s.bias_correction2) + s.eps
    p = p - s.grad_coef * (g / denom)
    return p - s.exp_avg_coef * (exp_avg / denom), exp_avg, exp_avg_sq


def radam(p, g, exp_avg, exp_avg_sq, s):
    p = p * s.param_decay
    g = g * s.grad_sign
    if s.weight_decay != 0:
        g = g + s.weight_decay * p
    exp_avg = (g if s.exp_avg_from_end else exp_avg) + s.exp_avg_weight * (g - exp_avg)
    exp_avg_sq = s.beta2 * exp_avg_sq + s.one_minus_beta2 * (g * g)
    if s.rectified:
        p = p - s.step_size * (exp_avg * (s.bias_correction2_sqrt / (math.sqrt(exp_avg_sq) + s.eps)))
    else:
        p = p - s.step_size * exp_avg
    return p, exp_avg, exp_avg_sq


def asgd(p, g, ax, s):
    g = g * s.grad_sign
    if s.weight_decay != 0:
        g = g + s.weight_decay * p
    p = p * s.param_decay  # torch's decay term (1 - lambd*eta), before the step
    p = p - s.eta * g
    # torch copies p while mu is 1 (t0 steps): ax + (p - ax)*1 would not be p in
    # float (and NaN for infinite p and ax of one sign).
    ax = p if s.copy_average else ax + (p - ax) * s.mu
    return p, ax


def lion(p, g, exp_avg, s):
    g = g * s.grad_sign
    c = s.beta1 * exp_avg + s.one_minus_beta1 * g
    p = p * s.param_decay
    # p - lr*sign(c) without a float literal: copysign(lr, c) for c != 0, and
    # for c = +-0 or NaN, lr*(c - c): +0 (np.sign and torch.sign give +0 for -0
    # too) or NaN, which propagates (torch.sign(NaN) is 0; fastopt surfaces the
    # NaN, as every rule does). Both candidates are computed first and then
    # selected by quiet comparisons (== and !=): nothing is evaluated under a
    # condition, so a C compiler vectorizes the loop without masks (with an
    # arithmetic arm under the condition, GCC's -ftrapping-math kept the AVX2
    # Lion loop scalar: 5-7x slower).
    signed_lr = math.copysign(s.lr, c)
    zero_or_nan = s.lr * (c - c)
    return p - (signed_lr if (c == c and c != 0) else zero_or_nan), s.beta2 * exp_avg + s.one_minus_beta2 * g


def rprop(p, g, prev, step_size, s):
    g = g * s.grad_sign
    prod = g * prev
    # torch: sign(g*prev) > 0 -> etaplus, < 0 -> etaminus, 0 -> 1. For a NaN
    # product torch.sign gives 0 (the step size would be kept, the parameter
    # frozen); here the NaN propagates, as in every rule. As in lion, the
    # candidates are computed before the selects, and the clamps are single
    # comparisons: a select on `x > lo or x != x` after these selects kept
    # GCC's AVX2 loop scalar (4x slower).
    grown = step_size * s.etaplus
    shrunk = step_size * s.etaminus
    kept = step_size + (prod - prod)  # step_size, or NaN for a NaN product
    step_size = grown if prod > 0 else (shrunk if prod < 0 else kept)
    # clamp as torch.clamp / np.minimum(np.maximum(x, lo), hi): a NaN stays NaN
    # (both comparisons are False for it), ties keep x
    step_size = s.step_size_min if step_size < s.step_size_min else step_size
    step_size = s.step_size_max if step_size > s.step_size_max else step_size
    g = s.zero if prod < 0 else g  # no step where the sign flipped; the next step starts over
    # p - sign(g)*step_size, with sign(g) as np.sign gives it (+-1; +0 for +-0;
    # NaN for NaN) and multiplied, as the reference does, so a NaN step size
    # keeps its bits.
    signed_one = math.copysign(s.one, g)
    zero_or_nan = g - g
    sign_g = signed_one if (g == g and g != 0) else zero_or_nan
    return p - sign_g * step_size, g, step_size


# ---- two-pass rules (fastopt.rules.TWO_PASS_RULES) ---------------------------------
# With s.measure on (pass 1) the element gives the update u in place of the new
# parameter, and the pass stores nothing: pass 1 reduces ||p|| and ||u|| from
# exactly the u that pass 2, with the tensor's trust ratio folded into its
# scalars, applies.

def lamb(p, g, exp_avg, exp_avg_sq, s):
    # apex's LAMBStage1Functor (multi_tensor_lamb.cu), with the bias corrections'
    # reciprocals multiplied (m*(1/bc1) for m/bc1, v*(1/bc2) for v/bc2: two
    # divisions fewer, in both passes, which measured ~40% of pass 1's time),
    # the order of commutative operands and (1-beta2)*(g*g) for ((1-beta2)*g)*g.
    g = g * s.grad_sign
    if s.weight_decay != 0:  # adam_w_mode=False: L2 on the (clipped) gradient
        g = g + s.weight_decay * p
    exp_avg = s.beta1 * exp_avg + s.beta3 * g
    exp_avg_sq = s.beta2 * exp_avg_sq + s.one_minus_beta2 * (g * g)
    update = (exp_avg * s.inv_bias_correction1) / (math.sqrt(exp_avg_sq * s.inv_bias_correction2) + s.eps)
    if s.decay != 0:  # adam_w_mode=True: decoupled decay, in the update (so in its norm)
        update = update + s.decay * p
    # apex's LAMBStage2Functor: p - ratio*update, ratio = lr*||p||/||u|| (in s.step_size)
    return (update if s.measure else p - s.step_size * update), exp_avg, exp_avg_sq


def lars(p, g, momentum_buffer, s):
    # vicreg's LARS: dp = g + wd*p; q = eta*||p||/||dp|| (in s.trust_ratio);
    # mu = momentum*mu + q*dp; p -= lr*mu.
    update = g * s.grad_sign
    if s.weight_decay != 0:
        update = update + s.weight_decay * p
    scaled = s.trust_ratio * update
    if s.use_momentum:
        momentum_buffer = s.momentum * momentum_buffer + scaled
        scaled = momentum_buffer
    return (update if s.measure else p - s.lr * scaled), momentum_buffer


# ---- matrix rules (fastopt.rules.MATRIX_RULES) ------------------------------------

def muon(p, g, momentum_buffer, s):
    # The momentum pass (p: the update U to orthogonalize; its old value is not
    # read) or, with s.orthogonalized, the apply pass (g: the orthogonalized O;
    # the buffer comes back as it came). Both torch lerps, rules.py's form.
    buf = (g if s.buf_from_end else momentum_buffer) + s.buf_weight * (g - momentum_buffer)
    blended = (buf if s.update_from_end else g) + s.update_weight * (buf - g)
    update = blended if s.nesterov else buf
    applied = p * s.param_decay - s.lr * g
    return (applied if s.orthogonalized else update), (momentum_buffer if s.orthogonalized else buf)


# ---- schedule-free rules (fastopt.rules.SCHEDULE_FREE_RULES) ----------------------
# In the swap phase (s.swap) the grad slot holds z and the state comes back as it
# came: p = lerp(p, z, w), the train/eval switch of the parameters.

def adamw_schedulefree(p, g, z, exp_avg_sq, s):
    swapped = (g if s.swap_from_end else p) + s.swap_weight * (g - p)
    exp_avg_sq_new = s.beta2 * exp_avg_sq + s.one_minus_beta2 * (g * g)
    normalized = g / (math.sqrt(exp_avg_sq_new / s.bias_correction2) + s.eps)
    if s.weight_decay != 0:
        normalized = normalized + s.weight_decay * p
    y = (z if s.ckp1_from_end else p) + s.ckp1_weight * (z - p)  # torch's lerp(y, z, ckp1)
    y = y + s.y_coef * normalized
    z_new = z - s.lr * normalized
    return (swapped if s.swap else y), (z if s.swap else z_new), (exp_avg_sq if s.swap else exp_avg_sq_new)


def sgd_schedulefree(p, g, z, s):
    swapped = (g if s.swap_from_end else p) + s.swap_weight * (g - p)
    if s.weight_decay != 0:
        g = g + s.weight_decay * p
    y = (z if s.ckp1_from_end else p) + s.ckp1_weight * (z - p)
    y = y + s.y_coef * g
    z_new = z - s.lr * g
    return (swapped if s.swap else y), (z if s.swap else z_new)
