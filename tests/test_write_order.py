"""The order of an ingest run's groups: checks and writes each take turns in landing order."""

from __future__ import annotations

import threading
import time

from tasks.write_order import check_turnstile, turnstile, write_order


def _run_groups(key: str, turns: list[int], fail_check: set[int]) -> tuple[list[int], list[int]]:
    """Threads started in the order of `turns`, each doing what an ingest_files task does with
    the gates: wait for its check turn, check, finish it; wait for its write turn, write."""
    checked: list[int] = []
    written: list[int] = []
    lock = threading.Lock()

    def group(turn: int) -> None:
        checking = check_turnstile(key)
        checking.wait(turn, timeout=10)
        try:
            with lock:
                checked.append(turn)
            time.sleep(0.02)  # a check that takes a while: a later group must not start meanwhile
            if turn in fail_check:
                raise RuntimeError("this group's check broke")
        except RuntimeError:
            turnstile(key).finish(turn, False)
            return
        finally:
            checking.finish(turn, True)
        writes = turnstile(key)
        ok = writes.wait(turn, timeout=10)
        if ok:
            with lock:
                written.append(turn)
        writes.finish(turn, ok)

    threads = [threading.Thread(target=group, args=(turn,)) for turn in turns]
    for thread in threads:
        thread.start()
        time.sleep(0.005)  # later turns reach their gates first
    for thread in threads:
        thread.join(timeout=20)
    assert not any(thread.is_alive() for thread in threads)
    return checked, written


def test_groups_check_one_at_a_time_in_landing_order_whoever_arrives_first() -> None:
    with write_order() as key:
        checked, written = _run_groups(key, [3, 2, 1, 0], fail_check=set())
    assert checked == [0, 1, 2, 3]
    assert written == [0, 1, 2, 3]


def test_a_failed_check_lets_later_groups_check_but_not_write() -> None:
    with write_order() as key:
        checked, written = _run_groups(key, [2, 1, 0], fail_check={1})
    assert checked == [0, 1, 2]  # the check turn only orders the work
    assert written == [0]  # a group after a failed one keeps its files for the next run


def test_a_task_alone_or_after_its_run_waits_for_no_check_turn() -> None:
    started = time.perf_counter()
    assert check_turnstile(None).wait(5, timeout=5)
    with write_order() as key:
        pass
    assert check_turnstile(key).wait(3, timeout=5)  # the run has ended: nothing to wait for
    assert time.perf_counter() - started < 1.0
    assert not turnstile(key).wait(0)  # but an ended run's writes let nothing through
