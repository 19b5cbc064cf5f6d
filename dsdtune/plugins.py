"""A user's own models and datasets: import paths ("pkg.module:factory") and register_model / register_dataset.

A study file names a user's model or dataset loader by import path, e.g. `task.model: "mynets:small_cnn"`.
The module is imported from the study file's folder, the current directory or the installed packages
(in that order), on the driver for validation and in every Ray worker (the search folders travel with
the study; on a cluster joined with `--address` the modules themselves travel through Ray's runtime
environment, `py_modules`). Notebooks and packages register callables by name instead.

Model factories are called as `factory(input_shape=..., num_classes=..., **model_args)` and return an
`nn.Module`; dataset loaders as `loader(data_dir=..., **dataset_args)` and return a mapping (see
`dsdtune.data.load_dataset`). `models.build_model` and `data.load_dataset` resolve every name through
here, so a misspelt module or function is the same one-line `SpecError` wherever it is used.
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from .config import SpecError

# Folders plugin modules are imported from, in order; they are also put at the front of sys.path so
# that a user's module can import its neighbours.
_SEARCH_PATHS: list[str] = []
# name -> callable registered in this process (register_model / register_dataset)
_REGISTERED: dict[str, dict[str, Callable]] = {"model": {}, "dataset": {}}


def is_import_path(name: str) -> bool:
    """'pkg.module:function' (torchvision:<name> is the built-in torchvision prefix, not a module)."""
    return ":" in name and not name.startswith("torchvision:")


def study_search_paths(study_path: str | Path) -> list[str]:
    """Where a study's plugin modules are looked for: the study file's folder, then the cwd."""
    return [str(Path(study_path).resolve().parent), os.getcwd()]


def add_search_paths(paths: Iterable[str]) -> None:
    """Import plugin modules from these folders too (earlier ones first); repeats are ignored."""
    for path in paths:
        path = os.path.abspath(os.path.expanduser(str(path)))
        if path not in _SEARCH_PATHS:
            _SEARCH_PATHS.append(path)
    # Keep sys.path in the same order as the search paths, ahead of site-packages.
    for path in reversed(_SEARCH_PATHS):
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
    importlib.invalidate_caches()  # a module file written after the last import must be found


def search_paths() -> list[str]:
    return list(_SEARCH_PATHS)


def _where() -> str:
    places = ", ".join(_SEARCH_PATHS) if _SEARCH_PATHS else os.getcwd()
    return f"{places} or the installed packages"


def _import(module_name: str, field: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise SpecError(f"{field}: no module {module_name!r} in {_where()}; check the spelling "
                            f"(module a.b is the file a/b.py)") from None
        raise SpecError(f"{field}: importing {module_name!r} failed: {err}{_origin(err)}") from None
    except Exception as err:  # the user's module raised while importing: say where, in one line
        raise SpecError(f"{field}: importing {module_name!r} raised {type(err).__name__}: "
                        f"{' '.join(str(err).split())}{_origin(err)}") from None


def _origin(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    return f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""


def resolve(import_path: str, field: str) -> Callable:
    """The callable an import path names; a misspelt module or function is a one-line SpecError."""
    module_name, _, attr = import_path.partition(":")
    if not module_name or not attr or not all(part.isidentifier() for part in module_name.split(".")) \
            or not attr.isidentifier():
        raise SpecError(f"{field}: {import_path!r} is not an import path; write 'module:function', "
                        f"e.g. mynets:small_cnn")
    module = _import(module_name, field)
    target = getattr(module, attr, None)
    if not callable(target):
        defined = sorted(n for n, v in vars(module).items()
                         if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__)
        what = "has no" if target is None else "has a non-callable"
        raise SpecError(f"{field}: module {module_name!r} ({getattr(module, '__file__', '?')}) {what} {attr!r}; "
                        f"it defines: {', '.join(defined) or 'nothing callable'}")
    return target


def lookup(name: str, kind: str, builtins: dict[str, Callable], field: str, allowed: list[str]) -> Callable:
    """What a task.model / task.dataset name stands for: an import path, a built-in, or a registered one.

    `allowed` lists the built-in names as the error message shows them (the registered names and
    `module:function` are added).
    """
    if is_import_path(name):
        return resolve(name, field)
    if name in builtins:
        return builtins[name]
    if name in registered(kind):
        return registered(kind)[name]
    raise SpecError(f"{field}: {name!r} is unknown; allowed: "
                    f"{', '.join(allowed + sorted(registered(kind)) + ['module:function'])}")


def registered(kind: str) -> dict[str, Callable]:
    """Callables registered in this process by name ('model' or 'dataset')."""
    return _REGISTERED[kind]


def _register(kind: str, name: str, target: Callable, builtin: Iterable[str]) -> Callable:
    if not callable(target):
        raise TypeError(f"register_{kind}({name!r}, ...) needs a callable, got {type(target).__name__}")
    if not name or ":" in name:
        raise ValueError(f"register_{kind}: {name!r} is not a usable name (no ':', which marks import paths)")
    if name in builtin:
        raise ValueError(f"register_{kind}: {name!r} is a built-in {kind}; choose another name")
    _REGISTERED[kind][name] = target  # re-registering (a notebook cell run again) replaces it
    return target


def register_model(name: str, factory: Optional[Callable] = None):
    """Make `factory(input_shape=..., num_classes=..., **model_args) -> nn.Module` usable as task.model: name.

    Works as a call or a decorator (`@register_model("tiny")`). Registered models travel to Ray workers
    with the study (functions defined in a notebook or script are shipped by value).
    """
    from .models import MODELS
    if factory is None:
        return lambda f: _register("model", name, f, MODELS)
    return _register("model", name, factory, MODELS)


def register_dataset(name: str, loader: Optional[Callable] = None):
    """Make `loader(data_dir=..., **dataset_args) -> mapping` usable as task.dataset: name (call or decorator)."""
    from . import data
    data.clear_cache()  # a re-registered name must not serve the previous loader's data
    if loader is None:
        return lambda f: _register("dataset", name, f, data.DATASETS)
    return _register("dataset", name, loader, data.DATASETS)


# ---------------------------------------------------------------------------------------------
# Shipping to Ray workers


def worker_payload() -> dict[str, Any]:
    """What a Ray worker needs to resolve the same names: the search folders and registered callables."""
    return {"search_paths": search_paths(), "models": dict(_REGISTERED["model"]),
            "datasets": dict(_REGISTERED["dataset"])}


def install(payload: Optional[dict]) -> None:
    """In a Ray worker: use the driver's search folders and registrations (`worker_payload`)."""
    if not payload:
        return
    add_search_paths(payload.get("search_paths", ()))
    _REGISTERED["model"].update(payload.get("models", {}))
    _REGISTERED["dataset"].update(payload.get("datasets", {}))


