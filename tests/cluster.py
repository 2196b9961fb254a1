"""A reusable multi-process cluster for tests: ``R`` long-lived worker processes on one machine.

Each worker initialises ``torch.distributed`` (gloo, world group) over a TCP store hosted by the
parent on a free localhost port, then executes jobs until the cluster is closed::

    with Cluster(num_nodes=2, ranks_per_node=4) as cluster:
        results = cluster.run(job, 123, timeout_s=60)     # job(ctx, 123) on every rank

    def job(ctx, seed):            # module level, so that it pickles by reference
        ctx.rank, ctx.world_size, ctx.num_nodes, ctx.ranks_per_node, ctx.group
        ctx.cache["buf"] = ...     # survives between jobs of this worker
        return something_picklable

If a rank raises, :meth:`Cluster.run` raises :class:`JobFailed` (an ``AssertionError``) with
every failing rank's traceback, or with ``return_exceptions=True`` returns the exceptions in
place. A job that runs past ``timeout_s`` kills the whole cluster (after dumping the stacks of
the stuck workers into the error message) and raises :class:`ClusterTimeout`: it never hangs.

The nodes are simulated: tests pass ``num_ranks_per_node=ctx.ranks_per_node`` explicitly.
Nothing at module level imports torch, so the workers can set their thread limits first.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import wait as _mp_wait
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

__all__ = [
    "Cluster",
    "ClusterFactory",
    "ClusterTimeout",
    "JobFailed",
    "RemoteError",
    "WorkerContext",
    "WorkerDied",
    "shm_snapshot",
    "leaked_shm",
    "REPO_ROOT",
]


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------

class JobFailed(AssertionError):
    """A job raised on at least one rank (message: every failing rank's traceback)."""

    def __init__(self, message: str, errors: Optional[Dict[int, BaseException]] = None):
        super().__init__(message)
        self.errors = errors or {}


class ClusterTimeout(JobFailed):
    """A job ran past its timeout; the cluster was killed."""


class WorkerDied(RuntimeError):
    """The worker process of ``rank`` exited during a job."""

    def __init__(self, rank: int, exitcode: Optional[int]):
        super().__init__(f"worker of rank {rank} died (exit code {exitcode})")
        self.rank = rank
        self.exitcode = exitcode

    def __reduce__(self):
        return (WorkerDied, (self.rank, self.exitcode))


class RemoteError(RuntimeError):
    """Stand-in for a worker exception that could not be pickled back to the parent.

    ``exc_type`` is the qualified type name; ``rank`` is copied from the original exception when
    it had such an attribute.
    """

    def __init__(self, exc_type: str, message: str, rank: Optional[int] = None):
        super().__init__(f"{exc_type}: {message}")
        self.exc_type = exc_type
        self.rank = rank

    def __reduce__(self):
        return (RemoteError, (self.exc_type, str(self.args[0]).split(": ", 1)[-1], self.rank))


# ----------------------------------------------------------------------------------------------
# /dev/shm helpers
# ----------------------------------------------------------------------------------------------

SHM_DIR = "/dev/shm"


def shm_snapshot(prefix: str = "dispatch") -> Set[str]:
    """Names of the entries of ``/dev/shm`` that start with ``prefix``."""
    try:
        return {n for n in os.listdir(SHM_DIR) if n.startswith(prefix)}
    except FileNotFoundError:
        return set()


def _shm_in_use() -> Set[str]:
    """Names under /dev/shm that some live process has open or mapped."""
    used: Set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    i = line.find(SHM_DIR + "/")
                    if i >= 0:
                        used.add(os.path.basename(line[i:].strip().split(" (deleted)")[0]))
        except OSError:
            pass
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith(SHM_DIR + "/"):
                    used.add(os.path.basename(target))
        except OSError:
            pass
    return used


def leaked_shm(before: Set[str] = frozenset(), prefix: str = "dispatch",
               settle_s: float = 3.0) -> List[str]:
    """``/dev/shm/<prefix>*`` entries not in ``before`` that no live process uses.

    Entries opened or mapped by a live process (another test run on this machine, a buffer
    still alive) are not leaks. Waits up to ``settle_s`` for entries to go away or get mapped,
    so an entry between ``shm_open`` and ``mmap`` is not reported.
    """
    deadline = time.monotonic() + settle_s
    while True:
        candidates = shm_snapshot(prefix) - set(before)
        if candidates:
            candidates -= _shm_in_use()
            candidates &= shm_snapshot(prefix)
        if not candidates or time.monotonic() >= deadline:
            return sorted(candidates)
        time.sleep(0.2)


# ----------------------------------------------------------------------------------------------
# worker side
# ----------------------------------------------------------------------------------------------

class WorkerContext:
    """What a job function receives as its first argument."""

    def __init__(self, rank: int, world_size: int, num_nodes: int, ranks_per_node: int, group: Any):
        self.rank = rank
        self.world_size = world_size
        self.num_nodes = num_nodes
        self.ranks_per_node = ranks_per_node
        self.node = rank // ranks_per_node
        self.local_rank = rank % ranks_per_node
        self.group = group
        self.cache: Dict[str, Any] = {}

    def __repr__(self) -> str:
        return (f"WorkerContext(rank={self.rank}, world_size={self.world_size}, "
                f"num_nodes={self.num_nodes}, ranks_per_node={self.ranks_per_node})")


def _encode_exception(exc: BaseException, tb_text: str) -> bytes:
    exc_bytes: Optional[bytes]
    try:
        exc_bytes = pickle.dumps(exc)
        pickle.loads(exc_bytes)  # exceptions with custom __init__ may not round-trip
    except Exception:
        exc_bytes = None
    rank_attr = getattr(exc, "rank", None)
    if not isinstance(rank_attr, int):
        rank_attr = None
    return pickle.dumps(("err", exc_bytes, tb_text,
                         f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc), rank_attr))


