"""`reconciler serve` as a real process, for the tests that need one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator

TIMEOUT = 60


def clean_environ() -> dict[str, str]:
    """This process's environment without any Reconciler setting it may hold."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RECONCILER_", "PORT"))}


@contextlib.asynccontextmanager
async def serve(
    settings: dict[str, str], *, stderr: int = asyncio.subprocess.PIPE
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`python -m reconciler serve` on an ephemeral loopback port with `settings` in a clean
    environment; yields the process and its URL (from its first line); kills it if it is
    still running at the end."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "reconciler",
        "serve",
        env={**clean_environ(), "RECONCILER_PORT": "0", **settings},
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(TIMEOUT):
            line = (await process.stdout.readline()).decode()
        assert "listening on http://127.0.0.1:" in line, line
        yield process, line.rsplit(" ", 1)[1].strip()
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
