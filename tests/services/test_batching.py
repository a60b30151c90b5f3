"""services/batching.py: BentoML's CorkDispatcher is where it was, takes what we pass, and batches."""

from __future__ import annotations

import asyncio

import pytest

from services.batching import DispatcherMoved, batched, check_dispatcher


def test_the_installed_bentoml_still_has_the_dispatcher() -> None:
    try:
        check_dispatcher()
    except DispatcherMoved as exc:
        pytest.fail(str(exc))  # "BentoML moved CorkDispatcher: ..." names the version and what changed


def test_concurrent_jobs_share_batches_and_get_their_own_answers() -> None:
    sizes = []

    def double(jobs):
        sizes.append(len(jobs))
        return [2 * job for job in jobs]

    async def main():
        submit = batched(double, max_latency_ms=5000, max_batch_size=8, fallback=lambda: None)
        return await asyncio.gather(*(submit(i) for i in range(32)))

    assert asyncio.run(main()) == [2 * i for i in range(32)]
    assert max(sizes) > 1 and max(sizes) <= 8


def test_a_moved_dispatcher_is_one_clear_error(monkeypatch) -> None:
    import services.batching as batching

    monkeypatch.setattr(batching, "DISPATCHER_MODULE", "bentoml._internal.marshal.nowhere")
    with pytest.raises(DispatcherMoved, match="BentoML moved CorkDispatcher: .*nowhere"):
        check_dispatcher()
