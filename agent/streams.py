"""Copying between two byte streams, for every relay podtwin has (agent, sidecar, runner)."""
from __future__ import annotations

import asyncio

import asyncssh

CHUNK = 256 * 1024


async def pump(reader, writer) -> None:
    """Copy until EOF, then half-close the other side; on an error, close it."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncssh.Error):
        writer.close()


async def splice(a_reader, a_writer, b_reader, b_writer) -> None:
    """Both directions until both are done, then close both ends."""
    try:
        await asyncio.gather(pump(a_reader, b_writer), pump(b_reader, a_writer))
    finally:
        a_writer.close()
        b_writer.close()
