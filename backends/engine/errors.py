"""Errors raised by the backends. Every message says what failed, why, and what to do."""


class QuantKitError(Exception):
    """Base class: a problem the user can act on."""


class BackendUnavailable(QuantKitError):
    """The backend's Python package is not installed (or fails to import)."""


class FormatUnsupported(QuantKitError):
    """The format exists but this hardware (or this layer) cannot run it."""


class UnknownFormat(QuantKitError):
    """A format or backend name that no adapter offers."""


class MalformedFile(QuantKitError):
    """A model file that cannot be read safely."""


class UnknownRecipe(QuantKitError, KeyError):
    """A recipe name that no recipe table entry has."""

    def __str__(self):  # KeyError's own __str__ would quote the message
        return str(self.args[0])
