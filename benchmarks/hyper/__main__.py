"""``python -m benchmarks.hyper <subcommand>``: see :mod:`benchmarks.hyper`."""

from benchmarks.hyper.cli import main

if __name__ == "__main__":
    main()
