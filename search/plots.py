"""Plots of a search, written by `search.export`: what a leaderboard cannot show.

- `history.png`: the objective of each finished trial, in order, with the best so far: whether
  the search was still improving when it stopped;
- `intermediate.png`: every trial's val mIoU per epoch, pruned ones included: the learning
  curves ASHA compared, and where it cut;
- `importances.png`: which hyperparameters mattered (Optuna's default evaluator), from the
  trials that ran to their end;
- `timeline.png`: each trial's run over the search's wall time, epochs coloured by score, the
  grey around them the time Ray spent starting trials and shipping results (`timeline.csv`).

The first three are Optuna's own matplotlib plots of the study the searcher kept (`optuna.db`);
an experiment without one gets a study rebuilt from Tune's trial results. A plot that cannot be
drawn (too few trials, no timeline) is skipped with one line saying why: plots never fail an
export.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import optuna
from matplotlib.ticker import MaxNLocator
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.exceptions import ExperimentalWarning, OptunaError
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from optuna.visualization import matplotlib as optuna_plots

from marsseg.data.figures import save_figure  # also selects the Agg backend: files only
from marsseg.errors import first_line
from marsseg.train.keys import EPOCH, FINISHED, VAL_MIOU_BEST
from search.experiment import STUDY_FILE, TIMELINE, Experiment
from search.results import OBJECTIVE
from search.timeline import read_timeline

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from ray.tune import Result

PLOTS = "plots"
"""The folder of the plots, under the export's output folder."""
LEGEND_TRIALS = 16
"""Most trials the learning-curves plot names in its legend: a longer one runs off the figure."""
OBJECTIVE_NAME = "val mIoU"
"""How the plots name the objective (`OBJECTIVE`, the classes 1-4 mean IoU)."""


@dataclass(frozen=True)
class TrialRun:
    """One run of a trial in `timeline.csv`: from Tune starting it to its end (a trial retried
    or resumed has several). Times in seconds since the search began."""

    trial: str
    start: float
    end: float
    epochs: list[tuple[float, float, float | None]] = field(default_factory=list)
    """(began, ended, score) of each epoch: its result's arrival less its own training time."""


def trial_runs(rows: Sequence[dict[str, Any]]) -> list[TrialRun]:
    """The trial runs of a timeline's rows, in the order they started.

    A run ends at the trial's stop, or else (interrupted, or still running) at its last result.
    """
    open_runs: dict[str, dict[str, Any]] = {}
    runs: list[dict[str, Any]] = []
    for row in rows:
        trial, t = row["trial"], row["t_s"]
        if row["event"] == "start":
            open_runs[trial] = {"trial": trial, "start": t, "end": t, "epochs": []}
            runs.append(open_runs[trial])
        elif trial in open_runs and row["event"] in ("result", "stop"):
            run = open_runs[trial]
            run["end"] = t
            if row["event"] == "stop":
                del open_runs[trial]
            elif row["epoch_time_s"] is not None:
                run["epochs"].append((t - row["epoch_time_s"], t, row["score"]))
    return [TrialRun(**run) for run in runs]


def plot_timeline(runs: Sequence[TrialRun]) -> Axes:
    """One row per trial: its runs as grey spans (Ray's share), its epochs as bars coloured by
    val mIoU on top (the training's share)."""
    order = list(dict.fromkeys(run.trial for run in runs))
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.3 * len(order)))
    scores = [s for run in runs for *_, s in run.epochs if s is not None]
    norm = plt.Normalize(min(scores, default=0.0), max(scores, default=1.0))
    cmap = plt.get_cmap("viridis")
    for run in runs:
        y = order.index(run.trial)
        ax.barh(y, run.end - run.start, left=run.start, height=0.8, color="0.85")
        for began, ended, score in run.epochs:
            colour = cmap(norm(score)) if score is not None else "0.5"
            ax.barh(y, ended - began, left=began, height=0.6, color=colour, edgecolor="white")
    ax.set_yticks(range(len(order)), order, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the search began")
    ax.set_title("Trials over time: epochs (coloured by score) and Ray's overhead (grey)")
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=OBJECTIVE_NAME)
    fig.tight_layout()
    return ax