def _destroy_cache(cache: Dict[str, Any]) -> None:
    """Destroy cached objects that have a ``destroy()`` (buffers), in a fixed key order."""
    for key in sorted(cache, key=str):
        destroy = getattr(cache[key], "destroy", None)
        if callable(destroy):
            try:
                destroy()
            except Exception:
                traceback.print_exc()
    cache.clear()


def _worker_main(rank: int, world_size: int, num_nodes: int, ranks_per_node: int, store_port: int,
                 conn: Any, repo_root: str, stack_file: str, env: Dict[str, str]) -> None:
    for key, value in env.items():
        os.environ[key] = value
    if repo_root not in sys.path:
        sys.path.insert(0, repo_root)
    stack_out = open(stack_file, "w")
    faulthandler.register(signal.SIGUSR1, file=stack_out, all_threads=True)

    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        store = dist.TCPStore("127.0.0.1", store_port, world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=120))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=300))
        ctx = WorkerContext(rank, world_size, num_nodes, ranks_per_node, dist.group.WORLD)
    except BaseException as exc:  # noqa: BLE001 - report start-up failures to the parent
        conn.send_bytes(_encode_exception(exc, traceback.format_exc()))
        return
    conn.send_bytes(pickle.dumps(("ready", rank)))

    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            break  # parent gone
        try:
            job = pickle.loads(message)
        except BaseException as exc:  # noqa: BLE001
            conn.send_bytes(_encode_exception(exc, traceback.format_exc()))
            continue
        if job is None:
            break
        fn, args, kwargs = job
        try:
            result = fn(ctx, *args, **kwargs)
            payload = pickle.dumps(("ok", result))
        except BaseException as exc:  # noqa: BLE001
            payload = _encode_exception(exc, traceback.format_exc())
        try:
            conn.send_bytes(payload)
        except (EOFError, OSError, BrokenPipeError):
            break

    _destroy_cache(ctx.cache)
    stack_out.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip the slow interpreter / process-group teardown


# ----------------------------------------------------------------------------------------------
# parent side
# ----------------------------------------------------------------------------------------------

