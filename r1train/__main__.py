import sys

from r1train.cli import main

sys.exit(main())
