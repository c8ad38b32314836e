"""Search spaces: Optuna define-by-run functions, one module per space."""
