"""The exception fastattn raises for a bad argument."""


class ArgumentError(ValueError, RuntimeError):
    """A bad argument (shape, dtype, device, value, unsupported combination); the message names the argument.

    Both a ValueError and a RuntimeError: torch raises RuntimeError where fastattn's drop-ins refuse an input (SDPA,
    the nn modules), so code written against torch keeps catching it, and ``except ValueError`` works too."""
