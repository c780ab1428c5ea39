"""What pyproject.toml cannot say: ship the LAVIS autoload hook (docs/autoload.md).

Everything else about the package is in pyproject.toml.  This adds

* the top-level module ``blip2_internlm_autoload`` (it must be importable without
  ``blip2_internlm``, whose ``__init__`` imports LAVIS), and
* ``blip2_internlm-autoload.pth`` at the root of site-packages, for wheels
  (``pip install .``) and PEP 660 editable installs (``pip install -e .``).  Its name sorts
  after setuptools' ``__editable__.*.pth``, which makes the module importable in
  editable installs.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "blip2_internlm-autoload.pth"
PTH_LINE = "import blip2_internlm_autoload; blip2_internlm_autoload.install()\n"


class build_py_with_autoload_pth(build_py):
    """build_py, plus the .pth written where the wheel's root is packed from."""

    def run(self):
        super().run()
        if self.editable_mode:
            # setuptools' editable wheel is packed from the folder that `install` targets
            # (build_lib is a throwaway folder in that mode)
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        self.mkpath(target)
        pth = os.path.join(target, PTH_NAME)
        with open(pth, "w", encoding="ascii") as file:  # site reads .pth files in the locale's encoding
            file.write(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs


setup(
    py_modules=["blip2_internlm_autoload"],
    cmdclass={"build_py": build_py_with_autoload_pth},
)
