"""One block-by-block calibration engine for the one-shot algorithms (GPTQ, SmoothQuant, ...); no Lightning.

``batches`` (training batches, model inputs, real tokens), ``capture`` (the block stack, block inputs, early stops),
``dataflow`` (which layers share an input, what produced it), ``engine`` (the block-by-block walk and the
statistics hooks), ``progress``, ``threads`` (how many threads each step of a solver runs on) and one driver per
algorithm (``gptq``, ``smoothquant``). Cross-rank reductions go through :mod:`lightning_compress.nn.distributed`.
"""
