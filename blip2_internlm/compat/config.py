"""LAVIS's Config: the run: section checked as soon as the config is built."""

import functools

from blip2_internlm.compat.fixes import fix


@fix
def run_config_validated_at_start():
    """LAVIS never validates run:, so a misspelt key is ignored and a bad value fails after the model is built."""
    from lavis.common.config import Config

    init = Config.__init__

    @functools.wraps(init)
    def init_then_validate(self, args):
        init(self, args)
        # imported here: run_config reads tasks and the feature cache, registered after the compat fixes
        from blip2_internlm.run_config import validate_run_config

        validate_run_config(self.config.get("run"))

    Config.__init__ = init_then_validate
