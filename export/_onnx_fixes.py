"""Fixes for the dynamo ONNX exporter's op library, keyed by aten overload (its custom_translation_table).

Imported only when onnxscript is installed. No `from __future__ import annotations` here: the exporter
reads these functions' annotations to match their signatures, and needs them as real types.

onnxscript 0.7's `repeat_interleave.self_int` puts a symbolic repeat count on the wrong axis of its
Expand (ones * dim instead of ones * (dim + 1)), so a key mask repeated per token (the DiT's image
and context branches) fails at run time for every size except the one it was traced at. Ours repeats
along a new axis after `dim`, then folds it into `dim`.
"""

import torch
from onnxscript import opset18 as op
from onnxscript.onnx_types import TensorType


def repeat_interleave_self_int(
    self: TensorType, repeats: int, dim: int | None = None, output_size: int | None = None,
) -> TensorType:
    """x.repeat_interleave(r, dim): (.., n, ..) -> (.., n * r, ..), each element r times in a row."""
    if dim is None:
        self = op.Reshape(self, op.Constant(value_ints=[-1]))
        dim, rank = 0, 1
    else:
        rank = len(self.shape)
    d = dim % rank
    if isinstance(repeats, int):
        reps = op.Constant(value_ints=[repeats])
    else:  # a symbolic size: an int64 scalar value in the graph
        reps = op.Reshape(repeats, op.Constant(value_ints=[-1]))
    parts = [op.Constant(value_ints=[1] * (d + 1)), reps]
    if rank - d - 1 > 0:
        parts.append(op.Constant(value_ints=[1] * (rank - d - 1)))
    tiled = op.Expand(op.Unsqueeze(self, op.Constant(value_ints=[d + 1])), op.Concat(*parts, axis=0))  # (.., n, r, ..)
    shape = op.Concat(op.Shape(self, start=0, end=d), op.Constant(value_ints=[-1]), op.Shape(self, start=d + 1), axis=0)
    return op.Reshape(tiled, shape)


TABLE = {torch.ops.aten.repeat_interleave.self_int: repeat_interleave_self_int}
