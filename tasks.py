"""The invoke tasks of a checkout (`invoke build`, …): the same namespace as the installed `appliance` command.

The task bodies live in appliance/commands.py.
"""

from appliance.commands import ns

__all__ = ["ns"]
