"""``python -m localimages [operator|trainer ...] [--json FILE] [--prune]``: build the images (``make images``).

Prints one line per image (``<name> <ref> built|cached <seconds> s``); ``--json FILE``
also writes ``{"operator": ref, "trainer": ref}``; ``--prune`` removes the tags of
older inputs (each trainer tag whose layers are not shared holds gigabytes). Exits 1 with the error when a
tool, a base or a build fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from localimages import build, engine


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m localimages", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", default=["operator", "trainer"], help="operator, trainer (default both)")
    parser.add_argument("--json", metavar="FILE", help="write {name: ref} to FILE")
    parser.add_argument("--prune", action="store_true", help="remove image tags built from older inputs")
    ns = parser.parse_args(argv)
    start = time.monotonic()
    try:
        log = lambda msg: print(f"[images] {msg}", flush=True)  # noqa: E731
        results = build.build_all(tuple(ns.images), log=log)
        if ns.prune:
            build.prune(results, log=log)
    except (engine.EngineError, ValueError, FileNotFoundError) as exc:
        print(f"make images: {exc}", file=sys.stderr)
        return 1
    for name, built in results.items():
        print(f"{name} {built.ref} {'built' if built.built else 'cached'} {built.seconds:.0f} s")
    print(f"images ready in {time.monotonic() - start:.1f} s")
    if ns.json:
        with open(ns.json, "w") as fh:
            json.dump({name: built.ref for name, built in results.items()}, fh, indent=1)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
