"""Ray Tune orchestration of marsseg: `run`, `export` and `final` entry points."""
