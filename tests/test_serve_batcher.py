"""MicroBatcher: concurrent images share forward passes; a lone image does not wait."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from resnetlab.serve.batcher import MicroBatcher


def _fn(calls: list[int]):
    def forward(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])  # batch size of each forward pass
        return x.float().flatten(1).sum(dim=1, keepdim=True)  # [n, 1]: a per-image answer

    return forward


def test_announced_images_share_one_batch_and_answers_stay_in_order() -> None:
    calls: list[int] = []

    async def main() -> list[float]:
        b = MicroBatcher(_fn(calls), ThreadPoolExecutor(1), max_batch=8, max_wait_s=5.0)
        b.start()
        b.announce(5)  # five images are being decoded: worth waiting for
        xs = [torch.full((1, 2, 2), i, dtype=torch.uint8) for i in range(5)]
        out = await asyncio.gather(*(b.predict(x) for x in xs))
        await b.stop()
        assert [n for _, n in out] == [5] * 5  # each answer says it ran in a batch of 5
        return [float(p[0]) for p, _ in out]

    assert asyncio.run(main()) == [0.0, 4.0, 8.0, 12.0, 16.0]  # image i sums to 4 * i
    assert calls == [5]


def test_lone_image_does_not_wait_and_max_batch_splits() -> None:
    calls: list[int] = []

    async def main() -> float:
        b = MicroBatcher(_fn(calls), ThreadPoolExecutor(1), max_batch=3, max_wait_s=30.0)
        b.start()
        t0 = time.perf_counter()
        await b.predict(torch.zeros(1, 2, 2, dtype=torch.uint8))  # nobody announced: no 30 s wait
        lone = time.perf_counter() - t0
        b.announce(7)
        await asyncio.gather(*(b.predict(torch.zeros(1, 2, 2, dtype=torch.uint8)) for _ in range(7)))
        await b.stop()
        return lone

    assert asyncio.run(main()) < 10.0  # far below max_wait_s, even on a loaded machine
    assert calls == [1, 3, 3, 1]  # at most max_batch per pass


def test_a_failing_forward_fails_its_requests_only() -> None:
    def broken(x: torch.Tensor) -> torch.Tensor:
        if int(x.max()) == 9:
            raise RuntimeError("bad batch")
        return x.float().flatten(1)

    async def main() -> tuple[str, float]:
        b = MicroBatcher(broken, ThreadPoolExecutor(1), max_batch=4, max_wait_s=0.0)
        b.start()
        try:
            await b.predict(torch.full((1, 1, 1), 9, dtype=torch.uint8))
            err = ""
        except RuntimeError as e:
            err = str(e)
        ok, _ = await b.predict(torch.full((1, 1, 1), 3, dtype=torch.uint8))
        await b.stop()
        return err, float(ok[0])

    assert asyncio.run(main()) == ("bad batch", 3.0)


def test_observer_sees_each_batch_size_and_queue_waits() -> None:
    seen: list[tuple[int, int, bool]] = []

    async def main() -> None:
        b = MicroBatcher(_fn([]), ThreadPoolExecutor(1), max_batch=4, max_wait_s=5.0,
                         on_batch=lambda n, waits, s: seen.append((n, len(waits), min(waits) >= 0 <= s)))
        b.start()
        b.announce(6)
        await asyncio.gather(*(b.predict(torch.zeros(1, 2, 2)) for _ in range(6)))
        await b.stop()

    asyncio.run(main())
    assert seen == [(4, 4, True), (2, 2, True)]  # one wait per image, sizes capped at max_batch
