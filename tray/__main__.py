import sys

from tray.app import main

sys.exit(main())
