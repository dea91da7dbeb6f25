"""The shared table across real forked processes: one exact count, and no slot wedged by a dead worker."""
from __future__ import annotations

import os
import signal
import time

from fastgate._core.ratelimit import Limiter
from fastgate._core.shm import SharedTable

S = 1_000_000_000
WORKERS = 4


def _in_children(n: int, body) -> list[int]:
    """Run body(i) -> int in n forked children at once; their results, via pipes."""
    go_r, go_w = os.pipe()
    kids = []
    for i in range(n):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                os.close(r)
                os.read(go_r, 1)  # start together
                os.write(w, str(body(i)).encode())
            except BaseException:  # noqa: BLE001
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        kids.append((pid, r))
    os.write(go_w, b"x" * n)
    out = []
    for pid, r in kids:
        data = b""
        while chunk := os.read(r, 64):
            data += chunk
        os.close(r)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        out.append(int(data))
    os.close(go_r)
    os.close(go_w)
    return out


def test_gcra_exactly_the_burst_passes_across_processes():
    table = SharedTable(1024)
    lim = Limiter(table)
    burst = 1000

    def hammer(_):
        return sum(lim.gcra(b"hot", 1.0, 3600 * S, burst)[0] for _ in range(2000))

    got = _in_children(WORKERS, hammer)
    assert sum(got) == burst
    assert not lim.gcra(b"hot", 1.0, 3600 * S, burst)[0]  # the parent sees the same count


def test_windows_and_counters_are_exact_across_processes():
    table = SharedTable(1024)
    lim = Limiter(table)

    def hammer(_):
        n = 0
        for _ in range(1500):
            n += lim.sliding_window(b"sw", 500, 3600 * S)[0]
            n += 1000 * lim.fixed_window(b"fw", 300, 7, 3600 * S)[0]
            table.add(b"total", 1)
        return n

    got = _in_children(WORKERS, hammer)
    assert sum(g % 1000 for g in got) == 500
    assert sum(g // 1000 for g in got) == 300
    assert table.get(b"total") == WORKERS * 1500


def test_concurrency_places_are_never_over_given():
    table = SharedTable(1024)
    lim = Limiter(table)

    def hammer(_):
        over = 0
        for _ in range(3000):
            taken, in_use = lim.acquire(b"conc", 3, 60 * S)
            if taken:
                over += in_use > 3
                lim.release(b"conc")
        return over

    assert _in_children(WORKERS, hammer) == [0] * WORKERS
    assert lim.release(b"conc") == 0  # every place went back


def test_a_lock_left_by_a_killed_process_is_taken_over():
    table = SharedTable(64)
    lim = Limiter(table)
    pid = os.fork()
    if pid == 0:
        table._hold(b"k")  # dies holding the slot's lock
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    start = time.monotonic()
    child = os.fork()
    if child == 0:  # decide in a child so a wedged lock cannot hang the test process itself
        os._exit(0 if lim.gcra(b"k", 1.0, S, 5)[0] else 3)
    while True:
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            break
        if time.monotonic() - start > 30:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            raise AssertionError("the slot stayed locked after its owner died")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0


def test_counts_made_before_a_fork_are_seen_by_later_processes():
    """What a reload does: new workers fork from the supervisor that holds the table."""
    table = SharedTable(64)
    lim = Limiter(table)
    assert _in_children(2, lambda _: sum(lim.gcra(b"g", 1.0, 3600 * S, 10)[0] for _ in range(4))) == [4, 4]
    assert _in_children(1, lambda _: sum(lim.gcra(b"g", 1.0, 3600 * S, 10)[0] for _ in range(4))) == [2]


def test_shared_array_adds_are_exact_across_processes():
    from fastgate._core.shm import SharedArray

    arr = SharedArray(8)

    def hammer(i):
        for _ in range(5000):
            arr.add(3, 1)
            arr.add(i, 2)
        return 0

    _in_children(WORKERS, hammer)
    assert arr.get(3) == WORKERS * 5000 + 2 * 5000  # child 3 also added its own 2s to slot 3
    assert [arr.get(i) for i in (0, 1, 2)] == [10000] * 3
    for bad in (-1, 8):
        try:
            arr.add(bad, 1)
        except IndexError:
            pass
        else:
            raise AssertionError(f"index {bad} was accepted")
