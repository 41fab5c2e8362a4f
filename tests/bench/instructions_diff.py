"""Instructions per push of each build of instructions.sh, and the functions that moved most.

Reads OUT/<n>/functions.txt (`callgrind_annotate --inclusive=no`) and OUT/<n>/window (the pushes
and UDP messages the node counted while callgrind counted) for builds 1..N; compares each with
build 1, function by function (names without their file, LLVM's suffixes dropped).
"""

import re
import sys
from collections import Counter

LINE = re.compile(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)$")


def functions(path: str) -> Counter:
    by_name: Counter = Counter()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = LINE.match(line)
            if not m or "PROGRAM TOTALS" in line:
                continue
            name = re.sub(r" \[.*\]$", "", m.group(2))
            # "file:function" (a function name may hold "::", a file name does not end in ":").
            file, sep, rest = name.partition(":")
            if sep and not rest.startswith(":") and not file.startswith("<"):
                name = rest
            by_name[re.sub(r"\.llvm\.\d+", "", name)] += int(m.group(1).replace(",", ""))
    return by_name


def main() -> None:
    out, n, bins = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    builds = []
    for i in range(1, n + 1):
        with open(f"{out}/{i}/window", encoding="utf-8") as f:
            pushes, sent = (int(x) for x in f.read().split())
        if pushes <= 0:
            sys.exit(f"build {i}: no pushes counted in the window")
        builds.append((bins[i - 1], functions(f"{out}/{i}/functions.txt"), pushes, sent))

    print("| build | pushes counted | UDP messages / push | instructions / push | vs build 1 |")
    print("|---|---:|---:|---:|---:|")
    base = sum(builds[0][1].values()) / builds[0][2]
    for name, fns, pushes, sent in builds:
        per = sum(fns.values()) / pushes
        print(f"| {name} | {pushes} | {sent / pushes:.2f} | {per:,.0f} | {per / base:.3f}× |")

    _, first, first_pushes, _ = builds[0]
    for name, fns, pushes, _ in builds[1:]:
        keys = set(first) | set(fns)
        moved = sorted(
            keys, key=lambda k: abs(fns[k] / pushes - first[k] / first_pushes), reverse=True
        )
        print(f"\nfunctions that moved most, {name} against {builds[0][0]} (instructions / push):")
        for k in moved[:20]:
            a, b = first[k] / first_pushes, fns[k] / pushes
            print(f"  {b - a:+8.0f}  {a:8.0f} → {b:8.0f}  {k[:140]}")


if __name__ == "__main__":
    main()
