"""The one exception type users see.

Anything that is the user's input being wrong (a config key, a model path, a dataset row) raises `DadpoError`
with a one-line message naming the file, key or row. The CLI prints it without a traceback (unless --debug)
and exits non-zero; every other exception is a bug and keeps its traceback.
"""


class DadpoError(Exception):
    """A clear, one-line refusal of bad input."""
