"""``python -m bench.refserver SOCKET``: the bare reference for getImageStatus.

gevent's pywsgi on a gevent Unix listening socket, and jsonrpcserver dispatching to a method
that returns a constant status of the same shape as the agent's: no thread pool, no
validation against the API document, no files read, no logging. What the agent's RPC layer
would cost if it did nothing else.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterable
from typing import Any

import gevent.pywsgi
import gevent.socket
import jsonrpcserver

STATUS = {
    "imageId": "00000000-0000-4000-8000-000000000000",
    "status": "optimized",
    "hostID": 1,
    "stage": "2/2",
    "percent_complete": 100,
    "last_error": None,
    "operation": None,
    "running": False,
}


def getImageStatus(repositoryId: str, imageId: str) -> Any:  # noqa: N802 - the API's name
    return jsonrpcserver.Success(STATUS)


METHODS = {"getImageStatus": getImageStatus}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = environ["wsgi.input"].read()
    answer = jsonrpcserver.dispatch(body.decode(), methods=METHODS).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(answer)))])
    return [answer]


def main(argv: list[str]) -> int:
    path = argv[0]
    if os.path.exists(path):
        os.unlink(path)
    listener = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(128)
    gevent.pywsgi.WSGIServer(listener, app, log=None).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
