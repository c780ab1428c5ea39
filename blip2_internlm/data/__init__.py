"""Data tools: ``python -m blip2_internlm.data.convert`` (Chinese caption corpora -> LAVIS caption JSON)."""