START_METHOD = os.environ.get("DISPATCH_TEST_START_METHOD", "forkserver")


def _mp_context():
    """The multiprocessing context of the workers.

    ``forkserver`` (default) with torch preloaded: the server imports torch once and every worker
    is forked from that clean process, so an 8-rank cluster starts in about a second instead of
    ~15 s of parallel ``import torch`` on a small machine. ``DISPATCH_TEST_START_METHOD=spawn``
    gives fully fresh interpreters.
    """
    import torch.multiprocessing as tmp

    ctx = tmp.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        ctx.set_forkserver_preload(["torch", "torch.distributed"])
    return ctx


def _decode_exception(payload: tuple, rank: int) -> BaseException:
    _, exc_bytes, tb_text, type_name, message, rank_attr = payload
    exc: Optional[BaseException] = None
    if exc_bytes is not None:
        try:
            exc = pickle.loads(exc_bytes)
        except Exception:
            exc = None
    if exc is None:
        exc = RemoteError(type_name, message, rank_attr)
    try:
        exc.remote_traceback = tb_text  # type: ignore[attr-defined]
        exc.worker_rank = rank  # type: ignore[attr-defined]
    except Exception:
        pass
    return exc


class Cluster:
    """``num_nodes * ranks_per_node`` worker processes with a gloo world group.

    Args:
        num_nodes: simulated nodes ``N``.
        ranks_per_node: ranks per simulated node ``L``; rank ``r`` is on node ``r // L``.
        start_timeout_s: how long the workers may take to start and join the group.
        env: extra environment variables for the workers.
    """

    def __init__(self, num_nodes: int, ranks_per_node: int, *, start_timeout_s: float = 180.0,
                 env: Optional[Dict[str, str]] = None):
        import torch.distributed as dist

        self.num_nodes = num_nodes
        self.ranks_per_node = ranks_per_node
        self.world_size = num_nodes * ranks_per_node
        self.broken = False  # a job failed, timed out, or a worker died / was killed
        self.closed = False
        self.dead: Set[int] = set()
        self._lock = threading.Lock()
        self._tmpdir = tempfile.mkdtemp(prefix="cluster-")
        self._stack_files = [os.path.join(self._tmpdir, f"stack-{r}.txt") for r in range(self.world_size)]

        worker_env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if "GLOO_SOCKET_IFNAME" not in os.environ:
            worker_env["GLOO_SOCKET_IFNAME"] = "lo"
        worker_env.update(env or {})

        self._store = dist.TCPStore("127.0.0.1", 0, self.world_size + 1, is_master=True,
                                    wait_for_workers=False)
        ctx = _mp_context()
        self._procs = []
        self._conns = []
        for rank in range(self.world_size):
            parent_conn, child_conn = ctx.Pipe(duplex=True)
            proc = ctx.Process(
                target=_worker_main,
                args=(rank, self.world_size, num_nodes, ranks_per_node, self._store.port, child_conn,
                      REPO_ROOT, self._stack_files[rank], worker_env),
                name=f"cluster-{num_nodes}x{ranks_per_node}-rank{rank}",
                daemon=True,
            )
            proc.start()
            child_conn.close()
            self._procs.append(proc)
            self._conns.append(parent_conn)
        atexit.register(self.close)

        try:
            results = self._collect(list(range(self.world_size)), start_timeout_s, expect_ready=True)
        except BaseException:
            self.close(graceful=False)
            raise
        errors = {r: v for r, v in enumerate(results) if isinstance(v, BaseException)}
        if errors:
            self.close(graceful=False)
            raise JobFailed(self._format_errors("cluster start-up failed", errors), errors)

    # -- public API ------------------------------------------------------------------------------

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.num_nodes, self.ranks_per_node)

    @property
    def pids(self) -> List[Optional[int]]:
        return [p.pid for p in self._procs]

    def alive_ranks(self) -> List[int]:
        return [r for r in range(self.world_size) if r not in self.dead and self._procs[r].is_alive()]

    def healthy(self) -> bool:
        """Usable for new jobs: not closed, not broken, every worker alive."""
        return (not self.closed and not self.broken
                and len(self.alive_ranks()) == self.world_size)

    def mark_broken(self) -> None:
        """Declare the cluster's state unusable (a factory will respawn it)."""
        self.broken = True

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 180.0,
            return_exceptions: bool = False, ranks: Optional[Sequence[int]] = None,
            failure_grace_s: float = 30.0, **kwargs: Any) -> List[Any]:
        """Run ``fn(ctx, *args, **kwargs)`` on every live rank (or on ``ranks``).

        Args:
            fn: a module-level (picklable) function.
            timeout_s: wall-clock limit; past it the cluster is killed and ``ClusterTimeout`` raised.
            return_exceptions: put exceptions (the worker's own exception type when it pickles,
                else ``RemoteError``; ``WorkerDied`` for a worker that exited) into the result list
                instead of raising.
            ranks: run only on these ranks (default: all live ranks).
            failure_grace_s: without ``return_exceptions``, once a rank failed the others get
                this long to finish before the cluster is killed.

        Returns:
            One entry per rank of the world (``None`` for ranks the job did not run on).
        """
        with self._lock:
            if self.closed:
                raise RuntimeError("cluster is closed")
            targets = list(self.alive_ranks() if ranks is None else ranks)
            for r in targets:
                if r in self.dead or not self._procs[r].is_alive():
                    raise RuntimeError(f"rank {r} is dead")
            job = pickle.dumps((fn, args, kwargs))
            for r in targets:
                self._conns[r].send_bytes(job)
            results = self._collect(targets, timeout_s,
                                    failure_grace_s=None if return_exceptions else failure_grace_s)
            errors = {r: v for r, v in enumerate(results) if isinstance(v, BaseException)}
            if any(isinstance(v, WorkerDied) for v in errors.values()):
                self.broken = True
            if errors and not return_exceptions:
                self.broken = True
                raise JobFailed(self._format_errors(f"job {getattr(fn, '__name__', fn)} failed",
                                                    errors), errors)
            return results

    def kill_rank(self, rank: int) -> None:
        """SIGKILL the worker of ``rank`` (to test dead peers); the cluster becomes broken."""
        proc = self._procs[rank]
        self.broken = True
        self.dead.add(rank)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)

    def close(self, graceful: bool = True, grace_s: float = 30.0) -> None:
        """Stop the workers (gracefully: they destroy cached buffers first). Idempotent."""
        if self.closed:
            return
        self.closed = True
        if graceful:
            for r, conn in enumerate(self._conns):
                if r not in self.dead and self._procs[r].is_alive():
                    try:
                        conn.send_bytes(pickle.dumps(None))
                    except (OSError, ValueError):
                        pass
            deadline = time.monotonic() + grace_s
            for proc in self._procs:
                proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join(5)
        for conn in self._conns:
            try:
                conn.close()
            except OSError:
                pass
        self._store = None
        for f in self._stack_files:
            try:
                os.unlink(f)
            except OSError:
                pass
        try:
            os.rmdir(self._tmpdir)
        except OSError:
            pass
        try:
            atexit.unregister(self.close)
        except Exception:
            pass

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("broken" if self.broken else "ok")
        return f"Cluster({self.num_nodes}x{self.ranks_per_node}, {state})"

    # -- internals -------------------------------------------------------------------------------

    def _collect(self, targets: List[int], timeout_s: float, expect_ready: bool = False,
                 failure_grace_s: Optional[float] = None) -> List[Any]:
        results: List[Any] = [None] * self.world_size
        pending = set(targets)
        deadline = time.monotonic() + timeout_s
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._timeout(sorted(pending), results, timeout_s)
            waitables = {}
            for r in pending:
                waitables[self._conns[r]] = r
                waitables[self._procs[r].sentinel] = r
            ready = _mp_wait(list(waitables), timeout=remaining)
            for obj in ready:
                r = waitables[obj]
                if r not in pending:
                    continue
                conn = self._conns[r]
                got = False
                try:
                    if conn.poll():
                        payload = pickle.loads(conn.recv_bytes())
                        got = True
                except (EOFError, OSError):
                    got = False
                if got:
                    if payload[0] == "ok":
                        results[r] = payload[1]
                    elif payload[0] == "ready":
                        results[r] = True
                    else:
                        results[r] = _decode_exception(payload, r)
                    pending.discard(r)
                elif not self._procs[r].is_alive():
                    self._procs[r].join(1)
                    self.dead.add(r)
                    self.broken = True
                    results[r] = WorkerDied(r, self._procs[r].exitcode)
                    pending.discard(r)
            if (failure_grace_s is not None and pending
                    and any(isinstance(results[r], BaseException) for r in targets)):
                deadline = min(deadline, time.monotonic() + failure_grace_s)
                failure_grace_s = None
        return results

    def _timeout(self, stuck: List[int], results: List[Any], timeout_s: float) -> None:
        stacks = {}
        for r in stuck:
            if self._procs[r].is_alive():
                try:
                    os.kill(self._procs[r].pid, signal.SIGUSR1)
                except OSError:
                    pass
        time.sleep(1.0)
        for r in stuck:
            try:
                with open(self._stack_files[r]) as f:
                    stacks[r] = f.read()[-6000:]
            except OSError:
                stacks[r] = "<no stack>"
        errors = {r: v for r, v in enumerate(results) if isinstance(v, BaseException)}
        self.broken = True
        self.close(graceful=False)
        parts = [f"cluster {self.num_nodes}x{self.ranks_per_node}: job timed out after {timeout_s:.0f}s "
                 f"on ranks {stuck}; cluster killed"]
        for r in stuck:
            parts.append(f"--- rank {r} stacks at timeout ---\n{stacks[r]}")
        if errors:
            parts.append(self._format_errors("errors on the other ranks", errors))
        raise ClusterTimeout("\n".join(parts), errors)

    def _format_errors(self, title: str, errors: Dict[int, BaseException]) -> str:
        parts = [f"{title} on {self.num_nodes}x{self.ranks_per_node} cluster, ranks {sorted(errors)}:"]
        for r in sorted(errors):
            exc = errors[r]
            tb = getattr(exc, "remote_traceback", None) or f"{type(exc).__name__}: {exc}\n"
            parts.append(f"--- rank {r} ---\n{tb}")
        return "\n".join(parts)


