"""The bus's NATS client remembers parsed header blocks (esperd.bus.HeaderCachingClient)."""

from __future__ import annotations

from esperd.bus import HeaderCachingClient

JSON_BLOCK = b"NATS/1.0\r\nContent-Type: application/json\r\n\r\n"
MSGPACK_BLOCK = b"NATS/1.0\r\nContent-Type: application/msgpack\r\nX-Trace: 7\r\n\r\n"


async def test_a_known_block_parses_to_an_equal_fresh_dict_each_time() -> None:
    client = HeaderCachingClient()
    first = await client._process_headers(JSON_BLOCK)
    first["Content-Type"] = "changed by a handler"  # handlers may change their message's headers
    second = await client._process_headers(JSON_BLOCK)
    third = await client._process_headers(JSON_BLOCK)
    assert second == third == {"Content-Type": "application/json"}
    assert second is not third
    assert await client._process_headers(MSGPACK_BLOCK) == {
        "Content-Type": "application/msgpack",
        "X-Trace": "7",
    }
    assert await client._process_headers(None) is None and await client._process_headers(b"") is None


async def test_blocks_beyond_the_cache_are_still_parsed() -> None:
    client = HeaderCachingClient()
    blocks = [f"NATS/1.0\r\nNats-Msg-Id: {k}\r\n\r\n".encode() for k in range(client.HEADER_CACHE_SIZE + 50)]
    for k, block in enumerate(blocks):
        assert await client._process_headers(block) == {"Nats-Msg-Id": str(k)}
    assert len(client._parsed_headers) == client.HEADER_CACHE_SIZE  # bounded: unique ids do not grow it
    assert await client._process_headers(blocks[-1]) == {"Nats-Msg-Id": str(len(blocks) - 1)}
