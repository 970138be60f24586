import sys

from steindiff.cli import main

sys.exit(main())
