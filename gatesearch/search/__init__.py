"""Search engine: one trial (trial.py), the Ray Tune run (engine.py) with its Optuna searcher (searcher.py) and
driver-side MLflow recorder (recorder.py), MLflow records (tracking.py), Pareto fronts (pareto.py)."""
