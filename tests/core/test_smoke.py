from registry import ClientType, Registry


async def test_add_flush_reopen_keeps_history(database_url: str) -> None:
    async with Registry(database_url) as reg:
        reg.add_client("d1", "windows", object(), ClientType.DEVICE, {"k": 1})
        await reg.flush()
        page = await reg.history.connections("d1")
        assert [row.client_id for row in page.items] == ["d1"]
        assert page.items[0].disconnected_at is None
    async with Registry(database_url) as reg:
        page = await reg.history.connections("d1")
        assert page.items[0].close_reason == "server_shutdown"
