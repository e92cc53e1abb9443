"""`python -m fedtune` runs the CLI."""

from fedtune.cli import main

if __name__ == "__main__":
    main()
