import sys

from tako_stream.cli import main

sys.exit(main())
