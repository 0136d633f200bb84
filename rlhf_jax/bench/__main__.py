"""Dispatch ``python -m rlhf_jax.bench <name> [options]`` to ``rlhf_jax.bench.<name>.main``."""

import importlib
import pkgutil
import sys

import rlhf_jax.bench as bench_pkg


def _available() -> list[str]:
    return sorted(
        m.name for m in pkgutil.iter_modules(bench_pkg.__path__) if not m.name.startswith("_")
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = _available()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m rlhf_jax.bench {all|" + "|".join(names) + "} [options]")
        return
    name, rest = argv[0], argv[1:]
    if name == "all":
        for each in names:
            print(f"\n## {each}\n", flush=True)
            importlib.import_module(f"rlhf_jax.bench.{each}").main(rest)
        return
    if name not in names:
        raise SystemExit(f"unknown benchmark {name!r}; available: {', '.join(names)}")
    importlib.import_module(f"rlhf_jax.bench.{name}").main(rest)


if __name__ == "__main__":
    main()
