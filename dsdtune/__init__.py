"""dsdtune: hyperparameter studies of sparse training (DSD, GSM, sparse inits) on Ray Tune."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["run_pipeline", "Pipeline", "RunSpec", "load_study", "register_model", "register_dataset",
           "load_results", "StudyResults", "PhaseKind", "PhaseState", "MaskedState", "KindSettings",
           "register_phase_kind"]


def __getattr__(name):
    # Lazy: `python -m dsdtune.study --dry-run` and config errors should not pay for importing torch.
    if name in ("run_pipeline", "Pipeline"):
        from . import pipeline
        return getattr(pipeline, name)
    if name == "register_model":
        from .models import register_model
        return register_model
    if name == "register_dataset":
        from .data import register_dataset
        return register_dataset
    if name in ("PhaseKind", "PhaseState", "MaskedState", "register_phase_kind"):
        from . import phases
        return getattr(phases, name)
    if name in ("RunSpec", "load_study", "KindSettings"):
        from . import config
        return getattr(config, name)
    if name in ("load_results", "StudyResults"):
        from . import results
        return getattr(results, name)
    raise AttributeError(f"module 'dsdtune' has no attribute {name!r}")
