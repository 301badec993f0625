"""fastopt.torch under torch.distributed (gloo on 127.0.0.1, CPU): DDP, ZeRO, FSDP2, DCP.

Every case trains one tiny model (Linear(13, 11), LayerNorm(11), Linear(11, 5):
236 parameters in 6 tensors; 11 and 5 are odd and not multiples of 3, so FSDP2
shards are uneven at world sizes 2 and 3 and ZeRO's partition is unbalanced)
for ``STEPS`` AdamW steps on the same global batches (``GLOBAL_BATCH`` = 12
samples a step, divisible by 2 and 3; rank ``r`` of ``w`` takes the r-th
contiguous chunk of 12/w). DDP and FSDP2 average the gradients over ranks, so
the mean of the per-rank mean losses is the mean loss of the whole batch, and
the single-process reference is ``torch.optim.AdamW(foreach=False)`` on the
whole batch, computed here in the test process. Each case checks that every
rank ends with bit-identical parameters, that they match the reference, and
that training moved them (``MOVED`` >> the tolerance).

How it runs. The test process starts one subprocess per rank running this file
as a script (``--worker``); the children get the parent's ``sys.path`` as
PYTHONPATH, so they import the same fastopt (installed package or src/), and
check that they did. One run per world size executes several cases in turn,
each in a fresh default process group over a shared TCPStore (a failing case
cannot desynchronise the next one's collectives), and writes each rank's final
parameters, or its traceback, to a file the tests read. Collectives time out
after ``PG_TIMEOUT`` seconds and a whole run is killed after ``RUN_TIMEOUT``, so
a hang fails the tests instead of blocking CI. The world-size-3 run loads the
DCP checkpoints the world-size-2 run wrote (resharding 2 -> 3).

Tolerance: ``atol=1e-5, rtol=1e-5`` in float32. The distributed runs and the
reference do the same arithmetic except for the gradient reduction: the
reference sums 12 per-sample terms inside one mean, the ranks sum their own
chunk and then all-reduce / reduce-scatter the chunk means (and divide by the
world size), so each gradient differs by a few ulps (~1e-7 relative). AdamW's
update ``lr * m_hat / (sqrt(v_hat) + eps)`` is invariant to the gradient's
scale, so a relative gradient error of 1e-7 moves the update by ~1e-7 * lr =
1e-9; the optimizer arithmetic itself differs from torch's single-tensor path by
~1 ulp of the parameter (|p| < 2: ~2.4e-7) per step, and both errors feed back
through later gradients. Over 12 steps that bounds the difference by ~3e-6
(all errors of one sign); measured over all cases: at most 1.0e-7 with
torch.optim.AdamW as the optimizer under test (the harness check below),
1.8e-7 with fastopt.torch.AdamW. A wrong
update (a missing step, a stale or unsynchronised shard, fresh moments after a
checkpoint load) is off by order lr = 1e-2 per step, 1000x the tolerance
(resuming at step 6 with fresh optimizer state ends 0.05 away from the
reference), and the parameters must move by more than ``MOVED`` = 0.02 from
their start (they move 0.06 in 6 steps, 0.11 in 12).

Harness check: with FASTOPT_TEST_DIST_OPTIMIZER=torch in the environment the
workers use ``torch.optim.AdamW(foreach=False)`` wherever they would use
``fastopt.torch.AdamW``; every case must then pass.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
import traceback

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)
import fastopt  # noqa: E402

D_IN, D_HID, D_OUT = 13, 11, 5
GLOBAL_BATCH = 12
STEPS = 12
#: DCP cases save after this many steps and resume for the rest.
SAVE_AT = 6
SEED, DATA_SEED = 0, 1234
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
TOL = dict(atol=1e-5, rtol=1e-5)
MOVED = 0.02
PG_TIMEOUT = 20      # seconds a collective may wait
RUN_TIMEOUT = 180    # seconds a whole world run may take before it is killed
OPTIMIZER_ENV = "FASTOPT_TEST_DIST_OPTIMIZER"

#: The cases each world run executes, in order (world size 3's dcp_resume_* load what world size 2's
#: dcp_save_* wrote); each test below reads one of them.
CASES_2 = ["ddp", "ddp_grad_bucket_view", "zero", "zero_bucket_view", "fsdp2",
           "dcp_save_fsdp2", "dcp_save_fsdp2_torch", "dcp_save_ddp"]
CASES_3 = ["zero", "zero_bucket_view", "fsdp2",
           "dcp_resume_fsdp2", "dcp_resume_fsdp2_from_torch", "dcp_resume_fsdp2_into_torch", "dcp_resume_ddp"]


# ---- shared by the test process and the workers ------------------------------------------


def make_model(seed: int = SEED) -> "torch.nn.Sequential":
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, D_HID), torch.nn.LayerNorm(D_HID),
                               torch.nn.Linear(D_HID, D_OUT))


def batches():
    """The global batches: x of (STEPS, GLOBAL_BATCH, D_IN), y of (STEPS, GLOBAL_BATCH, D_OUT)."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(STEPS, GLOBAL_BATCH, D_IN, generator=gen)
    y = torch.randn(STEPS, GLOBAL_BATCH, D_OUT, generator=gen)
    return x, y


