"""`dsdtune.load_results(path)`: a study's result files as pandas DataFrames, for notebooks and the report.

    r = dsdtune.load_results("results/sparsity_sweep")
    r.trials            # one row per trial: stage, arm, factors, seed, status, final metrics
    r.history           # one row per trial and epoch, with the trial's stage/arm/factors/seed/status
    r.summary           # per arm and metric: n, mean, SD, 95% CI (written by the report)
    r.comparisons       # each arm against the control: test, difference, CI, p, Holm p, effect size
    r.layers            # per trial and layer: density (studies with per-layer densities)
    r.weights           # per trial and phase end: weight-value histograms
    r.meta              # study.json: the study's metadata and provenance (spec, hash, versions...)

This module is the one place that knows the layout of a results folder (the names below, used by the
writers in `dsdtune.study.results` and `dsdtune.report.output` too) and the rules for reading it:

- The folder (or a file in it) must hold `trials.csv` with a `trial_id` column and at least one
  row; `study.json`, when present, must be a JSON object (`require_meta` makes it compulsory).
- Trial ids are unique. A trial that never started before a study was stopped has the id
  `not-started-<n>` (n counts such rows in table order); tables written before it had one get
  that id on reading, so an interrupted study's partial results always load.
- `history.csv`, `layers.csv`, `weights.csv`, `summary.csv`, `comparisons.csv` are optional: absent
  or empty -> an empty DataFrame. One that is there but cannot be read, or lacks its key columns
  (history: trial_id, epoch; layers: trial_id, layer, density; weights: trial_id, phase_label,
  bin_left, bin_right, count), is an error: dsdtune writes every file atomically, so such a file
  was damaged or edited.
- Rows of history/layers/weights get their trial's stage, arm, factors, seed and status beside
  them (columns the table already has are left as they are).
- `factors` are the study.json factors that are columns of trials.csv.

Every problem is a `ResultsError` with a one-line message. Reads files only: no Ray, no torch.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:  # pandas is imported when reading: the runner uses the layout's names without it
    import pandas as pd

# ---------------------------------------------------------------------------------- the layout

STUDY_JSON = "study.json"
TRIALS_CSV = "trials.csv"
HISTORY_CSV = "history.csv"
LAYERS_CSV = "layers.csv"
WEIGHTS_CSV = "weights.csv"
MASKS_DIR = "masks"  # masks/<trial_id>.npz: each finished trial's final masks
STUDY_FILES = (TRIALS_CSV, HISTORY_CSV, LAYERS_CSV, WEIGHTS_CSV, STUDY_JSON)  # written by the study runner

SUMMARY_CSV = "summary.csv"
COMPARISONS_CSV = "comparisons.csv"
COSTS_CSV = "costs.csv"
RANKS_CSV = "ranks.csv"
REPORT_MD = "report.md"
FIGURE_PREFIX, FIGURE_SUFFIX = "fig_", ".png"  # fig_<what>.png
REPORT_FILES = (SUMMARY_CSV, COMPARISONS_CSV, COSTS_CSV, RANKS_CSV, REPORT_MD)  # written by the report

NOT_STARTED = "not-started-"  # + n: the id of a trial that never started before the study was stopped

REQUIRED_COLUMNS = {HISTORY_CSV: ("trial_id", "epoch"), LAYERS_CSV: ("trial_id", "layer", "density"),
                    WEIGHTS_CSV: ("trial_id", "phase_label", "bin_left", "bin_right", "count")}
TRIAL_KEYS = ["stage", "arm", "seed", "status"]

# dsdtune.atomic's temp files (".<target>.<random>.tmp"), and the fixed ones older versions used
_TEMP = re.compile(r"\.(?P<target>.+?)(\.[A-Za-z0-9_]{8})?\.tmp(\.npz)?")


def is_figure(name: str) -> bool:
    return name.startswith(FIGURE_PREFIX) and name.endswith(FIGURE_SUFFIX)


def _written_name(name: str) -> bool:
    return name in STUDY_FILES or name in REPORT_FILES or is_figure(name)


def result_files(folder: Union[str, Path]) -> list[Path]:
    """The files in `folder` that dsdtune's writers write there (the study's tables and study.json,
    the report's tables, report.md and figures, masks/*.npz), and what an interrupted atomic write of
    one of them left behind; nothing else (a user's own files in the folder are not listed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir()):
        temp = _TEMP.fullmatch(entry.name)
        if entry.is_file() and (_written_name(entry.name) or (temp and _written_name(temp["target"]))):
            found.append(entry)
    masks = folder / MASKS_DIR
    if masks.is_dir():
        for entry in sorted(masks.iterdir()):
            temp = _TEMP.fullmatch(entry.name)
            if entry.is_file() and (entry.suffix == ".npz" or (temp and temp["target"].endswith(".npz"))):
                found.append(entry)
    return found


# ---------------------------------------------------------------------------------- reading


class ResultsError(Exception):
    """A results folder that cannot be read (one line: what is wrong and what to do)."""


@dataclass
class StudyResults:
    path: Path
    meta: dict
    trials: pd.DataFrame
    history: pd.DataFrame
    summary: pd.DataFrame
    comparisons: pd.DataFrame
    layers: pd.DataFrame
    weights: pd.DataFrame

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.path.name)

    @property
    def factors(self) -> list[str]:
        return [f for f in (self.meta.get("factors") or []) if f in self.trials.columns]

    @property
    def phase_labels(self) -> list[str]:
        return [str(label) for label in (self.meta.get("phase_labels") or [])]

    @property
    def metric(self) -> str:
        return self.meta.get("metric", "val_acc")

    def __repr__(self) -> str:
        counts = self.trials.groupby("status").size().to_dict() if "status" in self.trials else {}
        return (f"StudyResults({self.name!r}: {len(self.trials)} trials {counts}, {len(self.history)} epochs, "
                f"{len(self.summary)} summary rows, {len(self.comparisons)} comparisons; {self.path})")