class ClusterFactory:
    """``factory(num_nodes, ranks_per_node)``: a cached healthy :class:`Cluster` of that shape.

    A cluster that is broken (a job failed, timed out, a worker died) is closed and respawned on
    the next request. At most ``max_cached_ranks`` worker processes are kept: the least recently
    used clusters are closed to make room.
    """

    def __init__(self, max_cached_ranks: int = 32):
        self.max_cached_ranks = max_cached_ranks
        self._clusters: Dict[Tuple[int, int], Cluster] = {}
        self.spawned = 0

    def __call__(self, num_nodes: int, ranks_per_node: int) -> Cluster:
        key = (num_nodes, ranks_per_node)
        cluster = self._clusters.pop(key, None)
        if cluster is not None and not cluster.healthy():
            cluster.close()
            cluster = None
        if cluster is None:
            size = num_nodes * ranks_per_node
            while self._clusters and sum(c.world_size for c in self._clusters.values()) + size > self.max_cached_ranks:
                oldest = next(iter(self._clusters))
                self._clusters.pop(oldest).close()
            cluster = Cluster(num_nodes, ranks_per_node)
            self.spawned += 1
        self._clusters[key] = cluster  # most recently used last
        return cluster

    def discard(self, num_nodes: int, ranks_per_node: int) -> None:
        cluster = self._clusters.pop((num_nodes, ranks_per_node), None)
        if cluster is not None:
            cluster.close()

    def close_all(self) -> None:
        while self._clusters:
            _, cluster = self._clusters.popitem()
            cluster.close()
