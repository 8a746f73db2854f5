#!/usr/bin/env python
"""Open a run's outputs in neuroglancer: ``cleftwise view OUTPUT_DIR [--serve [PORT]]``.

Writes ``<OUTPUT_DIR>/neuroglancer_state.json`` (atomically) and prints it: a neuroglancer state
with the layers raw (image), predictions (image, channels on the local ``c^`` axis), labels
(synapse instances, segmentation), neurons (segmentation) and synapses (the precomputed
annotations of the connectome export, ``graph/annotations``, linked to the neurons layer by
their pre_neuron / post_neuron relationships: select a neuron to see its synapses). Layers
whose files do not exist (stages not run) are left out. Inputs are read from
``run_summary.json`` (the run's config): ``--raw`` / ``--neurons`` override them.

Sources are URLs of an HTTP server: ``http://127.0.0.1:PORT/`` is the output folder, and
``/_inputs/raw/`` / ``/_inputs/neurons/`` the raw and neuron volumes when they lie outside it
(remote volumes, gs:// or s3://, are given to neuroglancer as they are). ``--serve`` runs that
server on 127.0.0.1 (with CORS headers, so neuroglancer-demo.appspot.com can read it) until
Ctrl-C and prints the link that opens the state. Without ``--serve`` the state names
``--port`` (default 9000): serve it later with ``cleftwise view DIR --serve 9000``.

Example:
    cleftwise view cleftwise_out --serve 9000
    # open https://neuroglancer-demo.appspot.com/#!http://127.0.0.1:9000/neuroglancer_state.json
"""

from __future__ import annotations

import argparse
import logging
import http.server
import json
import os
import posixpath
import sys
import urllib.parse
from typing import Optional

import numpy as np

from cleftwise.launch._common import new_parser, setup_logging
from cleftwise.storage.atomic import atomic_path
from cleftwise.storage.errors import StorageError

__all__ = ["build_state", "layer_paths", "make_server", "STATE_FILE", "VIEWER"]

STATE_FILE = "neuroglancer_state.json"
VIEWER = "https://neuroglancer-demo.appspot.com/"
_INPUTS = "_inputs"
_NG_PREFIX = {"zarr": "zarr://", "zarr3": "zarr3://", "n5": "n5://", "precomputed": "precomputed://"}
_REMOTE = ("gs://", "s3://", "http://", "https://")
_ANNOTATION_SHADER = """\
void main() {
  float s = float(prop_ei_sign());
  setColor(s > 0.0 ? vec3(0.2, 0.9, 0.2) : (s < 0.0 ? vec3(1.0, 0.2, 1.0) : vec3(1.0, 0.9, 0.2)));
}
"""


