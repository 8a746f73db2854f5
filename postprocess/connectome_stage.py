"""The ``connectome`` stage: synapse DB → neuron signs → signed edges → exports.

Not blockwise: it reads the DB once in the driver and writes ``<output_dir>/graph`` (formats
from the run config's ``export_formats``). Always runs (cheap), so its files follow the DB.
"""

from __future__ import annotations

import os

from cleftwise.blockwise import crashpoints
from cleftwise.blockwise.stages import Stage
from cleftwise.postprocess.preflight import check_db
from cleftwise.postprocess.connectome import SignConfig

__all__ = ["run_connectome", "STAGE"]


def run_connectome(run, cfg: SignConfig) -> dict:
    """Synapse DB → neuron signs → edges/nodes → exports in ``<output_dir>/graph``."""
    import pandas as pd

    from cleftwise.postprocess.export import export_graph, signs_for
    from cleftwise.storage.db import open_store

    with open_store(run.db_url) as store:
        syn = store.query()
    signs = signs_for(syn, cfg)
    out = os.path.join(run.output_dir, "graph")
    written = export_graph(syn, out, run.export_formats, signs, cfg)
    crashpoints.hit("export_written", "connectome")
    edges = nodes = None
    if "parquet" in written:
        edges = pd.read_parquet(os.path.join(out, "edges.parquet"))
        nodes = pd.read_parquet(os.path.join(out, "nodes.parquet"))
    elif "csv" in written:
        edges = pd.read_csv(os.path.join(out, "edges.csv"))
        nodes = pd.read_csv(os.path.join(out, "nodes.csv"))
    # signed_neurons counts the graph's nodes with a sign (as the demo's summary does);
    # signed_presynaptic also counts signed neurons none of whose synapses became an edge
    signed_nodes = None if nodes is None or "sign" not in nodes else int((nodes["sign"].fillna(0) != 0).sum())
    return {"synapses": int(len(syn)), "signed_neurons": signed_nodes,
            "signed_presynaptic": int(0 if signs is None else len(signs)),
            "edges": None if edges is None else int(len(edges)), "files": written}


def _connectome_preflight(run, cfg) -> None:
    check_db(run.db_url)


#: the ``connectome`` stage: neuron signs (Dale's principle) and the signed graph's exports
STAGE = Stage(
    "connectome",
    config=SignConfig,
    after=("partners", "classify"),
    work_dir=lambda run, cfg: os.path.join(run.output_dir, "graph"),
    run=run_connectome,
    preflight=_connectome_preflight,
    doc="neuron signs and signed edges → <output_dir>/graph (CSV, Parquet, GraphML, npz, neuroglancer)",
)
