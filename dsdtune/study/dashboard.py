"""Trials named in Ray's dashboard.

Tune runs a function trainable inside an actor of a generated class whose repr is the function's
name, so every trial shows as an anonymous `run_trial` in the dashboard's actor list. Ray takes an
actor's repr (the dashboard's "Repr" column, `ray.util.state.list_actors()[i].repr_name`) once,
when the actor has been created; Ray also uses the repr in the error of a failed task. Our actor
class names its trial (`study/arm/seed=N`), and prints one line to its log each time it starts a
trial: Tune reuses actors across trials (`reuse_actors=True`, about twice as fast on small trials),
so a reused actor's Repr names the first trial it ran and its log names each trial it ran since.
"""
from __future__ import annotations

from typing import Callable


def named_trainable(trainable, label_of: Callable[[dict], str], name: str = "run_trial"):
    """`trainable` (a function trainable, after `tune.with_parameters`/`with_resources`) as a class
    whose actors carry `label_of(config)` as their repr. `name` keeps Tune's trial directory names."""
    from ray.tune.trainable.function_trainable import wrap_function

    base = wrap_function(trainable, name=name)

    class NamedTrial(base):
        _label = name

        def setup(self, config):
            self._name_trial(config)
            super().setup(config)

        def reset_config(self, new_config):
            reset = super().reset_config(new_config)
            if reset:
                self._name_trial(new_config)
            return reset

        def _name_trial(self, config):
            self._label = label_of(config)
            print(f"dsdtune: trial {self._label} ({self.trial_name})", flush=True)

        def __repr__(self):
            return self._label

    NamedTrial.__name__ = NamedTrial.__qualname__ = name
    return NamedTrial
