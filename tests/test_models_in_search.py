"""The hierarchical U-Net, EfferDeepNet and HMSA inside a real search: the default space offers
them with nothing changed in the search code, and a short search on CPU trains each of them.

The search test's space (`space` below, loaded as `test_models_in_search:space` like
`tests/search_space.py`) samples each architecture's knobs through the same `suggest_knob` the
real spaces use, so string-valued categoricals (HMSA's scale sets) go through Optuna's SQLite
storage and back into a `TrainConfig`; only the numeric knobs are pinned to their cheap ends.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import optuna
import pandas as pd
from search_helpers import search_args

from marsseg.config import preset
from marsseg.data import save_archive
from marsseg.data.synthetic import generate
from marsseg.models import Knob, list_models, model_knobs
from marsseg.models.hmsa import SCALE_SETS
from search.experiment import STUDY_FILE
from search.run import main as search_main
from spaces.common import ARCH, params_to_config, suggest_knob
from spaces.default import space as default_space

NEW_ARCHITECTURES = ("efferdeepnet", "hmsa", "hunet")
CHEAP = {
    "efferdeepnet": {"width": 0.25, "depth": 0.5, "decoder_channels": 32},
    "hmsa": {"base": ("segnet", "efferdeepnet"), "attention_channels": 8},
    "hunet": {"depth": 2, "coarse_channels": 8, "refine_channels": 8},
}
"""Per architecture, knobs narrowed for a CPU test: a number is pinned, a tuple limits choices."""


def cheap(arch: str, knob: Knob) -> Knob:
    """`knob` as the test space samples it: narrowed per `CHEAP`, else its full range."""
    value = CHEAP[arch].get(knob.name)
    if value is None:
        return knob
    if isinstance(value, tuple):
        return replace(knob, default=value[0], choices=value)
    return replace(knob, default=value, low=value, high=value)


def space(trial: optuna.Trial) -> dict[str, Any]:
    """Each new architecture in turn, its knobs sampled from `cheap` ranges.

    The architecture follows the trial number rather than a sampled `arch` so that three trials
    cover all three whatever the sampler draws. The learning rate range leaves out the reference
    recipe's 1e-4, so the search enqueues no reference trial (which would be MarsSeg).
    """
    trial.suggest_float("optim.lr", 1e-3, 1e-2, log=True)
    arch = NEW_ARCHITECTURES[trial.number % len(NEW_ARCHITECTURES)]
    for knob in model_knobs(arch):
        suggest_knob(trial, f"{arch}.{knob.name}", cheap(arch, knob))
    return {ARCH: arch}


def test_default_space_draws_the_new_architectures_from_the_registry():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for arch in NEW_ARCHITECTURES:
        study.enqueue_trial({ARCH: arch})
        trial = study.ask()
        default_space(trial)
        assert trial.distributions[ARCH].choices == tuple(list_models())
        config = params_to_config(trial.params, preset("reference"))  # validates every knob
        assert config.model.name == arch
        assert set(config.model.knobs) == {knob.name for knob in model_knobs(arch)}
        study.tell(trial, 0.0)


def test_a_short_search_trains_each_new_architecture(ray_env, tmp_path):
    s = generate(n_train=64, n_test=2, seed=5, n_aliens=0)
    archive = save_archive(tmp_path / "tiny.npz", s.training_set, s.test_set)
    args = search_args(archive, tmp_path, "new", 3, f"{__name__}:space", epochs=1)
    # A new local Ray even if another cluster runs on this machine (plain init would join it).
    assert search_main([*args, "--address", "local"]) == 0

    board = pd.read_csv(tmp_path / "new" / "leaderboard.csv")
    assert sorted(board["arch"]) == sorted(NEW_ARCHITECTURES)
    assert set(board["status"]) == {"complete"}
    storage = f"sqlite:///{tmp_path / 'new' / STUDY_FILE}"
    (hmsa_trial,) = [
        t
        for t in optuna.load_study(study_name="new", storage=storage).trials
        if "hmsa.scales" in t.params
    ]
    scales = hmsa_trial.params["hmsa.scales"]
    assert scales in SCALE_SETS  # the string came back from SQLite as it went in
    hmsa_row = board.loc[board["arch"] == "hmsa", "knobs"].item()
    assert f"scales={scales}" in hmsa_row.split()
