"""One generic registry: names and `package.module:attr` import paths, registration, what travels to Ray workers.

Each concern owns one `Registry` instance: `dsdtune.models.MODELS` (task.model), `dsdtune.data.DATASETS`
(task.dataset). An instance maps a name to an object in this order:
1. `module:attr`, an import path (when the instance takes them): the attribute of a user's module;
2. a prefix the owner handles itself (`torchvision:<name>` for models): the owner's factory for the rest;
3. a built-in name (the owner's table);
4. a name registered in this process (`register(name, obj)`, which refuses built-in names).

A user's module is looked for in the search folders - the study file's folder, then the current
directory - and then among the installed packages. The folders are searched explicitly for the module
an import path names, and are appended to `sys.path` *after* the installed packages, so the module can
import its neighbours while nothing in those folders (a `yaml.py` beside a study file) shadows a package
that dsdtune or Ray import.

What travels to Ray workers (`worker_payload` / `install`): the search folders and the registered
objects of every instance; objects defined in a user's module under the search folders travel as their
import path and are imported again in the worker once the folders are in place, everything else
(functions of a notebook or script) is pickled by Ray. On a cluster the user's modules themselves are
uploaded (`runtime_env`: Ray's `py_modules`). Imports nothing of dsdtune but `config.SpecError`.
"""
from __future__ import annotations

import collections.abc
import difflib
import importlib
import importlib.machinery
import importlib.util
import os
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

from .config import SpecError

# Folders a user's modules are imported from, in order (see `add_search_paths`).
_SEARCH_PATHS: list[str] = []
# kind -> {name: object registered in this process}; kept here, not in the instances, so that a worker
# can install the driver's registrations before the module that owns an instance is imported.
_REGISTERED: dict[str, dict[str, Any]] = {}
# kind -> the instance, for `on_change` after `install`
_INSTANCES: dict[str, "Registry"] = {}
# Prefixes some instance handles itself ("torchvision:"): such names are not import paths.
_PREFIXES: set[str] = set()

# Listed when a module lacks the attribute asked for: at most this many names, then "...". Values a
# module imports for its annotations are not what a user means to name.
_MAX_LISTED = 20
_NOT_OFFERED = {"typing", "typing_extensions", "builtins", "collections.abc", "abc"}


def is_import_path(name: str) -> bool:
    """'pkg.module:attr' (a prefix an instance handles, e.g. torchvision:<name>, is not one)."""
    return ":" in name and not any(name.startswith(prefix) for prefix in _PREFIXES)


