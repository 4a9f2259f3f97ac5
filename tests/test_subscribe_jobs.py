"""SubscribeBatch: which calls a batch of one client's subscribes takes, and that one
filter's failure does not cost the others theirs."""

from __future__ import annotations

import pytest

from exhook.subscribe_jobs import BYTES_PER_JOB, FILTERS_PER_JOB, SubscribeBatch


async def nothing(topic: str, qos: int) -> None:
    return None


def test_a_batch_takes_calls_of_its_connection_and_connect_up_to_its_bounds() -> None:
    batch = SubscribeBatch("c", "c@n:1", 7, nothing)
    assert batch.take("c@n:1", 7, "t/0", 1)
    assert not batch.take("c@n:2", 7, "t/x", 1)  # another connection
    assert not batch.take("c@n:1", 8, "t/x", 1)  # a later connect
    assert all(batch.take("c@n:1", 7, f"t/{i}", 1) for i in range(1, FILTERS_PER_JOB))
    assert not batch.take("c@n:1", 7, "t/full", 1)
    long = SubscribeBatch("c", "c@n:1", 7, nothing)
    assert long.take("c@n:1", 7, "x" * (BYTES_PER_JOB + 5), 1)  # alone, a long filter still fits
    assert not long.take("c@n:1", 7, "t/a", 1)


async def test_one_filter_that_fails_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    done: list[str] = []

    async def run(topic: str, qos: int) -> None:
        if topic == "t/bad":
            raise RuntimeError("store refused it")
        done.append(topic)

    batch = SubscribeBatch("c", "c@n:1", 1, run)
    for topic in ("t/a", "t/bad", "t/b"):
        batch.take("c@n:1", 1, topic, 1)
    await batch()
    assert done == ["t/a", "t/b"]
    assert [r.getMessage() for r in caplog.records] == ["client job failed: RuntimeError: store refused it"]
