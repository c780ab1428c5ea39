"""Text processors this package adds to LAVIS's registry."""

from blip2_internlm.processors import chinese_text  # noqa: F401  (registers chinese_caption, chinese_question)
