"""The engine's per-request channel: items in order, one wake-up per batch, and quiet puts that wake nobody."""

from __future__ import annotations

import asyncio

from pagedserve.control_plane.relay.item_channel import ItemChannel


def test_a_consumer_that_fell_behind_takes_every_waiting_item_in_order_at_once() -> None:
    async def scenario() -> list[list[int]]:
        channel: ItemChannel[int] = ItemChannel()
        for item in range(3):
            channel.put(item)
        first = await channel.take_all()
        channel.put(3)
        return [first, await channel.take_all()]

    assert asyncio.run(scenario()) == [[0, 1, 2], [3]]


def test_quiet_puts_leave_the_consumer_asleep_until_a_waking_put() -> None:
    async def scenario() -> tuple[bool, list[int]]:
        channel: ItemChannel[int] = ItemChannel()
        consumer = asyncio.create_task(channel.take_all())
        await asyncio.sleep(0)
        channel.put(1, wake=False)
        channel.put(2, wake=False)
        for _ in range(5):
            await asyncio.sleep(0)
        asleep = not consumer.done()
        channel.put(3)
        return asleep, await consumer

    assert asyncio.run(scenario()) == (True, [1, 2, 3])


def test_closing_wakes_the_consumer_which_takes_what_is_left_then_an_empty_list() -> None:
    async def scenario() -> list[list[int]]:
        channel: ItemChannel[int] = ItemChannel()
        consumer = asyncio.create_task(channel.take_all())
        await asyncio.sleep(0)
        channel.close()
        woken = await consumer
        channel_with_items: ItemChannel[int] = ItemChannel()
        channel_with_items.put(1, wake=False)
        channel_with_items.close()
        return [woken, await channel_with_items.take_all(), await channel_with_items.take_all()]

    assert asyncio.run(scenario()) == [[], [1], []]
