"""Redis link: the outage switch really cuts the connection, and the health it reports follows."""

import pytest

import source


async def test_the_outage_switch_cuts_and_restores_with_health_updated_at_once(sandbox):
    link = sandbox.redis
    assert await link.switch_outage(cut=True) is False
    assert link.cut_off and link.health.degraded
    with pytest.raises(source.REDIS_ERRORS):
        await link.client.get(link.key("anything"))

    assert await link.switch_outage(cut=False) is True
    assert not link.cut_off and not link.health.degraded
    await link.client.set(link.key("k"), "v")
    assert await link.client.get(link.key("k")) == "v"


async def test_an_outage_in_one_sandbox_leaves_another_connected(registry):
    first = await registry.acquire(source.new_sandbox_id())
    second = await registry.acquire(source.new_sandbox_id())
    await first.redis.switch_outage(cut=True)
    assert await second.redis.check() is True
    assert not second.redis.health.degraded
