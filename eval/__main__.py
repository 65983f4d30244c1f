"""`python -m eval` = `llmstack-eval`, so launchers can start it: `deepspeed --module eval`,
`torchrun -m eval`, `accelerate launch -m eval`."""

import sys

from eval.cli import main

sys.exit(main())
