"""The generic registry: names, import paths, registration, what a misspelt name lists, what travels to workers."""
import importlib
import pickle
import sys
import textwrap
import types

import pytest

from dsdtune import registry
from dsdtune.config import SpecError
from dsdtune.registry import Registry


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A fresh search folder; registrations, search folders, sys.path and the modules written are restored."""
    monkeypatch.setattr(registry, "_SEARCH_PATHS", [])
    monkeypatch.setattr(registry, "_REGISTERED", {})
    monkeypatch.setattr(registry, "_INSTANCES", dict(registry._INSTANCES))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("ureg"):
            sys.modules.pop(name)


def write(folder, name, source):
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    importlib.invalidate_caches()


def things(**options):
    return Registry("thing", "task.thing", {"alpha": len, "beta": abs}, **options)


def test_names_builtins_registered_and_the_decorator(folder):
    reg = things()
    assert reg.lookup("alpha") is len and "beta" in reg and list(reg) == ["alpha", "beta"]

    @reg.register("gamma")
    def gamma():
        return 3

    assert reg.register("delta", max) is max
    assert reg.lookup("gamma") is gamma and list(reg) == ["alpha", "beta", "gamma", "delta"]
    reg.register("delta", min)  # a notebook cell run again replaces it
    assert reg["delta"] is min
    with pytest.raises(ValueError, match="register_thing: 'alpha' is a built-in thing"):
        reg.register("alpha", max)
    with pytest.raises(ValueError, match="not a usable name"):
        reg.register("a:b", max)
    with pytest.raises(TypeError, match="needs a callable, got int"):
        reg.register("eps", 3)
    reg.unregister("gamma")
    with pytest.raises(SpecError) as info:
        reg.lookup("gama")
    assert str(info.value) == "task.thing: 'gama' is unknown; allowed: alpha, beta, delta, module:function"


def test_on_change_runs_at_every_registration(folder):
    calls = []
    reg = things(on_change=lambda: calls.append(1))
    reg.register("x", max)
    reg.unregister("x")
    reg.unregister("x")  # not registered: nothing changes
    assert len(calls) == 2


def test_import_paths_and_what_a_misspelt_attribute_lists(folder):
    registry.add_search_paths([folder])
    write(folder, "uregall", """
        __all__ = ["net", "Other"]
        def net(): pass
        def hidden(): pass
        class Other: pass
    """)
    write(folder, "uregexp", """
        from typing import Sequence
        from torch.nn import Linear    # re-exported: listed
        import torch                   # a module: not listed
        def net(): pass
        def _private(): pass
        WIDTH = 3
    """)
    write(folder, "uregmany", "".join(f"def f{i:02d}(): pass\n" for i in range(25)))
    reg = things()
    assert reg.lookup("uregexp:net").__name__ == "net"

    def message(name):
        with pytest.raises(SpecError) as info:
            reg.lookup(name)
        text = str(info.value)
        assert "\n" not in text and text.startswith("task.thing: ")
        return text

    assert message("uregall:nett").endswith("has no 'nett' (close: net); it defines: Other, net")
    assert message("uregexp:nett").endswith("has no 'nett' (close: net); it defines: Linear, net")
    assert message("uregexp:WIDTH").endswith("has 'WIDTH', an int, not a callable; it defines: Linear, net")
    listed = message("uregmany:g").split("it defines: ")[1]
    assert listed == ", ".join(f"f{i:02d}" for i in range(20)) + ", ... (25 in all)"
    # Close matches come from everything the module offers, also names beyond the listed 20.
    assert "has no 'ff24' (close: f24" in message("uregmany:ff24")
    assert "no module 'uregnone'" in message("uregnone:net")
    assert "is not an import path" in message("ureg.:net")


def test_a_class_valued_instance_with_its_own_rules(folder):
    """What a registry of phase kinds needs: letters as names, classes as values, no import paths in lookup."""
    class Kind:
        pass

    class Dense(Kind):
        pass

    kinds = Registry("phase_kind", "pipeline.flow", {"D": Dense}, shown=["D (dense)"],
                     check=lambda v: isinstance(v, type) and issubclass(v, Kind), expects="a subclass of Kind",
                     import_hint=None, name_pattern="[A-Z]", name_rule="one capital letter")

    @kinds.register("Q")
    class Quick(Kind):
        pass

    assert kinds.lookup("Q") is Quick
    with pytest.raises(ValueError, match="give one capital letter"):
        kinds.register("q", Quick)
    with pytest.raises(ValueError, match="register_phase_kind: 'D' is a built-in phase kind"):
        kinds.register("D", Quick)
    with pytest.raises(TypeError, match="needs a subclass of Kind, got function"):
        kinds.register("Z", lambda: 0)
    with pytest.raises(SpecError, match=r"^pipeline.flow: 'Z' is unknown; allowed: D \(dense\), Q$"):
        kinds.lookup("Z")
    write(folder, "uregkinds", "class NotAKind: pass\ndef helper(): pass\n")
    registry.add_search_paths([folder])
    with pytest.raises(SpecError, match=r"has 'NotAKind', a type, not a subclass of Kind; it defines: nothing"):
        kinds.resolve("uregkinds:NotAKind", "phase_kinds.X")


def test_a_study_folder_comes_first_for_an_import_path_but_shadows_no_installed_module(folder):
    study, cwd = folder / "study", folder / "cwd"
    study.mkdir()
    cwd.mkdir()
    write(study, "uregorder", "def net(): return 'study'\n")
    write(cwd, "uregorder", "def net(): return 'cwd'\n")
    write(study, "colorsys", "raise ImportError('shadowed')\n")  # a standard module nothing has imported yet
    sys.modules.pop("colorsys", None)
    registry.add_search_paths([study, cwd])
    assert things().lookup("uregorder:net")() == "study"
    assert sys.path[-2:] == [str(study), str(cwd)]  # after the installed packages
    assert importlib.import_module("colorsys").rgb_to_hsv(1, 0, 0)[2] == 1


def test_registered_objects_of_a_users_module_travel_by_name(folder):
    registry.add_search_paths([folder])
    write(folder, "uregfactory", "def net(): return 'mine'\n")
    reg = things()
    reg.register("mine", reg.lookup("uregfactory:net"))
    reg.register("builtin_fn", max)
    payload = pickle.dumps(registry.worker_payload())
    # A fresh worker: the module is neither imported nor on sys.path, nothing is registered yet.
    sys.modules.pop("uregfactory")
    sys.path.remove(str(folder))
    registry._SEARCH_PATHS.clear()
    registry._REGISTERED.clear()
    registry.install(pickle.loads(payload))
    assert reg.lookup("mine")() == "mine" and reg["builtin_fn"] is max
    assert registry.search_paths() == [str(folder)]


def test_installing_the_same_payload_again_keeps_what_was_built_from_it(folder):
    """Every trial installs the study's payload; only a real change may drop a cache (on_change)."""
    calls = []
    reg = things(on_change=lambda: calls.append(1))
    reg.register("lam", lambda: 1)
    payload = registry.worker_payload()
    for _ in range(3):  # a function shipped by value arrives as a new object, with the same code, each time
        lam = payload["registered"]["thing"]["lam"]
        registry.install({**payload, "registered": {"thing": {"lam": types.FunctionType(lam.__code__, {})}}})
    assert len(calls) == 1
    registry.install({"search_paths": [], "registered": {"thing": {"lam": lambda: 2}}})
    assert len(calls) == 2 and reg["lam"]() == 2
