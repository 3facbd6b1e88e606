"""The analyses of Lawson et al. (2025), as pure streaming computations over batches.

Nothing here loads a model or a file (except ``query_examples``, which reads a Parquet file
with DuckDB): a driver feeds batches of residual vectors ``x: [tokens, layers, d]`` and
sparse codes ``top_acts, top_idx: [tokens, layers, k]`` and writes the returned Arrow tables.

A driver's loop, in outline::

    means = LayerMeans(layers, d)                   # pass 1 (or a first slice of the data)
    for b in batches: means.update(b.x)
    drift = Drift(layers, layer_means=means.result())
    dist = LayerDistribution(n_latents, layers)     # shared_dictionary=False for a per-layer bank
    top = TopExamples(n_latents, layers, n=10)
    for b in batches:                               # pass 2
        drift.update(b.x); dist.update(b.top_acts, b.top_idx)
        top.update(b.top_acts, b.top_idx, b.token_ids, b.window, b.position)
    tables = {"drift": drift.result(), **dist.result(), "examples": top.result()}
    geo = decoder_geometry(W_dec, dist.result()["latents"].column("mean_layer"))
"""

from .drift import Drift, LayerMeans
from .examples import Heatmap, TopExamples, attach_context, prompt_heatmap, query_examples
from .geometry import DecoderGeometry, decoder_geometry
from .histogram import ActivationHistogram
from .joint import (
    FlowItem, block_norm_table, block_norms, decoder_cosines, flow_by_bucket, flow_items, information_flow,
    joint_latents, layers_holding, most_active,
)
from .layers import LayerDistribution

__all__ = [
    "ActivationHistogram",
    "DecoderGeometry",
    "FlowItem",
    "block_norm_table",
    "block_norms",
    "decoder_cosines",
    "flow_by_bucket",
    "flow_items",
    "information_flow",
    "joint_latents",
    "layers_holding",
    "most_active",
    "Drift",
    "Heatmap",
    "LayerDistribution",
    "LayerMeans",
    "TopExamples",
    "attach_context",
    "decoder_geometry",
    "prompt_heatmap",
    "query_examples",
]
