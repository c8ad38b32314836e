"""Ray Tune orchestration of marsseg: search configurations, then train one for real and submit.

The modules are flat, in five groups. Only an entry point imports an entry point (`run --final`
runs `export` and `final`), the task stages never touch Tune, and `marsseg` imports none of this.

Entry points, `python -m search.<name>`:
- `run`: the search: Optuna proposes each trial, ASHA stops poor ones, Tune runs them
- `export`: a search's top configurations as YAML, its leaderboard and plots
- `final`: train a chosen configuration (all data, k folds, reranked) and write the submission
- `compare`: configurations against each other at equal budget, over several seeds
- `predict`: a saved model file's submission for a test set

Tune plug-ins:
- `tuner`: the one `Tuner` of a search, assembled from the plug-ins below
- `optuna_searcher`: the searcher, Optuna told which trials ASHA pruned
- `asha`: the scheduler, ASHA whose rungs survive a resumed search
- `trainable`: the trainable, a trial's parameters to `marsseg.train.fit`
- `timeline`: a callback recording each trial's start and results, and Ray's share of the time

Experiment and storage, what every stage reads a search through:
- `experiment`: one search's name, storage, settings, base config and data, as one object
- `storage`: where experiments live (a folder, a mount every node shares, S3)
- `lock`: one driver per experiment
- `results`: trials ranked into the leaderboard (also live, as a callback) and exported configs
- `plots`: what a leaderboard cannot show, written by `export`

Ray start-up and resources, for the search and the task stages alike:
- `capacity`: `start_ray` (connect, the cluster's capacity, each run's CPUs and GPUs)
- `packing`: whether trials sharing a GPU fit in its memory

Ray task stages, training outside Tune for `final` and `compare`:
- `tasks`: each run as a Ray task, its epoch lines on the driver, its failure named
- `runstore`: a stage's checkpoints and results, so a rerun continues where it stopped
"""
