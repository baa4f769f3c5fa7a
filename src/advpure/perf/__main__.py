import sys

from advpure.perf.suite import main

sys.exit(main())
