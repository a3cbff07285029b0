"""The one exception type for input a user must fix; the CLI prints it on one line and exits 2."""


class BadInput(Exception):
    """A malformed or unsupported input. The message names the file and, where it applies, the tensor."""
