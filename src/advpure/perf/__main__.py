import sys

from advpure.perf.run import main

sys.exit(main())
