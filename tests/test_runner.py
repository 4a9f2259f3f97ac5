"""The service process's entry (``exhook.runner.serve``): what it does around the
service's own start and stop."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from pathlib import Path

from exhook.config import load_config_string
from exhook.runner import serve
from tests.e2e.harness import free_port
from tests.service_proc import eventually


async def test_serve_freezes_the_heap_start_up_made_then_stops_on_sigterm(tmp_path: Path) -> None:
    # gen-2 passes over start-up's objects held the loop 20-33 ms each under load (runner.py)
    gc.unfreeze()
    cfg = load_config_string(
        f'exhook {{ listen = "127.0.0.1:{free_port()}", workers = 1, http {{ listen = "127.0.0.1:{free_port()}" }}, '
        f'spool.path = "{tmp_path}/spool.sqlite3" }}\n'
        f'sqlite {{ enable = true, path = "{tmp_path}/db.sqlite3", topics = ["t/#"] }}\n')
    assert gc.get_freeze_count() == 0
    served = asyncio.create_task(serve(cfg))
    try:
        await eventually(lambda: gc.get_freeze_count() > 0 or served.done(), 30, "the heap frozen after start-up")
        assert not served.done()
        # everything alive then, the test process's own objects included
        assert gc.get_freeze_count() > 10_000
    finally:
        if not served.done():
            os.kill(os.getpid(), signal.SIGTERM)  # serve's own handler: a clean stop
        assert await asyncio.wait_for(served, 30) == 0
        gc.unfreeze()
