"""Search engine: one trial (trial.py), Ray Tune + Optuna (engine.py), MLflow (tracking.py), Pareto fronts."""
