"""cleftwise: blockwise synapse detection, partner assignment and E/I classification for EM
volumes, from raw EM to a signed connectome.

Layers (an arrow means "may import"; enforced by import-linter in CI)::

    launch → train → postprocess (the synapse stages) → blockwise (the engine) → models | storage

The repository's top-level folders install as ``cleftwise.<layer>``; nothing else is
installed at top level.
"""

__version__ = "0.2.0"
