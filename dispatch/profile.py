"""SM-usage / worker-usage profiler for the communication kernels.

Usage from any training script::

    import dispatch.profile as dprof

    with dprof.profile() as prof:          # or: with dispatch.profile() as prof:
        recv = buf.dispatch(...)
        out = buf.combine(...)
    print(prof.table())                    # per kernel: SMs/workers, busy time, SM-us per GB
    prof.timeline("timeline.png")          # one bar per block / worker slice

Backend contract (the executors call these):

* :func:`is_enabled` - a plain global flag read; executors check it once per kernel and skip all
  timing work when it is ``False``, so profiling off costs nothing measurable.
* :func:`record` - one record per kernel block (GPU) or per worker-thread slice (CPU):
  ``record(kernel, worker, start_ns, end_ns, bytes_moved, sm_id=-1)``. On the CPU backend
  ``worker`` is the worker-thread index and times are :func:`time.perf_counter_ns`.
* :func:`record_device_buffer` - the GPU path: a device buffer of ``(sm_id, start_ns, end_ns)``
  rows, one per block, written by the kernel from ``%smid`` and ``%globaltimer`` when profiling is
  on (``csrc/cuda/profile_record.h``; on the SIMT runtime virtual SM ids and the host's steady
  clock), is copied to the host and turned into records (``worker`` = block index). The CUDA
  backend passes the rank, as the virtual ranks of a loopback share one process.

Kernel names are dotted, ``"<op>.<stage>"`` (``"dispatch.pack_rail"``, ``"dispatch.node_copy"``,
``"combine.reduce"``, ``"combine.node_copy"``, ``"combine.accumulate"``, ...); the CUDA backend's
are ``"dispatch.layout"``, ``"notify"`` (every call's handshake), ``"dispatch.node_copy"`` and
``"combine.node_copy"``; across nodes ``"dispatch.rail_pack"``, ``"dispatch.rail_forward"``,
``"combine.rail_reduce"`` and ``"combine.rail_final"``.
"""

from __future__ import annotations

import sys
import threading
import types
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

__all__ = [
    "Record", "KernelSummary", "Profiler", "profile", "is_enabled", "record",
    "record_device_buffer", "enable", "disable",
]

# ----------------------------------------------------------------------------- global state

_ENABLED: bool = False            # read by is_enabled(); True while at least one Profiler is active
_ACTIVE: List["Profiler"] = []    # active profilers, innermost last; records go to all of them
_LOCK = threading.Lock()


def is_enabled() -> bool:
    """``True`` while a profiler is collecting. A single global read: cheap enough for hot paths."""
    return _ENABLED


@dataclass(frozen=True)
class Record:
    """One kernel block (GPU) or one worker-thread slice of a kernel (CPU)."""

    kernel: str
    worker: int        # CPU: worker-thread index; GPU: block index
    start_ns: int
    end_ns: int
    bytes_moved: int
    sm_id: int = -1    # GPU: SM the block ran on; CPU: -1
    rank: int = -1     # global rank of the process that recorded it (-1: unknown)

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)

    @property
    def unit(self) -> int:
        """The execution unit: the SM id where known, else the worker index."""
        return self.sm_id if self.sm_id >= 0 else self.worker


def _current_rank() -> int:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # pragma: no cover - defensive
        pass
    return -1


def record(kernel: str, worker: int, start_ns: int, end_ns: int, bytes_moved: int,
           sm_id: int = -1, rank: Optional[int] = None) -> None:
    """Add one record to every active profiler; a no-op when profiling is off.

    ``rank``: the recording rank where the caller knows it (the virtual ranks of a loopback share
    one process); None: the rank of the process (``torch.distributed``), or -1."""
    if not _ENABLED:
        return
    active = _ACTIVE
    if not active:
        return
    rec = Record(str(kernel), int(worker), int(start_ns), int(end_ns), int(bytes_moved), int(sm_id),
                 active[-1]._rank if rank is None else int(rank))
    for p in active:
        p._records.append(rec)   # list.append is atomic under the GIL


