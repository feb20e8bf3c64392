import sys

from galore_mini.cli import main

sys.exit(main())
