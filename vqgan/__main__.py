import sys

from vqgan.cli import main

sys.exit(main())
