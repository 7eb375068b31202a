"""The dynamic batcher: waits for images that are on their way, never for ones that are not."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serve.batcher import Batcher


def run_batch(pixels: np.ndarray, with_features: bool) -> tuple[np.ndarray, None]:
    return pixels.reshape(len(pixels), -1).sum(axis=1, keepdims=True).astype(np.float32), None


def test_a_lone_image_is_not_held_for_company():
    async def scenario() -> list[int]:
        sizes: list[int] = []
        batcher = Batcher(run_batch, max_batch=8, max_wait_ms=600_000, on_batch=sizes.append)  # ten minutes
        batcher.start()
        try:  # were it held for max_wait_ms, this would time out
            probabilities, _, _ = await asyncio.wait_for(batcher.submit(np.full((2, 2, 3), 1, np.uint8)), 30)
        finally:
            await batcher.stop()
        assert probabilities[0] == 12
        return sizes

    assert asyncio.run(scenario()) == [1]


def test_images_being_decoded_join_the_batch_they_are_waited_for():
    async def scenario() -> list[int]:
        sizes: list[int] = []
        batcher = Batcher(run_batch, max_batch=8, max_wait_ms=600_000, on_batch=sizes.append)
        batcher.start()
        try:
            decoded = asyncio.Event()

            async def slow_request() -> float:
                with batcher.coming():  # announced, still decoding
                    await decoded.wait()
                return float((await batcher.submit(np.full((2, 2, 3), 2, np.uint8)))[0][0])

            slow = asyncio.create_task(slow_request())
            await asyncio.sleep(0)  # the slow request has announced itself
            fast = asyncio.create_task(batcher.submit(np.full((2, 2, 3), 1, np.uint8)))
            await asyncio.sleep(0.05)
            assert not fast.done()  # the batch waits: another image is on its way
            decoded.set()
            first, second = await asyncio.wait_for(asyncio.gather(fast, slow), 30)
        finally:
            await batcher.stop()
        assert first[0][0] == 12 and second == 24
        return sizes

    assert asyncio.run(scenario()) == [2]


def test_several_workers_run_batches_at_once():
    async def scenario() -> int:
        running, most = 0, 0
        release = asyncio.Event()
        loop = asyncio.get_running_loop()

        def blocking_batch(pixels: np.ndarray, with_features: bool) -> tuple[np.ndarray, None]:
            nonlocal running, most
            running += 1
            most = max(most, running)
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(30)
            running -= 1
            return run_batch(pixels, with_features)

        batcher = Batcher(blocking_batch, max_batch=1, max_wait_ms=0, workers=2)
        batcher.start()
        try:
            tasks = [asyncio.create_task(batcher.submit(np.zeros((2, 2, 3), np.uint8))) for _ in range(2)]
            for _ in range(300):  # until both workers are inside a batch
                if most == 2:
                    break
                await asyncio.sleep(0.01)
            release.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
        finally:
            await batcher.stop()
        return most

    assert asyncio.run(scenario()) == 2


@pytest.mark.parametrize("settings", [{"workers": 0}, {"max_batch": 0}, {"max_queue": 0}])
def test_settings_that_would_never_answer_or_never_refuse_are_refused(settings):
    with pytest.raises(ValueError, match="must be at least 1"):
        Batcher(run_batch, **settings)
