"""A minimal authoritative DNS responder on loopback: A records for one name, as a headless Service returns them.

gRPC's c-ares resolver takes the DNS server from the target's authority (`dns://127.0.0.1:PORT/name:port`),
so a test can resolve a name to several loopback addresses without touching /etc/hosts.
"""

from __future__ import annotations

import socket
import struct
import threading


class FakeDNS:
    def __init__(self, name: str, addresses: list[str]) -> None:
        self.name = name.lower().rstrip(".")
        self.addresses = addresses
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.queries = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(512)
            except OSError:
                return
            reply = self._answer(data)
            if reply:
                self.sock.sendto(reply, peer)

    def _answer(self, query: bytes) -> bytes | None:
        if len(query) < 12:
            return None
        ident, _flags, qdcount = struct.unpack(">HHH", query[:6])
        pos, labels = 12, []
        while pos < len(query) and query[pos]:
            n = query[pos]
            labels.append(query[pos + 1 : pos + 1 + n].decode("ascii", "replace"))
            pos += 1 + n
        question_end = pos + 5  # zero byte, QTYPE, QCLASS
        if qdcount != 1 or question_end > len(query):
            return None
        qtype = struct.unpack(">H", query[pos + 1 : pos + 3])[0]
        self.queries += 1
        known = ".".join(labels).lower() == self.name
        answers = [a for a in self.addresses if qtype == 1] if known else []  # only A records
        header = struct.pack(">HHHHHH", ident, 0x8180 if known else 0x8183, 1, len(answers), 0, 0)
        body = query[12:question_end]
        for address in answers:  # name pointer to the question, type A, class IN, TTL 5, 4 bytes
            body += struct.pack(">HHHIH", 0xC00C, 1, 1, 5, 4) + socket.inet_aton(address)
        return header + body

    def close(self) -> None:
        self.sock.close()
