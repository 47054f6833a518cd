import sys

from dynaseg.cli import main

sys.exit(main())
