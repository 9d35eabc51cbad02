"""`python -m commands` is the `fedtune` command."""

from commands.main import main

main()