def modules_to_ship(names: Iterable[str]) -> list[str]:
    """Files or package folders of the user's modules (those under the search folders) for `py_modules`.

    Each import path's top-level module is shipped whole (a package with everything in it); modules
    found among the installed packages are expected to be installed on the cluster as well.
    """
    roots = [Path(p) for p in _SEARCH_PATHS]
    shipped: list[str] = []
    top_levels = {name.split(":")[0].split(".")[0] for name in names if is_import_path(name)}
    for target in list(_REGISTERED["model"].values()) + list(_REGISTERED["dataset"].values()):
        module = getattr(target, "__module__", None)
        if module and module != "__main__":  # __main__'s functions travel by value
            top_levels.add(module.split(".")[0])
    for top in sorted(top_levels):
        module = sys.modules.get(top) or _import(top, "task")
        location = Path(module.__path__[0]) if hasattr(module, "__path__") else Path(module.__file__)
        if any(root in location.parents for root in roots) and str(location) not in shipped:
            shipped.append(str(location))
    return shipped


def runtime_env(names: Iterable[str], remote: bool) -> Optional[dict]:
    """Ray's runtime environment for a study that uses a user's modules (None when it uses none).

    On a cluster (`--address`) the modules themselves are uploaded (`py_modules`), so nothing is
    installed on the nodes by hand; a local instance's workers import them from the search folders.
    """
    names = list(names)
    if not any(is_import_path(n) for n in names) and not (_REGISTERED["model"] or _REGISTERED["dataset"]):
        return None
    if remote:
        shipped = modules_to_ship(names)
        return {"py_modules": shipped} if shipped else None
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(_SEARCH_PATHS + inherited)}}
