"""A huge answer is encoded off the event loop: while it is, other clients' calls are answered.

In-process, on the real dispatcher, the real Api (Engine) and a real gevent thread pool: a
listImages page of many images is produced on a thread like any repository call, then its
answer (tens of MB) encoded; meanwhile a second "client" greenlet keeps calling
getImageStatus, which runs on the hub itself (Api.runs_inline). Were the answer encoded on the
hub, that greenlet could not run until it was done.
"""

from __future__ import annotations

import json
from typing import Any

import gevent
import gevent.threadpool

from rpc import dispatch, encoding
from tests import qemu
from tests.conftest import Engine


def body(method: str, *params: Any, rid: int = 1) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "method": method, "params": list(params),
                       "id": rid}).encode()


def test_other_calls_are_answered_while_a_huge_answer_is_encoded(engine: Engine) -> None:
    disk = engine.call("createVirtualDisk", "r1", 64 * qemu.MiB)
    engine.settle("r1", disk)
    pool = gevent.threadpool.ThreadPool(2)
    try:
        d = dispatch.Dispatcher(engine.api, lambda _m, fn, **kw: pool.spawn(fn, **kw).get(),
                                max_response_bytes=1 << 30)
        # A controlled huge answer: what a listImages of 8,000 images with a few hundred
        # values of userData each would answer (~16 MB; encoding it takes a while).
        row = {**engine.call("listImages", "r1")[0],
               "userData": {"vm": "web", "disks": [[i, str(i), i / 3] for i in range(200)]}}
        huge = {"jsonrpc": "2.0", "result": [dict(row, n=n) for n in range(8_000)], "id": 7}
        assert not encoding.small(huge)

        answered: list[dict[str, Any]] = []
        encoder = gevent.spawn(d._encode_answer, huge, 1 << 30)

        def other_client() -> None:
            while not encoder.ready():
                chunks = d.handle(body("getImageStatus", "r1", disk, rid=len(answered)))
                assert chunks is not None
                answered.append(json.loads(b"".join(chunks)))
                gevent.sleep(0.001)

        gevent.joinall([encoder, gevent.spawn(other_client)], raise_error=True)
        chunks, fits = encoder.get()
        assert fits and b"".join(chunks) == encoding.encode(huge)
        # Answered while the encoding went on, each exact.
        assert len(answered) >= 10, len(answered)
        assert all(a["result"]["status"] == "optimized" and a["id"] == i
                   for i, a in enumerate(answered))
    finally:
        pool.kill()
