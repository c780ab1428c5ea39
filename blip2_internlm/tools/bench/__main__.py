"""``python -m blip2_internlm.tools.bench``."""

import sys

from blip2_internlm.tools.bench import main

sys.exit(main())
