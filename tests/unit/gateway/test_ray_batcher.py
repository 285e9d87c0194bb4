"""The cross-request batching inside the Ray model actors, without Ray: requests that wait together run together."""

from __future__ import annotations

import asyncio

import pytest

from gateway.ray_engine import RaySettings, _Batcher


def test_waiting_requests_are_run_as_one_batch_and_split_back():
    calls: list[list[int]] = []

    def model(items: list[int]) -> list[int]:
        calls.append(list(items))
        return [x * 10 for x in items]

    async def main() -> list[list[int]]:
        batcher = _Batcher(model, max_items=8, wait_s=0.01)
        return await asyncio.gather(batcher.submit([1, 2, 3]), batcher.submit([4]), batcher.submit([5, 6]))

    results = asyncio.run(main())
    assert results == [[10, 20, 30], [40], [50, 60]]
    assert calls == [[1, 2, 3, 4, 5, 6]]


def test_a_batch_never_exceeds_the_limit_but_keeps_requests_whole():
    calls: list[int] = []

    def model(items: list[int]) -> list[int]:
        calls.append(len(items))
        return items

    async def main() -> list[list[int]]:
        batcher = _Batcher(model, max_items=4, wait_s=0.01)
        return await asyncio.gather(*(batcher.submit([i, i]) for i in range(5)))

    results = asyncio.run(main())
    assert results == [[i, i] for i in range(5)]
    assert calls == [4, 4, 2]


def test_a_model_error_reaches_every_caller_of_its_batch_and_the_next_batch_runs():
    def model(items: list[int]) -> list[int]:
        if 0 in items:
            raise ValueError("bad frame")
        return items

    async def main() -> tuple[list[object], list[int]]:
        batcher = _Batcher(model, max_items=8, wait_s=0.01)
        first = await asyncio.gather(batcher.submit([0]), batcher.submit([1]), return_exceptions=True)
        return list(first), await batcher.submit([2])

    first, second = asyncio.run(main())
    assert all(isinstance(r, ValueError) for r in first)
    assert second == [2]


def test_settings_refuse_unknown_keys():
    with pytest.raises(ValueError, match="extra"):
        RaySettings.model_validate({"detector_replica": 2})
