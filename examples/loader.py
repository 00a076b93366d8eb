#!/usr/bin/env python3
"""An incfs data loader serving blocks from a local copy of the image's tree.

Run by the mount:  incfs mount SOURCE MNT --trust KEY.pem --loader "python3 loader.py TREE"

The daemon writes one JSON message per line on our stdin; we answer on stdout (protocol:
docs/loader.md). For every pending read we send the blocks it waits for, plus a few after
them (readahead), raw and base64-encoded. The daemon checks every block against the file's
Merkle tree, so a loader can be wrong but never make a mount serve wrong bytes.

Testing aids: --corrupt-once PATH sends a damaged first block of PATH once;
--exit-if-exists FILE makes the loader exit whenever FILE exists (a loader dying).
"""
import argparse
import base64
import json
import os
import sys

BLOCK = 4096
READAHEAD = 32


def unescape(path):
    """Paths come escaped as incfs prints them: \\xNN for odd bytes."""
    out, i, raw = bytearray(), 0, path.encode()
    while i < len(raw):
        if raw[i:i + 2] == b"\\x" and i + 4 <= len(raw):
            out.append(int(raw[i + 2:i + 4], 16))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return bytes(out)


def send(msg):
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tree", help="a local copy of the image's files")
    ap.add_argument("--corrupt-once", metavar="PATH")
    ap.add_argument("--exit-if-exists", metavar="FILE")
    args = ap.parse_args()
    root = os.fsencode(args.tree)
    corrupt = args.corrupt_once
    for line in sys.stdin:
        if args.exit_if_exists and os.path.exists(args.exit_if_exists):
            sys.exit(3)
        msg = json.loads(line)
        if msg["type"] == "rejected":
            print(f"loader: a fill was refused: {msg['reason']}", file=sys.stderr)
        if msg["type"] != "pending":
            continue
        path = msg["path"]
        blocks = (msg["size"] + BLOCK - 1) // BLOCK
        first, last = msg["block"], min(blocks, msg["block"] + msg["count"] + READAHEAD)
        try:
            f = open(os.path.join(root, unescape(path)), "rb")
        except OSError as e:
            print(f"loader: {path}: {e}", file=sys.stderr)
            continue
        with f:
            f.seek(first * BLOCK)
            for i in range(first, last):
                data = f.read(BLOCK).rstrip(b"\0")
                if corrupt == path:
                    data = bytes([data[0] ^ 1]) + data[1:] if data else b"\1"
                    corrupt = None
                codec = "raw" if data else "zero"
                send({"type": "fill", "path": path, "block": i, "codec": codec,
                      "data": base64.b64encode(data).decode()})


if __name__ == "__main__":
    main()
