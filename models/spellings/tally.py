"""Counts the outcomes of tests/rewrite_spellings.rs per choice of generate.py, so that every
choice is seen rewritten (or left with a reason) and none is wrong.

    cargo test --release --test rewrite_spellings -- --nocapture > log.txt
    python3 models/spellings/tally.py models/spellings/index.json log.txt

Reads the generator's index.json and the test's lines `NAME rewritten; ...`, `NAME left: ...`,
`NAME WRONG: ...`; export failures are counted from the index. Standard library only.
"""

import json
import re
import sys
from collections import defaultdict

SKIP = {"name", "seed", "bytes", "export_failed"}


def main():
    index, log = sys.argv[1], sys.argv[2]
    models = json.load(open(index))["models"]
    outcome = {}
    for line in open(log):
        m = re.match(r"^(\S+)\s+(rewritten|left:|WRONG:)", line)
        if m:
            outcome[m.group(1)] = {"rewritten": "rewritten", "left:": "left", "WRONG:": "wrong"}[m.group(2)]
    cells = defaultdict(lambda: defaultdict(int))
    totals = defaultdict(int)
    for e in models:
        o = "export failed" if "export_failed" in e else outcome.get(e["name"], "not run")
        totals[o] += 1
        for k, v in e.items():
            if k not in SKIP:
                cells[(e["family"], k, str(v))][o] += 1
    cols = ["rewritten", "left", "wrong", "export failed", "not run"]
    print(f"{len(models)} seeds: " + ", ".join(f"{totals[c]} {c}" for c in cols if totals[c]))
    print(f"{'family':<11} {'choice':<10} {'value':<22}" + "".join(f"{c:>14}" for c in cols))
    for (fam, k, v), c in sorted(cells.items()):
        if k == "family":
            continue
        print(f"{fam:<11} {k:<10} {v:<22}" + "".join(f"{c[x]:>14}" for x in cols))
    unseen = [key for key, c in cells.items() if c["rewritten"] == 0]
    if unseen:
        print("choices never rewritten:", ", ".join("/".join(u) for u in unseen))
    return 1 if totals["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
