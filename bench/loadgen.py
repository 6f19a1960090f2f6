"""``python -m bench.loadgen SOCKET REPO IMAGE DURATION``: one keep-alive client calling
getImageStatus in a loop.

It connects, makes one call, prints ``ready``, waits for a start time (time.monotonic(), the
same clock in every process) on stdin, calls for DURATION seconds from then and prints a JSON
list of call latencies in seconds.
"""

from __future__ import annotations

import json
import sys
import time

from rpc import transport


def main(argv: list[str]) -> int:
    sock, repo, image, duration = argv[0], argv[1], argv[2], float(argv[3])
    client = transport.Client(socket_path=sock, timeout=60.0)
    client.call("getImageStatus", repo, image)
    print("ready", flush=True)
    start = float(sys.stdin.readline())
    end = start + duration
    while (now := time.monotonic()) < start:
        time.sleep(min(0.01, start - now))
    latencies = []
    while True:
        t0 = time.monotonic()
        if t0 >= end:
            break
        client.call("getImageStatus", repo, image)
        latencies.append(time.monotonic() - t0)
    client.close()
    print(json.dumps(latencies), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
