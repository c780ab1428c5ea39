"""The commands, above the core: each imports the package and nothing in the package imports them.

``python -m blip2_internlm.tools.<name>``: ``caption`` (caption or answer questions on a folder of
images), ``app`` (the web demo), ``export`` (to plain transformers), ``plan`` (memory planner, with
``plan_validation``), ``bench`` and ``bench_internlm2`` (speed against LAVIS), ``measure`` (what the
two measure with), ``demo`` (the whole pipeline on the synthetic shapes), ``gpu_check`` (``make
gpu-check``), ``convert_corpus`` (Chinese caption corpora to LAVIS JSON).  Training and evaluation
stay ``python -m blip2_internlm.train`` / ``.evaluate``, as LAVIS's scripts.
"""