def _run_config(output_dir: str) -> dict:
    path = os.path.join(output_dir, "run_summary.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return (json.load(f) or {}).get("config") or {}
    except (OSError, ValueError) as e:
        raise StorageError(f"{path} cannot be read: {e}") from e


def layer_paths(output_dir: str, raw: Optional[str] = None, neurons: Optional[str] = None) -> dict:
    """{layer: volume URL or local path} of a run's outputs that exist (see the module doc)."""
    out = os.path.abspath(output_dir)
    if not os.path.isdir(out):
        raise StorageError(f"output folder {output_dir} does not exist")
    conf = _run_config(out)
    raw = raw or conf.get("raw")
    neurons = neurons or conf.get("neurons")
    if not raw:
        raise StorageError(f"{out}: no run_summary.json naming the raw volume; give --raw")
    paths = {"raw": raw,
             "predictions": os.path.join(out, "predictions.zarr", "pred"),
             "labels": os.path.join(out, "synapses.zarr", "labels"),
             "neurons": neurons,
             "synapses": os.path.join(out, "graph", "annotations")}
    found = {}
    for name, p in paths.items():
        if not p:
            continue
        if p.startswith(_REMOTE) or os.path.exists(_local(p)):
            found[name] = p
        elif name == "raw":
            raise StorageError(f"raw volume {p} does not exist")
    return found


def _local(url: str) -> str:
    for prefix in list(_NG_PREFIX.values()) + ["file://"]:
        if url.startswith(prefix):
            url = url[len(prefix):]
    return os.path.abspath(url)


def _transform(vol) -> dict:
    """Source voxel axes (c?, z, y, x) → world nm, offset included (zarr carries neither for
    neuroglancer: the voxel size and offset live in cleftwise's own attributes)."""
    dims, matrix = {}, []
    rank = len(vol.shape)
    if rank == 4:
        dims["c^"] = [1, ""]
        matrix.append([1, 0, 0, 0, 0])
    for i, (a, v, o) in enumerate(zip("zyx", vol.voxel_size, vol.offset)):
        dims[a] = [float(v) * 1e-9, "m"]
        row = [0] * (rank + 1)
        row[rank - 3 + i] = 1
        row[rank] = int(o) // int(v)
        matrix.append(row)
    return {"outputDimensions": dims, "matrix": matrix}


def _source(name: str, path: str, out: str, base_url: str) -> tuple:
    """(neuroglancer source, the opened volume or None for annotations) of layer ``name``."""
    if name == "synapses":
        rel = os.path.relpath(path, out).replace(os.sep, "/")
        return "precomputed://" + base_url + rel, None
    from cleftwise.storage.volume import open_volume

    vol = open_volume(path)
    prefix = _NG_PREFIX[vol.format]
    if path.startswith(_REMOTE):
        url = path
        for p in _NG_PREFIX.values():
            url = url[len(p):] if url.startswith(p) else url
    else:
        local = _local(path)
        if local == out or local.startswith(out + os.sep):
            url = base_url + os.path.relpath(local, out).replace(os.sep, "/")
        else:
            url = f"{base_url}{_INPUTS}/{name}"
    if vol.format in ("zarr", "zarr3"):
        return {"url": prefix + url, "transform": _transform(vol)}, vol
    return prefix + url, vol


def build_state(output_dir: str, base_url: str, raw: Optional[str] = None,
                neurons: Optional[str] = None) -> tuple[dict, dict]:
    """(neuroglancer state, mounts {URL path prefix: local folder}) for a run's outputs;
    ``base_url`` is where the output folder is served (``http://127.0.0.1:PORT/``)."""
    out = os.path.abspath(output_dir)
    base_url = base_url.rstrip("/") + "/"
    paths = layer_paths(out, raw, neurons)
    mounts = {"": out}
    layers, raw_vol = [], None
    kinds = {"raw": "image", "predictions": "image", "labels": "segmentation", "neurons": "segmentation"}
    for name, path in paths.items():
        src, vol = _source(name, path, out, base_url)
        if vol is not None and not path.startswith(_REMOTE):
            local = _local(path)
            if not (local == out or local.startswith(out + os.sep)):
                mounts[f"{_INPUTS}/{name}"] = local
        if name == "raw":
            raw_vol = vol
        if name == "synapses":
            layer = {"type": "annotation", "name": name, "source": src, "shader": _ANNOTATION_SHADER}
            if "neurons" in paths:
                layer["linkedSegmentationLayer"] = {"pre_neuron": "neurons", "post_neuron": "neurons"}
                layer["filterBySegmentation"] = ["pre_neuron", "post_neuron"]
        else:
            layer = {"type": kinds[name], "name": name, "source": src}
            if name == "predictions":
                top = 1 if vol.dtype.kind == "f" else int(np.iinfo(vol.dtype).max)
                layer["opacity"] = 0.5
                layer["shader"] = (f"#uicontrol invlerp normalized(range=[0, {top}])\n"
                                   "void main() { emitRGB(vec3(normalized(), 0.0, 0.0)); }\n")
        layers.append(layer)
    center = [float(b + s / 2.0) / float(v) for b, s, v in
              zip(raw_vol.roi.begin, raw_vol.roi.shape, raw_vol.voxel_size)]
    state = {
        "dimensions": {a: [float(v) * 1e-9, "m"] for a, v in zip("zyx", raw_vol.voxel_size)},
        "position": center,
        "crossSectionScale": 1,
        "projectionScale": float(max(raw_vol.spatial_shape)) * 2,
        "layers": layers,
        "selectedLayer": {"layer": "synapses" if "synapses" in paths else "raw", "visible": True},
        "layout": "4panel",
    }
    return state, mounts


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files from the mounts, with CORS headers (neuroglancer runs on another origin)."""

    mounts: dict = {}

    def translate_path(self, path: str) -> str:
        path = urllib.parse.unquote(urllib.parse.urlsplit(path).path)
        parts = [p for p in posixpath.normpath(path).split("/") if p and p not in (".", "..")]
        for prefix in sorted(self.mounts, key=len, reverse=True):
            pre = [p for p in prefix.split("/") if p]
            if parts[:len(pre)] == pre:
                return os.path.join(self.mounts[prefix], *parts[len(pre):])
        return os.path.join(self.mounts[""], *parts)

    def end_headers(self):
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "*")
        self.send_header("Access-Control-Allow-Private-Network", "true")
        super().end_headers()

    def do_OPTIONS(self):
        self.send_response(204)
        self.end_headers()

    def list_directory(self, path):
        self.send_error(404, "no directory listings")
        return None

    def log_message(self, fmt, *args):  # quiet: one line per request is noise here
        pass


def make_server(mounts: dict, port: int = 0, host: str = "127.0.0.1") -> http.server.ThreadingHTTPServer:
    """An HTTP server (not yet serving) for ``mounts`` {URL path prefix: folder} on
    ``host:port`` (0: a free port; read it from ``server.server_address``)."""
    handler = type("Handler", (_Handler,), {"mounts": dict(mounts)})
    try:
        return http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise StorageError(f"cannot serve on {host}:{port}: {e.strerror or e}") from e


def write_state(output_dir: str, state: dict) -> str:
    path = os.path.join(os.path.abspath(output_dir), STATE_FILE)
    with atomic_path(path, "neuroglancer state") as tmp:
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
    return path


def main(argv=None) -> int:
    p = new_parser(description=__doc__.splitlines()[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter,
                   epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("output_dir", help="the run's output folder (output_dir of its config)")
    p.add_argument("--serve", nargs="?", type=int, const=9000, default=None, metavar="PORT",
                   help="serve the folder on 127.0.0.1:PORT (default 9000; 0 = any free port) until Ctrl-C")
    p.add_argument("--port", type=int, default=9000, help="port named in the state without --serve")
    p.add_argument("--raw", help="raw volume URL (default: from run_summary.json)")
    p.add_argument("--neurons", help="neuron segmentation URL (default: from run_summary.json)")
    a = p.parse_args(argv)
    setup_logging(a, default=logging.WARNING)
    server = None
    try:
        port = a.port
        if a.serve is not None:
            server = make_server({"": os.path.abspath(a.output_dir)}, a.serve)
            port = server.server_address[1]
        state, mounts = build_state(a.output_dir, f"http://127.0.0.1:{port}/", a.raw, a.neurons)
        path = write_state(a.output_dir, state)
    except StorageError as e:
        if server is not None:
            server.server_close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(state, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    link = f"{VIEWER}#!http://127.0.0.1:{port}/{STATE_FILE}"
    if server is None:
        print(f"serve it with: cleftwise view {a.output_dir} --serve {port}, then open {link}", file=sys.stderr)
        return 0
    server.RequestHandlerClass.mounts = mounts
    print(f"serving {os.path.abspath(a.output_dir)} on http://127.0.0.1:{port}/ (Ctrl-C stops)\nopen {link}",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
