"""The CUDA backend: Numba CUDA kernels over ``__cuda_array_interface__`` buffers.

Host wrapper of the three layers (see :mod:`fastopt.kernels.cuda_kernels`):
take validated device buffers (Numba device arrays, CuPy arrays, PyTorch CUDA
tensors, anything exporting the CUDA Array Interface), view them as flat 1-D
arrays without copying, pick the compiled kernel for (element kernel, dtype,
present state buffers), and launch it once on the right stream.

Launch configuration. An update is bandwidth bound (3-9 bytes moved per flop),
so the launch aims at keeping the memory system busy, not at occupancy per se:
``THREADS_PER_BLOCK`` threads (256: 8 warps, a multiple of every SM's warp
schedulers, and small enough that 8 blocks fit per SM) and
``min(one resident wave, ceil(n / threads))`` blocks, where one resident wave
is the occupancy API's active blocks per SM for *this* kernel (its register
count included) times the SM count. More blocks than one wave add block
scheduling and nothing else, since the grid-stride loop covers any n; fewer
leave SMs, and so outstanding loads, idle. NVVM unrolls the grid-stride loop,
so each thread keeps several independent loads in flight. ``MAX_BLOCKS``
caps the grid (None: one wave) for benchmark sweeps.

Streams. ``stream=`` (a Numba stream, an int handle with 0 for the default
stream, or any object with ``__cuda_stream__``, ``.cuda_stream`` (torch) or
``.ptr`` (CuPy)) is where the kernel runs. Without it, the kernel runs on the
stream the buffers' interfaces name (the CAI v3 ``stream`` key: the producer's
stream, so the update is ordered after the work that produced the gradient
with no host synchronisation), else on the default stream. When the buffers
name other streams than the launch stream, the launch stream waits on an event
recorded on each of them: ordered, still without blocking the host. The
launch is asynchronous, like any CUDA kernel.

Conversions. A Numba device array is passed as is (reshaped when not 1-D). Any
other interface is turned into a flat Numba view once and cached by (pointer,
shape, dtype): the view owns nothing, it only describes the memory, so a later
call on the same buffer costs a dict lookup instead of building a
DeviceNDArray. Buffers must be on the current Numba device.
"""
from __future__ import annotations

import threading
from typing import Any, NamedTuple, Sequence

import numpy as np
from numba import cuda
from numba.core import config

from .. import denormals
from ..buffers import device_interface
from ..formats import CallFormats
from ..kernels import cuda_formats, cuda_kernels
from . import run_each

name = "cuda"
device = "cuda"

#: True under NUMBA_ENABLE_CUDASIM=1: kernels run in Numba's Python simulator.
SIMULATOR = bool(config.ENABLE_CUDASIM)

#: Threads per block and an optional cap on the grid (None: one resident wave).
THREADS_PER_BLOCK = 256
MAX_BLOCKS: int | None = None

if SIMULATOR:
    _NUMBA_ARRAY: type = cuda.devicearray.FakeCUDAArray
    _NUMBA_STREAM: type = cuda.stream
else:
    from numba.cuda.cudadrv.devicearray import DeviceNDArray as _NUMBA_ARRAY
    from numba.cuda.cudadrv.driver import Stream as _NUMBA_STREAM


def unavailable_reason() -> str:
    """Empty when kernels can run here (a CUDA GPU and driver, or the simulator)."""
    if SIMULATOR or cuda.is_available():
        return ""
    detail = " ".join(str(cuda.cuda_error() or "").split())
    return "no CUDA GPU or driver" + (f" ({detail})" if detail else "")


# ---------------------------------------------------------------------------
# Compiled kernels, per (element kernel, dtype, present state buffers)
# ---------------------------------------------------------------------------

class _Compiled(NamedTuple):
    dispatcher: Any
    argtypes: tuple
    waves: dict  # threads per block -> blocks of one resident wave (known at first launch)


_compiled: dict[tuple, _Compiled] = {}
_compile_lock = threading.Lock()


def _compile(key: tuple, pyfunc, argtypes: tuple) -> _Compiled:
    with _compile_lock:
        got = _compiled.get(key)
        if got is None:
            got = _compiled[key] = _Compiled(cuda.jit(argtypes)(pyfunc), argtypes, {})
    return got


def compiled(kernel: str, dtype, present: tuple[bool, ...], flush: bool = False) -> _Compiled:
    """The compiled variant (compiling it on first use)."""
    key = (kernel, np.dtype(dtype), present) + (("flush",) if flush else ())
    got = _compiled.get(key)
    if got is None:
        got = _compile(key, cuda_kernels.make_kernel(kernel, present, flush),
                       cuda_kernels.signature(kernel, dtype, present))
    return got


