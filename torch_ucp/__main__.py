import sys

from torch_ucp.cli.main import main

sys.exit(main())