def open_study(experiment: Experiment, results: Iterable[Result] | None = None) -> optuna.Study:
    """The search's Optuna study, read from `optuna.db` without writing to it (a running search
    may be writing); rebuilt from Tune's trial `results` when the experiment has no study or
    it cannot be read (one line says so)."""
    path = experiment.driver / STUDY_FILE
    if path.is_file():
        try:
            # Read-only (SQLite's URI mode): an export must never change the search's study.
            storage = RDBStorage(
                f"sqlite:///file:{path.resolve()}?mode=ro&uri=true", skip_table_creation=True
            )
            return optuna.load_study(study_name=experiment.name, storage=storage)
        except KeyError:
            print(f"plots: {STUDY_FILE} holds no study {experiment.name}; plotting Tune's results")
        except (OptunaError, RuntimeError) as err:  # a damaged file; a schema of another Optuna
            reason = first_line(err)
            print(f"plots: cannot read {STUDY_FILE} ({reason}); plotting Tune's results")
    return rebuilt_study(results or [], experiment.name)


def rebuilt_study(results: Iterable[Result], name: str) -> optuna.Study:
    """An in-memory study of Tune's trial results, as the searcher would have told them: a
    trial that ended by itself is COMPLETE with its best val mIoU, a stopped one PRUNED, one
    that errored FAIL, each with its per-epoch val mIoU.

    The space's distributions are not in the results; they are taken as the range (or the set)
    of the values the trials drew, on a linear scale, and constants are left out.
    """
    results = list(results)
    distributions = _observed_distributions([r.config or {} for r in results])
    study = optuna.create_study(study_name=name, direction="maximize")
    for result in results:
        last = result.metrics or {}
        history = result.metrics_dataframe
        steps = {}
        if history is not None and {EPOCH, OBJECTIVE} <= set(history):
            scored = history[[EPOCH, OBJECTIVE]].dropna()
            steps = {
                int(e): float(v) for e, v in zip(scored[EPOCH], scored[OBJECTIVE], strict=True)
            }
        state, value = TrialState.PRUNED, None
        if result.error:
            state = TrialState.FAIL
        elif last.get(FINISHED) and last.get(VAL_MIOU_BEST) is not None:
            state, value = TrialState.COMPLETE, float(last[VAL_MIOU_BEST])
        params = {k: v for k, v in (result.config or {}).items() if k in distributions}
        study.add_trial(
            optuna.trial.create_trial(
                state=state,
                value=value,
                params=params,
                distributions={k: distributions[k] for k in params},
                intermediate_values=steps,
            )
        )
    return study


def _observed_distributions(configs: Sequence[dict[str, Any]]) -> dict[str, BaseDistribution]:
    """Per parameter that took more than one scalar value: the range of the numbers it took,
    or the set of its values."""
    seen: dict[str, list[Any]] = {}
    for config in configs:
        for key, value in config.items():
            if isinstance(value, bool | int | float | str):
                seen.setdefault(key, []).append(value)
    distributions: dict[str, BaseDistribution] = {}
    for key, values in seen.items():
        if len(set(values)) < 2:
            continue
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            distributions[key] = IntDistribution(min(values), max(values))
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            distributions[key] = FloatDistribution(min(values), max(values))
        else:
            distributions[key] = CategoricalDistribution(sorted(set(values), key=repr))
    return distributions