def precompile(kernel: str, dtype, state_present: Sequence[bool]) -> None:
    """Compile one variant ahead of time (benchmarks: keep JIT time out of timings)."""
    compiled(kernel, dtype, tuple(bool(x) for x in state_present))


def launch_config(n: int, resident_blocks: int) -> tuple[int, int]:
    """(blocks, threads) for ``n`` elements: at most one resident wave, grid-stride beyond."""
    threads = THREADS_PER_BLOCK
    cap = MAX_BLOCKS or resident_blocks
    return max(1, min(cap, -(-n // threads))), threads


def _launch(entry: _Compiled, n: int, stream, args) -> None:
    wave = entry.waves.get(THREADS_PER_BLOCK)
    if wave is None:
        # Occupancy API: active blocks per SM for this kernel's registers, times the SMs.
        overload = entry.dispatcher.overloads[entry.argtypes]
        wave = entry.waves[THREADS_PER_BLOCK] = max(1, overload.max_cooperative_grid_blocks(THREADS_PER_BLOCK))
    blocks, threads = launch_config(n, wave)
    entry.dispatcher[blocks, threads, stream](*args)


# ---------------------------------------------------------------------------
# Buffers: flat Numba views of __cuda_array_interface__ objects
# ---------------------------------------------------------------------------

_views: dict[tuple, Any] = {}
_VIEWS_MAX = 4096  # distinct buffers remembered; cleared when full


def _view_from_interface(ptr: int, n: int, typestr: str):
    if SIMULATOR:
        # Simulated device memory is host memory: view it in place.
        dtype = np.dtype(typestr)
        buf = (np.ctypeslib.ctypes.c_char * (n * dtype.itemsize)).from_address(ptr) if n else b""
        return cuda.devicearray.FakeCUDAArray(np.frombuffer(buf, dtype, n))
    desc = {"shape": (n,), "strides": None, "typestr": typestr, "data": (ptr, False), "version": 3}
    # owner=None: the view must not keep the buffer alive from the cache; sync=False:
    # stream ordering is handled at launch, without blocking the host.
    return cuda.from_cuda_array_interface(desc, owner=None, sync=False)


def _stream_handle(s) -> int | None:
    """The stream handle a Numba array's ``.stream`` names (None: no stream)."""
    if not s or SIMULATOR:
        return None
    return int(s.handle)


def flat_view(obj: Any) -> tuple[Any, int | None]:
    """(a flat 1-D Numba device array over ``obj``'s memory, the stream ``obj`` names)."""
    if isinstance(obj, _NUMBA_ARRAY):
        return (obj if obj.ndim == 1 else obj.reshape(obj.size)), _stream_handle(obj.stream)
    cai = device_interface(obj)
    shape = tuple(cai["shape"])
    key = (cai["data"][0], shape, cai["typestr"])
    view = _views.get(key)
    if view is None:
        if len(_views) >= _VIEWS_MAX:
            _views.clear()
        view = _views[key] = _view_from_interface(key[0], int(np.prod(shape)), key[2])
    return view, cai.get("stream")


# ---------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------

_external: dict[int, Any] = {}


def _stream_for(handle: int):
    """A Numba stream object for a raw handle (cached; 0 is the default stream)."""
    if handle == 0 or SIMULATOR:
        return 0
    s = _external.get(handle)
    if s is None:
        if len(_external) >= 256:
            _external.clear()
        s = _external[handle] = cuda.external_stream(handle)
    return s


def as_stream(stream: Any) -> tuple[Any, int]:
    """(what to launch on, its handle) for a user's ``stream=`` argument."""
    if isinstance(stream, int) and not isinstance(stream, bool):
        return _stream_for(stream), stream
    if isinstance(stream, _NUMBA_STREAM):
        return stream, (id(stream) if SIMULATOR else int(stream.handle))
    if hasattr(stream, "__cuda_stream__"):
        h = int(stream.__cuda_stream__()[1])
    elif hasattr(stream, "cuda_stream"):  # torch.cuda.Stream
        h = int(stream.cuda_stream)
    elif hasattr(stream, "ptr"):  # cupy.cuda.Stream
        h = int(stream.ptr)
    else:
        raise TypeError("stream must be a Numba CUDA stream, an int handle (0: default stream) or an object "
                        f"with __cuda_stream__, .cuda_stream or .ptr; got {type(stream).__name__}")
    return _stream_for(h), h


def plan_streams(user: int | None, producers: Sequence[int | None]) -> tuple[int | None, list[int]]:
    """(handle to launch on, producer handles it must wait for).

    ``user`` is the handle of ``stream=`` (None when not given); ``producers``
    are the CAI ``stream`` keys of the buffers (None: unspecified). Without
    ``stream=`` the launch goes to the first stream a buffer names (None: the
    default stream).
    """
    named = list(dict.fromkeys(h for h in producers if h is not None))
    launch = user if user is not None else (named[0] if named else None)
    return launch, [h for h in named if h != launch]


def _resolve_stream(stream: Any, producers: Sequence[int | None]):
    if stream is None:
        if not any(h is not None for h in producers):
            return 0  # the common case: nothing to order against
        user_obj, user = None, None
    else:
        user_obj, user = as_stream(stream)
    launch, waits = plan_streams(user, producers)
    target = user_obj if user is not None else (0 if launch is None else _stream_for(launch))
    for h in waits:
        event = cuda.event(timing=False)
        event.record(_stream_for(h))
        event.wait(target)
    return target


# ---------------------------------------------------------------------------
# The backend interface
# ---------------------------------------------------------------------------

def _cast(scalars: NamedTuple, dtype: np.dtype) -> NamedTuple:
    t = dtype.type
    return scalars._make(t(x) if isinstance(x, float) else x for x in scalars)


def run(kernel: str, param, grad, state, scalars, stream=None) -> None:
    """Launch one update of ``param`` and ``state`` in place (asynchronously).

    ``state`` is the rule-ordered tuple of device buffers (None: not used by
    this call); ``scalars`` the rule's precomputed per-step scalars.
    """
    views, producers = zip(*(flat_view(a) for a in (param, grad, *(s for s in state if s is not None))))
    n = views[0].size
    if n == 0:
        return
    dtype = views[0].dtype
    entry = compiled(kernel, dtype, tuple(s is not None for s in state), _flush)
    # On a GPU the launch marshals each float field as the signature's
    # float32/float64 (ctypes.c_float rounds exactly like np.float32). The
    # simulator runs the element function in Python, so it needs the cast.
    tiny = dtype.type(np.finfo(dtype).tiny)
    args = (*views, _cast(scalars, dtype) if SIMULATOR else scalars, tiny)
    _launch(entry, n, _resolve_stream(stream, producers), args)


_flush = denormals.get_flush_denormal()  # set_flush_denormal keeps it current


def set_flush_denormal(on: bool) -> None:
    """Store subnormal results as zeros from the next launch on (fastopt.set_flush_denormal)."""
    global _flush
    _flush = bool(on)


def run_list(kernel: str, params, grads, states, scalars, stream=None, table=None) -> None:
    """The update over lists of device tensors, one launch per tensor (in order, on one stream)."""
    run_each(run, kernel, params, grads, states, scalars, stream)


def compiled_mixed(kernel: str, formats: CallFormats, flush: bool = False, signed: tuple = ()) -> _Compiled:
    """The compiled mixed-format variant (:mod:`fastopt.kernels.cuda_formats`), compiled on first use."""
    key = (kernel, "mixed", formats, signed) + (("flush",) if flush else ())
    got = _compiled.get(key)
    if got is None:
        got = _compile(key, cuda_formats.make_kernel(kernel, formats, flush, signed),
                       cuda_formats.signature(kernel, formats))
    return got


#: The formats run_mixed takes (fastopt.formats' codes): every one, 8-bit state included.
mixed_formats = (0, 1, 2, 3)


def _bits16(view):
    """A 16-bit buffer as the ``uint16`` array of its bits (its format comes from the call)."""
    return view if view.dtype == np.uint16 or view.dtype.itemsize != 2 else view.view(np.uint16)


def run_mixed(kernel: str, params, grads, states, masters, formats: CallFormats, scalars, key: int,
              stream=None) -> None:
    """A mixed-format update (``fastopt.formats``) over lists of device tensors, one launch per
    tensor on one stream: 16-bit buffers are any 2-byte device arrays of their bits (bfloat16
    has no ``__cuda_array_interface__`` type), their formats given by ``formats``; tensor ``t``'s
    stochastic rounding draws from the streams ``fastopt.formats.stream(key, t, role)``."""
    from .. import formats as fmt

    signed = tuple(s[0].signed if f == fmt.INT8 and s else None for s, f in zip(states, formats.state)) \
        if fmt.INT8 in formats.state else ()
    entry = compiled_mixed(kernel, formats, _flush, signed)
    roles = cuda_formats.roles(formats)
    cast = _cast(scalars, np.dtype(np.float32)) if SIMULATOR else scalars
    tiny = np.float32(np.finfo(np.float32).tiny)
    for t, (p, g) in enumerate(zip(params, grads)):
        arrays = [p, g]
        for s, f in zip(states, formats.state):
            if s is not None:  # (an 8-bit buffer is two arguments: its codes, its absmax)
                arrays += [s[t].codes, s[t].absmax] if f == fmt.INT8 else [s[t]]
        arrays += [masters[t]] if masters is not None else []
        views, producers = zip(*(flat_view(a) for a in arrays))
        n = views[0].size
        if n == 0:
            continue
        streams = tuple(np.uint64(fmt.stream(key, t, r)) for r in roles)
        args = (*map(_bits16, views), cast, tiny, streams)
        if signed:  # one thread block per block of 256 elements
            blocks = min(-(-n // fmt.BLOCK), MAX_BLOCKS or 65535)
            entry.dispatcher[blocks, fmt.BLOCK, _resolve_stream(stream, producers)](*args)
        else:
            _launch(entry, n, _resolve_stream(stream, producers), args)


def all_finite(array, stream=None) -> bool:
    """True when no element of the device ``array`` is NaN or +-Inf (synchronises)."""
    view, producer = flat_view(array)
    if view.dtype not in cuda_kernels.NONFINITE_SIGNATURES:
        raise TypeError(f"array must have dtype float32 or float64, got {view.dtype}")
    if view.size == 0:
        return True
    target = _resolve_stream(stream, (producer,))
    sig = cuda_kernels.NONFINITE_SIGNATURES[view.dtype]
    entry = _compile(("nonfinite", view.dtype), cuda_kernels.nonfinite_kernel, sig)  # lazily, like the updates
    found = cuda.to_device(np.zeros(1, np.int32), stream=target)
    _launch(entry, view.size, target, (view, found))
    flag = found.copy_to_host(stream=target)
    if target != 0:
        target.synchronize()
    return not flag[0]


# ---------------------------------------------------------------------------
# Reproducible reductions (fastopt.sum_of_squares, fastopt.max_abs on device arrays)
# ---------------------------------------------------------------------------

#: Threads per thread block of the reduction kernels: a multiple of 8, at most cuda_norms.MAX_THREADS.
NORM_THREADS = 256


def _block_results(kind: str, arrays, stream):
    """(per-block results on the host, float64; first[t]: tensor t's first block).

    One launch per non-empty tensor (in order, on the stream the buffers name
    or ``stream``), each writing its blocks' results into one device array at
    the tensor's offset; then one copy back (which waits for the kernels).
    """
    from ..kernels import cuda_norms
    views, producers = zip(*(flat_view(a) for a in arrays))
    counts = [-(-v.size // cuda_norms.BLOCK) for v in views]
    first = np.zeros(len(views) + 1, dtype=np.int64)
    np.cumsum(counts, out=first[1:])
    if not first[-1]:
        return np.zeros(0), first
    dtype = views[0].dtype
    if dtype not in cuda_norms.SIGNATURES:
        raise TypeError(f"arrays must have dtype float32 or float64, got {dtype}")
    kernel = cuda_norms.sumsq_kernel if kind == "sumsq" else cuda_norms.maxabs_kernel
    entry = _compile((kind, dtype), kernel, cuda_norms.SIGNATURES[dtype])  # lazily, like the updates
    target = _resolve_stream(stream, producers)
    out = cuda.device_array(int(first[-1]), np.float64, stream=target)
    for view, f, c in zip(views, first, counts):
        if c:
            threads = min(NORM_THREADS, c * cuda_norms.LANES)  # a small tensor: no idle threads
            entry.dispatcher[cuda_norms.grid(c, threads), threads, target](view, out, np.uint64(f))
    host = out.copy_to_host(stream=target)
    if target != 0:
        target.synchronize()
    return host, first


def sumsq_list(arrays, each=None, stream=None) -> float:
    """The sum of squares of every element of the device ``arrays`` (validated,
    one dtype), bitwise the host backends' (:mod:`fastopt.kernels.cuda_norms`:
    the block sums on the GPU, then added in order on the host); each array's own
    into ``each`` (a host float64 array) when given. Synchronises."""
    if not arrays:
        return 0.0
    sums, first = _block_results("sumsq", arrays, stream)
    if each is not None:
        for t in range(len(arrays)):
            mine = sums[first[t]:first[t + 1]]
            each[t] = np.add.accumulate(mine)[-1] if mine.size else 0.0  # accumulate: strictly in order
    return float(np.add.accumulate(sums)[-1]) if sums.size else 0.0


def maxabs_list(arrays, each=None, stream=None) -> float:
    """The largest magnitude of every element of the device ``arrays`` as a
    float64 (NaN anywhere: the canonical ``np.nan``, as on the host); each
    array's own into ``each`` (a host float64 array) when given. Synchronises."""
    if not arrays:
        return 0.0
    maxima, first = _block_results("maxabs", arrays, stream)
    if each is not None:
        for t in range(len(arrays)):
            mine = maxima[first[t]:first[t + 1]]
            each[t] = float(mine.max()) if mine.size else 0.0  # max propagates NaN
        each[np.isnan(each)] = np.nan
    total = float(maxima.max()) if maxima.size else 0.0
    return np.nan if total != total else total
