"""`python -m fedtune` is the `fedtune` command."""

from fedtune.main import main

main()
