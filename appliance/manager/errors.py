"""The guest manager's one error: a refusal or failure, as one sentence naming the file, key or command."""


class Error(Exception):
    """One sentence naming the file, key or command; the command line prints it as JSON, never a traceback."""
