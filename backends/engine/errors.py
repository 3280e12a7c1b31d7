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


class BudgetUnreachable(QuantKitError):
    """No choice of formats makes the model as small as the budget asks."""

    def __init__(self, smallest: int, budget: int, exact: bool = True):
        self.smallest, self.budget = smallest, budget
        takes = "takes" if exact else "takes at least"
        super().__init__(
            f"The budget of {_size(budget)} ({budget} bytes) cannot be met: with every searched "
            f"layer in its smallest candidate format, and the layers the recipe keeps as they "
            f"are, the model {takes} {_size(smallest)} ({smallest} bytes). Raise the budget to at "
            f"least that, add a smaller candidate format (gguf:Q2_K is the smallest), or "
            f"quantize the layers the recipe keeps with Quantize Model.")


def _size(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
