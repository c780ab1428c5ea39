"""``python -m blip2_internlm.serve``."""

from blip2_internlm.serve.cli import main

main()