def record_device_buffer(kernel: str, buffer: Any, bytes_moved: int = 0,
                         bytes_per_block: Optional[Sequence[int]] = None, rank: Optional[int] = None) -> None:
    """Turn a device buffer of per-block ``(sm_id, start_ns, end_ns)`` rows into records.

    ``buffer``: an integer tensor (any device) or nested sequence of shape ``[num_blocks, 3]``;
    rows whose ``end_ns`` is 0 (blocks that did not run) are skipped. Times come from the GPU's
    ``%globaltimer`` (nanoseconds; the SIMT runtime's steady clock). ``bytes_moved`` (the kernel's
    total) is split evenly over the blocks unless ``bytes_per_block`` gives each block's share.
    ``rank``: as for :func:`record`. The CUDA backend writes these buffers from
    ``csrc/cuda/profile_record.h`` (kernel names ``"dispatch.layout"``, ``"notify"``,
    ``"dispatch.node_copy"``, ``"combine.node_copy"``).
    """
    if not _ENABLED:
        return
    if hasattr(buffer, "detach"):
        rows = buffer.detach().to("cpu").tolist()
    else:
        rows = [list(r) for r in buffer]
    rows = [(i, r) for i, r in enumerate(rows) if int(r[2]) != 0]
    if not rows:
        return
    n = len(rows)
    for k, (i, r) in enumerate(rows):
        if bytes_per_block is not None:
            b = int(bytes_per_block[i])
        else:
            b = bytes_moved // n + (1 if k < bytes_moved % n else 0)
        record(kernel, i, int(r[1]), int(r[2]), b, sm_id=int(r[0]), rank=rank)


def enable() -> None:
    """Turn recording on without a profiler object (records are dropped until one is active)."""
    global _ENABLED
    _ENABLED = True


def disable() -> None:
    global _ENABLED
    _ENABLED = bool(_ACTIVE)


# ----------------------------------------------------------------------------- summaries

@dataclass
class KernelSummary:
    kernel: str
    records: int            # blocks / worker slices
    units: int              # distinct SMs (GPU) or worker threads (CPU) occupied
    ranks: int              # distinct ranks that recorded it
    busy_us: float          # sum of block durations (SM-us / worker-us)
    span_us: float          # first start to last end (per rank, max over ranks)
    bytes_moved: int
    unit_us_per_gb: float   # busy_us per GB (1e9 bytes) moved; inf when no bytes
    on_sm: bool             # True: units are SMs; False: CPU worker threads

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def summarize(records: Iterable[Record]) -> Dict[str, KernelSummary]:
    """Per-kernel summary, kernels in order of first appearance."""
    by_kernel: Dict[str, List[Record]] = {}
    for r in records:
        by_kernel.setdefault(r.kernel, []).append(r)
    out: Dict[str, KernelSummary] = {}
    for k, recs in by_kernel.items():
        busy_ns = sum(r.duration_ns for r in recs)
        nbytes = sum(r.bytes_moved for r in recs)
        per_rank: Dict[int, List[Record]] = {}
        for r in recs:
            per_rank.setdefault(r.rank, []).append(r)
        span_ns = max(max(r.end_ns for r in rs) - min(r.start_ns for r in rs) for rs in per_rank.values())
        units = {(r.rank, r.unit) for r in recs}
        out[k] = KernelSummary(
            kernel=k, records=len(recs), units=len(units), ranks=len(per_rank),
            busy_us=busy_ns / 1e3, span_us=max(0, span_ns) / 1e3, bytes_moved=nbytes,
            unit_us_per_gb=(busy_ns / 1e3) / (nbytes / 1e9) if nbytes > 0 else float("inf"),
            on_sm=any(r.sm_id >= 0 for r in recs))
    return out


