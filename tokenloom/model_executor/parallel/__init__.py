"""Tensor and pipeline parallelism as module swaps on a loaded model (gpt-fast style): each rank keeps its share of
the weights and wraps the layers whose outputs its peers must see with the collective that joins them."""
from tokenloom.model_executor.parallel.pipeline_parallel import make_pipeline_stage, stage_layers
from tokenloom.model_executor.parallel.tensor_parallel import TensorParallelPlan, parallelize, slice_float_weights

__all__ = ["TensorParallelPlan", "make_pipeline_stage", "parallelize", "slice_float_weights", "stage_layers"]
