"""One block-by-block calibration engine for the one-shot algorithms (GPTQ, SmoothQuant, ...); no Lightning.

``batches`` (training batches, model inputs, real tokens), ``capture`` (the block stack, block inputs, early stops),
``dataflow`` (which layers share an input, what produced it), ``progress``, ``engine`` (the block-by-block walk) and
one driver per algorithm (``gptq``, ``smoothquant``).
"""
