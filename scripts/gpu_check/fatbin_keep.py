"""Shows, or strips, the CUDA fat binaries in a shared library: ``fatbin_keep.py LIB.so`` prints the
bytes per architecture; ``fatbin_keep.py LIB.so 90`` zeroes the payload of every entry built for
another architecture (the entries' headers stay, so the runtime still finds the sm_90 one), which
compresses to nothing: fbgemm_gpu's wheel (2.5 GB unpacked, sm_80/90/100) fits a device call then."""

import collections
import struct
import sys
from typing import Iterator, Optional, Tuple

FATBIN_MAGIC = 0xBA55ED50


def section(data: bytes, name: str) -> Optional[Tuple[int, int]]:
    """(offset, size) of the ELF64 section ``name``."""
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]
    for sh_name, _, _, _, offset, size in headers:
        end = data.index(b"\0", names + sh_name)
        if data[names + sh_name : end].decode() == name:
            return offset, size
    return None


def entries(data: bytes, offset: int, size: int) -> Iterator[Tuple[int, int, int, int, int]]:
    """(position, kind, header size, payload size, sm arch) of every entry of the fat binaries in
    ``data[offset:offset + size]``; kind 1 is PTX, 2 an ELF cubin."""
    pos, end = offset, offset + size
    while pos < end:
        magic, _, header, fat_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # padding between fat binaries
            continue
        p, stop = pos + header, pos + header + fat_size
        while p < stop:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, p)
            arch = struct.unpack_from("<I", data, p + 28)[0]
            yield p, kind, entry_header, payload, arch
            p += entry_header + payload
        pos = stop


def main() -> None:
    path = sys.argv[1]
    keep = int(sys.argv[2]) if len(sys.argv) > 2 else None
    data = bytearray(open(path, "rb").read())
    sec = section(data, ".nv_fatbin")
    if sec is None:
        print(f"{path}: no fat binary")
        return
    per_arch: collections.Counter = collections.Counter()
    zeroed = 0
    for p, kind, header, payload, arch in entries(data, *sec):
        per_arch[f"{'ptx' if kind == 1 else 'sm'}_{arch}"] += payload
        if keep is not None and arch != keep:
            data[p + header : p + header + payload] = bytes(payload)
            zeroed += payload
    sizes = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(per_arch.items()))
    print(f"{path}: {sizes}; zeroed {zeroed / 1e6:.1f} MB")
    if keep is not None:
        open(path, "wb").write(data)


if __name__ == "__main__":
    main()
