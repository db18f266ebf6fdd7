"""The papers' findings, re-run by one command (``gatesearch fidelity``): is our implementation faithful to the
papers?

Named ``findings`` (not ``fidelity``) because ``objectives.fidelity`` already means something else: how far one
gated model's output is from its dense twin's (``gatesearch bench``). This package asks whether the *papers'
findings* hold for our implementation; finding 7 uses ``objectives.fidelity`` for the gated models it times.

Each finding is one module (``keep_all``, ``gate_fronts``, ``block_size``, ``clip_length``, ``dstep_target``,
``vared2_space``, ``wallclock``) registered in ``FINDINGS`` (see ``registry`` for the contract); ``runner`` runs
them on the shared networks of a ``Profile`` and ``report`` writes the Markdown, JSON, plots and MLflow run.
"""

from gatesearch.registry import import_submodules

from .profiles import PROFILES, Profile, get_profile
from .registry import FINDINGS, Claim, Finding, register_finding
from .runner import FidelityOptions, Report, run_fidelity

import_submodules(__name__, __path__)

__all__ = ["FINDINGS", "PROFILES", "Claim", "FidelityOptions", "Finding", "Profile", "Report", "get_profile",
           "register_finding", "run_fidelity"]
