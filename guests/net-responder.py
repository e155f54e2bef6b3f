#!/usr/bin/env python3
"""Host-side peer of the guest kit's `net` workload.

Listens on an interface (usually the tap a stasis VM's virtio-net device is
attached to) for the guest's EtherType 0x88B5 "STASISNT" frames and answers
each valid one with a "STASISRP" reply that echoes the guest's MAC and
sequence number (frame format: guests/README.md, `stasis_guestkit::net`).
Needs CAP_NET_RAW (root).

    ip tuntap add dev tapX mode tap && ip link set tapX up
    python3 guests/net-responder.py tapX [--seconds N] [--corrupt-every K]

Prints `RESPONDER iface= requests= replies= ignored= corrupted=` every second
and on exit. `--corrupt-every K` spoils the checksum of every K-th reply (a
negative control: the guest must count those as `bad`).
"""
import argparse
import socket
import struct
import sys
import time

ETHERTYPE = 0x88B5
FRAME_LEN = 60


def fnv1a(data):
    c = 0xCBF29CE484222325
    for b in data:
        c = ((c ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return c


def parse_request(frame):
    """(guest mac, seq) of a valid guest frame, else None."""
    if len(frame) < 14 + 32 or struct.unpack_from(">H", frame, 12)[0] != ETHERTYPE:
        return None
    p = frame[14:]
    if p[:8] != b"STASISNT":
        return None
    if fnv1a(p[:24]) != struct.unpack_from("<Q", p, 24)[0]:
        return None
    return bytes(p[8:14]), struct.unpack_from("<Q", p, 16)[0]


def build(magic, dst, src, mac, seq):
    f = bytearray(FRAME_LEN)
    f[0:6] = dst
    f[6:12] = src
    struct.pack_into(">H", f, 12, ETHERTYPE)
    f[14:22] = magic
    f[22:28] = mac
    struct.pack_into("<Q", f, 30, seq)
    struct.pack_into("<Q", f, 38, fnv1a(f[14:38]))
    return bytes(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("iface")
    ap.add_argument("--seconds", type=float, default=0, help="stop after N s (0 = never)")
    ap.add_argument("--mac", default="02:00:00:00:00:99", help="source MAC of the replies")
    ap.add_argument("--corrupt-every", type=int, default=0)
    a = ap.parse_args()
    src = bytes(int(x, 16) for x in a.mac.split(":"))
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    s.bind((a.iface, ETHERTYPE))
    s.settimeout(0.2)
    start = last = time.monotonic()
    requests = replies = ignored = corrupted = 0

    def report():
        print(f"RESPONDER iface={a.iface} requests={requests} replies={replies} "
              f"ignored={ignored} corrupted={corrupted}", flush=True)

    try:
        while not a.seconds or time.monotonic() - start < a.seconds:
            now = time.monotonic()
            if now - last >= 1:
                report()
                last = now
            try:
                frame = s.recv(2048)
            except socket.timeout:
                continue
            req = parse_request(frame)
            if req is None:
                ignored += 1
                continue
            requests += 1
            mac, seq = req
            reply = bytearray(build(b"STASISRP", mac, src, mac, seq))
            if a.corrupt_every and requests % a.corrupt_every == 0:
                reply[40] ^= 0xFF
                corrupted += 1
            s.send(bytes(reply))
            replies += 1
    except KeyboardInterrupt:
        pass
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