class Registry(collections.abc.Mapping):
    """Names -> objects for one concern (models, datasets, ...): built-ins, registered ones, import paths.

    - `kind`: the registration's name (`register_<kind>` in messages) and the key workers install under.
    - `field`: the study field named in every error, e.g. "task.model".
    - `builtins`: the owner's table of built-in names (kept by reference, so the owner may fill it later).
    - `shown`: the built-in names as "allowed: ..." lists them (default: sorted `builtins`).
    - `check` / `expects`: what a value must be (default: callable, "a callable"); applied to registered
      objects and to what an import path names.
    - `import_hint`: how "allowed: ..." shows an import path ("module:function"); None when the field
      takes no import paths.
    - `name_pattern` / `name_rule`: what a registered name must look like, and how to say so.
    - `prefixes`: {"torchvision:": factory}: a name "torchvision:resnet18" is factory("resnet18").
    - `on_change`: called whenever a registration changes (e.g. to drop a cache built by the old one).

    An instance is a read-only mapping of every name it resolves besides import paths and prefixes
    (built-ins first, then registered ones).
    """

    def __init__(self, kind: str, field: str, builtins: Mapping[str, Any], *, shown: Optional[Sequence[str]] = None,
                 check: Callable[[Any], bool] = callable, expects: str = "a callable",
                 import_hint: Optional[str] = "module:function", name_pattern: str = r"[^:\s]+",
                 name_rule: str = "a name without ':' (which marks import paths)",
                 prefixes: Optional[Mapping[str, Callable[[str], Any]]] = None,
                 on_change: Optional[Callable[[], None]] = None):
        self.kind, self.field, self.builtins = kind, field, builtins
        self._shown = list(shown) if shown is not None else None
        self.check, self.expects, self.import_hint = check, expects, import_hint
        self.name_pattern, self.name_rule = re.compile(name_pattern), name_rule
        self.prefixes = dict(prefixes or {})
        self.on_change = on_change
        _PREFIXES.update(self.prefixes)
        _INSTANCES[kind] = self

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {len(self.builtins)} built-in, {len(self.registered)} registered)"

    # --- the mapping of names

    @property
    def registered(self) -> dict[str, Any]:
        """The objects registered in this process by name."""
        return _REGISTERED.setdefault(self.kind, {})

    def __getitem__(self, name: str) -> Any:
        if name in self.builtins:
            return self.builtins[name]
        return self.registered[name]

    def __contains__(self, name: object) -> bool:
        return name in self.builtins or name in self.registered

    def __iter__(self) -> Iterator[str]:
        yield from self.builtins
        yield from (name for name in self.registered if name not in self.builtins)

    def __len__(self) -> int:
        return len(list(iter(self)))

    def allowed(self) -> list[str]:
        """What an error's "allowed: ..." lists: the built-ins as shown, the registered names, the import path."""
        shown = self._shown if self._shown is not None else sorted(self.builtins)
        hint = [self.import_hint] if self.import_hint else []
        return list(shown) + sorted(self.registered) + hint

    # --- resolving

    def lookup(self, name: str, field: Optional[str] = None) -> Any:
        """The object `name` stands for (import path, prefix, built-in or registered); else a one-line SpecError."""
        field = field or self.field
        for prefix, factory in self.prefixes.items():
            if name.startswith(prefix):
                return factory(name[len(prefix):])
        if self.import_hint and ":" in name:
            return self.resolve(name, field)
        if name in self:
            return self[name]
        raise SpecError(f"{field}: {name!r} is unknown; allowed: {', '.join(self.allowed())}")

    def resolve(self, import_path: str, field: Optional[str] = None) -> Any:
        """The object an import path `module:attr` names; a misspelt module or attribute is a one-line SpecError."""
        field = field or self.field
        module_name, _, attr = import_path.partition(":")
        if not (module_name and all(part.isidentifier() for part in module_name.split(".")) and attr.isidentifier()):
            raise SpecError(f"{field}: {import_path!r} is not an import path; write "
                            f"{self.import_hint or 'module:attr'} (module a.b is the file a/b.py)")
        module = import_module(module_name, field)
        target = getattr(module, attr, None)
        if target is None or not self.check(target):
            where = f"module {module_name!r} ({getattr(module, '__file__', None) or 'built in'})"
            kind = type(target).__name__
            offered = self._offered(module)
            close = difflib.get_close_matches(attr, offered, n=3) if target is None else []
            what = (f"has no {attr!r}" + (f" (close: {', '.join(close)})" if close else "") if target is None else
                    f"has {attr!r}, {'an' if kind[0] in 'aeiouAEIOU' else 'a'} {kind}, not {self.expects}")
            raise SpecError(f"{field}: {where} {what}; it defines: {self._defined(offered)}")
        return target

    def _offered(self, module) -> list[str]:
        """What `module` offers: its `__all__`, else its public values that pass `check` (re-exports included)."""
        declared = getattr(module, "__all__", None)
        if declared is not None:
            return sorted(str(n) for n in declared)
        return sorted(n for n, v in vars(module).items() if not n.startswith("_") and self.check(v)
                      and getattr(v, "__module__", None) not in _NOT_OFFERED)

    def _defined(self, names: list[str]) -> str:
        if not names:
            return f"nothing that is {self.expects}"
        listed = ", ".join(names[:_MAX_LISTED])
        return listed + (f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")

    # --- registering

    def register(self, name: str, obj: Any = None) -> Any:
        """Make `obj` usable as `<field>: name`; without `obj`, a decorator that registers what it decorates.

        Registering a name again replaces it (a notebook cell run twice). Built-in names are refused.
        """
        if obj is None:
            return lambda target: self.register(name, target)
        call = f"register_{self.kind}"
        if not self.check(obj):
            raise TypeError(f"{call}({name!r}, ...) needs {self.expects}, got {type(obj).__name__}")
        if not isinstance(name, str) or not self.name_pattern.fullmatch(name):
            raise ValueError(f"{call}: {name!r} is not a usable name; give {self.name_rule}")
        if name in self.builtins or any(name.startswith(prefix) for prefix in self.prefixes):
            raise ValueError(f"{call}: {name!r} is a built-in {self.kind.replace('_', ' ')}; choose another name")
        self.registered[name] = obj
        self._changed()
        return obj

    def unregister(self, name: str) -> None:
        """Forget a registered name (nothing happens if it is not registered)."""
        if self.registered.pop(name, None) is not None:
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


# ---------------------------------------------------------------------------------------------
# Where a user's modules are found


def study_search_paths(study_path: str | Path) -> list[str]:
    """Where a study's modules are looked for: the study file's folder, then the current directory."""
    return [str(Path(study_path).resolve().parent), os.getcwd()]


def add_search_paths(paths: Iterable[str]) -> None:
    """Import a user's modules from these folders too (earlier ones first); repeats are ignored.

    The folders are appended to `sys.path`, after the installed packages: a user's module imports its
    neighbours from there, and nothing in them shadows an installed package.
    """
    for path in paths:
        path = os.path.abspath(os.path.expanduser(str(path)))
        if path not in _SEARCH_PATHS:
            _SEARCH_PATHS.append(path)
        if path not in sys.path:
            sys.path.append(path)
    importlib.invalidate_caches()  # a module file written after the last import must be found


def search_paths() -> list[str]:
    return list(_SEARCH_PATHS)


def _where() -> str:
    places = ", ".join(_SEARCH_PATHS) if _SEARCH_PATHS else os.getcwd()
    return f"{places} or the installed packages"


def import_module(module_name: str, field: str):
    """Import a user's module: its top-level package from the search folders first, else the installed ones.

    Errors are one-line SpecErrors naming `field`: no such module, or where the module's own code failed.
    """
    try:
        top = module_name.partition(".")[0]
        if top not in sys.modules:
            _import_from_search_paths(top)
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


def _import_from_search_paths(top: str) -> None:
    """Import module `top` from the first search folder that holds it (no-op if none does)."""
    if not _SEARCH_PATHS:
        return
    importlib.invalidate_caches()
    spec = importlib.machinery.PathFinder.find_spec(top, _SEARCH_PATHS)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[top] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(top, None)
        raise


def _origin(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    return f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""


def _under_search_paths(location: Path) -> bool:
    return any(Path(root) in location.parents for root in _SEARCH_PATHS)


def _module_location(module) -> Optional[Path]:
    if hasattr(module, "__path__"):
        return Path(list(module.__path__)[0])
    return Path(module.__file__) if getattr(module, "__file__", None) else None


# ---------------------------------------------------------------------------------------------
# Shipping to Ray workers


@dataclass(frozen=True)
class _ByName:
    """A registered object of a user's module, carried to a worker as its import path."""

    module: str
    qualname: str
    field: str

    def load(self) -> Any:
        target = import_module(self.module, self.field)
        for part in self.qualname.split("."):
            target = getattr(target, part)
        return target


def _portable(obj: Any, field: str) -> Any:
    """`obj` as a worker can load it: by name if its module lies in a search folder, else itself (pickled)."""
    module_name, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    module = sys.modules.get(module_name or "")
    if module is None or module_name == "__main__" or "<" in qualname:
        return obj
    location = _module_location(module)
    if location is None or not _under_search_paths(location):
        return obj
    target = module
    for part in qualname.split("."):
        target = getattr(target, part, None)
    return _ByName(module_name, qualname, field) if target is obj else obj


def worker_payload() -> dict[str, Any]:
    """What a Ray worker needs to resolve the same names: the search folders and every registered object."""
    return {"search_paths": search_paths(),
            "registered": {kind: {name: _portable(obj, _field(kind)) for name, obj in entries.items()}
                           for kind, entries in _REGISTERED.items() if entries}}


def _field(kind: str) -> str:
    return _INSTANCES[kind].field if kind in _INSTANCES else kind


def install(payload: Optional[dict]) -> None:
    """In a Ray worker: use the driver's search folders and registrations (`worker_payload`)."""
    if not payload:
        return
    add_search_paths(payload.get("search_paths", ()))
    for kind, entries in payload.get("registered", {}).items():
        store = _REGISTERED.setdefault(kind, {})
        changed = False
        for name, obj in entries.items():
            obj = obj.load() if isinstance(obj, _ByName) else obj
            changed |= name not in store or not _same(store[name], obj)
            store[name] = obj
        if changed and kind in _INSTANCES:
            _INSTANCES[kind]._changed()


def _same(old: Any, new: Any) -> bool:
    """Whether a worker already holds this registration: every trial installs the payload again, and a
    function shipped by value arrives as a new object each time (its code is what tells)."""
    if old is new:
        return True
    code = getattr(new, "__code__", None)
    return (code is not None and code == getattr(old, "__code__", None)
            and getattr(old, "__qualname__", None) == getattr(new, "__qualname__", None))


def modules_to_ship(names: Iterable[str]) -> list[str]:
    """Files or package folders of the user's modules (those under the search folders) for `py_modules`.

    Each import path's top-level module is shipped whole (a package with everything in it); modules
    found among the installed packages are expected to be installed on the cluster as well.
    """
    top_levels = {name.split(":")[0].split(".")[0] for name in names if is_import_path(name)}
    for entries in _REGISTERED.values():
        for target in entries.values():
            module = getattr(target, "__module__", None)
            if module and module != "__main__":  # __main__'s functions travel by value
                top_levels.add(module.split(".")[0])
    shipped: list[str] = []
    for top in sorted(top_levels):
        location = _module_location(sys.modules.get(top) or import_module(top, "task"))
        if location is not None and _under_search_paths(location) and str(location) not in shipped:
            shipped.append(str(location))
    return shipped


def runtime_env(names: Iterable[str], remote: bool) -> Optional[dict]:
    """Ray's runtime environment for a study that uses a user's modules (None when it needs none).

    On a cluster (`--address`) the modules themselves are uploaded (`py_modules`), so nothing is
    installed on the nodes by hand. A local instance's workers need nothing: they import the modules
    from the search folders that `worker_payload` carries (never through PYTHONPATH, which would put
    the folders in front of the installed packages).
    """
    if not remote:
        return None
    names = list(names)
    if not any(is_import_path(n) for n in names) and not any(_REGISTERED.values()):
        return None
    shipped = modules_to_ship(names)
    return {"py_modules": shipped} if shipped else None
