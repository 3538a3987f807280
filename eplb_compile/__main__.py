import sys

from eplb_compile.cli import main

sys.exit(main())
