"""The error types (engine/errors.py): one base class callers can catch, messages shown as
written, and the budget error's sizes. Which lookups raise which error is tested with the
lookups (test_registry.py, test_recipes.py, test_budget.py)."""
from __future__ import annotations

import inspect

import pytest

from conftest import pack_module

errors = pack_module("backends.engine.errors")


def test_every_error_is_a_quantkit_error():
    """Nodes catch QuantKitError to show a message instead of a traceback.
    Shown able to fail: MalformedFile deriving from Exception -> 'MalformedFile' listed."""
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert {"BackendUnavailable", "MalformedFile", "UnknownRecipe", "BudgetUnreachable"} <= {c.__name__ for c in classes}
    assert [c.__name__ for c in classes if not issubclass(c, errors.QuantKitError)] == []


def test_an_unknown_recipe_is_a_key_error_that_reads_as_written():
    """Code that looks recipes up in a dict may catch KeyError; the user reads the message
    without KeyError's quotes. Shown able to fail: UnknownRecipe without its __str__ ->
    "'Unknown recipe ...'" (quoted)."""
    with pytest.raises(KeyError) as info:
        raise errors.UnknownRecipe("Unknown recipe 'sd9'. Known recipes: sd15.")
    assert str(info.value) == "Unknown recipe 'sd9'. Known recipes: sd15."


@pytest.mark.parametrize("smallest, shown", [(2**30, "1.000 GiB"), (2**30 - 2**19, "1023.5 MiB"),
                                             (3 * 2**30 + 2**29, "3.500 GiB")], ids=["1GiB", "below-1GiB", "3.5GiB"])
def test_an_unreachable_budget_says_both_sizes_and_what_to_do(smallest, shown):
    """Shown able to fail: _size switching to GiB above 2**30 (`>`) -> 1 GiB reads
    '1024.0 MiB'."""
    message = str(errors.BudgetUnreachable(smallest, 2**20))
    assert f"The budget of 1.0 MiB ({2**20} bytes) cannot be met" in message
    assert f"the model takes {shown} ({smallest} bytes). Raise the budget" in message
    assert "takes at least" in str(errors.BudgetUnreachable(smallest, 2**20, exact=False))
