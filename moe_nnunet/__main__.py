import sys

from moe_nnunet.cli import main

sys.exit(main())
