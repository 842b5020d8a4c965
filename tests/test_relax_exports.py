"""Every public name of ``diffnas_jax.relax`` is the function, whatever was imported before."""
import importlib
import pkgutil

import diffnas_jax.relax as relax


def test_exports_are_callables_after_importing_every_submodule():
    # importing a submodule sets the package attribute of its name; a submodule named like an
    # exported function would shadow it (an order-dependent failure under pytest-xdist)
    for info in pkgutil.iter_modules(relax.__path__):
        importlib.import_module(f"{relax.__name__}.{info.name}")
    for name in relax.__all__:
        obj = getattr(relax, name)
        assert callable(obj) and not hasattr(obj, "__path__") and type(obj).__name__ != "module", name


def test_unknown_name_raises_attribute_error():
    try:
        relax.no_such_operator
    except AttributeError as e:
        assert "no_such_operator" in str(e)
    else:
        raise AssertionError("expected AttributeError")
