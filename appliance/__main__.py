"""`python -m appliance`: the same as the `appliance` command."""

from .program import main

main()
