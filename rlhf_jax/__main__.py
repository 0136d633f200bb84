"""`python -m rlhf_jax <command> ...`: the same as the `rlhf-jax` command."""

from rlhf_jax.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
