"""Typed errors. Each carries one whole sentence naming the file, key, device or step.

Only the tasks (appliance/commands.py) print them, as one line; the library never prints a traceback.
"""


class ApplianceError(Exception):
    """Base of every error the user should see as one clear line."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} ({self.hint})" if self.hint else text


class OptionError(ApplianceError):
    """A command-line option's value is wrong (named as the user typed it, e.g. --memory)."""


class Interrupted(ApplianceError):
    """Ctrl-C stopped the work; the message says what it left behind. Exits 130, as a shell expects."""

    exit_code = 130


class RecipeError(ApplianceError):
    """A recipe, board definition or overlay is wrong."""


class BuildError(ApplianceError):
    """A build step failed."""


class ToolError(BuildError):
    """A host command failed or is missing."""


class FlashError(ApplianceError):
    """Writing an image to a card was refused or failed."""


class FlashInterrupted(FlashError, Interrupted):
    """Ctrl-C during a write: the card is incomplete."""


class EmulateError(ApplianceError):
    """Booting an image under QEMU failed."""


class DeployError(ApplianceError):
    """Updating the served guest on a board failed."""


class SshError(ApplianceError):
    """An SSH connection or a command over it failed."""


class HostKeyError(SshError):
    """A host key is unknown (and not to be accepted) or has changed."""


class GuestError(ApplianceError):
    """Building or checking a guest bundle failed."""


class ReleaseError(ApplianceError):
    """Publishing a version to a release channel (pull mode) failed."""
