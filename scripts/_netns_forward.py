"""For `make demo` in network namespaces: reach a namespace's 127.0.0.1 from the host.

The web console listens on 127.0.0.1 only, and in the namespaced demo that
is the loopback of m1's namespace, which a browser on the host cannot
reach.  This forwards host 127.0.0.1:PORT to the namespace's
127.0.0.1:PORT (the same port, so the console's Host check still holds):
each outgoing connection is opened by a thread that entered the namespace
with setns(2), which moves only that thread.  Demo helper; not part of the
agent.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading

CLONE_NEWNET = 0x40000000


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class NetnsForward:
    """Forward host 127.0.0.1:port into network namespace `ns` (daemon threads)."""

    def __init__(self, ns: str, port: int) -> None:
        self.ns, self.port = ns, port
        self.listener = socket.create_server(("127.0.0.1", port))  # OSError if taken
        self._libc = ctypes.CDLL(None, use_errno=True)

    def _connect_inside(self) -> socket.socket:
        result: dict[str, object] = {}

        def run() -> None:
            try:
                fd = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
                try:
                    if self._libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns failed")
                finally:
                    os.close(fd)
                result["sock"] = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            except OSError as exc:
                result["error"] = exc

        t = threading.Thread(target=run)  # the thread ends; the socket stays in the namespace
        t.start()
        t.join()
        if "error" in result:
            raise result["error"]  # type: ignore[misc]
        sock = result["sock"]
        assert isinstance(sock, socket.socket)
        sock.settimeout(None)
        return sock

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                inside = self._connect_inside()
            except OSError:
                client.close()
                continue
            threading.Thread(target=_pump, args=(client, inside), daemon=True).start()
            threading.Thread(target=_pump, args=(inside, client), daemon=True).start()

    def start(self) -> NetnsForward:
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def close(self) -> None:
        self.listener.close()
