"""gatesearch: search the best gated (dynamic) video CNN for a target device.

Importing the package stays cheap: Ray, MLflow and Optuna are imported inside
the functions that need them.
"""

__version__ = "0.1.0"