def format_table(summary: Dict[str, KernelSummary]) -> str:
    if not summary:
        return "(no kernel records)"
    # The units column counts the SMs (GPU, SIMT: virtual SMs) or worker threads occupied.
    kinds = {s.on_sm for s in summary.values()}
    per_gb_head = "SM-us/GB" if kinds == {True} else "thread-us/GB" if kinds == {False} else "unit-us/GB"
    head = (f"{'kernel':<24} {'blocks':>7} {'occupied':>12} {'busy us':>11} {'span us':>10} "
            f"{'MB':>9} {per_gb_head:>12}")
    lines = [head, "-" * len(head)]
    for s in summary.values():
        per_gb = f"{s.unit_us_per_gb:12.1f}" if s.unit_us_per_gb != float("inf") else f"{'-':>12}"
        units = f"{s.units} {'SMs' if s.on_sm else 'threads'}"
        lines.append(f"{s.kernel:<24} {s.records:>7} {units:>12} {s.busy_us:>11.1f} {s.span_us:>10.1f} "
                     f"{s.bytes_moved / 1e6:>9.3f} {per_gb}")
    lines.append("(occupied: distinct SMs (per rank) on the CUDA backend, virtual SMs on SIMT, worker threads on "
                 "the CPU backend; per GB: busy SM- or thread-microseconds per 1e9 bytes moved)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the profiler

class Profiler:
    """Collects kernel records while active. Re-entrant use of several profilers is allowed:
    each active one receives every record."""

    def __init__(self) -> None:
        self._records: List[Record] = []
        self._rank = -1
        self._active = False

    # context manager -------------------------------------------------------------------
    def start(self) -> "Profiler":
        global _ENABLED
        if self._active:
            return self
        self._rank = _current_rank()
        with _LOCK:
            _ACTIVE.append(self)
            _ENABLED = True
        self._active = True
        return self

    def stop(self) -> "Profiler":
        global _ENABLED
        if not self._active:
            return self
        with _LOCK:
            if self in _ACTIVE:
                _ACTIVE.remove(self)
            _ENABLED = bool(_ACTIVE)
        self._active = False
        return self

    def __enter__(self) -> "Profiler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # results ---------------------------------------------------------------------------
    @property
    def records(self) -> List[Record]:
        return list(self._records)

    def clear(self) -> None:
        self._records.clear()

    def add(self, records: Iterable[Record]) -> None:
        """Merge records (e.g. gathered from other ranks)."""
        self._records.extend(records)

    def gather(self, group: Any = None) -> List[Record]:
        """All ranks' records (collective over ``group``); every rank gets the full list and
        this profiler holds it afterwards."""
        import torch.distributed as dist
        world = dist.get_world_size(group)
        mine = [tuple(asdict(r).values()) for r in self._records]
        allr: List[Any] = [None] * world
        dist.all_gather_object(allr, mine, group=group)
        self._records = [Record(*t) for part in allr for t in part]
        return self.records

    def summary(self, kernel_prefix: Optional[str] = None) -> Dict[str, KernelSummary]:
        recs = self._records
        if kernel_prefix:
            recs = [r for r in recs if r.kernel.startswith(kernel_prefix)]
        return summarize(recs)

    def table(self, kernel_prefix: Optional[str] = None) -> str:
        return format_table(self.summary(kernel_prefix))

    def to_json(self) -> Dict[str, Any]:
        return {"records": [asdict(r) for r in self._records],
                "summary": {k: s.as_dict() for k, s in self.summary().items()}}

    def timeline(self, path: str, title: Optional[str] = None, max_records: int = 20000) -> str:
        """Timeline PNG: execution unit (SM, or worker thread; grouped per rank) on the y axis,
        time in microseconds on the x axis, one bar per record, coloured by kernel."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch

        recs = self._records[:max_records]
        fig_h = 2.5
        if recs:
            t0 = min(r.start_ns for r in recs)
            rows = sorted({(r.rank, r.unit) for r in recs})
            row_of = {u: i for i, u in enumerate(rows)}
            kernels = list(dict.fromkeys(r.kernel for r in recs))
            cmap = plt.get_cmap("tab10")
            color = {k: cmap(i % 10) for i, k in enumerate(kernels)}
            fig_h = min(2.0 + 0.25 * len(rows), 40.0)
        fig, ax = plt.subplots(figsize=(11, fig_h))
        if recs:
            for r in recs:
                ax.barh(row_of[(r.rank, r.unit)], max(r.duration_ns, 1) / 1e3,
                        left=(r.start_ns - t0) / 1e3, height=0.8, color=color[r.kernel],
                        edgecolor="none")
            on_sm = any(r.sm_id >= 0 for r in recs)
            uname = "SM" if on_sm else "worker"
            multi_rank = len({r.rank for r in recs}) > 1
            labels = [(f"r{rk} " if multi_rank else "") + f"{uname} {u}" for rk, u in rows]
            if len(rows) <= 64:
                ax.set_yticks(range(len(rows)))
                ax.set_yticklabels(labels, fontsize=7)
            ax.set_ylabel("SM" if on_sm else "rank / worker thread")
            ax.invert_yaxis()
            # Beside the axes, not on them: inside it covered the last bars.
            ax.legend(handles=[Patch(color=color[k], label=k) for k in kernels],
                      loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, borderaxespad=0.0)
        else:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("time (us)")
        ax.set_title(title or "communication kernel timeline")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def profile() -> Profiler:
    """A new :class:`Profiler`; use as ``with profile() as prof:``."""
    return Profiler()


# Make the module itself callable, so ``with dispatch.profile() as prof:`` works as well as
# ``with dispatch.profile.profile() as prof:``.
class _CallableModule(types.ModuleType):
    def __call__(self) -> Profiler:
        return Profiler()


sys.modules[__name__].__class__ = _CallableModule