def train(model, opt, steps, rank: int = 0, world: int = 1) -> None:
    x, y = batches()
    chunk = GLOBAL_BATCH // world
    rows = slice(rank * chunk, (rank + 1) * chunk)
    for t in steps:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[t, rows]), y[t, rows])
        loss.backward()
        opt.step()


# ---- the worker (this file run as a script) ------------------------------------------------


def _optimizer(which: str = "under test"):
    """(class, extra options) of the optimizer a case uses: the one under test, or torch's."""
    if which == "torch" or os.environ.get(OPTIMIZER_ENV) == "torch":
        cls, extra = torch.optim.AdamW, dict(foreach=False)
    else:
        import fastopt.torch
        cls, extra = fastopt.torch.AdamW, {}
    _USED.append(f"{cls.__module__}.{cls.__name__}")
    return cls, extra


def _make_opt(params, which: str = "under test"):
    cls, extra = _optimizer(which)
    return cls(params, **HYPER, **extra)


#: The optimizer classes the current case made (reported with its result).
_USED: list = []


def _ddp(gradient_as_bucket_view=False, seed=SEED):
    from torch.nn.parallel import DistributedDataParallel
    model = make_model(seed)
    return model, DistributedDataParallel(model, gradient_as_bucket_view=gradient_as_bucket_view)


def _fsdp2(world, seed=SEED):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    model = make_model(seed)
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(model):
    """The full parameters (all-gathering DTensors)."""
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]