def write_search_plots(study: optuna.Study, out: Path) -> list[Path]:
    """Optuna's history, intermediate values and importances plots of `study` as PNGs in `out`;
    each one that cannot be drawn is skipped with one line saying why. Returns those written."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    curves = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    plots: list[tuple[str, str | None, Callable[[], Axes]]] = [
        ("history", None if done else "no trial ran to its end", lambda: _history(study)),
        ("intermediate", None if curves else "no trial reported an epoch", lambda: _curves(study)),
        ("importances", _no_importances(done), lambda: _importances(study)),
    ]
    written = []
    for name, missing, draw in plots:
        path = _draw(draw, out / f"{name}.png", missing)
        if path is not None:
            written.append(path)
    return written


def _history(study: optuna.Study) -> Axes:
    ax = optuna_plots.plot_optimization_history(study, target_name=OBJECTIVE_NAME)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return ax


def _curves(study: optuna.Study) -> Axes:
    ax = optuna_plots.plot_intermediate_values(study)
    ax.set_xlabel("epoch")
    ax.set_ylabel(OBJECTIVE_NAME)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    legend = ax.get_legend()
    if legend is not None and len(legend.get_texts()) > LEGEND_TRIALS:
        legend.remove()
    return ax


def _no_importances(done: Sequence[optuna.trial.FrozenTrial]) -> str | None:
    """Why importances cannot be computed from the finished trials `done`, or None if they can."""
    if len(done) < 2:
        return f"{len(done)} trial(s) ran to their end, importances need 2 or more"
    if len({t.value for t in done}) < 2:
        return "every trial that ran to its end scored the same"
    params = {name for t in done for name in t.params}
    if not any(len({repr(t.params.get(p)) for t in done}) > 1 for p in params):
        return "the trials that ran to their end share every parameter"
    return None


def _importances(study: optuna.Study) -> Axes:
    """Optuna's importances, one bar per parameter, the figure as tall as they need.

    On a small search the evaluator warns once per parameter that some of its values were
    tried fewer than twice: true, and one line says it instead of one per parameter."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        ax = optuna_plots.plot_param_importances(study, target_name=OBJECTIVE_NAME)
    if not ax.patches:  # Optuna found nothing to rank: an empty chart would only mislead
        raise ValueError("no parameter could be ranked")
    rough = [w for w in caught if "less than 2 trials" in str(w.message)]
    if rough:
        print("plots: importances.png: some parameter values were tried once; a rough ranking")
    for other in caught:
        if other not in rough:
            warnings.warn(other.message, other.category, stacklevel=2)
    width, height = ax.figure.get_size_inches()
    ax.figure.set_size_inches(width, max(height, 1.5 + 0.22 * len(ax.get_yticks())))
    return ax


def _draw(draw: Callable[[], Axes], path: Path, missing: str | None) -> Path | None:
    """Draw one plot and save it to `path`, or say in one line why it was skipped."""
    if missing is None:
        # rc_context: Optuna's plots switch matplotlib's global style to ggplot, which would
        # leak into every later figure of this process (search.run --final's report). Its
        # matplotlib plots are flagged experimental since Optuna 2.2; the warning on each call
        # is not something a user of the export can act on, so it is silenced here.
        before = set(plt.get_fignums())
        with plt.rc_context(), warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            try:
                figure = draw().figure
                figure.tight_layout()  # Optuna's leave long parameter names and legends cut off
                return save_figure(figure, path)
            except (ValueError, RuntimeError, ZeroDivisionError) as err:
                missing = first_line(err)
            finally:
                for number in set(plt.get_fignums()) - before:  # a plot that failed half-way
                    plt.close(number)
    print(f"plots: skipped {path.name}: {missing}")
    return None


def write_experiment_plots(
    experiment: Experiment, out: Path, results: Iterable[Result] | None = None
) -> list[Path]:
    """Every plot of the experiment (see the module doc) in `out`; returns those written.

    `results` (Tune's, for the trials) serve only an experiment that kept no study."""
    study = open_study(experiment, results)
    written = write_search_plots(study, out)
    timeline = experiment.driver / TIMELINE
    if not timeline.is_file():
        print(f"plots: skipped timeline.png: the search recorded no {TIMELINE}")
        return written
    runs = trial_runs(read_timeline(timeline))
    missing = None if runs else f"no trial started in {TIMELINE}"
    path = _draw(lambda: plot_timeline(runs), out / "timeline.png", missing)
    return [*written, path] if path is not None else written
