"""Pictures of a search and of a gated model: one colour per gate everywhere (``colours``), the Pareto front and
density plots (``plots``), gate masks over the frames (``masks``). matplotlib and PyAV are imported inside the
functions that draw."""
