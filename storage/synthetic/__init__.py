"""Synthetic EM volumes with full ground truth (raw, neurons, synapses, polarity, E/I).

:mod:`~cleftwise.storage.synthetic.geometry` places neurons, synapses and vesicles,
:mod:`~cleftwise.storage.synthetic.render` draws one block of them, and
:mod:`~cleftwise.storage.synthetic.generate` writes whole volumes blockwise.
"""

from cleftwise.storage.synthetic.generate import (
    DATASETS, NEURON_COLUMNS, TABLE_COLUMNS, SyntheticConfig, SyntheticResult, generate_arrays,
    generate_block, generate_volume, iter_blocks, read_synapse_table)

__all__ = ["SyntheticConfig", "SyntheticResult", "TABLE_COLUMNS", "NEURON_COLUMNS", "DATASETS",
           "generate_block", "generate_arrays", "generate_volume", "iter_blocks", "read_synapse_table"]
