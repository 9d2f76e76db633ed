"""Run the registered benchmarks and write benchmarks/RESULTS.md."""

from __future__ import annotations

import argparse
import datetime
import importlib
from pathlib import Path

from benchmarks import machine

# Module names under benchmarks/, in the order their tables appear.
REGISTRY = ["size_accounting", "pruning", "physical_pruning", "qat"]
RESULTS = Path(__file__).with_name("RESULTS.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run, of {REGISTRY} (default: all)")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(REGISTRY))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; available: {REGISTRY}")
    names = args.names or REGISTRY
    sections = []
    stamp = datetime.date.today().isoformat()
    command = " ".join(["python -m benchmarks", *args.names])
    header = f"# Benchmark results\n\nMeasured {stamp} on {machine()} with `{command}`.\n"
    for name in names:
        print(f"[benchmarks] running {name} ...", flush=True)
        for table in importlib.import_module(f"benchmarks.{name}").run():
            print(table.to_markdown() + "\n", flush=True)
            sections.append(table.to_markdown())
        RESULTS.write_text(header + "\n" + "\n\n".join(sections) + "\n")  # after each module: nothing lost
        print(f"[benchmarks] wrote {RESULTS}", flush=True)


if __name__ == "__main__":
    main()