# Tune's trial ids are 8 hex digits: read as text, since pandas would make "12345678" a number (and
# "00123456" 123456) and "1e234567" infinity, when every id of a table looks like one (a small study).
_ID_DTYPES = {"trial_id": str}


def _read_table(path: Path, required: tuple = ()) -> pd.DataFrame:
    """An optional table: empty when absent or empty, a ResultsError when it cannot be read."""
    import pandas as pd
    if not path.is_file():
        return pd.DataFrame()
    try:
        frame = pd.read_csv(path, dtype=_ID_DTYPES)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path} cannot be read as CSV ({str(exc).splitlines()[0]}); "
                           f"restore it or delete it") from None
    missing = [c for c in required if c not in frame.columns]
    if missing and not frame.empty:
        raise ResultsError(f"{path} has no {missing[0]} column: not a dsdtune {path.name}; restore it or delete it")
    return frame if not missing else pd.DataFrame()


def _read_meta(path: Path, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise ResultsError(f"{path} is missing; is {path.parent} a study results folder?")
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path} is not valid JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(meta, dict):
        raise ResultsError(f"{path} must hold a JSON object")
    return meta


def _read_trials(path: Path) -> pd.DataFrame:
    import pandas as pd
    if not path.is_file():
        raise ResultsError(f"{path} is missing; the study has not written any trials yet "
                           f"(give the results folder of a study, e.g. results/<study>)")
    try:
        trials = pd.read_csv(path, dtype=_ID_DTYPES)
    except pd.errors.EmptyDataError:
        raise ResultsError(f"{path} is empty; the study has not written any trials yet") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path} cannot be parsed as CSV ({str(exc).splitlines()[0]})") from None
    if "trial_id" not in trials.columns:
        raise ResultsError(f"{path} has no trial_id column; not a dsdtune trials table")
    return _with_unique_ids(trials, path)


def not_started_ids(count: int) -> list[str]:
    """The ids of `count` never-started trials, in table order."""
    return [f"{NOT_STARTED}{n}" for n in range(1, count + 1)]


def _with_unique_ids(trials: pd.DataFrame, path: Path) -> pd.DataFrame:
    ids = trials["trial_id"]
    unnamed = ids.isna() | (ids.astype(str).str.strip() == "")
    if unnamed.any():  # written before never-started trials had an id
        trials = trials.copy()
        trials["trial_id"] = ids.astype(object)
        trials.loc[unnamed, "trial_id"] = not_started_ids(int(unnamed.sum()))
    twice = trials["trial_id"][trials["trial_id"].duplicated()]
    if len(twice):
        raise ResultsError(f"{path} lists trial {twice.iloc[0]} more than once; trial ids must be unique")
    return trials


def _with_trial_columns(frame: pd.DataFrame, trials: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    """`frame` (keyed by trial_id) with each trial's stage, arm, factors, seed and status beside it."""
    if frame.empty or trials.empty or "trial_id" not in frame:
        return frame
    wanted = [c for c in TRIAL_KEYS[:2] + factors + TRIAL_KEYS[2:] if c in trials.columns and c not in frame.columns]
    keys = ["trial_id"] + wanted
    merged = frame.merge(trials[keys], on="trial_id", how="left", validate="many_to_one")
    return merged[keys + [c for c in frame.columns if c not in keys]]


def load_results(path: Union[str, Path], *, report_tables: bool = True, require_meta: bool = False) -> StudyResults:
    """The result files of one study: its folder (e.g. `results/sparsity_sweep`) or a file in it.

    `report_tables=False` leaves summary.csv and comparisons.csv unread (what the report itself is
    about to rewrite); `require_meta` makes a missing study.json an error. Raises ResultsError.
    """
    import pandas as pd
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise ResultsError(f"{folder} is not a folder; give the results folder of a study (e.g. results/<study>) "
                           f"as written by python -m dsdtune.study")
    meta = _read_meta(folder / STUDY_JSON, require_meta)
    trials = _read_trials(folder / TRIALS_CSV)
    factors = [f for f in (meta.get("factors") or []) if f in trials.columns]

    def per_trial(name: str) -> pd.DataFrame:
        return _with_trial_columns(_read_table(folder / name, REQUIRED_COLUMNS[name]), trials, factors)

    return StudyResults(
        path=folder, meta=meta, trials=trials, history=per_trial(HISTORY_CSV),
        summary=_read_table(folder / SUMMARY_CSV) if report_tables else pd.DataFrame(),
        comparisons=_read_table(folder / COMPARISONS_CSV) if report_tables else pd.DataFrame(),
        layers=per_trial(LAYERS_CSV), weights=per_trial(WEIGHTS_CSV))

