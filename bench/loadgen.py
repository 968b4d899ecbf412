"""A lean load generator: many connections, one epoll loop, pre-encoded requests.

A load generator written with the full client would spend more CPU than the daemon it
measures (they share two cores here), and its own queueing would show up as the
daemon's latency.  This one encodes one request frame up front and, for replies, only
reads frame lengths.
"""

import select
import socket
import struct
import time

from daemon.wire import protocol as p

_LEN = struct.Struct(">I")


def _handshake(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    conn = p.Connection(p.Role.CLIENT)
    s.sendall(conn.send(p.Hello()))
    while True:
        conn.receive_data(s.recv(65536))
        if isinstance(conn.next_event(), p.Welcome):
            break
    s.setblocking(False)
    return s


def run_load(
    path: str, op: str, args: dict, connected: int, active: int, per_client: int
) -> list[float]:
    """Latencies of `per_client` sequential requests on each of `active` connections,
    with `connected - active` more connections open and idle."""
    request = p.Connection(p.Role.CLIENT).send(p.Request(1, op, args))
    socks = [_handshake(path) for _ in range(connected)]
    ep = select.epoll()
    state: dict[int, list] = {}
    for s in socks[:active]:
        # fd -> [socket, bytes buffered, requests left, send time]
        state[s.fileno()] = [s, b"", per_client, 0.0]
        ep.register(s.fileno(), select.EPOLLIN)
    latencies: list[float] = []
    for st in state.values():
        st[3] = time.perf_counter()
        st[0].send(request)
    live = len(state)
    while live:
        for fd, _ in ep.poll():
            st = state[fd]
            st[1] += st[0].recv(65536)
            while len(st[1]) >= 4:
                (n,) = _LEN.unpack_from(st[1])
                if len(st[1]) < 4 + n:
                    break
                st[1] = st[1][4 + n :]
                now = time.perf_counter()
                latencies.append(now - st[3])
                st[2] -= 1
                if st[2]:
                    st[3] = now
                    st[0].send(request)
                else:
                    ep.unregister(fd)
                    live -= 1
    ep.close()
    for s in socks:
        s.close()
    return latencies
