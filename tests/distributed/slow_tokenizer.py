"""`python -m llmstack` with rank 0's tokenizer training made slow: a test driver.

The deepspeed launcher runs this script in every process instead of the llmstack module. It
wraps `llmstack.stages.common.train_tokenizer` (which only rank 0 calls) with a sleep of
$SLOW_TOKENIZER_S seconds, to stand in for a tokenizer trained on a real corpus, then runs the
command line as usual. Nothing in llmstack reads that variable.
"""

import os
import sys
import time

from llmstack import cli
from llmstack.stages import common

_train = common.train_tokenizer


def slow_train_tokenizer(*args, **kwargs):
    time.sleep(float(os.environ["SLOW_TOKENIZER_S"]))
    return _train(*args, **kwargs)


common.train_tokenizer = slow_train_tokenizer

if __name__ == "__main__":
    sys.exit(cli.main())
