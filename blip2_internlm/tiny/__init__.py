"""The generated test assets (``tiny`` in a config), built from the models they are for.

Importing this package (``blip2_internlm`` does) registers each with
:mod:`blip2_internlm.assets` under the config value that names it; the resolvers there reach
them by that name only, so nothing below the models imports their builders.
"""

from blip2_internlm import assets
from blip2_internlm.tiny import bert, llm, vit

assets.register_generated(assets.TEXT_MODEL, "tiny", bert.TINY_BERT)
assets.register_generated(assets.TEXT_MODEL, "tiny-zh", bert.TINY_BERT_ZH)
assets.register_generated(assets.VIT_WEIGHTS, "tiny", vit.TINY_VIT_WEIGHTS)
assets.register_generated(assets.LLM, "tiny", llm.TINY_INTERNLM2)
assets.register_generated(assets.LLM, "tiny-opt", llm.TINY_OPT)
