import sys

from nvfp4_worker.main import main

sys.exit(main())
