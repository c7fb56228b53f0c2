"""Datasets, tokenizers and the grain input pipeline.

The contract between the parts: a dataset split is a random-access source (``len`` and ``__getitem__``) of
examples ``{'inputs': str|bytes, 'targets': str|bytes}``; the pipeline turns it into batches whose keys are
exactly the keyword arguments of ``Transformer.__call__`` (``inputs``, ``targets``, ``inputs_positions``,
``inputs_segmentation``, ``targets_positions``, ``targets_segmentation``). Token id 0 is padding, 1 is EOS.
"""
