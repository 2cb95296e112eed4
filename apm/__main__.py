import sys

from apm.cli import main

sys.exit(main())
