import sys

from advpure.cli import main

sys.exit(main())
