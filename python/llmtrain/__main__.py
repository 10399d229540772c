import sys

from llmtrain.cli import main

sys.exit(main())
