import sys

from nested_reft.cli import main

sys.exit(main())
