"""Groups a flat `perf report --sort sym --stdio` (on stdin) by component; see profile.sh.

A symbol belongs to the crate named first in it (`drop_in_place<quinn_proto::...>` is
quinn-proto's, `<nearby_node::x as tokio::y>` nearby's); kernel symbols (`[k]`) are the
kernel's; the allocator, memcpy and the rest of libc by name.
"""

import re
import sys

CRATES = [
    # nearby's client driver and TLS session move packets (the transport); the rest of nearby
    # is its logic. Listed first: at an equal position the earlier entry wins.
    ("nearby's driver, TLS (transport)", r"nearby_node::service::(driver|tls)::"),
    ("nearby (logic)", r"nearby_[a-z]+::"),
    ("quinn-proto", r"quinn_proto::"),
    ("quinn (and quinn-udp)", r"quinn(_udp)?::"),
    ("rustls", r"rustls::"),
    ("crypto (ring)", r"\bring::|ring_core_|aes_|gcm_|chacha|poly1305|x25519|sha256|sha512|ecp_nistz"),
    ("roaring (friend sets)", r"roaring::"),
    ("libm (sin, cos, asin: distances)", r"^__(sin|cos|tan|ieee754_|asin|acos|atan|sqrt)"),
    ("tracing", r"\btracing(_core|_subscriber)?::"),
    ("tokio", r"tokio::"),
    ("allocator", r"malloc|free|realloc|calloc|_int_|tcache|arena_|sysmalloc|mremap|madvise"),
    ("memcpy / memmove / memset", r"mem(cpy|move|set|cmp)"),
    ("std, alloc, core, hashbrown, bytes", r"^(std|alloc|core|hashbrown|bytes)::"),
]
LINE = re.compile(r"^\s*([0-9.]+)%\s+\[(.)\]\s+(.*)$")


def group_of(kind: str, sym: str) -> str:
    if kind == "k":
        return "kernel (syscalls, UDP, scheduler)"
    best = None
    for name, pattern in CRATES:
        m = re.search(pattern, sym)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), name)
    if best:
        return best[1]
    if re.match(r"^(__)?(libc_|send|recv|epoll|syscall|pthread|clock_|__GI_|__lll)", sym):
        return "libc"
    return "other"


def main() -> None:
    groups: dict[str, float] = {}
    hottest: list[tuple[float, str, str]] = []
    other: dict[str, float] = {}
    for line in sys.stdin:
        m = LINE.match(line)
        if not m:
            continue
        share, kind, sym = float(m.group(1)), m.group(2), m.group(3).strip()
        g = group_of(kind, sym)
        groups[g] = groups.get(g, 0.0) + share
        hottest.append((share, g, sym))
        if g == "other":
            other[sym] = other.get(sym, 0.0) + share
    total = sum(groups.values())
    print(f"\n{'component':<40} {'self %':>8}")
    for g, share in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"{g:<40} {share:>8.1f}")
    print(f"{'(total sampled)':<40} {total:>8.1f}")
    print("\nhottest symbols:")
    for share, g, sym in sorted(hottest, reverse=True)[:25]:
        print(f"{share:>6.2f}%  {g:<28} {sym[:110]}")
    if other:
        print("\nlargest unclassified:")
        for sym, share in sorted(other.items(), key=lambda kv: -kv[1])[:8]:
            print(f"{share:>6.2f}%  {sym[:110]}")


if __name__ == "__main__":
    main()
