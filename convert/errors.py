"""The one exception type for input a user must fix; the CLI prints it on one line and exits 2."""


class BadInput(Exception):
    """A malformed or unsupported input. The message names the file and, where it applies, the tensor."""


class WriteFailed(BadInput):
    """Writing the output failed (disk full, file size limit, I/O error). Not the input's fault, but reported the
    same way: one line naming the file, exit code 2. Finished work stays in the temporary folder for a resume."""