def _save(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def _load(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    if not os.path.exists(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"no DCP checkpoint at {path} (the world-size-2 case that saves it failed)")
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def run_case(case: str, rank: int, world: int, ckpt: str):
    """Run one case in the current process group; returns this rank's full parameters at the end."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    if case in ("ddp", "ddp_grad_bucket_view"):
        model, ddp = _ddp(gradient_as_bucket_view=case == "ddp_grad_bucket_view")
        train(ddp, _make_opt(ddp.parameters()), range(STEPS), rank, world)
        return _full(model)
    if case in ("zero", "zero_bucket_view"):
        model, ddp = _ddp()
        cls, extra = _optimizer()
        opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=cls,
                                      parameters_as_bucket_view=case == "zero_bucket_view", **HYPER, **extra)
        train(ddp, opt, range(STEPS), rank, world)
        return _full(model)
    if case == "fsdp2":
        model = _fsdp2(world)
        train(model, _make_opt(model.parameters()), range(STEPS), rank, world)
        return _full(model)
    if case.startswith("dcp_save_"):
        which = "torch" if case.endswith("_torch") else "under test"
        if case == "dcp_save_ddp":
            model, net = _ddp()
        else:
            model = net = _fsdp2(world)
        opt = _make_opt(net.parameters(), which)
        train(net, opt, range(SAVE_AT), rank, world)
        _save(model, opt, os.path.join(ckpt, case))
        return _full(model)
    if case.startswith("dcp_resume_"):
        source = {"dcp_resume_fsdp2": "dcp_save_fsdp2", "dcp_resume_fsdp2_from_torch": "dcp_save_fsdp2_torch",
                  "dcp_resume_fsdp2_into_torch": "dcp_save_fsdp2", "dcp_resume_ddp": "dcp_save_ddp"}[case]
        which = "torch" if case.endswith("_into_torch") else "under test"
        # Start from other weights: only a working load brings back the saved ones.
        if case == "dcp_resume_ddp":
            model, net = _ddp(seed=SEED + 1)
        else:
            model = net = _fsdp2(world, seed=SEED + 1)
        opt = _make_opt(net.parameters(), which)
        _load(model, opt, os.path.join(ckpt, source))
        train(net, opt, range(SAVE_AT, STEPS), rank, world)
        return _full(model)
    raise ValueError(f"unknown case {case!r}")


def _store(rank: int, world: int, port_file: str):
    """The TCPStore every case's process group meets in: rank 0 binds port 0 (a free port, no race
    between finding it and binding it) and publishes the port; the other ranks wait for it."""
    timeout = datetime.timedelta(seconds=60)
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
        with open(port_file + ".tmp", "w") as f:
            f.write(str(store.port))
        os.replace(port_file + ".tmp", port_file)
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while not os.path.exists(port_file):
        if time.monotonic() > deadline:
            raise SystemExit(f"rank {rank}: rank 0 published no port in {port_file}")
        time.sleep(0.05)
    with open(port_file) as f:
        port = int(f.read())
    return dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)


def worker_main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--port-file", required=True, help="rank 0 writes its store's port there, the others read it")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--fastopt", required=True, help="the fastopt package directory the test process imported")
    ap.add_argument("cases", nargs="+")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from torch.distributed.checkpoint.api import CheckpointException
    import fastopt
    here = os.path.dirname(os.path.abspath(fastopt.__file__))
    if here != a.fastopt:
        raise SystemExit(f"worker imported fastopt from {here}, the test process from {a.fastopt}")
    timeout = datetime.timedelta(seconds=PG_TIMEOUT)
    store = _store(a.rank, a.world, a.port_file)
    for case in a.cases:
        dist.init_process_group("gloo", store=dist.PrefixStore(case, store), rank=a.rank,
                                world_size=a.world, timeout=timeout)
        try:
            result = {"ok": True, "params": run_case(case, a.rank, a.world, a.ckpt)}
        except (Exception, CheckpointException) as e:  # (the latter is a BaseException)
            # Recorded for the test to report; the next case gets a fresh process group.
            cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e
            first = f"{type(cause).__name__}: {cause}".splitlines()[0]
            result = {"ok": False, "error": first, "traceback": traceback.format_exc()}
        finally:
            dist.destroy_process_group()
        result["optimizer"] = ", ".join(_USED) or "none"
        _USED.clear()
        torch.save(result, os.path.join(a.out, f"{case}.rank{a.rank}.pt"))
    # Rank 0 hosts the store: it leaves last.
    store.add("done", 1)
    deadline = time.monotonic() + 60
    while store.add("done", 0) < a.world and time.monotonic() < deadline:
        time.sleep(0.05)


# ---- the tests --------------------------------------------------------------------------------


class _Run(dict):
    """{case: [one result dict per rank]} of one world run (a short repr for pytest's tracebacks)."""

    def __repr__(self) -> str:
        return f"<world size {self.world} run, {self.elapsed:.1f} s: {', '.join(self)}>"


class _Result(dict):
    def __repr__(self) -> str:
        return f"<{'ok' if self['ok'] else 'failed: ' + self['error']}>"


def _spawn(world: int, cases, out, ckpt) -> _Run:
    """Run the cases on `world` worker processes; the results by case and rank (or why a rank wrote none)."""
    os.makedirs(out, exist_ok=True)
    path = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path),
           "OMP_NUM_THREADS": "1", "FASTOPT_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    fastopt_dir = os.path.dirname(os.path.abspath(fastopt.__file__))
    procs, logs = [], []
    start = time.monotonic()
    for rank in range(world):
        log = open(os.path.join(out, f"rank{rank}.log"), "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", "--rank", str(rank), "--world", str(world),
             "--port-file", os.path.join(out, "port"), "--out", str(out), "--ckpt", str(ckpt),
             "--fastopt", fastopt_dir, *cases],
            env=env, stdout=log, stderr=subprocess.STDOUT))
    timed_out = False
    for p in procs:
        try:
            p.wait(timeout=max(1.0, RUN_TIMEOUT - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    if timed_out:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    elapsed = time.monotonic() - start
    tails = []
    for rank, log in enumerate(logs):
        log.seek(0)
        tails.append(f"--- rank {rank} (exit {procs[rank].returncode}) ---\n" + log.read()[-3000:])
        log.close()
    why = (f"world size {world} run killed after {RUN_TIMEOUT} s" if timed_out else
           f"world size {world} run") + f" ({elapsed:.1f} s); worker output:\n" + "\n".join(tails)
    run = _Run()
    run.world, run.elapsed = world, elapsed
    for case in cases:
        files = [os.path.join(out, f"{case}.rank{rank}.pt") for rank in range(world)]
        run[case] = [_Result(torch.load(f) if os.path.exists(f) else
                             {"ok": False, "error": f"rank {rank} wrote no result", "traceback": why})
                     for rank, f in enumerate(files)]
    return run


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dcp")


@pytest.fixture(scope="module")
def world2(tmp_path_factory, ckpt_dir):
    return _spawn(2, CASES_2, tmp_path_factory.mktemp("world2"), ckpt_dir)


@pytest.fixture(scope="module")
def world3(tmp_path_factory, ckpt_dir, world2):  # after world2: it loads world2's checkpoints
    return _spawn(3, CASES_3, tmp_path_factory.mktemp("world3"), ckpt_dir)


@pytest.fixture(scope="module")
def reference():
    """Single-process torch.optim.AdamW(foreach=False) on the whole batch: parameters after 0, SAVE_AT, STEPS steps."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), **HYPER, foreach=False)
    snap = lambda: [p.detach().clone() for p in model.parameters()]  # noqa: E731
    out = {0: snap()}
    train(model, opt, range(SAVE_AT))
    out[SAVE_AT] = snap()
    train(model, opt, range(SAVE_AT, STEPS))
    out[STEPS] = snap()
    return out


def _check(ranks, reference, steps: int) -> None:
    for rank, r in enumerate(ranks):
        if not r["ok"]:
            pytest.fail(f"rank {rank}: {r['error']}\n{r['traceback']}", pytrace=False)
    first = ranks[0]["params"]
    names = [n for n, _ in make_model().named_parameters()]
    for rank, r in enumerate(ranks[1:], 1):
        for name, a, b in zip(names, first, r["params"]):
            assert torch.equal(a, b), f"rank {rank} and rank 0 disagree on {name}: max |diff| {(a - b).abs().max():.3g}"
    for name, got, want, start in zip(names, first, reference[steps], reference[0]):
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        torch.testing.assert_close(got, want, **TOL,
                                   msg=lambda m: f"{name} after {steps} steps ({ranks[0]['optimizer']}): {m}")
    moved = max((got - start).abs().max().item() for got, start in zip(first, reference[0]))
    assert moved > MOVED, f"training moved the weights by only {moved:.3g} from their start"


@pytest.mark.parametrize("case", ["ddp", "ddp_grad_bucket_view"])
def test_ddp(world2, reference, case):
    """DistributedDataParallel (world size 2), with DDP's gradient buckets copied into .grad or aliased as .grad."""
    _check(world2[case], reference, STEPS)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", ["zero", "zero_bucket_view"])
def test_zero_redundancy_optimizer(request, reference, world, case):
    """ZeroRedundancyOptimizer(optimizer_class=fastopt.torch.AdamW) over DDP, parameters_as_bucket_view False/True."""
    _check(request.getfixturevalue(f"world{world}")[case], reference, STEPS)


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2(request, reference, world):
    """fully_shard (per layer and at the root): fastopt.torch.AdamW steps the DTensor shards."""
    _check(request.getfixturevalue(f"world{world}")["fsdp2"], reference, STEPS)


@pytest.mark.parametrize("case", ["dcp_save_fsdp2", "dcp_save_fsdp2_torch", "dcp_save_ddp"])
def test_dcp_save(world2, reference, case):
    """The runs that write the checkpoints (world size 2, SAVE_AT steps; _torch: torch.optim.AdamW writes it)."""
    _check(world2[case], reference, SAVE_AT)


@pytest.mark.parametrize("case", ["dcp_resume_fsdp2", "dcp_resume_fsdp2_from_torch",
                                  "dcp_resume_fsdp2_into_torch", "dcp_resume_ddp"])
def test_dcp_resume(world3, reference, case):
    """Load at world size 3 what world size 2 saved (get/set_state_dict + dcp.save/load), train on: the same as
    an uninterrupted run. from_torch: a torch.optim.AdamW checkpoint into fastopt; into_torch: the reverse."""
    _check(world3[case], reference, STEPS)


if __name__ == "__main__":
    worker_main()
