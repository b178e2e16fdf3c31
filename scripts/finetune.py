#!/usr/bin/env python
"""Private fine-tuning from a YAML config; see lap2_hf/finetune.py and configs/.

accelerate launch scripts/finetune.py --config configs/sst2_eps054.yaml
python scripts/finetune.py --config configs/quickstart.yaml --privacy.mechanism gaussian
"""

import sys

from lap2_hf.finetune import exit_distributed_worker, main
from lap2_hf.run_config import ConfigError

if __name__ == "__main__":
    try:
        main()
    except ConfigError as exc:
        # A configuration that cannot run, found before the first step: one line naming the field and the value.
        # Any other error (one inside training, a bug) keeps its traceback.
        print(f"finetune.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
    exit_distributed_worker()
