#!/usr/bin/env python3
"""An independent implementation of the formats in docs/FORMATS.md, written from that document
alone with Python's standard library: the release tree digest and the audit entry hash. The
tests run it against rewind's own results (a real release directory, a real audit export), so
the document is proved sufficient, not just the Rust code consistent with itself.

    formats.py tree DIR            prints the tree digest of DIR
    formats.py audit FILE          verifies an export's entries (JSON lines) as a chain from the
                                   first entry's prev_hash; prints the last hash and the count
"""

import hashlib
import json
import os
import stat
import sys


def tree_digest(root):
    listing = hashlib.sha256()

    def walk(directory, relative):
        # Names sorted by their bytes, one directory at a time, depth first.
        for name in sorted(os.listdir(os.fsencode(directory))):
            path = os.path.join(os.fsencode(directory), name)
            text = os.path.join(os.fsencode(relative), name) if relative else name
            text = text.decode("utf-8", errors="replace")
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                target = os.readlink(path).decode("utf-8", errors="replace")
                listing.update(f"L {text} {target}\n".encode())
            elif stat.S_ISDIR(info.st_mode):
                listing.update(f"D {text}\n".encode())
                walk(path.decode("utf-8", errors="surrogateescape"), text)
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as file:
                    content = hashlib.sha256(file.read()).hexdigest()
                executable = "x" if info.st_mode & 0o111 else "-"
                listing.update(f"F {text} {executable} {content}\n".encode())
            else:
                raise SystemExit(f"{text}: not a regular file, directory or symlink")

    walk(root, "")
    return "sha256:" + listing.hexdigest()


def length_prefixed(parts):
    hasher = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        hasher.update(len(data).to_bytes(8, "big"))
        hasher.update(data)
    return hasher.hexdigest()


FIELDS = ["identity", "action", "target", "outcome", "reason"]


def entry_hash(entry):
    fmt = entry.get("format", 1) or 1
    common = [entry["prev_hash"], str(entry["index"]), str(entry["at_ms"])]
    if fmt == 1:
        return length_prefixed(common + [entry.get(f, "") for f in FIELDS[:4]])
    if fmt != 2:
        raise SystemExit(f"entry {entry['index']}: unknown format {fmt}")
    commitments = []
    for field in FIELDS:
        redacted = entry.get("redacted", {})
        if field in redacted:
            commitments.append(redacted[field])
        else:
            salt = entry.get("salts", {}).get(field, "")
            commitments.append(length_prefixed([salt, field, entry.get(field, "")]))
    return length_prefixed(["rewind.audit.2"] + common + commitments)


def verify(path):
    previous = None
    count = 0
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            entry = json.loads(line)
            if previous is not None and entry["prev_hash"] != previous:
                raise SystemExit(f"line {number}: does not link to the entry before it")
            if entry_hash(entry) != entry["hash"]:
                raise SystemExit(f"line {number}: does not match its hash")
            previous = entry["hash"]
            count += 1
    print(json.dumps({"entries": count, "last_hash": previous}))


def main():
    command, argument = sys.argv[1:3]
    if command == "tree":
        print(tree_digest(argument))
    elif command == "audit":
        verify(argument)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main()
