import sys

from jobs.cli.app import main

sys.exit(main())
