"""Run the registered benchmarks and write benchmarks/RESULTS.md."""

from __future__ import annotations

import argparse
import datetime
import importlib
from pathlib import Path

from benchmarks import machine

# Module names under benchmarks/, in the order their tables appear.
REGISTRY = [
    "size_accounting", "pruning", "pruning_defaults", "physical_pruning", "qat_speed", "qat", "gptq_speed",
    "ptq_minilm", "llm", "serving", "distill", "qat_llm", "budget", "export_speed", "gpu_export", "streaming",
]  # fmt: skip
RESULTS = Path(__file__).with_name("RESULTS.md")


MARKER = "<!-- benchmark: {} -->"
HEADER = "# Benchmark results\n\nEach section says when, where and by which command it was measured.\n"


def read_sections(text: str) -> dict[str, str]:
    """The sections of an existing RESULTS.md, keyed by module name (each starts with its :data:`MARKER` line)."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("<!-- benchmark: ") and line.endswith(" -->"):
            current = line[len("<!-- benchmark: ") : -len(" -->")]
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return {k: "\n".join(v).strip() for k, v in sections.items()}


def table_blocks(section: str) -> dict[str, str]:
    """The tables of a section, ``{title: markdown}`` in order (each from its ``### title`` line to the next)."""
    blocks: dict[str, list[str]] = {}
    current = None
    for line in section.splitlines():
        if line.startswith("### "):
            current = line[4:]
            blocks[current] = []
        if current is not None:
            blocks[current].append(line)
    return {k: "\n".join(v).strip() for k, v in blocks.items()}


def write_results(sections: dict[str, str]) -> None:
    """RESULTS.md with every known section, in REGISTRY order."""
    body = [f"{MARKER.format(name)}\n{sections[name]}" for name in REGISTRY if name in sections]
    staged = RESULTS.with_suffix(".md.tmp")  # written whole, then renamed: a crash never leaves half a file
    staged.write_text(HEADER + "\n" + "\n\n".join(body) + "\n")
    staged.replace(RESULTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run, of {REGISTRY} (default: all)")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(REGISTRY))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; available: {REGISTRY}")
    sections = read_sections(RESULTS.read_text()) if RESULTS.exists() else {}
    stamp = datetime.date.today().isoformat()
    for name in args.names or REGISTRY:
        print(f"[benchmarks] running {name} ...", flush=True)
        module = importlib.import_module(f"benchmarks.{name}")
        # a module running some of its tables (``partial()`` says how it was asked) keeps its other measured ones
        partial = getattr(module, "partial", lambda: None)()
        kept = table_blocks(sections.get(name, "")) if partial else {}
        note = f"_Measured {stamp} on {machine()} with `python -m benchmarks {name}`._"
        if partial:
            note = (f"_Latest run {stamp} on {machine()} with `{partial} python -m benchmarks {name}`; each table's "
                    "notes say when and where it was measured._")  # fmt: skip
        tables: dict[str, str] = {}
        for table in module.run():
            print(table.to_markdown() + "\n", flush=True)
            tables[table.title] = table.to_markdown()
            # after each table: nothing lost to a crash or a timeout, other modules' sections kept
            sections[name] = note + "\n\n" + "\n\n".join({**kept, **tables}.values())
            write_results(sections)
            print(f"[benchmarks] wrote {RESULTS}", flush=True)
        if not tables:  # nothing measurable here (e.g. the GPU rows on a CPU machine): keep what was there
            print(f"[benchmarks] {name}: nothing measured on this machine; its section is kept", flush=True)


if __name__ == "__main__":
    main()
