"""`python -m llmstack` (and so `deepspeed --module llmstack`, `torchrun -m llmstack`)."""

import sys

from llmstack.cli import main

sys.exit(main())
