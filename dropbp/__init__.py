"""Dropping Backward Propagation (DropBP): a model-agnostic library.

The DropBP layer, handler, sensitivity and allocation code arrive with the DropBP core issue.
"""
