"""Two real hosts, emulated: Linux network namespaces joined by a veth pair, each with its own
host name (UTS namespace) and its own /dev/shm (mount namespace), two ranks per host, gloo over
real TCP between test-only private addresses. Without LOCAL_WORLD_SIZE the Buffer groups ranks
by host name, and dispatch + combine are bit-exact. When the link between the hosts is cut
mid-loop, every rank raises naming a rank across the cut, and every process exits.

Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN); skipped, saying so, where namespaces cannot be made.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.cluster import REPO_ROOT

WORKER = os.path.join(REPO_ROOT, "tests", "netns_worker.py")
SUBNET = "10.212.{}.{}"  # test-only, inside the namespaces this test creates
TIMEOUT_S = 10.0  # netns_worker.TIMEOUT_S


def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True)


class Hosts:
    """Two namespaces ``a``/``b`` with a veth pair between them; removed on close."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.ns = [f"dsp{tag}a", f"dsp{tag}b"]
        self.veth = [f"dsp{tag}va", f"dsp{tag}vb"]
        self.addr = [SUBNET.format(os.getpid() % 200 + 1, 1), SUBNET.format(os.getpid() % 200 + 1, 2)]
        self.procs: list = []

    def up(self) -> None:
        for ns in self.ns:
            self._run("ip", "netns", "add", ns)
        self._run("ip", "link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        for ns, veth, addr in zip(self.ns, self.veth, self.addr):
            self._run("ip", "link", "set", veth, "netns", ns)
            self._run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", veth)
            self._run("ip", "netns", "exec", ns, "ip", "link", "set", veth, "up")
            self._run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

    @staticmethod
    def _run(*cmd: str) -> None:
        proc = _sh(*cmd)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")

    def launch(self, host: int, ranks: list, env: dict) -> subprocess.Popen:
        """Starts ``ranks`` on host ``host``, in their own UTS and mount namespaces."""
        starts = " ".join(f"RANK={r} {sys.executable} {WORKER} &" for r in ranks)
        script = (f"hostname dsp-host-{host} && mount -t tmpfs -o size=512m tmpfs /dev/shm && "
                  f"{starts} wait")
        env = dict(env, GLOO_SOCKET_IFNAME=self.veth[host])
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns[host], "unshare", "--uts", "--mount",
                                 "--propagation", "private", "bash", "-c", script],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def cut(self) -> None:
        """Takes host b's end of the link down: host a keeps its address (the store's)."""
        self._run("ip", "netns", "exec", self.ns[1], "ip", "link", "set", self.veth[1], "down")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for ns in self.ns:
            _sh("ip", "netns", "del", ns)


def _can_make_namespaces() -> str:
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "needs the ip and unshare commands"
    probe = f"dspprobe{os.getpid()}"
    proc = _sh("ip", "netns", "add", probe)
    if proc.returncode:
        return f"cannot create network namespaces here ({proc.stderr.strip()})"
    _sh("ip", "netns", "del", probe)
    return ""


@pytest.fixture
def hosts():
    reason = _can_make_namespaces()
    if reason:
        pytest.skip(reason)
    h = Hosts()
    try:
        h.up()
        yield h
    finally:
        h.close()


def _run_hosts(hosts: Hosts, extra_env: dict, ready_dir: str = "", timeout_s: float = 240.0):
    """Runs ranks 0-1 on host a and 2-3 on host b. With ``ready_dir``, cuts the link once every
    rank has created its file there (after its exact rounds); returns (exit code, stdout,
    stderr, seconds from the cut to the host's exit) per host."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_WORLD_SIZE", "LOCAL_RANK")}
    env.update(WORLD_SIZE="4", MASTER_ADDR=hosts.addr[0], MASTER_PORT="29512", OMP_NUM_THREADS="1", **extra_env)
    if ready_dir:
        env["READY_DIR"] = ready_dir
    procs = [hosts.launch(0, [0, 1], env), hosts.launch(1, [2, 3], env)]
    deadline = time.monotonic() + timeout_s
    cut_at = None
    if ready_dir:
        while len(os.listdir(ready_dir)) < 4 and time.monotonic() < deadline:
            if any(proc.poll() is not None for proc in procs):
                break  # a host failed before the cut: its output says why
            time.sleep(0.05)
        if len(os.listdir(ready_dir)) == 4:
            hosts.cut()
            cut_at = time.monotonic()
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        out.append((proc.returncode, stdout, stderr, None if cut_at is None else time.monotonic() - cut_at))
    return out


def _lines(out, word):
    found = {}
    for _, stdout, _, _ in out:
        for line in stdout.splitlines():
            m = re.match(rf"R(\d+) {word}(?: (.*))?$", line)
            if m:
                found[int(m.group(1))] = m.group(2)
    return found


def _detail(out) -> str:
    return "\n".join(f"host {i}: rc={rc}\n{so}\n{se[-1500:]}" for i, (rc, so, se, _) in enumerate(out))


def test_two_hosts_exact_and_grouped_by_host_name(hosts):
    out = _run_hosts(hosts, {"ROUNDS": "3"})
    detail = _detail(out)
    assert all(rc == 0 for rc, _, _, _ in out), detail
    assert _lines(out, "NODES") == {r: "2" for r in range(4)}, detail
    assert _lines(out, "EXACT") == {r: "3" for r in range(4)}, detail


def test_link_cut_every_rank_raises_naming_a_rank_across_the_cut(hosts, tmp_path):
    """The link between the hosts goes down mid-loop (no reset reaches either side): every rank
    raises PeerTimeoutError within its timeout plus the grace a live peer gets, naming a rank on
    the other host, destroy() returns, and every process exits 0 (none is left behind)."""
    out = _run_hosts(hosts, {"ROUNDS": "2", "KEEP_GOING": "1"}, ready_dir=str(tmp_path), timeout_s=300.0)
    detail = _detail(out)
    assert all(seconds is not None for *_, seconds in out), f"no cut: a host exited first\n{detail}"
    assert all(rc == 0 for rc, _, _, _ in out), detail
    blamed = _lines(out, "BLAMED")
    assert sorted(blamed) == [0, 1, 2, 3], detail
    for rank, line in blamed.items():
        culprit, seconds = int(line.split()[0]), float(line.split()[1])
        other_host = (2, 3) if rank < 2 else (0, 1)
        assert culprit in other_host, f"rank {rank} blamed {culprit}\n{detail}"
        # notify waits 1.25 x timeout + 1 s, a live peer gets half a timeout more
        assert seconds < 2.5 * TIMEOUT_S, f"rank {rank} raised {seconds} s after its last good call\n{detail}"
    assert sorted(_lines(out, "EXITING")) == [0, 1, 2, 3], detail
    for _, _, _, seconds in out:
        assert seconds < 4 * TIMEOUT_S, detail
