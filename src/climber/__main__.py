import sys

from climber.cli import main

sys.exit(main())
