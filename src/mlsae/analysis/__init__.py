"""The analyses of Lawson et al. (2025), as pure streaming computations over batches.

Nothing here loads a model or a file (except ``query_examples``, which reads a Parquet file
with DuckDB): a driver feeds batches of residual vectors ``x: [tokens, layers, d]`` and
sparse codes ``top_acts, top_idx: [tokens, layers, k]`` and writes the returned Arrow tables.
"""

from .drift import Drift, LayerMeans
from .examples import Heatmap, TopExamples, attach_context, prompt_heatmap, query_examples
from .geometry import DecoderGeometry, decoder_geometry
from .layers import LayerDistribution

__all__ = [
    "DecoderGeometry",
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
